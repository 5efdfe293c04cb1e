//! # nes-e2e: the harness for end-to-end tests
//!
//! Starts the real programs, each private to one test, and talks to them the way users
//! and frontends do:
//!
//! | piece | what it is |
//! |---|---|
//! | [`Mosquitto`] | a mosquitto on a free port with its own persistence dir; stop/start on the same port; optionally with a test's own listener/auth lines (TLS, password file, ACL) |
//! | [`KeyServer`] | `nes-keyserver` (keygen + serve, SQLite, mail into a dir, no rate limits) |
//! | [`Identity`] | a username with fresh (or given) RSA keys in a data dir, as `nes generate` writes them |
//! | [`Nesd`] / [`NesdBuilder`] | a daemon for one identity: own data dir and socket; extra flags and environment; stop, kill -9, restart |
//! | [`World`] | one test's broker and key server, and registered users with a running nesd |
//! | [`connect`] | a gRPC client over the daemon's Unix socket |
//! | [`RawMqtt`] | a plain MQTT client, to publish raw frames and watch the wire |
//! | [`eventually`] | polls a condition until it holds (generous timeout, never a timing assertion) |
//! | [`wait_connected`] / [`wait_status`] | waits until a daemon's Status says it is connected, or whatever a test asks |
//!
//! There is one launcher per program: [`Nesd::builder`] for every nesd a test runs
//! (`Nesd::start` is its shorthand), [`KeyServer::start`] for the key server. Both start
//! the program from [`isolated`], so a `NES_*` variable, a session bus or a systemd
//! socket of the shell running the tests never reaches it; a test adds what it wants
//! with [`NesdBuilder::env`]. The frontends' commands (`nes`, `nes-notify`) are in
//! [`frontends`].
//!
//! Binaries are found next to the test executable (`target/debug/` for `cargo test`,
//! `target/release/` for `cargo bench`): build them first with
//! `cargo build -p nesd -p nes-keyserver` (add `--release` for benches).
//!
//! Everything is cleaned up on drop: child processes are killed, temp dirs removed.
//! Ports are free ports of 127.0.0.1 and every directory is a fresh temp dir, so tests
//! run in parallel and never touch shared services (the system mosquitto on 1883).
//! When a test panics, the harness prints the tail of each daemon's log.

#![forbid(unsafe_code)]

pub mod frontends;

use anyhow::{anyhow, bail, ensure, Context, Result};
use nes_proto::rpc::messenger_client::MessengerClient;
use nes_proto::rpc::{self, Event, EventsRequest, StatusRequest};
use nes_proto::{PrivateKey, Username};
pub use rumqttc::QoS;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet};
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long [`eventually`] waits by default: long enough for a loaded 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The gRPC client of nesd.
pub type Client = MessengerClient<Channel>;

/// The directory holding the binaries under test (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    let deps = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if deps.ends_with("deps") {
        deps.parent().map(Path::to_path_buf).unwrap_or(deps)
    } else {
        deps
    }
}

/// A binary built from this workspace, with a clear message when it is not built yet.
/// `NES_E2E_BIN_<NAME>` (upper case, `-` as `_`, e.g. `NES_E2E_BIN_NES_KEYSERVER`) points
/// at another build, e.g. a debug key server for a release bench of nesd.
pub fn bin(name: &str) -> Result<PathBuf> {
    let var = format!(
        "NES_E2E_BIN_{}",
        name.to_ascii_uppercase().replace('-', "_")
    );
    if let Some(path) = std::env::var_os(&var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build -p nesd -p nes-keyserver` (with --release for benches) first",
            path.display()
        );
    }
    Ok(path)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Locks a test's shared state; a panic in another task leaves plain data behind, still
/// usable, so a poisoned lock is taken as it is.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`. Errors of
/// `check` count as "not yet" and the last one is reported on timeout.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out waiting for {what}; last error: {e:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A command for a program under test, with nothing of the environment the test process
/// may have inherited that would change how it runs: no `NES_*` variable (settings such
/// as `NES_USER`, `NES_KEYSERVER_DATABASE`, `NES_LOG`), no `DBUS_SESSION_BUS_ADDRESS` (the
/// desktop's session bus), no `LISTEN_*` or `NOTIFY_SOCKET` (systemd's socket activation
/// and readiness). The test sets what it means to give.
pub fn isolated(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    clear_env(&mut cmd);
    cmd
}

/// Removes from `cmd` what [`isolated`] leaves out; for commands made elsewhere (a
/// `tokio::process::Command` through `as_std_mut`).
pub fn clear_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("NES_")) {
            cmd.env_remove(key);
        }
    }
    for key in [
        "DBUS_SESSION_BUS_ADDRESS",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(key);
    }
}

/// Waits until `ready` says a child just spawned is up, asking every `every` for at most
/// `timeout`. Fails with the tail of its `log` when it exits first, and kills it when
/// the time is up. `what` names it in the errors ("nesd for alice").
async fn wait_up<F, Fut>(
    child: &mut Child,
    what: &str,
    log: &Path,
    timeout: Duration,
    every: Duration,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited at start ({status}):\n{}", tail(log, 20));
        }
        if ready().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} was not up after {timeout:?}:\n{}", tail(log, 20));
        }
        tokio::time::sleep(every).await;
    }
}

/// Kills a child with SIGKILL and reaps it; nothing when there is none.
fn kill(child: Option<Child>) -> Result<()> {
    if let Some(mut child) = child {
        let killed = child.kill();
        child.wait()?;
        killed?;
    }
    Ok(())
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// Waits for a child to exit, at most `timeout`; kills it after that.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait()?;
            bail!(
                "process {} did not exit in time (killed: {status})",
                child.id()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// mosquitto

/// A private mosquitto broker.
pub struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Config lines of the test's own, after the `listener` line.
    extra: String,
    /// The listener speaks TLS.
    tls: bool,
}

fn mosquitto_binary() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect()
        })
        .unwrap_or_default();
    candidates.extend(["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("mosquitto is not installed (apt-get install mosquitto)"))
}

impl Mosquitto {
    /// Starts a broker on a free port (retrying if another process takes the port first).
    pub async fn start() -> Result<Mosquitto> {
        Self::start_with("", false).await
    }

    /// Starts a broker whose config has `extra` after its `listener` line: listener
    /// options such as `cafile`/`certfile`/`keyfile` (then `tls` is true and [`url`] is
    /// `mqtts://localhost:<port>`, so the server certificate must name `localhost`), and
    /// `password_file`, `acl_file`, `allow_anonymous false`. Without an
    /// `allow_anonymous` line anonymous clients are allowed, as in [`Mosquitto::start`].
    ///
    /// [`url`]: Mosquitto::url
    pub async fn start_with(extra: &str, tls: bool) -> Result<Mosquitto> {
        let mut last = None;
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("nes-mqtt-").tempdir()?;
            let mut m = Mosquitto {
                port: free_port()?,
                dir,
                child: None,
                extra: extra.to_owned(),
                tls,
            };
            match m.spawn().await {
                Ok(()) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("mosquitto did not start")))
    }

    async fn spawn(&mut self) -> Result<()> {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let conf = self.dir.path().join("mosquitto.conf");
        let mut extra = self.extra.clone();
        if !extra.contains("allow_anonymous") {
            extra.push_str("\nallow_anonymous true");
        }
        std::fs::write(
            &conf,
            format!(
                // `user root`: started as root, mosquitto would otherwise drop to the user
                // `mosquitto`, which cannot write the 0700 temp dir, and silently lose its
                // persistence (sessions, queued messages) on restart. Ignored when not root.
                "user root\nlistener {port} 127.0.0.1\n{extra}\npersistence true\npersistence_location {data}/\n\
                 max_queued_messages 100000\nmax_inflight_messages 20\nlog_dest file {log}\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
                port = self.port,
                data = data.display(),
                log = self.dir.path().join("mosquitto.log").display(),
            ),
        )?;
        let mut child = Command::new(mosquitto_binary()?)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start mosquitto")?;
        let port = self.port;
        wait_up(
            &mut child,
            &format!("mosquitto on port {port}"),
            &self.dir.path().join("mosquitto.log"),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of the broker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.path().join("mosquitto.log"), lines)
    }

    /// `mqtt://127.0.0.1:<port>`, or `mqtts://localhost:<port>` for a TLS listener.
    pub fn url(&self) -> String {
        if self.tls {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }

    /// Stops the broker cleanly (SIGTERM: it saves its sessions to disk).
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            sigterm(&child);
            wait_exit(&mut child, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same persistence.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    // The port may linger a moment; try again.
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = kill(self.child.take());
    }
}

// ---------------------------------------------------------------------------------------
// key server

/// A private `nes-keyserver`: its own key, SQLite database and mail dir, on a free port.
/// The one key server launcher of the end-to-end tests.
pub struct KeyServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
    /// `--lookup-rate` (per IP per second; 0, the default here, is unlimited).
    lookup_rate: u32,
}

impl KeyServer {
    /// Makes a server key and starts the key server on a free port, mail into a dir.
    pub async fn start() -> Result<KeyServer> {
        let dir = tempfile::Builder::new().prefix("nes-ks-").tempdir()?;
        let key = dir.path().join("server-key");
        let out = keyserver_command("keygen")?
            .arg("--out")
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .context("cannot run nes-keyserver keygen")?;
        if !out.status.success() {
            bail!(
                "nes-keyserver keygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::create_dir_all(dir.path().join("mail"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut ks = KeyServer {
            port: 0,
            dir,
            child: None,
            http,
            lookup_rate: 0,
        };
        let mut last = None;
        for _ in 0..5 {
            ks.port = free_port()?;
            match ks.spawn().await {
                Ok(()) => return Ok(ks),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("key server did not start")))
    }

    async fn spawn(&mut self) -> Result<()> {
        let url = self.url();
        let log_path = self.dir.path().join("keyserver.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = keyserver_command("serve")?
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--database")
            .arg(format!(
                "sqlite://{}",
                self.dir.path().join("keys.db").display()
            ))
            .arg("--key")
            .arg(self.dir.path().join("server-key"))
            .args(["--public-url", &url])
            .arg("--mail-dir")
            .arg(self.mail_dir())
            .args([
                "--register-rate",
                "0",
                "--lookup-rate",
                &self.lookup_rate.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start nes-keyserver")?;
        let health = format!("{url}/healthz");
        wait_up(
            &mut child,
            &format!("nes-keyserver on {url}"),
            &log_path,
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async {
                self.http
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the key server (SIGKILL: it is "down").
    pub fn stop(&mut self) -> Result<()> {
        kill(self.child.take())
    }

    /// Starts it again after [`KeyServer::stop`]: same port, database and key.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the key server is still running");
        }
        self.spawn().await
    }

    /// Restarts it (same port, database and key) with a per-IP lookup rate limit, so that
    /// lookups past `per_second` get 429 with `Retry-After`. Lookups include activation
    /// links: register first.
    pub async fn restart_with_lookup_rate(&mut self, per_second: u32) -> Result<()> {
        self.stop()?;
        self.lookup_rate = per_second;
        self.start_again().await
    }

    /// The server's public key file (for `nesd --keyserver-key`).
    pub fn public_key_path(&self) -> PathBuf {
        self.dir.path().join("server-key.pub")
    }

    /// Where the activation mails go.
    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    fn mails(&self) -> Result<Vec<PathBuf>> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(self.mail_dir())? {
            all.push(entry?.path());
        }
        all.sort();
        Ok(all)
    }

    /// `POST /users` with these public keys; expects 201.
    pub async fn post_user(
        &self,
        user: &str,
        email: &str,
        message_pem: &str,
        sign_pem: &str,
    ) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/users", self.url()))
            .json(&serde_json::json!({
                "username": user, "email": email, "public_key_message": message_pem, "public_key_sign": sign_pem,
            }))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!(
                "POST /users for {user}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The `Activate:` and `Delete:` links of the newest mail for `user` not in `seen`.
    async fn links(&self, user: &str, seen: &[PathBuf]) -> Result<(String, String)> {
        let marker = format!("/users/{user}/");
        eventually(
            &format!("the activation mail of {user}"),
            TIMEOUT,
            || async {
                for path in self.mails()?.into_iter().rev() {
                    if seen.contains(&path) {
                        continue;
                    }
                    let text = std::fs::read_to_string(&path)?;
                    let find = |label: &str| {
                        text.lines()
                            .filter_map(|l| l.trim().strip_prefix(label))
                            .map(str::trim)
                            .find(|u| u.contains(&marker))
                            .map(str::to_owned)
                    };
                    if let (Some(a), Some(d)) = (find("Activate:"), find("Delete:")) {
                        return Ok(Some((a, d)));
                    }
                }
                Ok(None)
            },
        )
        .await
    }

    /// Registers `user` with these keys and follows the activation link; returns the
    /// delete link.
    pub async fn register_and_activate(
        &self,
        user: &str,
        message_pem: &str,
        sign_pem: &str,
    ) -> Result<String> {
        let seen = self.mails()?;
        self.post_user(user, &format!("{user}@example.test"), message_pem, sign_pem)
            .await?;
        let (activate, delete) = self.links(user, &seen).await?;
        self.get_ok(&activate).await?;
        Ok(delete)
    }

    /// Follows the activation link of a registration made by someone else (nesd's
    /// Register): the newest mail for `user`.
    pub async fn activate_pending(&self, user: &str) -> Result<String> {
        let (activate, delete) = self.links(user, &[]).await?;
        self.get_ok(&activate).await?;
        Ok(delete)
    }

    /// GETs a link and expects success.
    pub async fn get_ok(&self, url: &str) -> Result<()> {
        let r = self.http.get(url).send().await?;
        if !r.status().is_success() {
            bail!("GET {url}: {}", r.status());
        }
        Ok(())
    }

    /// POSTs to a link (a delete link: its GET only asks for confirmation) and expects
    /// success.
    pub async fn post_ok(&self, url: &str) -> Result<()> {
        let r = self.http.post(url).send().await?;
        if !r.status().is_success() {
            bail!("POST {url}: {}", r.status());
        }
        Ok(())
    }

    /// `GET /users/<user>`: the status code.
    pub async fn lookup_status(&self, user: &str) -> Result<u16> {
        Ok(self
            .http
            .get(format!("{}/users/{user}", self.url()))
            .send()
            .await?
            .status()
            .as_u16())
    }
}

/// `nes-keyserver SUBCOMMAND`, [`isolated`].
fn keyserver_command(subcommand: &str) -> Result<Command> {
    let mut cmd = isolated(bin("nes-keyserver")?);
    cmd.arg(subcommand);
    Ok(cmd)
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        let _ = kill(self.child.take());
    }
}

// ---------------------------------------------------------------------------------------
// identities

/// A user with keys in a data dir laid out as `nes generate` writes it.
pub struct Identity {
    /// The username.
    pub user: String,
    dir: tempfile::TempDir,
    /// Private message key.
    pub message: PrivateKey,
    /// Private signing key.
    pub sign: PrivateKey,
}

impl Identity {
    /// Fresh 2048-bit keys for `user`.
    pub fn generate(user: &str) -> Result<Identity> {
        let message = PrivateKey::generate(2048)?;
        let sign = PrivateKey::generate(2048)?;
        Self::with_keys(user, message, sign)
    }

    /// Given keys (e.g. the legacy vectors) for `user`.
    pub fn with_keys(user: &str, message: PrivateKey, sign: PrivateKey) -> Result<Identity> {
        Username::parse(user)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("nes-{user}-"))
            .tempdir()?;
        let id = Identity {
            user: user.to_owned(),
            dir,
            message,
            sign,
        };
        id.write_keys()?;
        Ok(id)
    }

    /// Reads `<dir>/<user>-rsa-message` and `<dir>/<user>-rsa-sign`.
    pub fn from_key_dir(user: &str, keys: &Path) -> Result<Identity> {
        let message = PrivateKey::read(&keys.join(format!("{user}-rsa-message")))?;
        let sign = PrivateKey::read(&keys.join(format!("{user}-rsa-sign")))?;
        Self::with_keys(user, message, sign)
    }

    /// Replaces the keys with fresh ones (files too).
    pub fn rekey(&mut self) -> Result<()> {
        self.message = PrivateKey::generate(2048)?;
        self.sign = PrivateKey::generate(2048)?;
        self.write_keys()
    }

    fn write_keys(&self) -> Result<()> {
        let keys = self.dir.path().join("keys");
        std::fs::create_dir_all(&keys)?;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))?;
        let files = [
            (
                format!("{}-rsa-message", self.user),
                self.message.to_pkcs1_pem().to_string(),
            ),
            (
                format!("{}-rsa-message.pub", self.user),
                self.message.public_key().to_pem(),
            ),
            (
                format!("{}-rsa-sign", self.user),
                self.sign.to_pkcs1_pem().to_string(),
            ),
            (
                format!("{}-rsa-sign.pub", self.user),
                self.sign.public_key().to_pem(),
            ),
        ];
        for (name, text) in files {
            let path = keys.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    /// The data dir (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The message store nesd keeps in the data dir (`store-<user>`, a sled directory):
    /// remove it to re-create the store, copy it (nesd stopped) to back it up.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join(format!("store-{}", self.user))
    }

    /// Public message key, PEM.
    pub fn message_pem(&self) -> String {
        self.message.public_key().to_pem()
    }

    /// Public signing key, PEM.
    pub fn sign_pem(&self) -> String {
        self.sign.public_key().to_pem()
    }

    /// Registers the public keys with the key server and activates them.
    pub async fn register(&self, ks: &KeyServer) -> Result<String> {
        ks.register_and_activate(&self.user, &self.message_pem(), &self.sign_pem())
            .await
    }

    /// The username, parsed.
    pub fn username(&self) -> Username {
        Username::parse(&self.user).unwrap_or_else(|_| unreachable!("checked in with_keys"))
    }
}

// ---------------------------------------------------------------------------------------
// nesd

/// A running (or stopped) nesd for one identity, with a run dir of its own for its API
/// socket, its empty config file and its log. The one nesd launcher of the end-to-end
/// tests: start it with [`Nesd::start`] or, for anything else, [`Nesd::builder`].
pub struct Nesd {
    /// Who it is, for messages: "alice".
    name: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    run_dir: tempfile::TempDir,
    child: Option<Child>,
}

/// How to start a [`Nesd`]: its flags and environment. Made by [`Nesd::builder`] or
/// [`Nesd::with_config`]; [`NesdBuilder::start`] starts the daemon.
#[must_use = "a builder does nothing until start"]
pub struct NesdBuilder {
    name: String,
    /// `--user`, `--broker`, ... in this order; a flag appears once (clap refuses twice).
    flags: Vec<(&'static str, OsString)>,
    /// `--config`; `None` is an empty file in the run dir.
    config: Option<PathBuf>,
    extra: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Nesd {
    /// Starts nesd for `id` against this broker and key server, and waits until Status
    /// answers: `Nesd::builder(id, broker, ks).start()`.
    pub async fn start(id: &Identity, broker: &Mosquitto, ks: &KeyServer) -> Result<Nesd> {
        Self::builder(id, broker, ks).start().await
    }

    /// A nesd for `id` against this broker and key server (`--user`, `--broker`,
    /// `--keyserver`, `--keyserver-key`, `--data-dir`), with a socket and an empty config
    /// file of its own; add flags and environment before [`NesdBuilder::start`].
    pub fn builder(id: &Identity, broker: &Mosquitto, ks: &KeyServer) -> NesdBuilder {
        NesdBuilder {
            name: id.user.clone(),
            flags: vec![
                ("--user", id.user.clone().into()),
                ("--broker", broker.url().into()),
                ("--keyserver", ks.url().into()),
                ("--keyserver-key", ks.public_key_path().into()),
                ("--data-dir", id.data_dir().into()),
            ],
            config: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A nesd that takes everything from the config file `config` (and what the test
    /// adds), with only the socket given: for a config another program wrote.
    pub fn with_config(config: &Path) -> NesdBuilder {
        NesdBuilder {
            name: format!("{} alone", config.display()),
            flags: Vec::new(),
            config: Some(config.to_path_buf()),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = isolated(bin("nesd")?)
            .args(&self.args)
            .env("NES_LOG", "info,nesd=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start nesd")?;
        let socket = self.socket();
        wait_up(
            &mut child,
            &format!("nesd for {}", self.name),
            &log_path,
            TIMEOUT,
            Duration::from_millis(100),
            || async {
                match connect(&socket).await {
                    Ok(mut c) => c.status(StatusRequest {}).await.is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// The API socket (in a directory nesd creates).
    pub fn socket(&self) -> PathBuf {
        self.run_dir.path().join("nes").join("nesd.sock")
    }

    /// The daemon's stderr log file (all its starts, one after the other).
    pub fn log_path(&self) -> PathBuf {
        self.run_dir.path().join("nesd.log")
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident memory (VmRSS of /proc/<pid>/status) in KiB, while running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
        line.trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// A new gRPC client.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.socket()).await
    }

    /// Stops it with SIGTERM and checks that it exits with 0.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            sigterm(&child);
            let status = wait_exit(&mut child, Duration::from_secs(60)).await?;
            if !status.success() {
                bail!(
                    "nesd for {} exited with {status} on SIGTERM:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
        }
        Ok(())
    }

    /// Kills it with SIGKILL (no chance to flush or clean up).
    pub fn kill9(&mut self) -> Result<()> {
        kill(self.child.take())
    }

    /// Starts it again with the same data dir, socket, flags and environment.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("nesd for {} is still running", self.name);
        }
        self.spawn().await
    }

    /// Starts it again as [`Nesd::start_again`] does, with `args` added to its flags for
    /// this start and every later one (flags it did not have: nesd refuses a flag twice).
    pub async fn start_again_with<I, S>(&mut self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if self.child.is_some() {
            bail!("nesd for {} is still running", self.name);
        }
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.spawn().await
    }

    /// Runs the nesd binary with these arguments and environment (not as a daemon,
    /// [`isolated`] like every nesd here) and returns its exit code and stderr: for
    /// startup error checks.
    pub fn run_once(args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String)> {
        let out = isolated(bin("nesd")?)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl NesdBuilder {
    /// Points `--broker` at this URL instead (a proxy in front of a [`Mosquitto`]).
    pub fn broker_url(self, url: &str) -> Self {
        self.flag("--broker", url)
    }

    /// Points `--keyserver` at this URL instead (a proxy in front of the [`KeyServer`];
    /// `--keyserver-key` stays the real server's key).
    pub fn keyserver_url(self, url: &str) -> Self {
        self.flag("--keyserver", url)
    }

    fn flag(mut self, flag: &'static str, value: &str) -> Self {
        match self.flags.iter_mut().find(|(f, _)| *f == flag) {
            Some((_, v)) => *v = value.into(),
            None => self.flags.push((flag, value.into())),
        }
        self
    }

    /// Adds one argument after the others.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.extra.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments after the others (flags nesd has no default for: the builder
    /// already gives `--broker`, `--keyserver` and the others; see
    /// [`NesdBuilder::broker_url`]).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the daemon (over the `NES_LOG` it gets by
    /// default; everything else it would inherit is cleared, see [`isolated`]).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Puts the daemon on this session bus (`DBUS_SESSION_BUS_ADDRESS`), where it offers
    /// its D-Bus API.
    pub fn session_bus(self, bus: &frontends::SessionBus) -> Self {
        self.env("DBUS_SESSION_BUS_ADDRESS", bus.address())
    }

    /// Starts the daemon and waits until Status answers (not until it is connected to
    /// the broker: see [`wait_connected`]).
    pub async fn start(self) -> Result<Nesd> {
        let run_dir = tempfile::Builder::new().prefix("nesd-run-").tempdir()?;
        let config = match self.config {
            Some(config) => config,
            None => {
                let empty = run_dir.path().join("config.toml");
                std::fs::write(&empty, "")?;
                empty
            }
        };
        let mut args = Vec::new();
        for (flag, value) in self.flags {
            args.extend([flag.into(), value]);
        }
        args.extend([
            "--socket".into(),
            run_dir.path().join("nes").join("nesd.sock").into(),
            "--config".into(),
            config.into(),
        ]);
        args.extend(self.extra);
        let mut nesd = Nesd {
            name: self.name,
            args,
            env: self.env,
            run_dir,
            child: None,
        };
        nesd.spawn().await?;
        Ok(nesd)
    }
}

impl Drop for Nesd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- nesd {} log (last 40 lines) ----\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        let _ = kill(self.child.take());
    }
}

/// Connects a gRPC client to the nesd socket at `socket`.
pub async fn connect(socket: &Path) -> Result<Client> {
    let path = socket.to_path_buf();
    // The URI is required but unused: the connector opens the Unix socket.
    let channel = Endpoint::from_static("http://nesd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(MessengerClient::new(channel))
}

/// Sends the file at `path` over SendFile (64 KiB pieces) and returns its message.
pub async fn send_file(client: &mut Client, to: &str, path: &Path) -> Result<rpc::Message> {
    use rpc::send_file_request::Part;
    use tokio::io::AsyncReadExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut file = tokio::fs::File::open(path).await?;
    let header = rpc::SendFileRequest {
        part: Some(Part::Header(rpc::FileHeader {
            to: to.to_owned(),
            name,
            media_type: String::new(),
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header).await?;
    let pump = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            buf.truncate(n);
            let part = rpc::SendFileRequest {
                part: Some(Part::Data(buf)),
            };
            if tx.send(part).await.is_err() {
                return Ok(());
            }
        }
    });
    let reply = client
        .send_file(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    pump.await??;
    reply?
        .into_inner()
        .message
        .ok_or_else(|| anyhow!("SendFile answered no message"))
}

/// A file message by file id, with its progress.
pub async fn get_file(client: &mut Client, id: &str) -> Result<rpc::Message> {
    Ok(client
        .get_file(rpc::GetFileRequest { id: id.to_owned() })
        .await?
        .into_inner())
}

/// Waits until the file `id` is in `state` (failing at once on another end state).
pub async fn wait_file(client: &Client, id: &str, want: rpc::FileState) -> Result<rpc::Message> {
    let what = format!(
        "file {id} {}",
        nes_proto::names::file_state_name(want as i32)
    );
    eventually(&what, Duration::from_secs(120), || {
        let (mut c, id) = (client.clone(), id.to_owned());
        async move {
            let m = get_file(&mut c, &id).await?;
            let state = m.file.as_ref().map(|f| f.state).unwrap_or_default();
            if state == want as i32 {
                return Ok(Some(m));
            }
            let active = [
                rpc::FileState::Sending as i32,
                rpc::FileState::Receiving as i32,
            ];
            ensure!(
                active.contains(&state),
                "file {id} ended {} instead: {:?}",
                nes_proto::names::file_state_name(state),
                m.file
            );
            Ok(None)
        }
    })
    .await
}

/// A file of `size` random bytes under `dir`, and its SHA-256 (hex).
pub fn random_file(dir: &Path, name: &str, size: usize) -> Result<(PathBuf, String)> {
    use rand::RngCore;
    use sha2::Digest;
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut hasher = sha2::Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len());
        rand::thread_rng().fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n])?;
        left -= n;
    }
    std::io::Write::flush(&mut f)?;
    Ok((path, hex::encode(hasher.finalize())))
}

/// The SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Sends one message and returns it (state QUEUED or later).
pub async fn send(client: &mut Client, to: &str, text: &str) -> Result<rpc::Message> {
    let reply = client
        .send(rpc::SendRequest {
            to: to.into(),
            text: text.into(),
            legacy: false,
        })
        .await
        .with_context(|| format!("Send to {to}"))?
        .into_inner();
    reply
        .message
        .ok_or_else(|| anyhow!("Send answered no message"))
}

/// Sends one message that the daemon must refuse, and returns the refusal.
pub async fn send_refused(client: &mut Client, to: &str, text: &str) -> Result<tonic::Status> {
    let request = rpc::SendRequest {
        to: to.into(),
        text: text.into(),
        legacy: false,
    };
    match client.send(request).await {
        Ok(reply) => bail!("Send to {to} was accepted: {:?}", reply.into_inner()),
        Err(status) => Ok(status),
    }
}

/// The conversation with `peer`.
pub async fn history(client: &mut Client, peer: &str) -> Result<Vec<rpc::Message>> {
    Ok(client
        .history(rpc::HistoryRequest {
            peer: peer.into(),
            limit: 0,
            before_id: String::new(),
        })
        .await?
        .into_inner()
        .messages)
}

/// Status.
pub async fn status(client: &mut Client) -> Result<rpc::StatusReply> {
    Ok(client.status(StatusRequest {}).await?.into_inner())
}

/// Whether a message is one received from `from` (incoming and in state RECEIVED): for
/// [`wait_history`].
pub fn incoming_from(from: &str) -> impl Fn(&rpc::Message) -> bool + '_ {
    move |m| {
        m.direction == rpc::Direction::Incoming as i32
            && m.from == from
            && m.state == rpc::MessageState::Received as i32
    }
}

/// Waits until Status satisfies `ok` and returns that status; `what` names the wait in
/// the timeout's error.
pub async fn wait_status(
    client: &Client,
    what: &str,
    ok: impl Fn(&rpc::StatusReply) -> bool,
) -> Result<rpc::StatusReply> {
    // The last answer, so that a timeout says where the daemon stood.
    let last = std::sync::Mutex::new(None::<rpc::StatusReply>);
    let waited = eventually(what, TIMEOUT, || {
        let mut c = client.clone();
        let ok = &ok;
        let last = &last;
        async move {
            let s = status(&mut c).await?;
            if ok(&s) {
                return Ok(Some(s));
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            Ok(None)
        }
    })
    .await;
    waited.map_err(
        |e| match last.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => e.context(format!("last status: {s:?}")),
            None => e,
        },
    )
}

/// Waits until the daemon says it is connected to the broker (its MQTT session is up).
pub async fn wait_connected(client: &Client) -> Result<()> {
    wait_status(client, "the MQTT session", |s| s.connected).await?;
    Ok(())
}

/// Waits until nesd says the key server holds its newest v3 prekey (after `expect_not`
/// when given: a rotated one); returns that status.
pub async fn wait_prekey_published(
    client: &Client,
    expect_not: Option<&str>,
) -> Result<rpc::StatusReply> {
    eventually("the v3 prekey published", TIMEOUT, || {
        let mut c = client.clone();
        async move {
            let s = status(&mut c).await?;
            let new = expect_not.is_none_or(|old| s.prekey_id != old);
            Ok((s.prekey_published && !s.prekey_id.is_empty() && new).then_some(s))
        }
    })
    .await
}

/// Runs the offline `nes` with `args` and `stdin`; the exit code, stdout and stderr.
pub fn nes_offline(args: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    use std::io::Write as _;
    let mut child = isolated(bin("nes")?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start nes")?;
    child.stdin.take().context("nes stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Waits until the conversation with `peer` has at least `n` messages matching `keep`.
pub async fn wait_history(
    client: &Client,
    peer: &str,
    n: usize,
    keep: impl Fn(&rpc::Message) -> bool,
) -> Result<Vec<rpc::Message>> {
    eventually(&format!("{n} messages with {peer}"), TIMEOUT, || {
        let mut c = client.clone();
        let keep = &keep;
        async move {
            let h = history(&mut c, peer).await?;
            let matching = h.iter().filter(|m| keep(m)).count();
            Ok((matching >= n).then_some(h))
        }
    })
    .await
}

/// An open Events stream, read in the background.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Result<Event, tonic::Status>>,
}

impl EventStream {
    /// Subscribes (`since` as in EventsRequest).
    pub async fn open(client: &Client, since: Option<u64>) -> Result<EventStream> {
        Ok(Self::open_request(
            client,
            EventsRequest {
                since,
                ..Default::default()
            },
        )
        .await?)
    }

    /// Subscribes with this request; a refusal is the daemon's status, for tests of what
    /// it refuses (e.g. a `since_cursor` of another store).
    pub async fn open_request(
        client: &Client,
        request: EventsRequest,
    ) -> std::result::Result<EventStream, tonic::Status> {
        let mut c = client.clone();
        let mut stream = c.events(request).await?.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(e)) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s));
                        return;
                    }
                }
            }
        });
        Ok(EventStream { rx })
    }

    /// The next event for which `pick` returns `Some`, skipping others.
    pub async fn next_matching<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| anyhow!("timed out waiting for {what}"))?
                .ok_or_else(|| anyhow!("the event stream ended while waiting for {what}"))?
                .map_err(|s| anyhow!("the event stream failed: {s}"))?;
            if let Some(v) = pick(&event) {
                return Ok(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// raw MQTT

/// A plain MQTT client (clean session, random id) for raw frames.
pub struct RawMqtt {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<rumqttc::Publish>,
    acks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RawMqtt {
    /// Connects to the broker.
    pub async fn connect(broker: &Mosquitto) -> Result<RawMqtt> {
        let id = format!("raw-{}-{}", std::process::id(), free_port()?);
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port());
        options
            .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024)
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        let _ = up_tx.send(());
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let _ = in_tx.send(p);
                    }
                    Ok(MqttEvent::Incoming(Packet::PubAck(_)))
                    | Ok(MqttEvent::Incoming(Packet::PubComp(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(TIMEOUT, up_rx.recv())
            .await
            .map_err(|_| anyhow!("raw MQTT client did not connect"))?;
        Ok(RawMqtt {
            client,
            incoming,
            acks,
            task,
        })
    }

    /// Subscribes to `topic` (QoS 1) and waits for the SUBACK.
    pub async fn subscribe(&mut self, topic: &str) -> Result<()> {
        self.subscribe_qos(topic, QoS::AtLeastOnce).await
    }

    /// Subscribes to `topic` with `qos` (the broker delivers at the lower of this and
    /// the publisher's QoS) and waits for the SUBACK.
    pub async fn subscribe_qos(&mut self, topic: &str, qos: QoS) -> Result<()> {
        self.client.subscribe(topic, qos).await?;
        tokio::time::timeout(TIMEOUT, self.acks.recv())
            .await
            .map_err(|_| anyhow!("no SUBACK"))?;
        Ok(())
    }

    /// Publishes `payload` to `topic` (QoS 1) and waits for the broker's acknowledgement.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        tokio::time::timeout(TIMEOUT, self.acks.recv())
            .await
            .map_err(|_| anyhow!("no PUBACK"))?;
        Ok(())
    }

    /// Publishes every payload to `topic` (QoS 1) as fast as the broker takes them, then
    /// waits for all the acknowledgements (for floods; nothing else may be waiting for an
    /// ack on this client meanwhile). Returns how many were published.
    pub async fn publish_all(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<usize> {
        let mut n = 0;
        for payload in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
            n += 1;
        }
        for i in 0..n {
            tokio::time::timeout(TIMEOUT, self.acks.recv())
                .await
                .map_err(|_| anyhow!("only {i} of {n} PUBACKs"))?
                .ok_or_else(|| anyhow!("raw MQTT client stopped"))?;
        }
        Ok(n)
    }

    /// The next publish received on a subscribed topic.
    pub async fn next_publish(&mut self) -> Result<rumqttc::Publish> {
        tokio::time::timeout(TIMEOUT, self.incoming.recv())
            .await
            .map_err(|_| anyhow!("no publish received"))?
            .ok_or_else(|| anyhow!("raw MQTT client stopped"))
    }
}

impl Drop for RawMqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The original client's vectors (keys made by its Go code, frames it published):
/// `$NES_VECTORS`, else `proto/tests/vectors/legacy-v1` in the workspace.
pub fn vectors() -> PathBuf {
    std::env::var_os("NES_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto/tests/vectors/legacy-v1")
        })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Copies the directory `from` to `to` (files and subdirectories), as a backup of a
/// stopped nesd's store would.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// One test's world: a broker and a key server.
pub struct World {
    /// The broker.
    pub broker: Mosquitto,
    /// The key server.
    pub keyserver: KeyServer,
}

impl World {
    /// Starts both.
    pub async fn start() -> Result<World> {
        Self::start_with_broker("", false).await
    }

    /// Starts both, the broker with config lines of the test's own (TLS, passwords, an
    /// ACL), as [`Mosquitto::start_with`] takes them.
    pub async fn start_with_broker(extra: &str, tls: bool) -> Result<World> {
        let (broker, keyserver) =
            tokio::try_join!(Mosquitto::start_with(extra, tls), KeyServer::start())?;
        Ok(World { broker, keyserver })
    }

    /// A registered, activated identity with a running nesd.
    pub async fn user(&self, name: &str) -> Result<(Identity, Nesd)> {
        self.user_with(name, std::iter::empty::<&str>()).await
    }

    /// The original client's identity `name` (its keys among the [`vectors`]),
    /// registered and activated; no nesd.
    pub async fn vector_identity(&self, name: &str) -> Result<Identity> {
        let id = Identity::from_key_dir(name, &vectors().join("keys"))?;
        id.register(&self.keyserver).await?;
        Ok(id)
    }

    /// Like [`World::user`], once the nesd is connected to the broker; with a client of
    /// it.
    pub async fn connected_user(&self, name: &str) -> Result<(Identity, Nesd, Client)> {
        let (id, nesd) = self.user(name).await?;
        let client = nesd.client().await?;
        wait_connected(&client).await?;
        Ok((id, nesd, client))
    }

    /// Like [`World::user`], with these flags added to nesd's.
    pub async fn user_with<I, S>(&self, name: &str, args: I) -> Result<(Identity, Nesd)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let id = Identity::generate(name)?;
        id.register(&self.keyserver).await?;
        let nesd = Nesd::builder(&id, &self.broker, &self.keyserver)
            .args(args)
            .start()
            .await?;
        Ok((id, nesd))
    }
}
