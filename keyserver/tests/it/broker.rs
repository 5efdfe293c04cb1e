//! The embedded MQTT broker (`--embedded-broker`): MQTT 3.1.1, QoS 2 as the original
//! client uses it, and persistent sessions.

use crate::common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::Duration;

fn client(id: &str, port: u16, clean: bool) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean);
    AsyncClient::new(options, 16)
}

/// Polls `events` until a packet `want` says yes to, within a generous time.
async fn wait_for(
    events: &mut EventLoop,
    what: &str,
    mut want: impl FnMut(&Packet) -> bool,
) -> Packet {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let event = match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Err(e)) => panic!("MQTT error waiting for {what}: {e}"),
            Ok(Ok(event)) => event,
        };
        if let Event::Incoming(packet) = event {
            if want(&packet) {
                return packet;
            }
        }
    }
}

#[tokio::test]
async fn embedded_broker_carries_messages_and_keeps_sessions() {
    let broker_port = free_port();
    let server = Server::start_with(
        Options::new(Backend::Sqlite)
            .args(&["--embedded-broker", &format!("127.0.0.1:{broker_port}")]),
    )
    .await;
    // The key server still works next to it.
    server.register_and_activate("bob").await;

    // bob subscribes with a persistent session, as NES does.
    let (bob, mut bob_events) = client("nes-bob", broker_port, false);
    wait_for(&mut bob_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    bob.subscribe("nes/bob/message", QoS::ExactlyOnce)
        .await
        .unwrap();
    wait_for(&mut bob_events, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await;

    // alice publishes like the original client: QoS 2, clean session.
    let (alice, mut alice_events) = client("alicexyz", broker_port, true);
    alice
        .publish(
            "nes/bob/message",
            QoS::ExactlyOnce,
            false,
            b"frame-1".to_vec(),
        )
        .await
        .unwrap();
    wait_for(&mut alice_events, "PUBCOMP", |p| {
        matches!(p, Packet::PubComp(_))
    })
    .await;
    let got = wait_for(&mut bob_events, "the message", |p| {
        matches!(p, Packet::Publish(_))
    })
    .await;
    let Packet::Publish(publish) = got else {
        unreachable!()
    };
    assert_eq!(publish.topic, "nes/bob/message");
    assert_eq!(&publish.payload[..], b"frame-1");
    // Finish the QoS 2 exchange (PUBREL in, PUBCOMP out) before going away.
    wait_for(&mut bob_events, "PUBREL", |p| {
        matches!(p, Packet::PubRel(_))
    })
    .await;
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_millis(200), bob_events.poll()).await;
    }

    // bob goes away; a message sent meanwhile waits in his session.
    bob.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while bob_events.poll().await.is_ok() {}
    })
    .await;
    drop(bob_events);
    alice
        .publish(
            "nes/bob/message",
            QoS::AtLeastOnce,
            false,
            b"frame-2".to_vec(),
        )
        .await
        .unwrap();
    wait_for(&mut alice_events, "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;

    let (_bob, mut bob_events) = client("nes-bob", broker_port, false);
    let ack = wait_for(&mut bob_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    let Packet::ConnAck(ack) = ack else {
        unreachable!()
    };
    assert!(ack.session_present, "the broker kept bob's session");
    let got = wait_for(&mut bob_events, "the queued message", |p| {
        matches!(p, Packet::Publish(_))
    })
    .await;
    let Packet::Publish(publish) = got else {
        unreachable!()
    };
    assert_eq!(&publish.payload[..], b"frame-2");
}

#[test]
fn a_taken_broker_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--embedded-broker",
            &addr,
        ])
        .args([
            "--database",
            &format!("sqlite://{}", dir.path().join("ks.db").display()),
        ])
        .arg("--key")
        .arg(server_key_file())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("--embedded-broker") && text.contains(&addr),
        "{text}"
    );
}
