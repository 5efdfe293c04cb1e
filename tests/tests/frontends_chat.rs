//! `nes chat` in a real terminal (tmux): scrollback from history, a typed line reaches the
//! peer, an incoming line appears, two chat windows stay in step, delivery marks, marking
//! read, and leaving with Esc.

use anyhow::Result;
use nes_e2e::frontends::{nes_chat, run_nes};
use nes_e2e::{eventually, history, send, status, World, TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_lines_reach_the_peer_and_incoming_lines_appear_in_every_window() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let mut alice = alice_d.client().await?;
    send(&mut alice, "bob", "before the chat opened").await?;
    let mut bob = bob_d.client().await?;
    eventually("bob has the first message", TIMEOUT, || {
        let mut c = bob.clone();
        async move { Ok((!history(&mut c, "alice").await?.is_empty()).then_some(())) }
    })
    .await?;

    let one = nes_chat(&bob_d.socket(), home.path(), "alice").await?;
    let screen = one.wait_for("alice: before the chat opened").await?;
    assert!(
        screen.contains("bob ⇄ alice"),
        "title names both sides:\n{screen}"
    );
    // What the chat showed is marked read.
    eventually("the chat marked it read", TIMEOUT, || {
        let mut c = bob.clone();
        async move { Ok((status(&mut c).await?.unread == 0).then_some(())) }
    })
    .await?;
    let two = nes_chat(&bob_d.socket(), home.path(), "alice").await?;
    two.wait_for("alice: before the chat opened").await?;

    // Incoming, live, in both windows.
    send(&mut alice, "bob", "live from alice").await?;
    one.wait_for("alice: live from alice").await?;
    two.wait_for("alice: live from alice").await?;

    // Typed in one window: reaches alice, shows in both, marked delivered (✓).
    one.type_text("hello alice, from the terminal").await?;
    one.keys(&["Enter"]).await?;
    eventually("alice got the typed line", TIMEOUT, || {
        let mut c = alice.clone();
        async move {
            let texts: Vec<String> = history(&mut c, "bob")
                .await?
                .into_iter()
                .map(|m| m.text)
                .collect();
            Ok(texts
                .contains(&"hello alice, from the terminal".to_string())
                .then_some(()))
        }
    })
    .await?;
    two.wait_for("bob: hello alice, from the terminal").await?;
    one.wait_for("bob: hello alice, from the terminal ✓")
        .await?;

    // An empty line sends nothing; Esc leaves and gives the terminal back.
    one.keys(&["Enter"]).await?;
    one.keys(&["Escape"]).await?;
    eventually("the chat to exit on Esc", TIMEOUT, || async {
        Ok((!one.alive().await).then_some(()))
    })
    .await?;
    let sent: Vec<String> = history(&mut bob, "alice")
        .await?
        .into_iter()
        .filter(|m| m.from == "bob")
        .map(|m| m.text)
        .collect();
    assert_eq!(sent, ["hello alice, from the terminal"]);
    drop(two);

    // An unknown peer is refused before the screen is taken over.
    let out = run_nes(
        &bob_d.socket(),
        home.path(),
        &["chat", "-t", "zed-nobody"],
        b"",
    )
    .await?
    .expect_code(1)?;
    assert!(out.stderr.contains("zed-nobody"), "{}", out.stderr);
    let out = run_nes(
        &bob_d.socket(),
        home.path(),
        &["chat", "-t", "NOT VALID"],
        b"",
    )
    .await?
    .expect_code(1)?;
    assert!(out.stderr.contains("NOT VALID"), "{}", out.stderr);
    Ok(())
}
