//! nesd end to end: delivery through a real mosquitto and the real key server.
//!
//! Issue 4 "Done when": alice→bob appears in history and on the event stream while the
//! wire shows only ciphertext; an offline recipient gets everything once and in order; a
//! broker outage queues and then delivers; kill -9 during a stream of 200 loses and
//! duplicates nothing.

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use nes_e2e::*;
use nes_proto::rpc::{self, event::Kind, Direction, MessageState};
use std::collections::HashSet;

/// Waits until `n` outgoing messages to `peer` reached the broker (sent, or further on
/// with the recipient's receipts).
async fn wait_all_sent(client: &Client, peer: &str, n: usize) -> Result<Vec<rpc::Message>> {
    wait_history(client, peer, n, |m| {
        m.direction == Direction::Outgoing as i32 && nes_proto::states::reached_broker(m.state)
    })
    .await
}

/// Waits until `n` outgoing messages to `peer` are delivered (the recipient's receipts
/// came back) or read.
async fn wait_all_delivered(client: &Client, peer: &str, n: usize) -> Result<Vec<rpc::Message>> {
    wait_history(client, peer, n, |m| {
        m.direction == Direction::Outgoing as i32 && nes_proto::states::progress(m.state) >= 3
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_to_bob_through_the_broker_shows_only_ciphertext_on_the_wire() -> Result<()> {
    let w = World::start().await?;
    let alice_id = Identity::generate("alice")?;
    let bob_id = Identity::generate("bob")?;
    let alice = Nesd::start(&alice_id, &w.broker, &w.keyserver).await?;
    let bob = Nesd::start(&bob_id, &w.broker, &w.keyserver).await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;

    // Register through the daemons (the Register RPC), activate by mail.
    for (client, user) in [(&mut a, "alice"), (&mut b, "bob")] {
        let reply = client
            .register(rpc::RegisterRequest {
                email: format!("{user}@example.test"),
            })
            .await?
            .into_inner();
        ensure!(reply.username == user, "registered {:?}", reply.username);
        w.keyserver.activate_pending(user).await?;
        ensure!(
            w.keyserver.lookup_status(user).await? == 200,
            "{user} not served after activation"
        );
    }
    // A second registration of the same name is refused.
    let again = a
        .register(rpc::RegisterRequest {
            email: "alice@example.test".into(),
        })
        .await
        .unwrap_err();
    ensure!(
        again.code() == tonic::Code::AlreadyExists,
        "second register: {again:?}"
    );

    wait_connected(&b).await?;
    // v3 is the default once the recipient's prekey is on the key server.
    wait_prekey_published(&b, None).await?;
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.subscribe("nes/bob/message").await?;
    let mut events = EventStream::open(&b, None).await?;

    let text = "hello bob: the launch code is 0xC0FFEE-4711";
    let sent = send(&mut a, "bob", text).await?;
    ensure!(
        sent.state == MessageState::Queued as i32
            || sent.state == MessageState::Sent as i32
            || sent.state == MessageState::Delivered as i32,
        "Send answered state {}",
        sent.state
    );
    ensure!(
        sent.wire_version == 3
            && sent.direction == Direction::Outgoing as i32
            && sent.peer == "bob"
    );
    ensure!(
        sent.id.len() == 24 && sent.id.ends_with("=="),
        "id {:?}",
        sent.id
    );

    let got = events
        .next_matching("alice's message on bob's event stream", |e| match &e.kind {
            Some(Kind::Message(m)) if m.id == sent.id => Some(m.clone()),
            _ => None,
        })
        .await?;
    ensure!(
        got.text == text && got.from == "alice" && got.to == "bob",
        "{got:?}"
    );
    ensure!(
        got.state == MessageState::Received as i32 && got.direction == Direction::Incoming as i32
    );

    let h = wait_history(&b, "alice", 1, incoming_from("alice")).await?;
    ensure!(
        h.len() == 1 && h[0].id == sent.id && h[0].text == text && !h[0].read,
        "{h:?}"
    );

    // The wire: a v3 frame, no plaintext, not even who sent it.
    let frame = wire.next_publish().await?;
    ensure!(
        !contains_bytes(&frame.payload, text.as_bytes()),
        "plaintext on the wire"
    );
    ensure!(
        !contains_bytes(&frame.payload, b"0xC0FFEE"),
        "plaintext on the wire"
    );
    ensure!(
        !contains_bytes(&frame.payload, b"alice"),
        "sender name on the wire"
    );
    let json: serde_json::Value = serde_json::from_slice(&frame.payload)?;
    let mut keys: Vec<&str> = json
        .as_object()
        .context("frame is not an object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    ensure!(
        keys == ["ciphertext", "ek", "kem", "nonce", "prekey", "v"],
        "frame fields {keys:?}"
    );

    // Alice sees it acknowledged by the broker.
    wait_all_sent(&a, "bob", 1).await?;
    // Status counters follow the store a moment later.
    let sa = wait_status(&a, "the status counters", |s| s.queued == 0 && s.sent >= 1).await?;
    ensure!(sa.connected && sa.user == "alice", "{sa:?}");
    let sb = wait_status(&b, "the status counters", |s| s.received == 1).await?;
    ensure!(sb.unread == 1 && sb.refused.is_empty(), "{sb:?}");

    // Conversations and read marks.
    let convs = b
        .conversations(rpc::ConversationsRequest {})
        .await?
        .into_inner()
        .conversations;
    ensure!(
        convs.len() == 1 && convs[0].peer == "alice" && convs[0].unread == 1 && convs[0].total == 1,
        "{convs:?}"
    );
    let marked = b
        .mark_read(rpc::MarkReadRequest {
            peer: "alice".into(),
            up_to_id: String::new(),
        })
        .await?
        .into_inner();
    ensure!(marked.marked == 1);
    ensure!(status(&mut b).await?.unread == 0);

    // Contacts carry public keys only.
    let contact = b
        .lookup_contact(rpc::LookupContactRequest {
            username: "alice".into(),
            refresh: false,
        })
        .await?
        .into_inner();
    ensure!(contact.sign_key_fingerprint == alice_id.sign.public_key().fingerprint());
    ensure!(contact.trust == rpc::TrustState::Pinned as i32);
    ensure!(
        !contact.message_key_pem.contains("PRIVATE"),
        "a private key in an API answer"
    );

    // Bad input gets the documented codes.
    let e = send_refused(&mut a, "no such user!", "x").await?;
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    let e = send_refused(&mut a, "bob", "").await?;
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    let e = send_refused(&mut a, "nobody", "hi").await?;
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_recipient_gets_all_20_once_and_in_order() -> Result<()> {
    let w = World::start().await?;
    let (_alice_id, alice) = w.user("alice").await?;
    let (_bob_id, mut bob) = w.user("bob").await?;
    let mut a = alice.client().await?;
    // bob's session (and subscription) exists at the broker before he goes away.
    wait_connected(&bob.client().await?).await?;
    bob.stop().await?;

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(send(&mut a, "bob", &format!("while you were away #{i:02}")).await?);
    }
    wait_all_sent(&a, "bob", 20).await?;
    // The broker has them; bob's nesd does not: they stay "sent", none "delivered".
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let h = history(&mut a, "bob").await?;
    ensure!(
        h.len() == 20 && h.iter().all(|m| m.state == MessageState::Sent as i32),
        "while bob is down: {:?}",
        h.iter().map(|m| m.state).collect::<Vec<_>>()
    );

    bob.start_again().await?;
    let b = bob.client().await?;
    let h = wait_history(&b, "alice", 20, incoming_from("alice")).await?;
    let texts: Vec<&str> = h.iter().map(|m| m.text.as_str()).collect();
    let want: Vec<String> = (0..20)
        .map(|i| format!("while you were away #{i:02}"))
        .collect();
    ensure!(texts == want, "history {texts:?}");
    let ids: Vec<&str> = h.iter().map(|m| m.id.as_str()).collect();
    let sent_ids: Vec<&str> = sent.iter().map(|m| m.id.as_str()).collect();
    ensure!(ids == sent_ids, "ids differ");
    // bob's delivery receipts move all 20 on, in few receipt frames (they are batched).
    wait_all_delivered(&a, "bob", 20).await?;
    let bob_status = status(&mut b.clone()).await?;
    ensure!(
        (1..=20).contains(&bob_status.receipts_sent),
        "bob sent {} receipts for 20 messages",
        bob_status.receipts_sent
    );
    ensure!(
        status(&mut a).await?.receipts_sent == 0,
        "receipts are never receipted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_queues_then_delivers_everything() -> Result<()> {
    let mut w = World::start().await?;
    let (_alice_id, _alice, mut a) = w.connected_user("alice").await?;
    let (_bob_id, _bob, b) = w.connected_user("bob").await?;
    // alice knows bob's keys before the outage (the key server stays up anyway).
    a.lookup_contact(rpc::LookupContactRequest {
        username: "bob".into(),
        refresh: false,
    })
    .await?;

    w.broker.stop().await?;
    eventually("alice to notice the outage", TIMEOUT, || {
        let mut c = a.clone();
        async move { Ok((!status(&mut c).await?.connected).then_some(())) }
    })
    .await?;

    let mut sent = Vec::new();
    for i in 0..20 {
        let m = send(&mut a, "bob", &format!("during the outage {i:02}")).await?;
        ensure!(
            m.state == MessageState::Queued as i32,
            "state {} while the broker is down",
            m.state
        );
        sent.push(m);
    }
    let h = history(&mut a, "bob").await?;
    ensure!(
        h.len() == 20 && h.iter().all(|m| m.state == MessageState::Queued as i32),
        "queued: {h:?}"
    );
    ensure!(status(&mut a).await?.queued == 20);

    w.broker.restart().await?;
    wait_all_sent(&a, "bob", 20).await?;
    wait_status(&a, "the status counters", |s| s.queued == 0).await?;
    let got = wait_history(&b, "alice", 20, incoming_from("alice")).await?;
    let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    let sent_ids: Vec<&str> = sent.iter().map(|m| m.id.as_str()).collect();
    ensure!(
        got_ids == sent_ids,
        "bob got {} messages, in order: {}",
        got.len(),
        got_ids == sent_ids
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_stream_of_200_loses_and_duplicates_nothing() -> Result<()> {
    let w = World::start().await?;
    let (_alice_id, alice) = w.user("alice").await?;
    let (_bob_id, mut bob) = w.user("bob").await?;
    let a = alice.client().await?;
    let b = bob.client().await?;
    wait_connected(&b).await?;
    let mut events = EventStream::open(&b, None).await?;

    // 200 messages over one SendStream: the first 100 at once, the rest once bob is dead,
    // so messages are on their way to bob before, while and after he is killed.
    let request = |i: usize| rpc::SendRequest {
        to: "bob".into(),
        text: format!("stream {i:03}"),
        legacy: false,
    };
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let requests = futures::stream::iter((0..100).map(request)).chain(
        futures::stream::once(async move {
            let _ = killed_rx.await;
        })
        .flat_map(move |()| futures::stream::iter((100..200).map(request))),
    );
    let mut sender = a.clone();
    let sending = tokio::spawn(async move {
        let mut replies = sender.send_stream(requests).await?.into_inner();
        let mut ids = Vec::new();
        while let Some(reply) = replies.next().await {
            let reply = reply?;
            ensure!(
                reply.error.is_empty(),
                "SendStream refused one: {}",
                reply.error
            );
            ids.push(reply.message.context("no message in reply")?.id);
        }
        anyhow::Ok(ids)
    });

    // Kill bob as soon as he has stored a few.
    let mut seen = 0;
    events
        .next_matching("bob to store 10 messages", |e| {
            if matches!(&e.kind, Some(Kind::Message(m)) if m.from == "alice") {
                seen += 1;
            }
            (seen >= 10).then_some(())
        })
        .await?;
    bob.kill9()?;
    drop(events);
    let _ = killed_tx.send(());
    let sent_ids = sending.await??;
    ensure!(sent_ids.len() == 200);

    wait_all_sent(&a, "bob", 200).await?;
    bob.start_again().await?;
    let b = bob.client().await?;
    let h = wait_history(&b, "alice", 200, incoming_from("alice")).await?;
    let got: Vec<&str> = h.iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = got.iter().copied().collect();
    ensure!(
        got.len() == 200 && unique.len() == 200,
        "{} stored, {} distinct",
        got.len(),
        unique.len()
    );
    let want: HashSet<&str> = sent_ids.iter().map(String::as_str).collect();
    ensure!(unique == want, "stored ids differ from sent ids");
    let s = status(&mut b.clone()).await?;
    eprintln!(
        "bob after the restart: received {}, refused {:?}",
        s.received, s.refused
    );
    // Per sender, in order.
    ensure!(
        got == sent_ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "not in send order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_working_past_their_ttl_while_the_key_server_is_down() -> Result<()> {
    let mut w = World::start().await?;
    let alice_id = Identity::generate("alice")?;
    let bob_id = Identity::generate("bob")?;
    alice_id.register(&w.keyserver).await?;
    bob_id.register(&w.keyserver).await?;
    let ttl = ["--key-ttl", "1"];
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .args(ttl)
        .start()
        .await?;
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .args(ttl)
        .start()
        .await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;
    wait_connected(&a).await?;
    wait_connected(&b).await?;
    // Both learn each other's keys.
    let m = send(&mut a, "bob", "keys, please").await?;
    wait_history(&b, "alice", 1, |x| x.id == m.id).await?;
    let m = send(&mut b, "alice", "here you go").await?;
    wait_history(&a, "bob", 1, |x| x.id == m.id).await?;

    w.keyserver.stop()?;
    // Let the 1-second TTL run out (this sleep only ages the cache; nothing is timed).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let m = send(&mut a, "bob", "the key server is gone").await?;
    wait_history(&b, "alice", 1, |x| {
        x.id == m.id && x.state == MessageState::Received as i32
    })
    .await?;
    let m = send(&mut b, "alice", "still works").await?;
    wait_history(&a, "bob", 1, |x| {
        x.id == m.id && x.state == MessageState::Received as i32
    })
    .await?;
    // Someone never seen: nothing cached, nobody to ask.
    let e = send_refused(&mut a, "carol", "hi").await?;
    ensure!(e.code() == tonic::Code::Unavailable, "{e:?}");
    Ok(())
}
