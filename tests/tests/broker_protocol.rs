//! nesd against a broker that speaks only MQTT 3.1.1 (issue 14 item 5).
//!
//! The private mosquitto speaks 5, so the test puts a small TCP proxy in front of it that
//! answers an MQTT 5 CONNECT as a 3.1.1 broker does (CONNACK `20 02 00 01`, unacceptable
//! protocol version, then close) and passes 3.1.1 connections through. nesd must get its
//! session through that proxy and messages must flow both ways: today nesd speaks 3.1.1
//! only, and once it tries MQTT 5 first this is the fallback test.

use anyhow::{Context, Result};
use nes_e2e::*;
use nes_proto::rpc::{self, Direction, MessageState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy saw.
#[derive(Default)]
struct Seen {
    /// CONNECTs with protocol level 5, refused.
    refused_v5: AtomicUsize,
    /// 3.1.1 (level 4) connections passed to the broker.
    passed: AtomicUsize,
}

/// Reads one whole MQTT packet (fixed header, remaining length, body) as raw bytes.
async fn read_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut raw = vec![s.read_u8().await?];
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = s.read_u8().await?;
        raw.push(b);
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let start = raw.len();
    raw.resize(start + len, 0);
    s.read_exact(&mut raw[start..]).await?;
    Ok(raw)
}

/// The protocol level of a CONNECT packet (`raw` as [`read_packet`] returns it).
fn protocol_level(raw: &[u8]) -> Option<u8> {
    if raw.first()? >> 4 != 1 {
        return None;
    }
    // Skip the remaining-length bytes, then the protocol name (length-prefixed).
    let body = raw.iter().skip(1).position(|b| b & 0x80 == 0)? + 2;
    let name_len = usize::from(u16::from_be_bytes([*raw.get(body)?, *raw.get(body + 1)?]));
    raw.get(body + 2 + name_len).copied()
}

async fn serve(mut client: TcpStream, upstream: u16, seen: Arc<Seen>) -> Result<()> {
    let connect = read_packet(&mut client).await?;
    if protocol_level(&connect) == Some(5) {
        seen.refused_v5.fetch_add(1, Ordering::SeqCst);
        client.write_all(&[0x20, 0x02, 0x00, 0x01]).await?;
        client.shutdown().await?;
        return Ok(());
    }
    seen.passed.fetch_add(1, Ordering::SeqCst);
    let mut broker = TcpStream::connect(("127.0.0.1", upstream)).await?;
    broker.write_all(&connect).await?;
    tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
    Ok(())
}

/// Starts the proxy in front of `broker`; answers its URL.
async fn v311_only_proxy(broker: &Mosquitto, seen: Arc<Seen>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let upstream = broker.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                // A connection that ends is the normal case (nesd stopping, a refusal).
                let _ = serve(client, upstream, seen).await;
            });
        }
    });
    Ok(format!("mqtt://127.0.0.1:{port}"))
}

#[test]
fn the_proxy_reads_protocol_levels() {
    // 3.1.1 and 5 CONNECT headers as rumqttc writes them (client id "c").
    let v4 = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'c',
    ];
    let v5 = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'c',
    ];
    assert_eq!(protocol_level(&v4), Some(4));
    assert_eq!(protocol_level(&v5), Some(5));
    assert_eq!(protocol_level(&[0x30, 0]), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_through_a_broker_that_speaks_only_3_1_1() -> Result<()> {
    let w = World::start().await?;
    let seen = Arc::new(Seen::default());
    let url = v311_only_proxy(&w.broker, seen.clone()).await?;
    let alice_id = Identity::generate("alice")?;
    let bob_id = Identity::generate("bob")?;
    alice_id.register(&w.keyserver).await?;
    bob_id.register(&w.keyserver).await?;
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .broker_url(&url)
        .start()
        .await?;
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .broker_url(&url)
        .start()
        .await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;
    for (c, who, d) in [(&a, "alice", &alice), (&b, "bob", &bob)] {
        eventually(&format!("{who}'s MQTT session"), TIMEOUT, || {
            let mut c = c.clone();
            async move { Ok(status(&mut c).await?.connected.then_some(())) }
        })
        .await
        .with_context(|| d.log_tail(30))?;
    }

    send(&mut a, "bob", "over 3.1.1").await?;
    send(&mut b, "alice", "and back").await?;
    let got = wait_history(&b, "alice", 1, |m: &rpc::Message| {
        m.direction == Direction::Incoming as i32 && m.state == MessageState::Received as i32
    })
    .await
    .with_context(|| bob.log_tail(30))?;
    let incoming: Vec<_> = got
        .iter()
        .filter(|m| m.direction == Direction::Incoming as i32)
        .map(|m| m.text.as_str())
        .collect();
    anyhow::ensure!(incoming == ["over 3.1.1"], "bob got {incoming:?}");
    wait_history(&a, "bob", 1, |m: &rpc::Message| {
        m.direction == Direction::Incoming as i32 && m.text == "and back"
    })
    .await
    .with_context(|| alice.log_tail(30))?;
    anyhow::ensure!(
        seen.passed.load(Ordering::SeqCst) >= 2,
        "the proxy passed {} 3.1.1 connections",
        seen.passed.load(Ordering::SeqCst)
    );
    let _ = status(&mut a).await?;
    Ok(())
}
