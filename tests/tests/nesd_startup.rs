//! nesd end to end: starting and stopping — one-line errors with exit code 1, socket
//! and directory modes, a live socket refused, a stale one taken over, clean SIGTERM.

use anyhow::{ensure, Result};
use nes_e2e::*;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &std::path::Path) -> Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_are_one_line_with_exit_code_1() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let empty_config = dir.join("empty.toml");
    std::fs::write(&empty_config, "")?;
    let ks_key = dir.join("ks.pub");
    std::fs::write(&ks_key, Identity::generate("server")?.sign_pem())?;
    let base = |user: &str, data: &std::path::Path| -> Vec<String> {
        vec![
            "--user".into(),
            user.into(),
            "--broker".into(),
            "mqtt://127.0.0.1:9".into(),
            "--keyserver".into(),
            "http://127.0.0.1:9".into(),
            "--keyserver-key".into(),
            ks_key.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--socket".into(),
            dir.join(format!("{user}.sock")).display().to_string(),
            "--config".into(),
            empty_config.display().to_string(),
        ]
    };
    let run = |args: Vec<String>| -> Result<(i32, String)> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Nesd::run_once(&refs, &[])
    };
    // Log lines may come first; the error itself is the last line, alone.
    let one_line = |stderr: &str| {
        stderr
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("nesd: "))
    };
    let last = |stderr: &str| {
        stderr
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };

    // No keys.
    let (code, err) = run(base("nokeys", &dir.join("data-nokeys")))?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("nes generate --user nokeys"),
        "{code}: {err}"
    );
    ensure!(mode(&dir.join("data-nokeys"))? == 0o700, "data dir mode");

    // Unreadable key files.
    let data = dir.join("data-bad");
    std::fs::create_dir_all(data.join("keys"))?;
    std::fs::write(data.join("keys/badkeys-rsa-message"), "not a key")?;
    std::fs::write(data.join("keys/badkeys-rsa-sign"), "not a key")?;
    let (code, err) = run(base("badkeys", &data))?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("cannot read key file"),
        "{code}: {err}"
    );

    // A bad config file.
    let id = Identity::generate("alice")?;
    let bad_config = dir.join("bad.toml");
    std::fs::write(&bad_config, "user = [\"unterminated\"\n")?;
    let mut args = base("alice", id.data_dir());
    let n = args.len();
    args[n - 1] = bad_config.display().to_string();
    let (code, err) = run(args)?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("bad config file"),
        "{code}: {err}"
    );

    // A config file that does not exist.
    let mut args = base("alice", id.data_dir());
    args[n - 1] = dir.join("missing.toml").display().to_string();
    let (code, err) = run(args)?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("cannot read config file"),
        "{code}: {err}"
    );

    // An unreadable key server key.
    let mut args = base("alice", id.data_dir());
    args[7] = dir.join("nope.pub").display().to_string();
    let (code, err) = run(args)?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("key server's public key"),
        "{code}: {err}"
    );

    // Missing username: settings from the environment count.
    let (code, err) = Nesd::run_once(
        &["--config", empty_config.to_str().unwrap_or_default()],
        &[("NES_KEYSERVER", "http://127.0.0.1:9")],
    )?;
    ensure!(
        code == 1 && one_line(&err) && last(&err).contains("--user"),
        "{code}: {err}"
    );

    // Bad usage is clap's exit 2.
    let (code, _) = Nesd::run_once(&["--no-such-flag"], &[])?;
    ensure!(code == 2, "bad usage exit {code}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_refused_when_live_and_taken_over_when_stale() -> Result<()> {
    let w = World::start().await?;
    let (id, mut nesd) = w.user("alice").await?;
    let socket = nesd.socket();
    ensure!(mode(&socket)? == 0o600, "socket mode {:o}", mode(&socket)?);
    ensure!(
        mode(socket.parent().unwrap_or(&socket))? == 0o700,
        "socket dir mode"
    );
    ensure!(mode(id.data_dir())? == 0o700, "data dir mode");

    // A second daemon on the same socket is refused, and the first keeps serving.
    let other = Identity::generate("bob")?;
    let ks_key = w.keyserver.public_key_path();
    let args = [
        "--user",
        "bob",
        "--broker",
        &w.broker.url(),
        "--keyserver",
        &w.keyserver.url(),
        "--keyserver-key",
        ks_key.to_str().unwrap_or_default(),
        "--data-dir",
        other.data_dir().to_str().unwrap_or_default(),
        "--socket",
        socket.to_str().unwrap_or_default(),
        "--config",
        "/dev/null",
    ];
    let (code, err) = Nesd::run_once(&args, &[])?;
    ensure!(
        code == 1
            && err.trim_end().ends_with("pass a different --socket")
            && err.contains("already running"),
        "{code}: {err}"
    );
    status(&mut nesd.client().await?).await?;

    // kill -9 leaves the socket file behind; the next start takes it over.
    nesd.kill9()?;
    ensure!(
        socket.exists(),
        "the socket file should be left behind by kill -9"
    );
    nesd.start_again().await?;
    let s = status(&mut nesd.client().await?).await?;
    ensure!(
        s.user == "alice" && s.pid == nesd.pid().unwrap_or_default(),
        "{s:?}"
    );
    let client_id = s.client_id.clone();
    ensure!(client_id.starts_with("nes-alice-"), "client id {client_id}");

    // SIGTERM: exit 0, socket removed; the client id stays the same across restarts.
    nesd.stop().await?;
    ensure!(!socket.exists(), "socket left behind after SIGTERM");
    nesd.start_again().await?;
    ensure!(
        status(&mut nesd.client().await?).await?.client_id == client_id,
        "client id changed"
    );
    Ok(())
}
