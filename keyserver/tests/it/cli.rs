//! The command line: `keygen`, exit codes, env vars, the config file, shutdown.

use crate::common::*;
use nes_proto::{PrivateKey, PublicKey};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nes-keyserver")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 1 with one error line on stderr that contains each of `words` (log lines
/// written before it, such as warnings, may precede it).
fn assert_user_error(out: &Output, words: &[&str]) {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit 1: {text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("nes-keyserver: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {text}");
    assert_eq!(
        text.lines().last(),
        Some(errors[0]),
        "the error line is last: {text}"
    );
    for word in words {
        assert!(errors[0].contains(word), "{word:?} in {text}");
    }
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn keygen_writes_both_files_and_prints_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("server.key");
    let key_s = key.to_str().unwrap();
    let out = run(&["keygen", "--out", key_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let private = PrivateKey::read(&key).expect("PKCS#1 PEM");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public_pem = std::fs::read_to_string(dir.path().join("server.key.pub")).unwrap();
    assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert_eq!(
        &PublicKey::from_pem(&public_pem).unwrap(),
        private.public_key()
    );
    assert_eq!(
        String::from_utf8(out.stdout.clone()).unwrap(),
        public_pem,
        "stdout is the public PEM, nothing else"
    );
    assert_eq!(private.bits(), 2048);

    // No overwrite without --force, and nothing changes.
    let out = run(&["keygen", "--out", key_s]);
    assert_user_error(&out, &["exists", "--force"]);
    assert_eq!(
        &PrivateKey::read(&key).unwrap().public_key().to_pem(),
        &public_pem
    );
    // An existing .pub alone also stops it.
    let other = dir.path().join("other.key");
    std::fs::write(dir.path().join("other.key.pub"), "keep me").unwrap();
    assert_user_error(
        &run(&["keygen", "--out", other.to_str().unwrap()]),
        &["other.key.pub", "--force"],
    );
    assert!(!other.exists());

    let out = run(&["keygen", "--out", key_s, "--force"]);
    assert!(out.status.success());
    let replaced = PrivateKey::read(&key).unwrap();
    assert_ne!(replaced.public_key(), private.public_key());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The environment names the file too.
    let env_key = dir.path().join("env.key");
    let out = Command::new(BIN)
        .arg("keygen")
        .env("NES_KEYSERVER_OUT", &env_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env_key.exists());
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["keygen"][..],
        &["keygen", "--out", "x", "--bits", "1024"],
        &["serve", "--no-such-flag"],
        &["serve", "--dev", "--mail-dir", "x"],
        &["serve", "--register-rate", "many"],
        &["serve", "--pending-ttl", "soon"],
        &["frobnicate"],
        &[],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("NES_KEYSERVER_OUT")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn serve_refuses_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ks.db").display());
    let key = server_key_file();
    let key = key.to_str().unwrap();
    let base = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        &db,
        "--public-url",
        "http://127.0.0.1:1",
    ];
    let with = |extra: &[&str]| -> Output {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };
    // No mail transport.
    assert_user_error(&with(&["--key", key]), &["--smtp", "--mail-dir", "--dev"]);
    // No key, a missing key, a file that is not a key.
    assert_user_error(&with(&["--dev"]), &["--key", "keygen"]);
    assert_user_error(
        &with(&["--dev", "--key", "/nonexistent/k"]),
        &["/nonexistent/k", "keygen"],
    );
    let not_key = dir.path().join("not.key");
    std::fs::write(&not_key, "hello").unwrap();
    assert_user_error(
        &with(&["--dev", "--key", not_key.to_str().unwrap()]),
        &["not.key"],
    );
    // Bad URLs.
    assert_user_error(
        &with(&["--key", key, "--smtp", "http://mail"]),
        &["smtp://"],
    );
    let out = run(&["serve", "--dev", "--key", key, "--database", "mysql://x"]);
    assert_user_error(&out, &["sqlite://", "postgres://"]);
    let out = run(&[
        "serve",
        "--dev",
        "--key",
        key,
        "--database",
        &db,
        "--public-url",
        "keys.example.org",
    ]);
    assert_user_error(&out, &["--public-url"]);
    // A database that cannot be reached.
    let out = run(&[
        "serve",
        "--dev",
        "--key",
        key,
        "--database",
        "postgres://postgres@127.0.0.1:1/none",
    ]);
    assert_user_error(&out, &["database"]);
    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&[
        "serve",
        "--dev",
        "--key",
        key,
        "--database",
        &db,
        "--listen",
        &addr,
    ]);
    assert_user_error(&out, &["cannot listen", &addr]);
    // A config file with a typo.
    let config = dir.path().join("ks.toml");
    std::fs::write(&config, "lissen = \"127.0.0.1:1\"\n").unwrap();
    assert_user_error(
        &run(&["serve", "--config", config.to_str().unwrap()]),
        &["lissen"],
    );
}

/// Starts `serve` with `args` and `env`, waits for /healthz on `port`.
async fn start_raw(
    args: &[&str],
    env: &[(&str, String)],
    port: u16,
    log: &std::path::Path,
) -> std::process::Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = spawn_logged(cmd, log);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "exited {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            return child;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn register_and_find_mail(port: u16, mail_dir: &std::path::Path, name: &str) -> Links {
    let (m, s) = alice_keys();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/users"))
        .body(registration(name, "someone@example.org", &m, &s))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    mail_links(mail_dir, name).expect("mail")
}

#[tokio::test]
async fn every_setting_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mail = dir.path().join("mail");
    let env = vec![
        ("NES_KEYSERVER_LISTEN", format!("127.0.0.1:{port}")),
        (
            "NES_KEYSERVER_DATABASE",
            format!("sqlite://{}", dir.path().join("db/ks.db").display()),
        ),
        (
            "NES_KEYSERVER_PRIVATE_KEY",
            server_key_file().display().to_string(),
        ),
        (
            "NES_KEYSERVER_PUBLIC_URL",
            "https://keys.example.org/".to_string(),
        ),
        ("NES_KEYSERVER_MAIL_DIR", mail.display().to_string()),
        ("NES_KEYSERVER_REGISTER_RATE", "0".to_string()),
        ("NES_KEYSERVER_LOOKUP_RATE", "0".to_string()),
        ("NES_KEYSERVER_LOG_FORMAT", "json".to_string()),
    ];
    let log = dir.path().join("log");
    let mut child = start_raw(&[], &env, port, &log).await;
    let links = register_and_find_mail(port, &mail, "xavier").await;
    assert!(
        links
            .activate
            .starts_with("https://keys.example.org/users/xavier/"),
        "{links:?}"
    );
    assert!(
        dir.path().join("db/ks.db").exists(),
        "the SQLite file (and its directory) were created"
    );
    // JSON logs: every line is an object.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() >= 2);
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(v["level"].is_string());
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn the_config_file_works_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mail = dir.path().join("mail");
    let config = dir.path().join("keyserver.toml");
    std::fs::write(
        &config,
        format!(
            "# nes-keyserver\nlisten = \"127.0.0.1:1\"\ndatabase = \"sqlite://{}\"\nkey = \"{}\"\n\
             public-url = \"http://from-file.example.org\"\nmail_dir = \"{}\"\nregister-rate = 0\n\
             lookup-rate = 0\npending-ttl = \"2h\"\n",
            dir.path().join("ks.db").display(),
            server_key_file().display(),
            mail.display()
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let log = dir.path().join("log");
    // The file says port 1; the flag wins. The env var beats the file for public-url.
    let env = vec![(
        "NES_KEYSERVER_PUBLIC_URL",
        "http://from-env.example.org".to_string(),
    )];
    let mut child = start_raw(
        &["--config", config.to_str().unwrap(), "--listen", &listen],
        &env,
        port,
        &log,
    )
    .await;
    let links = register_and_find_mail(port, &mail, "yvonne").await;
    assert!(
        links
            .activate
            .starts_with("http://from-env.example.org/users/yvonne/"),
        "{links:?}"
    );
    let raw: String = files_under(&mail)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        raw.contains("within 2 hours"),
        "pending-ttl from the file: {raw}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn sigterm_and_sigint_stop_the_server_cleanly() {
    for signal in ["TERM", "INT"] {
        let mut server = Server::start(Backend::Sqlite).await;
        server.register_and_activate("zoe").await;
        let status = server.signal_and_wait(signal, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "SIG{signal}: {}", server.log_text());
        let log = server.log_text();
        assert!(
            log.contains(&format!("SIG{signal}: shutting down")) && log.contains("stopped"),
            "{log}"
        );
    }
}
