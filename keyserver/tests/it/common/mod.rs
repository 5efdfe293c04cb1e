//! Test harness: runs the real `nes-keyserver` binary on a free loopback port against
//! a fresh SQLite file or a fresh PostgreSQL database, and talks HTTP to it as a client
//! would.

#![allow(dead_code)]

use nes_proto::{PublicKey, Username};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_nes-keyserver");
/// PostgreSQL of the machine (trust auth).
pub const PG_HOST: &str = "127.0.0.1";
/// How long a server may take to come up on a loaded machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs each named `async fn NAME(backend: Backend)` of the calling module once against
/// SQLite and once against PostgreSQL: `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Which database a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://<tempdir>/ks.db`.
    Sqlite,
    /// A fresh `nes_ks_*` database on 127.0.0.1:5432, dropped afterwards.
    Postgres,
}

/// The legacy test vectors (shared with the original Go code).
pub fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/tests/vectors/legacy-v1")
}

/// The key the test servers sign with (the vectors' test provider key).
pub fn server_key_file() -> PathBuf {
    vectors().join("provider-private-key.TEST-ONLY.pem")
}

/// Its public half, as clients hold it.
pub fn server_public() -> PublicKey {
    PublicKey::read(&vectors().join("provider-public-key.pem")).expect("provider public key")
}

/// A vector key file's text, e.g. `alice-rsa-sign.pub`.
pub fn vector_key(name: &str) -> String {
    std::fs::read_to_string(vectors().join("keys").join(name)).expect("vector key")
}

/// A fixture of this test suite (`tests/it/data/NAME`).
pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/it/data")
            .join(name),
    )
    .expect("fixture")
}

/// Alice's two public keys from the vectors: (message, sign).
pub fn alice_keys() -> (String, String) {
    (
        vector_key("alice-rsa-message.pub"),
        vector_key("alice-rsa-sign.pub"),
    )
}

/// A registration body as JSON.
pub fn registration(username: &str, email: &str, message: &str, sign: &str) -> String {
    serde_json::json!({
        "username": username, "email": email, "public_key_message": message, "public_key_sign": sign
    })
    .to_string()
}

/// A unique suffix for names made by this process.
pub fn unique() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}_{}_{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("addr")
        .port()
}

/// A database for one test: a SQLite file or a fresh PostgreSQL database.
pub struct Database {
    /// The URL to give `--database`.
    pub url: String,
    pg_name: Option<String>,
}

impl Database {
    /// Creates it (`dir` holds the SQLite file).
    pub fn create(backend: Backend, dir: &Path) -> Self {
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.join("ks.db").display()),
                pg_name: None,
            },
            Backend::Postgres => {
                let name = format!("nes_ks_{}", unique());
                psql(&format!("CREATE DATABASE {name}"));
                Self {
                    url: format!("postgres://postgres@{PG_HOST}:5432/{name}"),
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            let _ = Command::new("psql")
                .args(["-h", PG_HOST, "-U", "postgres", "-d", "postgres", "-qc"])
                .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([
            "-h",
            PG_HOST,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()
        .expect("psql (PostgreSQL client) must be installed");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How the server sends activation mail.
#[derive(Debug, Clone)]
pub enum Mail {
    /// `--mail-dir <tempdir>/mail` (the default).
    Dir,
    /// `--smtp URL`.
    Smtp(String),
    /// `--dev`.
    Dev,
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The database backend.
    pub backend: Backend,
    /// Mail transport.
    pub mail: Mail,
    /// Extra flags (after the defaults; rate limits default to off).
    pub args: Vec<String>,
    /// Use this database URL instead of a fresh one (several servers on one database).
    pub database: Option<String>,
}

impl Options {
    /// Defaults for `backend`: mail into a directory, no rate limits.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            mail: Mail::Dir,
            args: Vec::new(),
            database: None,
        }
    }

    /// Adds flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }
}

/// A running `nes-keyserver serve`. Killed on drop.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The listening port.
    pub port: u16,
    /// The mail directory (for [`Mail::Dir`]).
    pub mail_dir: PathBuf,
    /// The server's stderr, captured to this file.
    pub log: PathBuf,
    /// The database URL.
    pub database_url: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    db: Option<Database>,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server with the defaults for `backend`.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(Options::new(backend)).await
    }

    /// Starts a server as `options` say and waits until `/healthz` answers.
    pub async fn start_with(options: Options) -> Self {
        let mut last_log = String::new();
        // A port picked free can be taken by someone else before the server binds it:
        // try a few.
        for _ in 0..4 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (db, database_url) = match &options.database {
                Some(url) => (None, url.clone()),
                None => {
                    let db = Database::create(options.backend, dir.path());
                    let url = db.url.clone();
                    (Some(db), url)
                }
            };
            let port = free_port();
            let base = format!("http://127.0.0.1:{port}");
            let mail_dir = dir.path().join("mail");
            let log = dir.path().join("server.log");
            let mut cmd = Command::new(BIN);
            cmd.arg("serve")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--database", &database_url])
                .arg("--key")
                .arg(server_key_file())
                .args(["--public-url", &base]);
            // Rate limits off unless the test sets them.
            for flag in ["--register-rate", "--lookup-rate", "--prekey-rate"] {
                if !options.args.iter().any(|a| a == flag) {
                    cmd.args([flag, "0"]);
                }
            }
            match &options.mail {
                Mail::Dir => {
                    cmd.arg("--mail-dir").arg(&mail_dir);
                }
                Mail::Smtp(url) => {
                    cmd.args(["--smtp", url]);
                }
                Mail::Dev => {
                    cmd.arg("--dev");
                }
            }
            cmd.args(&options.args);
            let child = spawn_logged(cmd, &log);
            let mut server = Self {
                child: Some(child),
                base,
                port,
                mail_dir,
                log,
                database_url,
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("client"),
                db,
                dir,
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(log) => {
                    last_log = log;
                    if !last_log.contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("the server did not start:\n{last_log}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited with {status}: {}", self.log_text()));
                }
            }
            if let Ok(r) = self
                .http
                .get(self.url("/healthz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "no answer within {READY_TIMEOUT:?}: {}",
            self.log_text()
        ))
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal}");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "no exit within {timeout:?} after SIG{signal}: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// POST /users with `body`.
    pub async fn post_users(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url("/users"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST /users")
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    /// GET an absolute URL (a link from a mail).
    pub async fn follow(&self, url: &str) -> reqwest::Response {
        self.http.get(url).send().await.expect("GET link")
    }

    /// POST an absolute URL: what the delete link's confirmation form does.
    pub async fn confirm_delete(&self, url: &str) -> reqwest::Response {
        self.http.post(url).send().await.expect("POST link")
    }

    /// Registers `name` with alice's vector keys; asserts 201.
    pub async fn register(&self, name: &str) {
        let (m, s) = alice_keys();
        let r = self
            .post_users(registration(name, &format!("{name}@example.org"), &m, &s))
            .await;
        let status = r.status();
        assert_eq!(
            status,
            201,
            "register {name}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// The links of the newest mail (in `--mail-dir`) about `name`.
    pub fn links(&self, name: &str) -> Links {
        mail_links(&self.mail_dir, name)
            .unwrap_or_else(|| panic!("no mail about {name} in {}", self.mail_dir.display()))
    }

    /// Registers `name`, follows the Activate link from the mail; returns the links.
    pub async fn register_and_activate(&self, name: &str) -> Links {
        self.register(name).await;
        let links = self.links(name);
        let r = self.follow(&links.activate).await;
        assert_eq!(r.status(), 200, "activate {name}");
        links
    }

    /// GET /users/NAME, asserting 200, and verifies the answer the way NES clients do.
    pub async fn lookup_verified(&self, name: &str) -> (Vec<u8>, nes_proto::KeyAnswer) {
        let r = self.get(&format!("/users/{name}")).await;
        assert_eq!(r.status(), 200, "lookup {name}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let body = r.bytes().await.expect("body").to_vec();
        let user = Username::parse(name).expect("name");
        let answer = nes_proto::verify_answer(
            &body,
            &server_public(),
            &user,
            nes_proto::UsernameRule::Require,
        )
        .expect("answer verifies");
        (body, answer)
    }

    /// A metric's value from `/metrics` (the whole series name with labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.expect("metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `cmd` with stdin closed and stdout+stderr into `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    let err = file.try_clone().expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn nes-keyserver")
}

/// The links of an activation mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Links {
    /// `Activate: ...`.
    pub activate: String,
    /// `Delete: ...`.
    pub delete: String,
    /// `API: ...`.
    pub api: String,
}

/// Parses the contract lines of a mail's text.
pub fn parse_links(text: &str) -> Option<Links> {
    let line = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(prefix)
                .map(|s| s.trim().to_string())
        })
    };
    Some(Links {
        activate: line("Activate: ")?,
        delete: line("Delete: ")?,
        api: line("API: ")?,
    })
}

/// The links of the newest mail about `name` among the files under `dir` (searched
/// recursively: `.eml` files or a Maildir).
pub fn mail_links(dir: &Path, name: &str) -> Option<Links> {
    let needle = format!("/users/{name}/");
    let mut mails: Vec<(std::time::SystemTime, String)> = files_under(dir)
        .into_iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            text.contains(&needle).then_some((modified, text))
        })
        .collect();
    mails.sort_by_key(|(t, _)| *t);
    mails.last().and_then(|(_, text)| parse_links(text))
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One polling helper for every test in the workspace.
pub use nes_e2e::eventually;

/// Asserts `r` has `status` and a JSON error body with `code`; returns the body.
pub async fn assert_error(r: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status(), status, "status");
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "error bodies are JSON"
    );
    let body: serde_json::Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "reason: {body}"
    );
    body
}
