//! Throughput of one `SendStream` alice→bob through a real mosquitto, and nesd's idle RSS.
//!
//! ```sh
//! cargo build --release -p nesd -p nes-keyserver
//! cargo bench -p nes-e2e --bench send_stream          # NES_BENCH_MESSAGES=2000 by default
//! ```
//!
//! Prints: the rate at which alice's daemon accepted the stream (sealed, stored, flushed),
//! the end-to-end rate (until bob's daemon has stored the last one), and the RSS of both
//! daemons when idle before and after.
//!
//! `NES_BENCH_MESSAGES` sets the size, `NES_BENCH_DEADLINE` (seconds, 600) when to give up
//! and print both daemons' status and logs, `NES_BENCH_HOLD=1` keeps them running for ten
//! minutes after such a failure for inspection (pids and log paths are printed).
//! `NES_E2E_BIN_NES_KEYSERVER=target/debug/nes-keyserver` spares a release build of the
//! key server (its speed does not matter here).

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use nes_e2e::*;
use nes_proto::rpc;
use std::time::{Duration, Instant};

fn rss_kib(pid: Option<u32>) -> Result<u64> {
    let pid = pid.context("daemon not running")?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("NES_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let w = World::start().await?;
    let (_alice_id, alice) = w.user("alice").await?;
    let (_bob_id, bob) = w.user("bob").await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;
    eventually("both sessions", TIMEOUT, || {
        let (mut a, mut b) = (a.clone(), b.clone());
        async move {
            Ok((status(&mut a).await?.connected && status(&mut b).await?.connected).then_some(()))
        }
    })
    .await?;
    // Warm up: both sides fetch each other's keys.
    send(&mut a, "bob", "warm-up").await?;
    wait_history(&b, "alice", 1, |_| true).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_before = (rss_kib(alice.pid())?, rss_kib(bob.pid())?);

    let text = "x".repeat(100);
    let requests = futures::stream::iter((0..n).map(move |i| rpc::SendRequest {
        to: "bob".into(),
        text: format!("{i:06} {text}"),
        legacy: false,
    }));
    let start = Instant::now();
    let mut replies = a.send_stream(requests).await?.into_inner();
    let mut accepted = 0;
    while let Some(reply) = replies.next().await {
        ensure!(reply?.error.is_empty(), "a send was refused");
        accepted += 1;
    }
    let accepted_at = start.elapsed();
    ensure!(accepted == n);
    let deadline = Duration::from_secs(
        std::env::var("NES_BENCH_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    );
    loop {
        let s = status(&mut b).await?;
        if s.received as usize > n {
            break;
        }
        if start.elapsed() > deadline {
            let sa = status(&mut a).await?;
            eprintln!("alice: {sa:?}\nbob: {s:?}");
            eprintln!(
                "alice log:\n{}\nbob log:\n{}",
                alice.log_tail(30),
                bob.log_tail(30)
            );
            eprintln!("broker log:\n{}", w.broker.log_tail(30));
            if std::env::var_os("NES_BENCH_HOLD").is_some() {
                eprintln!(
                    "holding for inspection: alice pid {:?} log {}, bob pid {:?} log {}",
                    alice.pid(),
                    alice.log_path().display(),
                    bob.pid(),
                    bob.log_path().display()
                );
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            anyhow::bail!("bob received only {} of {n}", s.received.saturating_sub(1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received_at = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_after = (rss_kib(alice.pid())?, rss_kib(bob.pid())?);

    println!("messages:                 {n} (100-byte texts, v2, one SendStream)");
    println!(
        "accepted by alice's nesd: {:.0} msg/s ({:.2} s)",
        n as f64 / accepted_at.as_secs_f64(),
        accepted_at.as_secs_f64()
    );
    println!(
        "stored by bob's nesd:     {:.0} msg/s ({:.2} s end to end)",
        n as f64 / received_at.as_secs_f64(),
        received_at.as_secs_f64()
    );
    println!(
        "idle RSS before:          alice {} KiB, bob {} KiB",
        idle_before.0, idle_before.1
    );
    println!(
        "idle RSS after:           alice {} KiB, bob {} KiB",
        idle_after.0, idle_after.1
    );
    Ok(())
}
