//! Activation mail: over real SMTP to a local server (Debian's python3-aiosmtpd, started
//! by the test), as `.eml` files, and as log lines with `--dev`.

use crate::common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

crate::on_both_backends!(activation_mail_over_smtp, activation_mail_in_mail_dir);

/// A local SMTP server writing what it receives into a Maildir. Killed on drop.
pub(crate) struct SmtpServer {
    child: Child,
    pub(crate) port: u16,
    maildir: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpServer {
    pub(crate) fn start() -> Self {
        let python = "/usr/bin/python3";
        let have = Command::new(python)
            .args(["-c", "import aiosmtpd"])
            .status();
        assert!(
            have.is_ok_and(|s| s.success()),
            "the SMTP tests need Debian's aiosmtpd: apt-get install -y python3-aiosmtpd"
        );
        for _ in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let maildir = dir.path().join("Maildir");
            let port = free_port();
            let mut child = Command::new(python)
                .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(&maildir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start aiosmtpd");
            let deadline = Instant::now() + READY_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child,
                        port,
                        maildir,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("aiosmtpd did not start");
    }

    pub(crate) fn mails(&self) -> Vec<String> {
        files_under(&self.maildir)
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks the headers the rest of NES relies on.
fn assert_contract_headers(raw: &str, name: &str) {
    let headers = &raw[..raw
        .find("\r\n\r\n")
        .or_else(|| raw.find("\n\n"))
        .expect("header end")];
    let has = |h: &str| {
        headers
            .lines()
            .any(|l| l.trim_end().eq_ignore_ascii_case(h))
    };
    assert!(has("Content-Transfer-Encoding: 7bit"), "7bit: {headers}");
    assert!(
        has("Content-Type: text/plain; charset=utf-8"),
        "plain text: {headers}"
    );
    assert!(has(&format!("To: {name}@example.org")), "To: {headers}");
    assert!(
        has(&format!("Subject: Activate the NES username {name}")),
        "Subject: {headers}"
    );
    assert!(
        !raw.contains("=\r\n") && !raw.contains("=\n"),
        "no quoted-printable soft breaks"
    );
}

async fn activation_mail_over_smtp(backend: Backend) {
    let smtp = SmtpServer::start();
    let mut options = Options::new(backend);
    options.mail = Mail::Smtp(format!("smtp://127.0.0.1:{}", smtp.port));
    let server = Server::start_with(options).await;
    server.register("olivia").await;

    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "one mail received by the SMTP server");
    let raw = &mails[0];
    assert_contract_headers(raw, "olivia");
    let links = parse_links(raw).expect("Activate, Delete and API lines");
    assert!(
        links
            .activate
            .starts_with(&format!("{}/users/olivia/", server.base)),
        "{links:?}"
    );
    assert!(
        links
            .delete
            .starts_with(&format!("{}/users/olivia/", server.base)),
        "{links:?}"
    );
    assert_eq!(links.api, format!("{}/users/olivia", server.base));

    // Follow the link from the received mail, then check the answer as clients do.
    assert_eq!(server.follow(&links.activate).await.status(), 200);
    let (_, answer) = server.lookup_verified("olivia").await;
    assert_eq!(answer.public_key_sign, alice_keys().1);
    assert_eq!(
        server
            .metric("nes_keyserver_mails_total{result=\"sent\"}")
            .await,
        1.0
    );
    assert_eq!(server.confirm_delete(&links.delete).await.status(), 200);
    assert_error(server.get("/users/olivia").await, 404, "not_found").await;
}

async fn activation_mail_in_mail_dir(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("peggy").await;
    let files = files_under(&server.mail_dir);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].extension().and_then(|e| e.to_str()), Some("eml"));
    let raw = std::fs::read_to_string(&files[0]).unwrap();
    assert_contract_headers(&raw, "peggy");
    assert!(
        raw.contains("From: \"NES key server\" <noreply@127.0.0.1>")
            || raw.contains("From: \"NES key server\" <noreply@localhost>"),
        "{raw}"
    );
    let links = parse_links(&raw).unwrap();
    // The links are whole lines: each fits in one line of the raw file.
    for link in [&links.activate, &links.delete, &links.api] {
        assert!(raw.contains(&format!("{link}\r\n")), "{link} unwrapped");
    }
    assert_eq!(server.follow(&links.activate).await.status(), 200);
    server.lookup_verified("peggy").await;
}

#[tokio::test]
async fn failed_mail_is_503_and_keeps_nothing() {
    // Nothing listens on this port.
    let dead = free_port();
    let mut options = Options::new(Backend::Sqlite);
    options.mail = Mail::Smtp(format!("smtp://127.0.0.1:{dead}"));
    let server = Server::start_with(options).await;
    let (m, s) = alice_keys();
    for _ in 0..2 {
        let r = server
            .post_users(registration("quentin", "quentin@example.org", &m, &s))
            .await;
        // Not 409 the second time: the failed registration was dropped.
        assert_error(r, 503, "mail_failed").await;
    }
    assert_eq!(
        server
            .metric("nes_keyserver_mails_total{result=\"failed\"}")
            .await,
        2.0
    );
    assert_eq!(
        server.metric("nes_keyserver_registrations_total").await,
        0.0
    );
}

#[tokio::test]
async fn dev_mode_logs_the_links() {
    let mut options = Options::new(Backend::Sqlite);
    options.mail = Mail::Dev;
    let server = Server::start_with(options).await;
    server.register("rupert").await;
    let log = server.log_text();
    // Each link ends its log line: "... Activate: <url>".
    let link = |marker: &str| {
        log.lines()
            .find_map(|l| l.split_once(marker).map(|(_, url)| url.trim().to_string()))
            .unwrap_or_else(|| panic!("no {marker:?} in the log:\n{log}"))
    };
    let (activate, delete) = (link("Activate: "), link("Delete: "));
    assert!(
        activate.starts_with(&format!("{}/users/rupert/", server.base)),
        "{log}"
    );
    assert!(
        delete.starts_with(&format!("{}/users/rupert/", server.base)),
        "{log}"
    );
    assert_eq!(server.follow(&activate).await.status(), 200);
    server.lookup_verified("rupert").await;
    assert!(
        files_under(&server.mail_dir).is_empty(),
        "--dev writes no mail"
    );
}
