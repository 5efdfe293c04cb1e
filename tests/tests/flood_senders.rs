//! Issue 14, floods: frames from made-up senders must not cost the receiver its real
//! messages.
//!
//! Real mosquitto, key server and nesd. A plain MQTT publisher floods bob's topic with
//! valid v2 frames sealed to bob, each from a different made-up (unregistered) username,
//! while alice (a pinned contact) keeps sending through her nesd, and carol (registered,
//! never seen by bob) sends her first message in the middle of the flood. Asserted: every
//! message of alice arrives exactly once, carol's arrives and pins her, every flood frame
//! is refused and counted, nothing stays parked, and bob's nesd stays under a generous
//! memory limit. Printed (not asserted: never a timed test on a shared machine): alice's
//! latency p50/p99 from send to bob's event stream, carol's latency, bob's throughput and
//! its RSS before/peak/after.
//!
//! `NES_FLOOD_SENDERS` sets the flood's size (default 20,000); `NES_FLOOD_RATE` paces the
//! publisher (frames per second; default: as fast as the broker takes them);
//! `NES_FLOOD_PROTOCOL` (`3.1.1`, `5`, `auto`) sets bob's `--broker-protocol` (default:
//! nesd's). Two floods: v2 frames sealed to bob's RSA key, and v3 frames sealed to his
//! published prekey (each made-up name with a certificate of its own).

use anyhow::{ensure, Context, Result};
use nes_e2e::*;
use nes_proto::frame::{self, Draft, Version};
use nes_proto::rpc::{self, event::Kind, Direction, MessageState, TrustState};
use nes_proto::{now_ms, Username};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Peak RSS allowed for bob's nesd: generous, only to catch unbounded growth.
const RSS_LIMIT_KIB: u64 = 256 * 1024;
/// Refusal reasons a flood frame can end with.
const FLOOD_REASONS: [&str; 3] = ["unknown_sender", "parked_evicted", "parked_too_many"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seal(
    from: &str,
    text: &str,
    ts: i64,
    to: &Identity,
    signer: &nes_proto::PrivateKey,
) -> Result<Vec<u8>> {
    let (from, bob) = (Username::parse(from)?, Username::parse("bob")?);
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &from,
        to: &bob,
        text,
        timestamp_ms: ts,
    };
    Ok(frame::seal(Version::V2, &draft, to.message.public_key(), signer)?.frame)
}

/// A v3 flood frame: sealed to bob's published prekey, with a certificate for `from`.
fn seal_v3(
    from: &str,
    ts: i64,
    prekey: &nes_proto::v3::SignedPrekey,
    signer: &nes_proto::PrivateKey,
) -> Result<Vec<u8>> {
    let (from, bob) = (Username::parse(from)?, Username::parse("bob")?);
    let certificate =
        nes_proto::v3::CertificateSecret::generate(&from, ts - 60_000, ts + 3_600_000, signer)?;
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &from,
        to: &bob,
        text: "flood",
        timestamp_ms: ts,
    };
    Ok(nes_proto::v3::seal(&draft, prekey, &certificate, ts)?.frame)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn flood_refused(client: &Client) -> Result<u64> {
    let mut c = client.clone();
    let refused = status(&mut c).await?.refused;
    Ok(FLOOD_REASONS
        .iter()
        .map(|r| refused.get(*r).copied().unwrap_or(0))
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_senders_costs_no_real_message() -> Result<()> {
    flood_of_made_up_senders(2).await
}

/// The same with v3 frames: they take the cheap lane, alice's own lane, so it is the
/// parking of the flood (not its decryption) that her messages wait behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_flood_of_made_up_senders_costs_no_real_message() -> Result<()> {
    flood_of_made_up_senders(3).await
}

async fn flood_of_made_up_senders(version: usize) -> Result<()> {
    let n = env_usize("NES_FLOOD_SENDERS", 20_000);
    let rate = env_usize("NES_FLOOD_RATE", 0);
    let w = World::start().await?;
    let (_alice_id, alice) = w.user("alice").await?;
    let carol_id = Identity::generate("carol")?;
    carol_id.register(&w.keyserver).await?;
    let bob_id = Identity::generate("bob")?;
    bob_id.register(&w.keyserver).await?;
    // A lookup budget that lets the whole flood be looked up within the test (the default,
    // 50 a second, would take minutes; what happens then is the same, only slower).
    let mut bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver).args(["--lookup-rate", "2000"]);
    if let Ok(protocol) = std::env::var("NES_FLOOD_PROTOCOL") {
        bob = bob.args(["--broker-protocol", protocol.as_str()]);
    }
    let bob = bob.start().await?;
    let mut a = alice.client().await?;
    let b = bob.client().await?;

    // bob pins alice.
    let hello = send(&mut a, "bob", "hello before the flood").await?;
    wait_history(&b, "alice", 1, |m| m.id == hello.id).await?;

    let bob_prekey = if version == 3 {
        let url = format!("{}/users/bob/prekey", w.keyserver.url());
        let body = eventually(
            "bob's prekey on the key server",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move {
                    let r = reqwest::get(&url).await?;
                    ensure!(r.status().is_success(), "{}", r.status());
                    Ok(Some(r.bytes().await?.to_vec()))
                }
            },
        )
        .await?;
        Some(nes_proto::v3::SignedPrekey::parse(&body)?)
    } else {
        None
    };

    // The flood, sealed before the clock starts (two signing keys; the names are what matter).
    let signers = [
        Identity::generate("mallory")?,
        Identity::generate("mallory")?,
    ];
    let salt = now_ms() % 1_000_000;
    let started = Instant::now();
    let now = now_ms();
    let flood: Vec<Vec<u8>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let (bob_id, signers, bob_prekey) = (&bob_id, &signers, &bob_prekey);
                s.spawn(move || -> Result<Vec<Vec<u8>>> {
                    (0..n)
                        .filter(|i| i % 2 == t)
                        .map(|i| {
                            let from = format!("f{salt}x{i}");
                            match bob_prekey {
                                Some(prekey) => seal_v3(&from, now, prekey, &signers[i % 2].sign),
                                None => seal(&from, "flood", now, bob_id, &signers[i % 2].sign),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("sealing thread panicked"))??,
            );
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let carol_frame = seal(
        "carol",
        "carol's first message",
        now_ms(),
        &bob_id,
        &carol_id.sign,
    )?;
    println!(
        "flood: sealed {n} v{version} frames in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // bob's event stream: when each message of alice and carol is seen.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut events = EventStream::open(&b, None).await?;
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let got = events
                    .next_matching("a message from alice or carol", |e| match &e.kind {
                        Some(Kind::Message(m)) if m.direction == Direction::Incoming as i32 => {
                            Some(m.text.clone())
                        }
                        _ => None,
                    })
                    .await;
                match got {
                    Ok(text) => {
                        seen.lock()
                            .unwrap()
                            .entry(text)
                            .or_insert_with(Instant::now);
                    }
                    Err(_) => return,
                }
            }
        })
    };

    // bob's memory, sampled.
    let rss_before = bob.rss_kib().context("bob's RSS")?;
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let pid = bob.pid().context("bob's pid")?;
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Acquire) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::AcqRel);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The flood publisher; carol's frame goes in the middle.
    let mut wire = RawMqtt::connect(&w.broker).await?;
    let clock = Instant::now();
    let carol_sent: Arc<Mutex<Option<Instant>>> = Arc::default();
    let publisher = {
        let carol_sent = carol_sent.clone();
        tokio::spawn(async move {
            let topic = "nes/bob/message";
            let mut rest = flood.into_iter();
            let half = n / 2;
            let chunk = if rate == 0 {
                n.max(1)
            } else {
                (rate / 10).max(1)
            };
            let mut published = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while published < n {
                if rate > 0 {
                    tick.tick().await;
                }
                let take = chunk
                    .min(if published < half {
                        half - published
                    } else {
                        n - published
                    })
                    .max(1);
                published += wire.publish_all(topic, rest.by_ref().take(take)).await?;
                if published == half {
                    *carol_sent.lock().unwrap() = Some(Instant::now());
                    wire.publish(topic, carol_frame.clone()).await?;
                }
            }
            if half == 0 || half == n {
                *carol_sent.lock().unwrap() = Some(Instant::now());
                wire.publish(topic, carol_frame).await?;
            }
            Ok::<_, anyhow::Error>(Instant::now())
        })
    };

    // alice keeps sending until bob has refused the whole flood.
    let mut sent: Vec<(String, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300) + Duration::from_millis(n as u64 * 20);
    let mut i = 0;
    loop {
        let text = format!("alice during the flood #{i}");
        let at = Instant::now();
        send(&mut a, "bob", &text).await?;
        sent.push((text, at));
        i += 1;
        if flood_refused(&b).await? >= n as u64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "bob refused only {} of {n} flood frames in time:\n{}",
            flood_refused(&b).await?,
            bob.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let flood_done = clock.elapsed();
    let published_at = publisher.await??;

    // Every message of alice arrives, once; carol's arrives and pinned her.
    let h = wait_history(&b, "alice", sent.len() + 1, |_| true)
        .await
        .with_context(|| bob.log_tail(20))?;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in &h {
        *counts.entry(m.text.as_str()).or_default() += 1;
    }
    for (text, _) in &sent {
        ensure!(
            counts.get(text.as_str()) == Some(&1),
            "{text:?} arrived {:?} times",
            counts.get(text.as_str())
        );
    }
    ensure!(
        h.len() == sent.len() + 1,
        "alice's history has {} messages, {} sent",
        h.len(),
        sent.len() + 1
    );
    let hc = wait_history(&b, "carol", 1, |_| true)
        .await
        .with_context(|| bob.log_tail(20))?;
    ensure!(
        hc.len() == 1
            && hc[0].text == "carol's first message"
            && hc[0].state == MessageState::Received as i32,
        "{hc:?}"
    );
    let carol = b
        .clone()
        .lookup_contact(rpc::LookupContactRequest {
            username: "carol".into(),
            refresh: false,
        })
        .await?
        .into_inner();
    ensure!(
        carol.trust == TrustState::Pinned as i32
            && carol.sign_key_fingerprint == carol_id.sign.public_key().fingerprint()
    );

    // The flood: all refused and counted, exactly; nothing left parked; no made-up contact.
    let mut c = b.clone();
    let st = status(&mut c).await?;
    let by_reason: Vec<(&str, u64)> = FLOOD_REASONS
        .iter()
        .map(|r| (*r, st.refused.get(*r).copied().unwrap_or(0)))
        .collect();
    let refused: u64 = by_reason.iter().map(|(_, k)| k).sum();
    ensure!(
        refused == n as u64,
        "flood frames refused {by_reason:?}, sent {n}; all refusals {:?}",
        st.refused
    );
    ensure!(st.waiting == 0, "frames still parked: {}", st.waiting);
    let contacts = c
        .contacts(rpc::ContactsRequest {})
        .await?
        .into_inner()
        .contacts;
    ensure!(
        contacts.len() == 2,
        "contacts {:?}",
        contacts.iter().map(|c| &c.username).collect::<Vec<_>>()
    );

    sampling.store(false, Ordering::Release);
    sampler.await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = bob.rss_kib().context("bob's RSS")?;
    let rss_peak = peak.load(Ordering::Acquire).max(rss_after);

    let seen = seen.lock().unwrap().clone();
    recorder.abort();
    let mut latencies: Vec<Duration> = sent
        .iter()
        .map(|(text, at)| {
            seen.get(text)
                .map(|s| s.saturating_duration_since(*at))
                .unwrap_or(Duration::MAX)
        })
        .collect();
    latencies.sort();
    let carol_latency = match (
        *carol_sent.lock().unwrap(),
        seen.get("carol's first message"),
    ) {
        (Some(at), Some(s)) => format!("{:.2} s", s.saturating_duration_since(at).as_secs_f64()),
        _ => "not seen on the stream".into(),
    };
    println!(
        "flood: {n} made-up senders{} published in {:.1} s, all refused after {:.1} s ({:.0} frames/s): {by_reason:?}",
        if rate > 0 { format!(" at {rate}/s") } else { String::new() },
        published_at.duration_since(clock).as_secs_f64(),
        flood_done.as_secs_f64(),
        n as f64 / flood_done.as_secs_f64()
    );
    println!(
        "flood: alice {} messages, latency p50 {:.2} s, p99 {:.2} s, max {:.2} s; carol's first message {carol_latency}",
        sent.len(),
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.99).as_secs_f64(),
        latencies.last().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "flood: bob's nesd RSS before {} MiB, peak {} MiB, after {} MiB",
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024
    );
    ensure!(
        rss_peak < RSS_LIMIT_KIB,
        "bob's nesd peaked at {} MiB",
        rss_peak / 1024
    );
    Ok(())
}

/// A key server that rate limits lookups (1 a second per IP, 429 with `Retry-After`):
/// bob's lookups of new senders wait for it, while alice's messages flow meanwhile; then
/// every made-up sender is refused, carol's first message arrives, nothing stays parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limiting_key_server_delays_only_unknown_senders() -> Result<()> {
    let mut w = World::start().await?;
    let (_alice_id, alice) = w.user("alice").await?;
    let carol_id = Identity::generate("carol")?;
    carol_id.register(&w.keyserver).await?;
    let (bob_id, bob) = w.user("bob").await?;
    let mut a = alice.client().await?;
    let b = bob.client().await?;
    let hello = send(&mut a, "bob", "hello").await?;
    wait_history(&b, "alice", 1, |m| m.id == hello.id).await?;

    w.keyserver.restart_with_lookup_rate(1).await?;
    let made_up: u64 = 20;
    let mallory = Identity::generate("mallory")?;
    let salt = now_ms() % 1_000_000;
    let now = now_ms();
    let mut frames = Vec::new();
    for i in 0..made_up {
        frames.push(seal(
            &format!("r{salt}x{i}"),
            "made up",
            now,
            &bob_id,
            &mallory.sign,
        )?);
    }
    frames.push(seal(
        "carol",
        "carol while rate limited",
        now,
        &bob_id,
        &carol_id.sign,
    )?);
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.publish_all("nes/bob/message", frames).await?;

    // alice's messages arrive while lookups for the others still wait for the key server.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            send(&mut a, "bob", &format!("alice while rate limited #{i}"))
                .await?
                .id,
        );
    }
    wait_history(&b, "alice", 3, |m| ids.contains(&m.id)).await?;
    let mut c = b.clone();
    let st = status(&mut c).await?;
    let refused = st.refused.get("unknown_sender").copied().unwrap_or(0);
    ensure!(
        st.waiting > 0 && refused < made_up,
        "alice's messages should not wait for the lookups: waiting {}, refused {refused}\n{}",
        st.waiting,
        bob.log_tail(20)
    );

    // Then, at the key server's pace: all made-up senders refused, carol in.
    let hc = wait_history(&b, "carol", 1, |_| true)
        .await
        .with_context(|| bob.log_tail(20))?;
    ensure!(
        hc[0].text == "carol while rate limited" && hc[0].state == MessageState::Received as i32
    );
    eventually("every made-up sender refused", TIMEOUT, || {
        let mut c = b.clone();
        async move {
            let st = status(&mut c).await?;
            Ok(
                (st.refused.get("unknown_sender").copied().unwrap_or(0) == made_up
                    && st.waiting == 0)
                    .then_some(()),
            )
        }
    })
    .await
    .with_context(|| bob.log_tail(20))?;
    let log = std::fs::read_to_string(bob.log_path())?;
    ensure!(log.contains("rate limits lookups"), "bob never saw a 429");
    Ok(())
}
