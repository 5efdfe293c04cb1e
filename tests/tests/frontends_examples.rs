//! The scripts in `examples/`, run as a user would run them (with `nes` on the PATH):
//! the echo bot answers, the logger resumes without loss or repeat. (The D-Bus monitor
//! one-liner is exercised in `frontends_dbus.rs`, where a session bus runs.)

use anyhow::Result;
use nes_e2e::frontends::{examples_dir, isolate, json_lines, path_with_bins, Lines};
use nes_e2e::{eventually, history, send, status, World, TIMEOUT};
use std::path::Path;

fn script(name: &str, socket: &Path, home: &Path, args: &[&str]) -> Result<Lines> {
    let mut cmd = tokio::process::Command::new(examples_dir().join(name));
    isolate(&mut cmd, home);
    cmd.env("PATH", path_with_bins())
        .env("NES_SOCKET", socket)
        .args(args);
    Lines::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_bot_answers_every_message_once() -> Result<()> {
    let world = World::start().await?;
    let (_bot, bot_d) = world.user("echo-bot").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let since = status(&mut bot_d.client().await?)
        .await?
        .last_cursor
        .to_string();
    let mut bot = script(
        "echo-bot.sh",
        &bot_d.socket(),
        home.path(),
        &["--since", &since],
    )?;

    let mut bob = bob_d.client().await?;
    for text in ["ping", "-starts with a dash", "two\nlines"] {
        send(&mut bob, "echo-bot", text).await?;
    }
    let answers = eventually("three echoes", TIMEOUT, || {
        let mut c = bob.clone();
        async move {
            let got: Vec<String> = history(&mut c, "echo-bot")
                .await?
                .into_iter()
                .filter(|m| m.from == "echo-bot")
                .map(|m| m.text)
                .collect();
            Ok((got.len() >= 3).then_some(got))
        }
    })
    .await?;
    assert_eq!(
        answers,
        [
            "echo: ping",
            "echo: -starts with a dash",
            "echo: two\nlines"
        ]
    );
    // Each answer's id was printed by the inner `nes send`.
    assert_eq!(bot.until(3).await?.len(), 3);
    bot.kill().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logger_resumes_after_its_last_line() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let log = home.path().join("messages.jsonl");
    let log_arg = log.display().to_string();
    let since = status(&mut bob_d.client().await?)
        .await?
        .last_cursor
        .to_string();
    let read_log = || -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        json_lines(&text.lines().map(String::from).collect::<Vec<_>>())
    };
    let wait_lines = |n: usize| {
        let read_log = &read_log;
        eventually("the log file to grow", TIMEOUT, move || async move {
            let lines = read_log()?;
            Ok((lines.len() >= n).then_some(lines))
        })
    };

    // First run: no file yet; --since makes the start exact for the test.
    let mut logger = script(
        "log-to-file.sh",
        &bob_d.socket(),
        home.path(),
        &[&log_arg, "--since", &since],
    )?;
    let mut alice = alice_d.client().await?;
    send(&mut alice, "bob", "one").await?;
    send(&mut alice, "bob", "two").await?;
    wait_lines(2).await?;
    logger.kill().await?;

    // Messages while the logger is away, then a second run without --since: it resumes
    // from the file's last cursor.
    send(&mut alice, "bob", "three").await?;
    send(&mut alice, "bob", "four").await?;
    let mut logger = script("log-to-file.sh", &bob_d.socket(), home.path(), &[&log_arg])?;
    let lines = wait_lines(4).await?;
    send(&mut alice, "bob", "five").await?;
    let lines = if lines.len() < 5 {
        wait_lines(5).await?
    } else {
        lines
    };
    let texts: Vec<&str> = lines
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["one", "two", "three", "four", "five"],
        "no loss, no repeat"
    );
    logger.kill().await?;
    Ok(())
}
