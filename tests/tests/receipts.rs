//! Delivery and read receipts end to end (issue 13), through a real mosquitto and the real
//! key server, seen through `nes --json`, a real session bus (`gdbus monitor`) and a real
//! terminal (tmux running `nes chat`).
//!
//! - A message moves queued, sent, delivered (bob's nesd stored it), read (bob read it).
//! - `read_receipts = false` stops at delivered; a legacy (v1) contact sends none.
//! - A replayed receipt moves nothing back; a receipt from another contact, or one
//!   forged in another's name, moves nothing.

use anyhow::{ensure, Context, Result};
use nes_e2e::frontends::{json_lines, nes, nes_chat, run_nes, Lines, SessionBus};
use nes_e2e::*;
use nes_proto::frame::{self, Draft, Version};
use nes_proto::inner::{Control, Receipt, ReceiptState};
use nes_proto::rpc::{self, Direction, MessageState};
use nes_proto::Username;
use std::time::Duration;

const DEST: &str = "org.nes.Messenger1";
const PATH: &str = "/org/nes/Messenger1";

async fn state_of(client: &Client, peer: &str, id: &str) -> Result<i32> {
    let h = history(&mut client.clone(), peer).await?;
    h.iter()
        .find(|m| m.id == id)
        .map(|m| m.state)
        .with_context(|| format!("no message {id} with {peer}"))
}

async fn wait_state(client: &Client, peer: &str, id: &str, want: MessageState) -> Result<()> {
    let what = format!("message {id} {}", nes_proto::names::state_name(want as i32));
    eventually(&what, TIMEOUT, || {
        let (c, peer, id) = (client.clone(), peer.to_owned(), id.to_owned());
        async move { Ok((state_of(&c, &peer, &id).await? == want as i32).then_some(())) }
    })
    .await
}

/// A receipt frame sealed by `signer` claiming to come from `from`.
fn receipt_frame(
    from: &str,
    to: &Identity,
    signer: &Identity,
    state: ReceiptState,
    ids: &[String],
) -> Result<Vec<u8>> {
    let (from, to_name) = (Username::parse(from)?, Username::parse(&to.user)?);
    let receipt = Receipt {
        state,
        ids: ids.to_vec(),
    };
    let draft = Draft {
        control: Some(Control::Receipt(&receipt)),
        wants_receipts: false,
        from: &from,
        to: &to_name,
        text: "",
        timestamp_ms: nes_proto::now_ms(),
    };
    Ok(frame::seal(Version::V2, &draft, to.message.public_key(), &signer.sign)?.frame)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_moves_to_delivered_then_read_in_json_dbus_and_chat() -> Result<()> {
    let w = World::start().await?;
    let bus = SessionBus::start().await?;
    let alice_id = Identity::generate("alice")?;
    alice_id.register(&w.keyserver).await?;
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .session_bus(&bus)
        .start()
        .await?;
    bus.wait_for_name(DEST).await?;
    let a = alice.client().await?;
    wait_connected(&a).await?;
    let (_bob_id, bob, b) = w.connected_user("bob").await?;
    let home = tempfile::tempdir()?;

    // Watchers: D-Bus signals, and `nes listen --json --outgoing` from alice's last event.
    let mut monitor = bus.monitor(DEST, PATH).await?;
    let since = status(&mut a.clone()).await?.last_log_cursor;
    let mut listen = {
        let mut cmd = nes(&alice.socket(), home.path())?;
        cmd.args(["listen", "--json", "--outgoing", "--since", &since]);
        Lines::spawn(cmd)?
    };

    // alice types a line in `nes chat bob`.
    let chat = nes_chat(&alice.socket(), home.path(), "bob").await?;
    chat.wait_for("bob").await?;
    chat.type_text("did you get this?").await?;
    chat.keys(&["Enter"]).await?;
    let got = wait_history(&b, "alice", 1, |m: &rpc::Message| {
        m.direction == Direction::Incoming as i32 && m.text == "did you get this?"
    })
    .await
    .with_context(|| bob.log_tail(30))?;
    let id = got[0].id.clone();
    ensure!(got[0].wants_receipts, "alice's v3 text asks for receipts");

    // Stored at bob: delivered, everywhere.
    wait_state(&a, "bob", &id, MessageState::Delivered)
        .await
        .with_context(|| alice.log_tail(30))?;
    let screen = chat.wait_for("did you get this? ✓✓").await?;
    ensure!(!screen.contains("✓✓ read"), "not read yet: {screen}");
    let line = monitor
        .next_matching("MessageStateChanged delivered", |l| {
            l.contains("MessageStateChanged") && l.contains("'delivered'")
        })
        .await?;
    ensure!(
        line.contains(&format!("'{id}'")) && line.contains("'bob'"),
        "{line}"
    );

    // bob reads it with `nes history alice`: read.
    let bob_home = tempfile::tempdir()?;
    let out = run_nes(&bob.socket(), bob_home.path(), &["history", "alice"], b"")
        .await?
        .expect_code(0)?;
    ensure!(out.stdout.contains("did you get this?"), "{}", out.stdout);
    wait_state(&a, "bob", &id, MessageState::Read)
        .await
        .with_context(|| alice.log_tail(30))?;
    chat.wait_for("did you get this? ✓✓ read").await?;
    let line = monitor
        .next_matching("MessageStateChanged read", |l| {
            l.contains("MessageStateChanged") && l.contains("'read'")
        })
        .await?;
    ensure!(line.contains(&format!("'{id}'")), "{line}");
    let out = run_nes(
        &alice.socket(),
        home.path(),
        &["history", "bob", "--json"],
        b"",
    )
    .await?
    .expect_code(0)?;
    let lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    let rows = json_lines(&lines)?;
    let row = rows
        .iter()
        .find(|r| r["id"] == id.as_str())
        .context("the message in history --json")?;
    ensure!(row["state"] == "read", "{row}");

    // listen --outgoing: the message, then each of its states, in order.
    let mut states = Vec::new();
    while states.last().map(String::as_str) != Some("read") {
        let line = listen.next().await?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v["id"] != id.as_str() {
            continue;
        }
        match v["event"].as_str() {
            Some("state") => states.push(v["state"].as_str().unwrap_or_default().to_owned()),
            _ => {
                ensure!(v["message"] == "did you get this?", "{v}");
                states.push(format!(
                    "message {}",
                    v["state"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    // "sent" (the broker's acknowledgement) is normally there; a receipt may overtake it.
    let without_sent: Vec<&String> = states.iter().filter(|s| *s != "sent").collect();
    ensure!(
        without_sent == ["message queued", "delivered", "read"]
            && states.iter().filter(|s| *s == "sent").count() <= 1
            && states
                .iter()
                .position(|s| s == "sent")
                .is_none_or(|i| i == 1),
        "listen --outgoing: {states:?}"
    );

    // One receipt frame per state from bob; none from alice (receipts are not receipted).
    let (sa, sb) = (status(&mut a.clone()).await?, status(&mut b.clone()).await?);
    ensure!(
        sb.receipts_sent == 2 && sa.receipts_received == 2,
        "bob sent {}, alice received {}",
        sb.receipts_sent,
        sa.receipts_received
    );
    ensure!(sa.receipts_sent == 0 && sb.receipts_received == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_off_stop_at_delivered_and_legacy_contacts_send_none() -> Result<()> {
    let w = World::start().await?;
    let (_alice_id, alice, mut a) = w.connected_user("alice").await?;
    let (_bob_id, bob) = w.user_with("bob", ["--read-receipts", "false"]).await?;
    let mut b = bob.client().await?;
    wait_connected(&b).await?;

    let sent = send(&mut a, "bob", "read me quietly").await?;
    wait_state(&a, "bob", &sent.id, MessageState::Delivered)
        .await
        .with_context(|| alice.log_tail(30))?;
    let marked = b
        .mark_read(rpc::MarkReadRequest {
            peer: "alice".into(),
            up_to_id: String::new(),
        })
        .await?
        .into_inner()
        .marked;
    ensure!(marked == 1, "marked {marked}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        state_of(&a, "bob", &sent.id).await? == MessageState::Delivered as i32,
        "read receipts are off at bob"
    );
    ensure!(
        status(&mut b).await?.receipts_sent == 1,
        "only the delivery receipt"
    );

    // alice marks bob legacy: v1, which asks for nothing; the message stays "sent".
    a.set_contact_legacy(rpc::SetContactLegacyRequest {
        username: "bob".into(),
        legacy: true,
    })
    .await?;
    let v1 = send(&mut a, "bob", "the original way").await?;
    ensure!(v1.wire_version == 1 && !v1.wants_receipts, "{v1:?}");
    let got = wait_history(&b, "alice", 2, |m: &rpc::Message| {
        m.direction == Direction::Incoming as i32
    })
    .await?;
    ensure!(!got[1].wants_receipts && got[1].wire_version == 1);
    wait_state(&a, "bob", &v1.id, MessageState::Sent).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(state_of(&a, "bob", &v1.id).await? == MessageState::Sent as i32);
    ensure!(
        status(&mut b).await?.receipts_sent == 1,
        "no receipt for a v1 frame"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_forged_receipts_move_nothing() -> Result<()> {
    let w = World::start().await?;
    let (alice_id, alice, mut a) = w.connected_user("alice").await?;
    let (_bob_id, _bob, mut b) = w.connected_user("bob").await?;
    let (carol_id, _carol, _c) = w.connected_user("carol").await?;
    // dave is registered but never runs: messages to him stay "sent".
    let dave_id = Identity::generate("dave")?;
    dave_id.register(&w.keyserver).await?;
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.subscribe("nes/alice/message").await?;

    let m1 = send(&mut a, "bob", "one").await?;
    wait_state(&a, "bob", &m1.id, MessageState::Delivered)
        .await
        .with_context(|| alice.log_tail(30))?;
    let delivered_receipt = wire.next_publish().await?.payload.to_vec();
    b.mark_read(rpc::MarkReadRequest {
        peer: "alice".into(),
        up_to_id: String::new(),
    })
    .await?;
    wait_state(&a, "bob", &m1.id, MessageState::Read).await?;

    // The broker (or anyone who saw it) replays bob's delivery receipt: still read.
    wire.publish("nes/alice/message", delivered_receipt).await?;
    wait_status(&a, "the replayed receipt", |s| s.receipts_received >= 3).await?;
    ensure!(state_of(&a, "bob", &m1.id).await? == MessageState::Read as i32);

    // carol acknowledges alice's message to dave: only dave's receipts count.
    let m2 = send(&mut a, "dave", "to dave").await?;
    wait_state(&a, "dave", &m2.id, MessageState::Sent).await?;
    let ids = vec![m2.id.clone()];
    let from_carol = receipt_frame("carol", &alice_id, &carol_id, ReceiptState::Read, &ids)?;
    wire.publish("nes/alice/message", from_carol).await?;
    wait_status(&a, "carol's receipt", |s| s.receipts_received >= 4).await?;
    // A receipt in dave's name, signed by carol, is refused for its signature.
    let before = status(&mut a)
        .await?
        .refused
        .get("signature")
        .copied()
        .unwrap_or(0);
    let forged = receipt_frame("dave", &alice_id, &carol_id, ReceiptState::Read, &ids)?;
    wire.publish("nes/alice/message", forged).await?;
    wait_status(&a, "the forged receipt refused", |s| {
        s.refused.get("signature").copied().unwrap_or(0) > before
    })
    .await?;
    ensure!(
        state_of(&a, "dave", &m2.id).await? == MessageState::Sent as i32,
        "alice's message to dave moved"
    );
    ensure!(status(&mut a).await?.receipts_received == 4);
    Ok(())
}
