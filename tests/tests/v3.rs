//! v3 in nesd end to end (issue 15): two daemons and the real key server.
//!
//! Once bob's prekey is published, alice→bob goes out as v3: the frame captured from the
//! broker says `"v":3`, bob receives it, alice's status counts it as v3, and the captured
//! frame opens offline with bob's data directory and nothing else (not with his RSA
//! message key). With short rotation and grace periods, bob's daemon rotates, deletes the
//! prekey's file after `expires + grace`, and the captured frame no longer opens with
//! anything left in his data directory.

use anyhow::{ensure, Context, Result};
use nes_e2e::frontends::run_nes;
use nes_e2e::*;
use nes_proto::rpc::{Direction, MessageState};
use std::collections::HashSet;
use std::path::Path;

fn prekey_files(data_dir: &Path) -> Result<HashSet<String>> {
    let dir = data_dir.join("keys").join("prekeys");
    let mut names = HashSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        names.insert(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn open_with_dir(bob: &Identity, alice: &Identity, frame: &[u8]) -> Result<(i32, String, String)> {
    let dir = bob.data_dir().display().to_string();
    let sender = alice
        .data_dir()
        .join("keys")
        .join("alice-rsa-sign.pub")
        .display()
        .to_string();
    nes_offline(
        &[
            "frame",
            "open",
            "--data-dir",
            &dir,
            "--sender-key",
            &sender,
            "--me",
            "bob",
        ],
        frame,
    )
}

/// `nes frame open --key` with bob's RSA message key alone (the v1/v2 way).
fn open_with_key(bob: &Identity, alice: &Identity, frame: &[u8]) -> Result<(i32, String, String)> {
    let key = bob.data_dir().join("keys").join("bob-rsa-message");
    let sender = alice.data_dir().join("keys").join("alice-rsa-sign.pub");
    nes_offline(
        &[
            "frame",
            "open",
            "--key",
            &key.display().to_string(),
            "--sender-key",
            &sender.display().to_string(),
        ],
        frame,
    )
}

/// Sends one message alice→bob and returns the frame seen on bob's topic.
async fn send_captured(
    w: &World,
    alice: &mut Client,
    bob: &Client,
    text: &str,
) -> Result<(nes_proto::rpc::Message, Vec<u8>)> {
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.subscribe("nes/bob/message").await?;
    let sent = send(alice, "bob", text).await?;
    let frame = wire.next_publish().await?.payload.to_vec();
    let h = wait_history(bob, "alice", 1, |m| {
        m.direction == Direction::Incoming as i32
            && m.id == sent.id
            && m.state == MessageState::Received as i32
    })
    .await?;
    ensure!(
        h.iter()
            .any(|m| m.id == sent.id && m.text == text && m.wire_version == 3),
        "bob's history {h:?}"
    );
    Ok((sent, frame))
}

#[tokio::test]
async fn v3_by_default_and_the_frame_opens_only_with_the_recipients_files() -> Result<()> {
    let w = World::start().await?;
    let (bob_id, bob) = w.user("bob").await?;
    let (alice_id, alice) = w.user("alice").await?;
    let b = bob.client().await?;
    let mut a = alice.client().await?;
    let published = wait_prekey_published(&b, None).await?;
    ensure!(published.prekey_waiting.is_empty(), "{published:?}");

    let text = "v3 to bob: forward secrecy";
    let (sent, frame) = send_captured(&w, &mut a, &b, text).await?;
    ensure!(sent.wire_version == 3, "sent as v{}", sent.wire_version);
    let json: serde_json::Value = serde_json::from_slice(&frame)?;
    ensure!(json["v"] == 3, "frame {json}");
    ensure!(
        !contains_bytes(&frame, text.as_bytes()),
        "plaintext on the wire"
    );

    let s = status(&mut a).await?;
    ensure!(
        (s.sent_v1, s.sent_v2, s.sent_v3) == (0, 0, 1),
        "alice's counts v1 {} v2 {} v3 {}",
        s.sent_v1,
        s.sent_v2,
        s.sent_v3
    );

    // Offline: bob's data directory opens it ...
    let (code, out, err) = open_with_dir(&bob_id, &alice_id, &frame)?;
    ensure!(code == 0 && out.contains(text), "exit {code}: {out} {err}");
    // ... his RSA message key alone (v1/v2) does not.
    let (code, out, err) = open_with_key(&bob_id, &alice_id, &frame)?;
    ensure!(code != 0 && !out.contains(text), "exit {code}: {out} {err}");
    // ... nor does another user's directory, with the right sender key.
    let sender = alice_id.data_dir().join("keys").join("alice-rsa-sign.pub");
    let (carol_id, _carol) = w.user("carol").await?;
    let (code, out, err) = nes_offline(
        &[
            "frame",
            "open",
            "--data-dir",
            &carol_id.data_dir().display().to_string(),
            "--sender-key",
            &sender.display().to_string(),
            "--me",
            "bob",
        ],
        &frame,
    )?;
    ensure!(
        code != 0 && err.contains("unknown_prekey"),
        "exit {code}: {out} {err}"
    );
    Ok(())
}

#[tokio::test]
async fn after_rotation_and_grace_the_prekey_file_is_gone_and_the_frame_stays_shut() -> Result<()> {
    let w = World::start().await?;
    let bob_id = Identity::generate("bob")?;
    bob_id.register(&w.keyserver).await?;
    // Rotation 4 s (each prekey expires after 8 s), grace 2 s.
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .args(["--prekey-rotation", "4", "--prekey-grace", "2"])
        .start()
        .await?;
    let (alice_id, alice) = w.user("alice").await?;
    let b = bob.client().await?;
    let mut a = alice.client().await?;
    let first = wait_prekey_published(&b, None).await?;

    let text = "sealed to a short-lived prekey";
    let (sent, frame) = send_captured(&w, &mut a, &b, text).await?;
    ensure!(sent.wire_version == 3, "sent as v{}", sent.wire_version);
    let held_then = prekey_files(bob_id.data_dir())?;
    let (code, out, err) = open_with_dir(&bob_id, &alice_id, &frame)?;
    ensure!(code == 0 && out.contains(text), "exit {code}: {out} {err}");

    // A rotated prekey gets published ...
    wait_prekey_published(&b, Some(&first.prekey_id)).await?;
    // ... and every prekey file held at capture time is deleted after expires + grace.
    eventually("the old prekey files deleted", TIMEOUT, || {
        let held_then = &held_then;
        let dir = bob_id.data_dir();
        async move {
            let now = prekey_files(dir)?;
            Ok(held_then.is_disjoint(&now).then_some(()))
        }
    })
    .await?;
    let (code, out, err) = open_with_dir(&bob_id, &alice_id, &frame)?;
    ensure!(
        code != 0 && !out.contains(text) && err.contains("unknown_prekey"),
        "exit {code}: {out} {err}"
    );
    // Nothing else in the data directory opens it either (his RSA key included).
    let (code, out, _) = open_with_key(&bob_id, &alice_id, &frame)?;
    ensure!(code != 0 && !out.contains(text), "exit {code}: {out}");
    Ok(())
}

/// nesd makes its prekey at start and keeps trying to publish it while the account does
/// not exist or is not active yet (the key server answers 404), says so in status, and
/// publishes it by itself once the mail link is followed: no restart, no `register` call
/// to nudge it (the registration here goes to the key server directly).
#[tokio::test]
async fn the_prekey_is_published_by_retrying_once_the_account_is_active() -> Result<()> {
    let w = World::start().await?;
    let id = Identity::generate("dora")?;
    let dora = Nesd::start(&id, &w.broker, &w.keyserver).await?;
    let d = dora.client().await?;
    let waiting = eventually("a failed first publication", TIMEOUT, || {
        let mut c = d.clone();
        async move {
            let s = status(&mut c).await?;
            Ok((!s.prekey_waiting.is_empty()).then_some(s))
        }
    })
    .await?;
    ensure!(
        !waiting.prekey_published && !waiting.prekey_id.is_empty(),
        "{waiting:?}"
    );
    ensure!(
        waiting.prekey_next_try_ms > nes_proto::now_ms() - 1_000,
        "no next try: {waiting:?}"
    );
    let text = run_nes(
        &dora.socket(),
        tempfile::tempdir()?.path(),
        &["status"],
        b"",
    )
    .await?
    .expect_code(0)?
    .stdout;
    ensure!(
        text.contains("waiting for the key server") && text.contains("next try in"),
        "nes status:\n{text}"
    );

    id.register(&w.keyserver).await?;
    let published = wait_prekey_published(&d, None).await?;
    ensure!(
        published.prekey_id == waiting.prekey_id && published.prekey_waiting.is_empty(),
        "{published:?}"
    );
    let served = reqwest::get(format!("{}/users/dora/prekey", w.keyserver.url())).await?;
    ensure!(served.status() == 200, "GET prekey: {}", served.status());
    Ok(())
}
