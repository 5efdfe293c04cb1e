//! Which MQTT version nesd speaks (issue 14 item 5): MQTT 5 where the broker speaks it,
//! else 3.1.1.
//!
//! - Against mosquitto 2 (which speaks 5) nesd uses MQTT 5 by default, and says so in
//!   Status.
//! - A broker that speaks only 3.1.1: the private mosquitto speaks 5, so the test puts a
//!   small TCP proxy in front of it that answers an MQTT 5 CONNECT as a 3.1.1 broker does
//!   (CONNACK `20 02 00 01`, unacceptable protocol version, then close) and passes 3.1.1
//!   connections through. With `auto` nesd tries 5, falls back to 3.1.1, and messages
//!   flow both ways; with `5` forced it reports why it cannot connect.
//! - MQTT 5 brokers refuse publishes they do not allow (an ACL): that message becomes
//!   FAILED with the broker's reason, and the next ones still go.
//! - nesd's connection to the broker has Nagle's algorithm off (TCP_NODELAY, rumqttc's
//!   `NetworkOptions`): read off the running daemon's socket itself.

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

/// `broker_protocol = "auto"` (the default), said out loud: MQTT 5 where the broker speaks
/// it, else 3.1.1.
const AUTO: [&str; 2] = ["--broker-protocol", "auto"];

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
        .args(AUTO)
        .start()
        .await?;
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .broker_url(&url)
        .args(AUTO)
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
    // Both tried MQTT 5 first, and fell back.
    anyhow::ensure!(
        seen.refused_v5.load(Ordering::SeqCst) >= 2,
        "the proxy saw {} MQTT 5 CONNECTs",
        seen.refused_v5.load(Ordering::SeqCst)
    );
    for (c, who) in [(&mut a, "alice"), (&mut b, "bob")] {
        let s = status(c).await?;
        anyhow::ensure!(
            s.broker_protocol == "3.1.1",
            "{who} speaks {:?}",
            s.broker_protocol
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_gets_mqtt_5() -> Result<()> {
    let w = World::start().await?;
    // nesd's default (auto): no --broker-protocol.
    let (_alice_id, alice) = w.user("alice").await?;
    let (_bob_id, bob) = w.user("bob").await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;
    for (c, who) in [(&a, "alice"), (&b, "bob")] {
        eventually(&format!("{who}'s MQTT session"), TIMEOUT, || {
            let mut c = c.clone();
            async move { Ok(status(&mut c).await?.connected.then_some(())) }
        })
        .await?;
    }
    let s = status(&mut b).await?;
    anyhow::ensure!(
        s.broker_protocol == "5",
        "bob speaks {:?}",
        s.broker_protocol
    );
    anyhow::ensure!(s.broker_error.is_empty(), "error {:?}", s.broker_error);
    // mosquitto logs each client's protocol (p5) and clean-start flag (c0: the session
    // is kept).
    let log = w.broker.log_tail(200);
    anyhow::ensure!(
        log.lines()
            .any(|l| l.contains("as nes-bob-") && l.contains("(p5, c0")),
        "mosquitto did not see an MQTT 5 session for bob:\n{log}"
    );
    send(&mut a, "bob", "over MQTT 5").await?;
    wait_history(&b, "alice", 1, |m: &rpc::Message| {
        m.direction == Direction::Incoming as i32 && m.text == "over MQTT 5"
    })
    .await
    .with_context(|| bob.log_tail(30))?;
    wait_history(&a, "bob", 1, |m: &rpc::Message| {
        m.direction == Direction::Outgoing as i32 && m.state == MessageState::Delivered as i32
    })
    .await
    .with_context(|| alice.log_tail(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_mqtt_5_says_why_a_3_1_1_broker_does_not_answer() -> Result<()> {
    let w = World::start().await?;
    let seen = Arc::new(Seen::default());
    let url = v311_only_proxy(&w.broker, seen.clone()).await?;
    let alice_id = Identity::generate("alice")?;
    alice_id.register(&w.keyserver).await?;
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .broker_url(&url)
        .args(["--broker-protocol", "5"])
        .start()
        .await?;
    let mut a = alice.client().await?;
    let s = eventually("the error in Status", TIMEOUT, || {
        let mut a = a.clone();
        async move {
            let s = status(&mut a).await?;
            Ok(s.broker_error.contains("may speak only 3.1.1").then_some(s))
        }
    })
    .await
    .with_context(|| alice.log_tail(30))?;
    anyhow::ensure!(!s.connected, "connected");
    anyhow::ensure!(s.broker_protocol == "5", "speaks {:?}", s.broker_protocol);
    let log = std::fs::read_to_string(alice.log_path())?;
    anyhow::ensure!(
        log.contains("did not answer the MQTT 5 CONNECT"),
        "the log does not say why:\n{log}"
    );
    // Never 3.1.1, since 5 was asked for.
    anyhow::ensure!(
        seen.passed.load(Ordering::SeqCst) == 0,
        "fell back to 3.1.1"
    );
    anyhow::ensure!(seen.refused_v5.load(Ordering::SeqCst) >= 1);
    let _ = status(&mut a).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_failed_and_later_sends_go() -> Result<()> {
    // Anonymous clients may use alice's and bob's topics, and only read carol's.
    let dir = tempfile::Builder::new().prefix("nes-acl-").tempdir()?;
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic readwrite nes/alice/message\ntopic readwrite nes/bob/message\n\
         topic read nes/carol/message\n",
    )?;
    let acl_line = format!("acl_file {}\n", acl.display());
    let (broker, keyserver) =
        tokio::try_join!(Mosquitto::start_with(&acl_line, false), KeyServer::start())?;
    let w = World { broker, keyserver };
    let (_alice_id, alice) = w.user_with("alice", AUTO).await?;
    let (_bob_id, bob) = w.user_with("bob", AUTO).await?;
    let carol = Identity::generate("carol")?;
    carol.register(&w.keyserver).await?;
    let mut a = alice.client().await?;
    let b = bob.client().await?;
    for (c, who) in [(&a, "alice"), (&b, "bob")] {
        eventually(&format!("{who}'s MQTT session"), TIMEOUT, || {
            let mut c = c.clone();
            async move { Ok(status(&mut c).await?.connected.then_some(())) }
        })
        .await?;
    }
    anyhow::ensure!(status(&mut a).await?.broker_protocol == "5");

    let denied = send(&mut a, "carol", "the ACL says no").await?;
    let failed = wait_history(&a, "carol", 1, |m: &rpc::Message| {
        m.id == denied.id && m.state == MessageState::Failed as i32
    })
    .await
    .with_context(|| alice.log_tail(30))?;
    let failed = failed
        .iter()
        .find(|m| m.id == denied.id)
        .context("the FAILED message")?;
    anyhow::ensure!(
        failed.error.contains("NotAuthorized"),
        "FAILED without the broker's reason: {:?}",
        failed.error
    );

    // A refusal is an answer, not a broken connection: the session stays up.
    anyhow::ensure!(
        !alice.log().contains("lost the broker connection"),
        "the refusal cost a reconnect:\n{}",
        alice.log_tail(30)
    );
    // The tracker still knows which frame is which: the next messages are sent,
    // delivered and received.
    for text in ["after the refusal", "and another"] {
        let sent = send(&mut a, "bob", text).await?;
        wait_history(&b, "alice", 1, |m: &rpc::Message| m.text == text)
            .await
            .with_context(|| bob.log_tail(30))?;
        wait_history(&a, "bob", 1, |m: &rpc::Message| {
            m.id == sent.id && m.state == MessageState::Delivered as i32
        })
        .await
        .with_context(|| alice.log_tail(30))?;
    }
    let s = status(&mut a).await?;
    anyhow::ensure!(s.queued == 0, "still queued: {}", s.queued);
    let h = history(&mut a, "carol").await?;
    anyhow::ensure!(
        h.len() == 1 && h[0].state == MessageState::Failed as i32,
        "carol's conversation: {h:?}"
    );
    Ok(())
}

/// The TCP sockets of process `pid` connected to 127.0.0.1:`port`, as fds of this process
/// (pidfd_getfd: the same sockets, not copies of their options).
fn sockets_to(pid: u32, port: u16) -> Result<Vec<std::os::fd::OwnedFd>> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let mut inodes = std::collections::HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            let fd: i32 = entry.file_name().to_string_lossy().parse()?;
            inodes.insert(inode.to_owned(), fd);
        }
    }
    let pid = Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    let mut found = Vec::new();
    for line in std::fs::read_to_string("/proc/net/tcp")?.lines().skip(1) {
        // sl local_address rem_address st ... inode (10th field)
        let f: Vec<&str> = line.split_whitespace().collect();
        let remote_port = f
            .get(2)
            .and_then(|a| a.split(':').nth(1))
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        if remote_port == Some(port) {
            if let Some(fd) = f.get(9).and_then(|inode| inodes.get(*inode)) {
                found.push(pidfd_getfd(&pidfd, *fd, PidfdGetfdFlags::empty())?);
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesd_talks_to_the_broker_with_nagle_off() -> Result<()> {
    let world = World::start().await?;
    // MQTT 5 (what `auto` picks with mosquitto 2) and 3.1.1: rumqttc has a client of each.
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world
        .user_with("bob", ["--broker-protocol", "3.1.1"])
        .await?;
    for d in [&alice_d, &bob_d] {
        wait_connected(&d.client().await?).await?;
    }
    anyhow::ensure!(status(&mut alice_d.client().await?).await?.broker_protocol == "5");
    anyhow::ensure!(status(&mut bob_d.client().await?).await?.broker_protocol == "3.1.1");
    let port = world.broker.port();

    // The check itself can fail: a plain connection has Nagle on.
    let plain = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let ours = sockets_to(std::process::id(), port)?;
    assert_eq!(ours.len(), 1, "this process's one connection");
    assert!(!rustix::net::sockopt::tcp_nodelay(&ours[0])?);
    drop(plain);

    for d in [&alice_d, &bob_d] {
        let pid = d.pid().context("nesd runs")?;
        let theirs = sockets_to(pid, port)?;
        assert_eq!(theirs.len(), 1, "nesd's one broker connection");
        assert!(
            rustix::net::sockopt::tcp_nodelay(&theirs[0])?,
            "TCP_NODELAY is set on nesd's broker connection ({pid})"
        );
    }
    Ok(())
}
