//! Fills a nesd message store fast, straight through `nesd::store` (no daemon, no crypto),
//! for the store-scale benchmark of `scripts/bench`.
//!
//! ```sh
//! NES_FILL_DIR=DATA_DIR/store-bob NES_FILL_MESSAGES=1000000 NES_FILL_PEERS=1000 \
//!     cargo bench -p nesd --bench fill_store
//! ```
//!
//! The daemon owning that store must be stopped (sled locks it). What is written is what
//! nesd writes when it receives that many messages, through the same code:
//!
//! - each peer (`peer0000`..`peerNNNN`) becomes a contact of the key cache as a first
//!   message makes it one: a key server answer (a stand-in, with real RSA-2048 public
//!   keys and an answer body of a real one's size) pinned by [`KeyCache::get`];
//! - messages are incoming (state RECEIVED, read), round-robin over the peers, each stored
//!   by [`Store::insert_incoming`], the receive pipeline's own atomic batch (record, id
//!   index, summary, event), and flushed every `NES_FILL_BATCH` (64, the pipeline's
//!   largest batch: a flood) as the pipeline commits before acknowledging;
//! - with `NES_FILL_RECEIPTS=1` the messages ask for delivery receipts, as NES peers'
//!   do, and each commit is followed by what the daemon writes for them: the owed
//!   receipts queued in the outbox as frames (one per peer, of a v3 receipt frame's size,
//!   [`Store::queue_receipt`]) and taken out again as the broker acknowledges them
//!   ([`Store::outbox_forget`]); without it (the default, as the figures before it) the
//!   messages ask for none;
//! - at the end the store is closed as nesd closes it at shutdown ([`Store::close`]), or,
//!   with `NES_FILL_END=crash`, left as a daemon killed with SIGKILL leaves it: flushed
//!   (every batch was), then the process waits to be killed (`scripts/bench` sends
//!   SIGKILL once it has printed its line) without closing anything.
//!
//! Prints one JSON line: messages, peers, seconds (messages only), messages/s, and how
//! long the close took.

use futures::future::BoxFuture;
use nes_proto::{KeyAnswer, PrivateKey, PublicKey, Username};
use nesd::config::KeyPolicy;
use nesd::keycache::KeyCache;
use nesd::keyserver::{FetchError, Fetched, KeySource};
use nesd::model::{Content, Direction, Message, MessageState};
use nesd::store::{Closed, OutboxRecord, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A key server that answers every name with the same two keys.
struct StandIn {
    message: PublicKey,
    sign: PublicKey,
}

impl KeySource for StandIn {
    fn fetch<'a>(&'a self, user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        let answer = KeyAnswer {
            username: Some(user.to_string()),
            public_key_message: self.message.to_pem(),
            public_key_sign: self.sign.to_pem(),
        };
        // The size of a real answer: both PEMs, the name, and a base64 RSA-2048 signature.
        let body = format!(
            "{{\"response\":{{\"username\":\"{user}\",\"public_key_message\":{:?},\"public_key_sign\":{:?}}},\"signature\":\"{}\"}}",
            answer.public_key_message,
            answer.public_key_sign,
            "A".repeat(344)
        );
        Box::pin(async move {
            Ok(Fetched {
                answer,
                message_key: self.message.clone(),
                sign_key: self.sign.clone(),
                body: body.into_bytes(),
            })
        })
    }
}

/// What the daemon writes for the receipts it owes: each group queued as a frame in the
/// outbox, then forgotten as the broker acknowledges it.
async fn send_receipts(store: &Store) -> anyhow::Result<()> {
    loop {
        let due = store.receipts_due(64)?;
        if due.is_empty() {
            return Ok(());
        }
        for group in &due {
            let frame = OutboxRecord {
                peer: group.peer.clone(),
                id: format!("receipt-{}", group.ids[0]),
                exactly_once: false,
                frame: vec![b'r'; RECEIPT_FRAME_BYTES],
            };
            store.queue_receipt(group, frame)?;
        }
        for (seq, _) in store.outbox_after(0, usize::MAX)? {
            store.outbox_forget(seq)?;
        }
        store.commit_all().await?;
    }
}

/// A v3 receipt frame for one id, as `nes frame seal` makes one (the size of a v3 frame
/// of a short text).
const RECEIPT_FRAME_BYTES: usize = 2_600;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::var("NES_FILL_DIR")
        .map_err(|_| anyhow::anyhow!("set NES_FILL_DIR to the store directory"))?;
    let messages = env_num("NES_FILL_MESSAGES", 1_000_000);
    let peers = env_num("NES_FILL_PEERS", 1_000).max(1);
    let batch = env_num("NES_FILL_BATCH", 64).max(1);
    let receipts = env_num("NES_FILL_RECEIPTS", 0) == 1;
    let crash = match std::env::var("NES_FILL_END").as_deref() {
        Ok("crash") => true,
        Ok("close") | Err(_) => false,
        Ok(other) => anyhow::bail!("NES_FILL_END is close or crash, not {other:?}"),
    };
    let me: Username = std::env::var("NES_FILL_USER")
        .unwrap_or_else(|_| "bob".into())
        .parse()?;
    let store = Store::open(std::path::Path::new(&dir))?;

    let (mine, theirs) = (PrivateKey::generate(2048)?, PrivateKey::generate(2048)?);
    let keys = KeyCache::open(
        store.clone(),
        Arc::new(StandIn {
            message: theirs.public_key().clone(),
            sign: mine.public_key().clone(),
        }),
        &me,
        mine.public_key().clone(),
        mine.public_key().clone(),
        KeyPolicy::Tofu,
        Duration::from_secs(24 * 3600),
    )?;
    let names: Vec<String> = (0..peers).map(|i| format!("peer{i:04}")).collect();
    for name in &names {
        keys.get(&name.parse()?, false).await?;
    }
    store.commit().await?;
    drop(keys);

    let t0 = Instant::now();
    let base_ms = nes_proto::now_ms() - (messages as i64) * 10;
    for i in 0..messages {
        let peer = names[(i % peers) as usize].clone();
        let message = Message {
            id: format!("fill-{i:08}"),
            from: peer.clone(),
            to: me.to_string(),
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
            wants_receipts: receipts,
        };
        store.insert_incoming(message, None)?;
        if (i + 1) % batch == 0 {
            store.commit().await?;
            if receipts {
                send_receipts(&store).await?;
            }
        }
        if i > 0 && i % 200_000 == 0 {
            eprintln!(
                "fill_store: {i} messages, {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    store.commit().await?;
    let secs = t0.elapsed().as_secs_f64();
    let line = |close_s: f64| {
        println!(
            "{{\"messages\":{messages},\"peers\":{peers},\"seconds\":{secs:.3},\"messages_per_s\":{:.0},\"end\":\"{}\",\"close_seconds\":{close_s:.3}}}",
            messages as f64 / secs,
            if crash { "crash" } else { "close" },
        )
    };
    if crash {
        line(0.0);
        // Killed here, as a daemon killed after its last commit.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let t1 = Instant::now();
    let closed = store.close()?;
    anyhow::ensure!(
        closed == Closed::Snapshot,
        "the store did not close: {closed:?}"
    );
    line(t1.elapsed().as_secs_f64());
    Ok(())
}
