//! Presence end to end (issue 13), through a real mosquitto and the real key server,
//! seen through `nes --json`, a real session bus (`gdbus monitor`) and a real terminal
//! (tmux running `nes chat`): told, changed, invisible, expired after a `kill -9`, and
//! offline at once after a clean stop. The broker sees only frames it cannot read.

use anyhow::{ensure, Context, Result};
use nes_e2e::frontends::{nes_chat, run_nes, SessionBus};
use nes_e2e::*;
use nes_proto::rpc::{self, PresenceStatus};
use std::time::Duration;

const DEST: &str = "org.nes.Messenger1";
const PATH: &str = "/org/nes/Messenger1";

/// Waits until `client` sees `user`'s presence as `status` (and `expired`).
async fn wait_presence(
    client: &Client,
    user: &str,
    status: PresenceStatus,
    expired: bool,
) -> Result<rpc::Presence> {
    let what = format!("{user} {}", nes_proto::names::presence_name(status as i32));
    eventually(&what, TIMEOUT, || {
        let mut c = client.clone();
        let user = user.to_owned();
        async move {
            let p = c
                .get_presence(rpc::GetPresenceRequest { username: user })
                .await?
                .into_inner();
            Ok((p.status == status as i32 && p.expired == expired).then_some(p))
        }
    })
    .await
}

/// alice and bob exchange a text each way, so each knows the other speaks kinds.
async fn introduce(a: &mut Client, b: &mut Client) -> Result<()> {
    send(a, "bob", "hi bob").await?;
    wait_history(b, "alice", 1, |m: &rpc::Message| m.text == "hi bob").await?;
    send(b, "alice", "hi alice").await?;
    wait_history(a, "bob", 1, |m: &rpc::Message| m.text == "hi alice").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_seen_changed_hidden_and_expires_after_a_kill() -> Result<()> {
    let w = World::start().await?;
    // Told every 2 s, so each lasts 3 s: an unclean exit shows within seconds.
    let fast = ["--presence-interval", "2s"];
    let (_alice_id, mut alice) = w.user_with("alice", fast).await?;
    let mut a = alice.client().await?;
    wait_connected(&a).await?;
    let bus = SessionBus::start().await?;
    let bob_id = Identity::generate("bob")?;
    bob_id.register(&w.keyserver).await?;
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .args(fast)
        .session_bus(&bus)
        .start()
        .await?;
    bus.wait_for_name(DEST).await?;
    let mut b = bob.client().await?;
    wait_connected(&b).await?;
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.subscribe("nes/bob/message").await?;
    let mut monitor = bus.monitor(DEST, PATH).await?;
    introduce(&mut a, &mut b).await?;

    // Seen: online, within a refresh.
    wait_presence(&b, "alice", PresenceStatus::Online, false)
        .await
        .with_context(|| alice.log_tail(30))?;
    let line = monitor
        .next_matching("PresenceChanged online", |l| {
            l.contains("PresenceChanged") && l.contains("'alice'") && l.contains("'online'")
        })
        .await?;
    ensure!(line.contains("'alice', 'online'"), "{line}");

    // bob's chat with alice shows it in its title.
    let home = tempfile::tempdir()?;
    let chat = nes_chat(&bob.socket(), home.path(), "alice").await?;
    chat.wait_for("alice (online)").await?;

    // Changed, through the CLI: everywhere on bob's side.
    let alice_home = tempfile::tempdir()?;
    let out = run_nes(
        &alice.socket(),
        alice_home.path(),
        &["presence", "away", "--note", "at lunch", "--json"],
        b"",
    )
    .await?
    .expect_code(0)?;
    let own: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    ensure!(
        own["status"] == "away" && own["note"] == "at lunch",
        "{own}"
    );
    let p = wait_presence(&b, "alice", PresenceStatus::Away, false).await?;
    ensure!(p.note == "at lunch", "{p:?}");
    monitor
        .next_matching("PresenceChanged away", |l| {
            l.contains("PresenceChanged") && l.contains("'away'") && l.contains("'at lunch'")
        })
        .await?;
    chat.wait_for("alice (away (at lunch))").await?;
    let out = run_nes(&bob.socket(), home.path(), &["contacts", "--json"], b"")
        .await?
        .expect_code(0)?;
    let alice_row = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["username"] == "alice")
        .with_context(|| out.stdout.clone())?;
    ensure!(
        alice_row["presence"]["status"] == "away"
            && alice_row["presence"]["last_seen"].as_i64() > Some(0),
        "{alice_row}"
    );
    let out = run_nes(&bob.socket(), home.path(), &["contacts"], b"")
        .await?
        .expect_code(0)?;
    ensure!(out.stdout.contains("away (at lunch)"), "{}", out.stdout);
    // A bad status is a usage error; nothing changes.
    run_nes(
        &alice.socket(),
        alice_home.path(),
        &["presence", "asleep"],
        b"",
    )
    .await?
    .expect_code(2)?;

    // The broker saw frames, never the status or the note.
    let mut frames = 0;
    while let Ok(Ok(p)) =
        tokio::time::timeout(Duration::from_millis(200), wire.next_publish()).await
    {
        let text = String::from_utf8_lossy(&p.payload).to_string();
        ensure!(
            !text.contains("lunch") && !text.contains("away"),
            "plaintext on the wire: {text}"
        );
        frames += 1;
    }
    ensure!(frames >= 2, "{frames} frames to bob");

    // Invisible: bob sees offline at once, and then nothing more comes from alice.
    run_nes(
        &alice.socket(),
        alice_home.path(),
        &["presence", "invisible"],
        b"",
    )
    .await?
    .expect_code(0)?;
    let p = wait_presence(&b, "alice", PresenceStatus::Offline, false).await?;
    ensure!(!p.expired, "told, not expired: {p:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(100), wire.next_publish()).await
    {}
    let sent_before = status(&mut a).await?.presence_sent;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), wire.next_publish())
            .await
            .is_err(),
        "a frame to bob while alice is invisible"
    );
    ensure!(status(&mut a).await?.presence_sent == sent_before);

    // Online again, then kill -9: bob sees it expire (offline, expired) by itself.
    a.set_presence(rpc::SetPresenceRequest {
        status: PresenceStatus::Online as i32,
        note: String::new(),
    })
    .await?;
    wait_presence(&b, "alice", PresenceStatus::Online, false).await?;
    alice.kill9()?;
    let p = wait_presence(&b, "alice", PresenceStatus::Offline, true).await?;
    ensure!(p.last_seen_ms > 0, "{p:?}");
    monitor
        .next_matching("PresenceChanged offline", |l| {
            l.contains("PresenceChanged") && l.contains("'alice'") && l.contains("'offline'")
        })
        .await?;
    chat.wait_for("alice (offline, last seen").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_says_offline_at_once() -> Result<()> {
    let w = World::start().await?;
    // A presence lasting 90 s: "offline" within seconds can only be the stop telling it.
    let (_alice_id, mut alice) = w.user_with("alice", ["--presence-interval", "60s"]).await?;
    let mut a = alice.client().await?;
    wait_connected(&a).await?;
    let (_bob_id, _bob, mut b) = w.connected_user("bob").await?;
    introduce(&mut a, &mut b).await?;
    // alice told bob nothing yet (bob was not a known contact at her connect): changing
    // the note tells him.
    a.set_presence(rpc::SetPresenceRequest {
        status: PresenceStatus::Busy as i32,
        note: "deep work".into(),
    })
    .await?;
    let p = wait_presence(&b, "alice", PresenceStatus::Busy, false).await?;
    ensure!(p.expires_ms > nes_proto::now_ms() + 60_000, "{p:?}");
    alice.stop().await?;
    let p = wait_presence(&b, "alice", PresenceStatus::Offline, false).await?;
    ensure!(!p.expired && p.note.is_empty(), "{p:?}");
    // The presence set survives the restart, and is told again at connect.
    alice.start_again().await?;
    let mut a = alice.client().await?;
    wait_connected(&a).await?;
    let own = a
        .get_presence(rpc::GetPresenceRequest {
            username: String::new(),
        })
        .await?
        .into_inner();
    ensure!(own.status == PresenceStatus::Busy as i32 && own.note == "deep work");
    wait_presence(&b, "alice", PresenceStatus::Busy, false).await?;
    Ok(())
}
