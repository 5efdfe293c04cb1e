//! `nes-notify` with a real notification server: dunst on a virtual X display (Xvfb) and
//! a private session bus. `dunstctl history` proves what was shown: summary = sender,
//! body = text (truncated), app name NES; mute and do-not-disturb; and no repeat and no
//! gap across a restart of nes-notify (its cursor file) and of nesd.
//! Two `nes listen --json` run beside it and see the same messages once.

use anyhow::Result;
use nes_e2e::frontends::{isolate, json_lines, nes, run_nes, Dunst, Lines, SessionBus, Xvfb};
use nes_e2e::{bin, eventually, send, status, World, TIMEOUT};
use std::path::Path;

fn notify(socket: &Path, home: &Path, bus: &SessionBus, state: &Path) -> Result<Lines> {
    let mut cmd = tokio::process::Command::new(bin("nes-notify")?);
    isolate(&mut cmd, home);
    cmd.env("NES_SOCKET", socket)
        .env("DBUS_SESSION_BUS_ADDRESS", bus.address())
        .args(["--print", "--body-max", "40", "--state-file"])
        .arg(state);
    Lines::spawn(cmd)
}

/// Waits until nes-notify has subscribed (it logs where it starts).
async fn ready(notify: &Lines) -> Result<()> {
    eventually("nes-notify to subscribe", TIMEOUT, || async {
        let log = notify.stderr();
        Ok((log.contains("starting with new messages")
            || log.contains("resuming after the stored cursor"))
        .then_some(()))
    })
    .await
}

/// The (summary, body) pairs dunst has shown, once they include `expected` entries.
async fn shown(dunst: &Dunst, expected: usize) -> Result<Vec<(String, String)>> {
    eventually("dunst to show the notifications", TIMEOUT, || async {
        let history = dunst.history().await?;
        for (app, _, _) in &history {
            anyhow::ensure!(app == "NES", "app name {app}");
        }
        let pairs: Vec<(String, String)> = history.into_iter().map(|(_, s, b)| (s, b)).collect();
        Ok((pairs.len() >= expected).then_some(pairs))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dunst_shows_each_message_once_with_mute_dnd_truncation_and_restarts() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, mut bob_d) = world.user("bob").await?;
    let bus = SessionBus::start().await?;
    let x = Xvfb::start().await?;
    let dunst = Dunst::start(&bus, &x).await?;
    let home = tempfile::tempdir()?;
    let (b, h) = (bob_d.socket(), home.path());
    let state = h.join("notify.cursor");
    let mut alice = alice_d.client().await?;

    // Two listeners and the notifier, all at once.
    let start = status(&mut bob_d.client().await?)
        .await?
        .last_cursor
        .to_string();
    let listen = || -> Result<Lines> {
        let mut cmd = nes(&b, h)?;
        cmd.args(["listen", "--json", "--since", &start]);
        Lines::spawn(cmd)
    };
    let (mut l1, mut l2) = (listen()?, listen()?);
    let mut n = notify(&b, h, &bus, &state)?;
    ready(&n).await?;

    let first = send(&mut alice, "bob", "hello notify").await?;
    let line = n.next().await?;
    assert_eq!(line, format!("shown alice {}: hello notify", first.id));
    assert_eq!(
        shown(&dunst, 1).await?,
        [("alice".to_string(), "hello notify".to_string())]
    );
    let (one, two) = (
        json_lines(l1.until(1).await?)?,
        json_lines(l2.until(1).await?)?,
    );
    assert_eq!(one, two);
    assert_eq!(one[0]["id"], first.id.as_str());
    assert_eq!(one[0]["message"], "hello notify");

    // A long text is cut to --body-max characters.
    let long = "x".repeat(100);
    send(&mut alice, "bob", &long).await?;
    assert!(n.next().await?.starts_with("shown alice "));
    let history = shown(&dunst, 2).await?;
    assert_eq!(
        history[1],
        ("alice".to_string(), format!("{}…", "x".repeat(39)))
    );

    // Muted in the config file (read per message): no notification, the listeners still see it.
    run_nes(&b, h, &["config", "set", "notify_mute", "alice"], b"")
        .await?
        .expect_code(0)?;
    let muted = send(&mut alice, "bob", "muted one").await?;
    assert_eq!(
        n.next().await?,
        format!("skipped alice {} (muted)", muted.id)
    );
    run_nes(&b, h, &["config", "unset", "notify_mute"], b"")
        .await?
        .expect_code(0)?;
    run_nes(&b, h, &["config", "set", "notify_dnd", "true"], b"")
        .await?
        .expect_code(0)?;
    let quiet = send(&mut alice, "bob", "do not disturb").await?;
    assert_eq!(
        n.next().await?,
        format!("skipped alice {} (do not disturb)", quiet.id)
    );
    run_nes(&b, h, &["config", "unset", "notify_dnd"], b"")
        .await?
        .expect_code(0)?;
    assert_eq!(json_lines(l1.until(4).await?)?[2]["message"], "muted one");

    // nes-notify killed; messages arrive meanwhile; restarted, it shows exactly those.
    n.kill().await?;
    let missed1 = send(&mut alice, "bob", "while notify was down 1").await?;
    let missed2 = send(&mut alice, "bob", "while notify was down 2").await?;
    let mut n = notify(&b, h, &bus, &state)?;
    ready(&n).await?;
    assert_eq!(
        n.next().await?,
        format!("shown alice {}: while notify was down 1", missed1.id)
    );
    assert_eq!(
        n.next().await?,
        format!("shown alice {}: while notify was down 2", missed2.id)
    );

    // nesd restarted under it: it reconnects and resumes by cursor.
    bob_d.stop().await?;
    let during = send(&mut alice, "bob", "across the nesd restart").await?;
    bob_d.start_again().await?;
    assert_eq!(
        n.next().await?,
        format!("shown alice {}: across the nesd restart", during.id)
    );

    let history = shown(&dunst, 5).await?;
    let bodies: Vec<&str> = history.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        bodies,
        [
            "hello notify",
            &format!("{}…", "x".repeat(39)),
            "while notify was down 1",
            "while notify was down 2",
            "across the nesd restart"
        ],
        "each shown once, none of the muted ones"
    );
    assert!(history.iter().all(|(s, _)| s == "alice"));
    // The listeners saw all seven, once each.
    for l in [&mut l1, &mut l2] {
        let all = json_lines(l.until(7).await?)?;
        let ids: std::collections::HashSet<_> = all
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 7);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nes_notify_without_a_daemon_exits_3() -> Result<()> {
    let home = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(bin("nes-notify")?);
    isolate(&mut cmd, home.path());
    cmd.env("NES_SOCKET", home.path().join("none.sock"));
    let out = nes_e2e::frontends::run(cmd, b"").await?.expect_code(3)?;
    assert!(
        out.stderr.contains("nesd is not running")
            && out.stderr.contains("systemctl --user start nesd"),
        "{}",
        out.stderr
    );
    let mut cmd = tokio::process::Command::new(bin("nes-notify")?);
    isolate(&mut cmd, home.path());
    cmd.arg("--body-max").arg("lots");
    nes_e2e::frontends::run(cmd, b"").await?.expect_code(2)?;
    Ok(())
}
