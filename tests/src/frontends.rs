//! Harness pieces for the frontend tests (`tests/tests/frontends_*.rs`): the `nes` CLI,
//! `nes-notify`, and the desktop around them, all real processes:
//!
//! | piece | what it is |
//! |---|---|
//! | [`nes`] / [`run_nes`] | the `nes` binary aimed at one daemon, isolated from the user's config |
//! | [`nes_notify`] | the `nes-notify` binary aimed at one daemon and one session bus |
//! | [`Lines`] | a long-running frontend (`nes listen`, `nes-notify`) whose stdout is read line by line |
//! | [`SessionBus`] | a private `dbus-daemon --session` on a socket in a temp dir (a nesd joins it with [`crate::NesdBuilder::session_bus`]) |
//! | [`Xvfb`] / [`Dunst`] | a virtual X display and the dunst notification server on it |
//! | [`Tmux`] | a private tmux server with one session of a given size, for `nes chat` |
//!
//! The frontends start [`isolate`]d: HOME and the XDG directories in a temp dir, and none
//! of the test process's `NES_*` settings, session bus or systemd sockets (the same
//! [`crate::clear_env`] as nesd's and the key server's).
//!
//! Every process is killed on drop and every directory is a fresh temp dir, so tests run
//! in parallel and leave nothing behind. Waiting is always "until it holds" (see
//! [`crate::eventually`]), never a fixed sleep standing in for an assertion.
//!
//! The binaries come from `target/<profile>/` like nesd's: `cargo build -p nes-cli
//! -p nes-notify -p nesd -p nes-keyserver` first (`scripts/test` builds every binary).

use crate::{bin, eventually, TIMEOUT};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The `nes` command aimed at the daemon on `socket`, with a config file and state dir of
/// its own (never the user's `~/.config/nes`). `home` is used as HOME and for the XDG
/// directories.
pub fn nes(socket: &Path, home: &Path) -> Result<Command> {
    let mut cmd = Command::new(bin("nes")?);
    isolate(&mut cmd, home);
    cmd.env("NES_SOCKET", socket);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// `nes-notify --print` aimed at the daemon on `socket`, showing on `bus`, isolated like
/// [`nes`] (its default cursor file is then under `home/.local/state/nes`). Add flags
/// and start it with [`Lines::spawn`].
pub fn nes_notify(socket: &Path, home: &Path, bus: &SessionBus) -> Result<Command> {
    let mut cmd = Command::new(bin("nes-notify")?);
    isolate(&mut cmd, home);
    cmd.env("NES_SOCKET", socket)
        .env("DBUS_SESSION_BUS_ADDRESS", bus.address())
        .arg("--print");
    Ok(cmd)
}

/// Points HOME and every XDG directory into `home`, and drops what [`crate::clear_env`]
/// drops (`NES_*` settings, the session bus, systemd's sockets) that the test process
/// may have inherited, so frontends see only what the test gives them.
pub fn isolate(cmd: &mut Command, home: &Path) {
    crate::clear_env(cmd.as_std_mut());
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_RUNTIME_DIR", home.join("run"));
}

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Outcome {
    /// Fails with the whole outcome unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Result<Outcome> {
        if self.code != code {
            bail!(
                "expected exit {code}, got {}:\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Runs a prepared command to the end with `stdin`, at most [`TIMEOUT`].
pub async fn run(mut cmd: Command, stdin: &[u8]) -> Result<Outcome> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("cannot start the command")?;
    let mut input = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let bytes = stdin.to_vec();
    let writer = tokio::spawn(async move {
        let _ = input.write_all(&bytes).await;
        drop(input);
    });
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("the command did not finish in {TIMEOUT:?}"))??;
    let _ = writer.await;
    Ok(Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `nes ARGS` against `socket` with `stdin`, to the end.
pub async fn run_nes(socket: &Path, home: &Path, args: &[&str], stdin: &[u8]) -> Result<Outcome> {
    let mut cmd = nes(socket, home)?;
    cmd.args(args);
    run(cmd, stdin).await
}

/// A long-running process whose stdout lines are collected as they come.
pub struct Lines {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line received so far, in order.
    pub seen: Vec<String>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lines {
    /// Starts `cmd` with its stdout read line by line and its stderr kept in a file.
    pub fn spawn(mut cmd: Command) -> Result<Lines> {
        let dir = tempfile::Builder::new().prefix("nes-lines-").tempdir()?;
        let stderr_path = dir.path().join("stderr");
        let stderr = std::fs::File::create(&stderr_path)?;
        cmd.stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("cannot start the command")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Lines {
            child,
            lines,
            seen: Vec::new(),
            stderr_path,
            _dir: dir,
        })
    }

    /// Waits for the next line, at most [`TIMEOUT`].
    pub async fn next(&mut self) -> Result<String> {
        match tokio::time::timeout(TIMEOUT, self.lines.recv()).await {
            Ok(Some(line)) => {
                self.seen.push(line.clone());
                Ok(line)
            }
            Ok(None) => bail!("the process closed its stdout; stderr:\n{}", self.stderr()),
            Err(_) => bail!("no line within {TIMEOUT:?}; stderr:\n{}", self.stderr()),
        }
    }

    /// Waits for the next line that satisfies `pred` (skipping the others), each within
    /// [`TIMEOUT`]; `what` names it in the error.
    pub async fn next_matching(
        &mut self,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        loop {
            let line = self
                .next()
                .await
                .map_err(|e| anyhow!("waiting for {what}: {e}"))?;
            if pred(&line) {
                return Ok(line);
            }
        }
    }

    /// Waits until `n` lines have been seen in total.
    pub async fn until(&mut self, n: usize) -> Result<&[String]> {
        while self.seen.len() < n {
            self.next().await?;
        }
        Ok(&self.seen)
    }

    /// Takes the lines that arrived so far without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// What the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the process to exit (at most [`TIMEOUT`]) and gives its exit code.
    pub async fn wait(&mut self) -> Result<i32> {
        let status = tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .map_err(|_| anyhow!("the process did not exit; stderr:\n{}", self.stderr()))??;
        Ok(status.code().unwrap_or(-1))
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) -> Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        Ok(())
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// A private session bus: `dbus-daemon --session` listening on a socket in a temp dir.
pub struct SessionBus {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl SessionBus {
    /// Starts the bus and waits until it answers.
    pub async fn start() -> Result<SessionBus> {
        let dir = tempfile::Builder::new().prefix("nes-bus-").tempdir()?;
        let address = format!("unix:path={}", dir.path().join("bus").display());
        let child = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dbus-daemon (apt-get install dbus)")?;
        let bus = SessionBus {
            child,
            address,
            _dir: dir,
        };
        let address = bus.address.clone();
        eventually("the session bus to answer", TIMEOUT, || {
            let address = address.clone();
            async move {
                let out = Command::new("dbus-send")
                    .arg(format!("--bus={address}"))
                    .args([
                        "--dest=org.freedesktop.DBus",
                        "--print-reply",
                        "/org/freedesktop/DBus",
                        "org.freedesktop.DBus.GetId",
                    ])
                    .output()
                    .await?;
                Ok(out.status.success().then_some(()))
            }
        })
        .await?;
        Ok(bus)
    }

    /// The bus address, for `DBUS_SESSION_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A command with this bus as its session bus.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .kill_on_drop(true);
        cmd
    }

    /// `gdbus monitor` of the signals of `object` at `dest`, once it listens.
    pub async fn monitor(&self, dest: &str, object: &str) -> Result<Lines> {
        let mut cmd = self.command("gdbus");
        cmd.args([
            "monitor",
            "--session",
            "--dest",
            dest,
            "--object-path",
            object,
        ]);
        let mut monitor = Lines::spawn(cmd)?;
        monitor
            .next_matching("gdbus monitor to start", |l| {
                l.contains("Monitoring signals")
            })
            .await?;
        Ok(monitor)
    }

    /// Waits until `name` has an owner on the bus.
    pub async fn wait_for_name(&self, name: &str) -> Result<()> {
        let what = format!("{name} on the session bus");
        eventually(&what, TIMEOUT, || async {
            Ok(self.has_owner(name).await?.then_some(()))
        })
        .await
    }

    /// Whether `name` has an owner on the bus right now.
    pub async fn has_owner(&self, name: &str) -> Result<bool> {
        let out = self
            .command("dbus-send")
            .args([
                "--session",
                "--dest=org.freedesktop.DBus",
                "--print-reply",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
            ])
            .arg(format!("string:{name}"))
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "NameHasOwner {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout.contains("boolean true"))
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A virtual X display (`Xvfb`), on the first free display number.
pub struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    /// Starts Xvfb and waits until it says which display it took.
    pub async fn start() -> Result<Xvfb> {
        // -displayfd 1: Xvfb picks a free display and writes its number to stdout.
        let mut child = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "800x600x24",
                "-nolisten",
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start Xvfb (apt-get install xvfb)")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let number = tokio::time::timeout(TIMEOUT, lines.next_line())
            .await
            .map_err(|_| anyhow!("Xvfb did not report its display"))??
            .ok_or_else(|| anyhow!("Xvfb exited before reporting its display"))?;
        Ok(Xvfb {
            child,
            display: format!(":{}", number.trim()),
        })
    }

    /// The display, for `DISPLAY`.
    pub fn display(&self) -> &str {
        &self.display
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The dunst notification server on an X display and a session bus.
pub struct Dunst {
    child: Child,
    bus_address: String,
    _dir: tempfile::TempDir,
}

impl Dunst {
    /// Starts dunst and waits until it owns `org.freedesktop.Notifications`.
    pub async fn start(bus: &SessionBus, x: &Xvfb) -> Result<Dunst> {
        let dir = tempfile::Builder::new().prefix("nes-dunst-").tempdir()?;
        let config = dir.path().join("dunstrc");
        // Notifications stay until closed, so the test decides when they go to history.
        std::fs::write(
            &config,
            "[global]\n    monitor = 0\n    follow = none\n    history_length = 200\n    idle_threshold = 0\n    markup = full\n\
             [urgency_low]\n    timeout = 0\n[urgency_normal]\n    timeout = 0\n[urgency_critical]\n    timeout = 0\n",
        )?;
        let child = bus
            .command("dunst")
            .arg("-config")
            .arg(&config)
            .env("DISPLAY", x.display())
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dunst (apt-get install dunst)")?;
        bus.wait_for_name("org.freedesktop.Notifications").await?;
        Ok(Dunst {
            child,
            bus_address: bus.address().to_owned(),
            _dir: dir,
        })
    }

    /// Moves every shown notification to the history and returns the history as
    /// (appname, summary, body) triples, oldest first.
    pub async fn history(&self) -> Result<Vec<(String, String, String)>> {
        let ctl = |args: &[&str]| {
            let mut cmd = Command::new("dunstctl");
            cmd.args(args)
                .env("DBUS_SESSION_BUS_ADDRESS", &self.bus_address);
            cmd
        };
        ctl(&["close-all"]).output().await?;
        let out = ctl(&["history"]).output().await?;
        if !out.status.success() {
            bail!(
                "dunstctl history failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("dunstctl history is not JSON")?;
        let field =
            |n: &serde_json::Value, k: &str| n[k]["data"].as_str().unwrap_or_default().to_owned();
        let mut all: Vec<(i64, (String, String, String))> = json["data"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group.as_array().cloned().unwrap_or_default())
            .map(|n| {
                (
                    n["id"]["data"].as_i64().unwrap_or(0),
                    (
                        field(&n, "appname"),
                        field(&n, "summary"),
                        field(&n, "body"),
                    ),
                )
            })
            .collect();
        all.sort_by_key(|(id, _)| *id);
        Ok(all.into_iter().map(|(_, n)| n).collect())
    }
}

impl Drop for Dunst {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A private tmux server (its own socket name) with one session.
pub struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    /// Starts `command` (run by the shell) in a new detached session of `width`×`height`,
    /// with `env` set in it.
    pub async fn start(
        command: &str,
        env: &[(&str, String)],
        width: u16,
        height: u16,
    ) -> Result<Tmux> {
        let socket = format!("nes-test-{}-{}", std::process::id(), unique());
        let session = "nes".to_string();
        let mut cmd = Command::new("tmux");
        cmd.args([
            "-L",
            &socket,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            &session,
        ])
        .args(["-x", &width.to_string(), "-y", &height.to_string()]);
        for (k, v) in env {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        cmd.arg(command);
        let out = cmd
            .output()
            .await
            .context("cannot start tmux (apt-get install tmux)")?;
        if !out.status.success() {
            bail!(
                "tmux new-session failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Tmux { socket, session })
    }

    /// The visible screen, as text.
    pub async fn screen(&self) -> Result<String> {
        let out = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "capture-pane",
                "-p",
                "-t",
                &self.session,
            ])
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "tmux capture-pane failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Types `text` literally.
    pub async fn type_text(&self, text: &str) -> Result<()> {
        self.keys(&["-l", text]).await
    }

    /// Sends tmux key names (`Enter`, `Escape`, `C-c`, ...).
    pub async fn keys(&self, keys: &[&str]) -> Result<()> {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", &self.session])
            .args(keys)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "tmux send-keys failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits until the screen contains `needle`; returns the screen.
    pub async fn wait_for(&self, needle: &str) -> Result<String> {
        let what = format!("{needle:?} on the tmux screen");
        let result = eventually(&what, TIMEOUT, || async {
            let screen = self.screen().await?;
            Ok(screen.contains(needle).then_some(screen))
        })
        .await;
        match result {
            Ok(screen) => Ok(screen),
            Err(e) => bail!(
                "{e}\n---- screen ----\n{}",
                self.screen().await.unwrap_or_default()
            ),
        }
    }

    /// The pane's title (what `ESC ] 0 ; ... BEL` from the program would set).
    pub async fn pane_title(&self) -> Result<String> {
        let out = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "display-message",
                "-p",
                "-t",
                &self.session,
                "#{pane_title}",
            ])
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "tmux display-message failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Whether the session still exists (the program in it has not exited).
    pub async fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["-L", &self.socket, "has-session", "-t", &self.session])
            .output()
            .await
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A number unique within this process.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The repository's `examples/` folder.
pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A PATH with the directory of the built binaries first, so scripts find `nes`.
pub fn path_with_bins() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{}:{old}", crate::bin_dir().display())
}

/// The JSON objects of JSON lines, failing on a line that is not one.
pub fn json_lines(lines: &[String]) -> Result<Vec<serde_json::Value>> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect()
}

/// `nes chat -t PEER` in a 100×30 tmux terminal, for the nesd at `socket`, with `home`
/// as its home (config and state under it) and a UTF-8 locale.
pub async fn nes_chat(socket: &Path, home: &Path, peer: &str) -> Result<Tmux> {
    let env = vec![
        ("NES_SOCKET", socket.display().to_string()),
        ("HOME", home.display().to_string()),
        (
            "XDG_CONFIG_HOME",
            home.join(".config").display().to_string(),
        ),
        (
            "XDG_STATE_HOME",
            home.join(".local/state").display().to_string(),
        ),
        ("LANG", "C.UTF-8".to_string()),
    ];
    Tmux::start(
        &format!("'{}' chat -t {peer}", bin("nes")?.display()),
        &env,
        100,
        30,
    )
    .await
}
