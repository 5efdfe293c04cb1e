//! Fills a nesd message store fast, straight through `nesd::store` (no daemon, no crypto),
//! for the store-scale benchmark of `scripts/bench`.
//!
//! ```sh
//! NES_FILL_DIR=DATA_DIR/store-bob NES_FILL_MESSAGES=1000000 NES_FILL_PEERS=1000 \
//!     cargo bench -p nesd --bench fill_store
//! ```
//!
//! The daemon owning that store must be stopped (sled locks it). Messages are incoming
//! (state RECEIVED, read), from `peer0000`..`peerNNNN` round-robin, each stored with
//! the same atomic batch, id index, summary and event record the receive pipeline
//! writes. Prints one JSON line: messages, peers, seconds, messages/s.

use nesd::model::{Content, Direction, Message, MessageState};
use nesd::store::Store;
use std::time::Instant;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("NES_FILL_DIR")
        .map_err(|_| anyhow::anyhow!("set NES_FILL_DIR to the store directory"))?;
    let messages = env_num("NES_FILL_MESSAGES", 1_000_000);
    let peers = env_num("NES_FILL_PEERS", 1_000).max(1);
    let me = std::env::var("NES_FILL_USER").unwrap_or_else(|_| "bob".into());
    let store = Store::open(std::path::Path::new(&dir))?;
    let t0 = Instant::now();
    let base_ms = nes_proto::now_ms() - (messages as i64) * 10;
    for i in 0..messages {
        let peer = format!("peer{:04}", i % peers);
        let message = Message {
            id: format!("fill-{i:08}"),
            from: peer.clone(),
            to: me.clone(),
            peer,
            direction: Direction::Incoming,
            content: Content::Text(format!(
                "message {i} of the store-scale benchmark, a line of ordinary length"
            )),
            timestamp_ms: base_ms + (i as i64) * 10,
            stored_at_ms: 0,
            state: MessageState::Received,
            read: true,
            wire_version: 2,
            error: String::new(),
            wants_receipts: false,
        };
        store.insert_incoming(message, None)?;
        if i > 0 && i % 200_000 == 0 {
            eprintln!(
                "fill_store: {i} messages, {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    store.flush()?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"messages\":{messages},\"peers\":{peers},\"seconds\":{secs:.3},\"messages_per_s\":{:.0}}}",
        messages as f64 / secs
    );
    Ok(())
}
