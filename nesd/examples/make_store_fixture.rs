//! Makes the store fixture `nesd/tests/fixtures/store-0.1.0/store/`: a small message store
//! written by this release's code through the store's and the key cache's public APIs,
//! which `nesd/tests/store_fixture.rs` opens (a copy of) to prove that later releases
//! still load it.
//!
//! ```text
//! cargo run -p nesd --example make_store_fixture -- DIR [KEYS_DIR]
//! ```
//!
//! writes `DIR/store/` (refused when it exists) from the key files in `KEYS_DIR` (default
//! `DIR/keys/`; public SPKI PEM, made once with fresh RSA keys when the directory is
//! missing), following `content.rs` beside the fixture, and prints what the store chose
//! itself (its id, the times, the log cursors) for the test to pin.
//!
//! The committed fixture was made once, with release 0.1.0, and must never be made again
//! with newer code: a fixture proves that *old* stores load. A release that changes the
//! store format adds a fixture of its own beside it (and a generator, this one copied).

#[path = "../tests/fixtures/store-0.1.0/content.rs"]
mod content;

use anyhow::{bail, Context as _};
use content::Msg;
use futures::future::BoxFuture;
use nes_proto::rpc::{Direction, MessageState};
use nes_proto::{KeyAnswer, PrivateKey, PublicKey, Username};
use nesd::config::KeyPolicy;
use nesd::keycache::KeyCache;
use nesd::keyserver::{FetchError, Fetched, KeySource};
use nesd::model::{self, ConnectionChanged, Content, EventKind};
use nesd::store::{OutboxRecord, Parked, Store};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        bail!("usage: make_store_fixture DIR [KEYS_DIR]");
    };
    let keys_dir = args.next().map_or_else(|| dir.join("keys"), PathBuf::from);
    let store_dir = dir.join("store");
    if store_dir.exists() {
        bail!(
            "{} exists: a fixture is made once and never again (a new release adds a new one)",
            store_dir.display()
        );
    }
    let keys = Keys::load_or_make(&keys_dir)?;
    write(&store_dir, &keys).await?;
    report(&store_dir, &keys)?;
    Ok(())
}

/// The key pairs of `content::KEY_PAIRS`, by name.
struct Keys(HashMap<String, (PublicKey, PublicKey)>);

impl Keys {
    fn load_or_make(dir: &Path) -> anyhow::Result<Keys> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            for name in content::KEY_PAIRS {
                for role in ["message", "sign"] {
                    let key = PrivateKey::generate(2048)?;
                    std::fs::write(
                        dir.join(format!("{name}-{role}.pem")),
                        key.public_key().to_pem(),
                    )?;
                }
            }
            eprintln!("made new keys in {}", dir.display());
        }
        let mut keys = HashMap::new();
        for name in content::KEY_PAIRS {
            let read = |role: &str| -> anyhow::Result<PublicKey> {
                let path = dir.join(format!("{name}-{role}.pem"));
                let pem = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(PublicKey::from_pem(&pem)?)
            };
            keys.insert((*name).to_owned(), (read("message")?, read("sign")?));
        }
        Ok(Keys(keys))
    }

    fn pair(&self, name: &str) -> anyhow::Result<(PublicKey, PublicKey)> {
        self.0
            .get(name)
            .cloned()
            .with_context(|| format!("no key pair {name}"))
    }
}

/// A key server that answers the key pair set for each user.
struct FixtureKeyServer {
    answers: Mutex<HashMap<String, (String, PublicKey, PublicKey)>>,
}

impl FixtureKeyServer {
    fn set(&self, user: &str, keys_name: &str, keys: &Keys) -> anyhow::Result<()> {
        let (m, s) = keys.pair(keys_name)?;
        self.answers
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(user.to_owned(), (keys_name.to_owned(), m, s));
        Ok(())
    }
}

impl KeySource for FixtureKeyServer {
    fn fetch<'a>(&'a self, user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        let answer = match self.answers.lock() {
            Ok(a) => a.get(user.as_str()).cloned(),
            Err(_) => None,
        };
        Box::pin(async move {
            let (name, m, s) = answer.ok_or_else(|| FetchError::NotFound(user.to_string()))?;
            Ok(Fetched {
                answer: KeyAnswer {
                    username: Some(user.to_string()),
                    public_key_message: m.to_pem(),
                    public_key_sign: s.to_pem(),
                },
                message_key: m,
                sign_key: s,
                body: content::answer_body(&name),
            })
        })
    }
}

fn msg(id: &str) -> anyhow::Result<&'static Msg> {
    content::MESSAGES
        .iter()
        .find(|m| m.id == id)
        .with_context(|| format!("no message {id} in content.rs"))
}

/// The record as first stored: incoming RECEIVED (or HELD) and unread, outgoing QUEUED.
/// (`content.rs` names the values as the API does; the store takes the domain's.)
fn record(m: &Msg) -> model::Message {
    let incoming = m.direction == Direction::Incoming;
    model::Message {
        id: m.id.into(),
        from: if incoming { m.peer } else { content::ME }.into(),
        to: if incoming { content::ME } else { m.peer }.into(),
        peer: m.peer.into(),
        direction: if incoming {
            model::Direction::Incoming
        } else {
            model::Direction::Outgoing
        },
        content: Content::Text(m.text.into()),
        timestamp_ms: m.timestamp_ms,
        stored_at_ms: 0,
        state: match (incoming, m.state) {
            (true, MessageState::Held) => model::MessageState::Held,
            (true, _) => model::MessageState::Received,
            (false, _) => model::MessageState::Queued,
        },
        read: !incoming,
        wire_version: m.wire_version,
        error: if m.state == MessageState::Held {
            m.error.into()
        } else {
            String::new()
        },
        // Release 0.1.0 had no receipts (the field reads as false from its records).
        wants_receipts: false,
    }
}

fn receive(store: &Store, id: &str) -> anyhow::Result<()> {
    let m = msg(id)?;
    let frame = (m.state == MessageState::Held).then(|| m.frame.to_vec());
    store
        .insert_incoming(record(m), frame)?
        .with_context(|| format!("{id} taken"))?;
    Ok(())
}

fn send(store: &Store, id: &str) -> anyhow::Result<()> {
    let m = msg(id)?;
    let outbox = OutboxRecord {
        peer: m.peer.into(),
        id: m.id.into(),
        exactly_once: m.exactly_once,
        frame: m.frame.to_vec(),
    };
    store.insert_outgoing(record(m), outbox)?;
    Ok(())
}

fn advance(store: &Store, id: &str, state: MessageState) -> anyhow::Result<()> {
    let m = msg(id)?;
    let error = if state == MessageState::Failed {
        m.error
    } else {
        ""
    };
    let to = model::MessageState::from_api(state as i32)
        .with_context(|| format!("{state:?} is no state"))?;
    store
        .set_outgoing_state(m.peer, id, to, error)?
        .with_context(|| format!("{id} did not move to {state:?}"))?;
    Ok(())
}

/// The steps, in the order of `content::EVENTS`.
async fn write(dir: &Path, keys: &Keys) -> anyhow::Result<()> {
    let store = Store::open(dir)?;
    let server = Arc::new(FixtureKeyServer {
        answers: Mutex::new(HashMap::new()),
    });
    let (my_m, my_s) = keys.pair(content::MY_KEYS)?;
    let cache = KeyCache::open(
        store.clone(),
        server.clone(),
        &Username::parse(content::ME)?,
        my_m,
        my_s,
        KeyPolicy::Tofu,
        Duration::from_secs(3600),
    )?;
    // Contacts pinned on first use; carol is a legacy (v1) contact.
    for (user, pinned, _, _) in content::CONTACTS {
        server.set(user, pinned, keys)?;
        cache.get(&Username::parse(user)?, false).await?;
    }
    cache.set_legacy(&Username::parse("carol")?, true).await?;

    receive(&store, "a-1")?;
    receive(&store, "a-2")?;
    send(&store, "o-1")?;
    advance(&store, "o-1", MessageState::Sent)?;
    advance(&store, "o-1", MessageState::Delivered)?;
    store.mark_read("alice", Some("a-1"), false)?;
    send(&store, "o-2")?;

    receive(&store, "c-1")?;
    send(&store, "o-3")?;
    advance(&store, "o-3", MessageState::Sent)?;
    send(&store, "o-4")?;
    advance(&store, "o-4", MessageState::Failed)?;

    receive(&store, "b-1")?;
    store.mark_read("bob", None, false)?;
    // bob's keys change at the key server: KEY_CHANGED with the new keys pending, and his
    // next message held with its frame.
    for (user, _, pending, _) in content::CONTACTS {
        if let Some(pending) = pending {
            server.set(user, pending, keys)?;
            let c = cache.get(&Username::parse(user)?, true).await?;
            if !c.key_changed() {
                bail!("{user}: no key change");
            }
        }
    }
    receive(&store, "b-2")?;

    let (from, frame) = content::PARKED;
    if store.park(from, frame)? != (Parked::Kept { evicted: None }) {
        bail!("the frame of {from} was not parked");
    }
    store.spill(&[content::INBOX])?;
    store.log_event(EventKind::Connection(ConnectionChanged {
        connected: false,
        reason: content::CONNECTION_REASON.into(),
    }))?;
    store.commit_all().await?;
    store.flush()?;
    if store.last_cursor() != content::EVENTS.len() as u64 {
        bail!(
            "{} events logged, content.rs lists {}",
            store.last_cursor(),
            content::EVENTS.len()
        );
    }
    drop(cache);
    drop(store);
    Ok(())
}

/// Prints what the store chose itself, for the test to pin.
fn report(dir: &Path, keys: &Keys) -> anyhow::Result<()> {
    // The store was just closed; sled's flusher thread lets go of its lock a moment later.
    let mut tries = 0;
    let store = loop {
        match Store::open(dir) {
            Ok(s) => break s,
            Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!("// Chosen by the store when the fixture was made (make_store_fixture printed it).");
    println!("const STORE_ID: &str = {:?};", store.store_id());
    println!("const LOG_CURSORS: &[&str] = &[");
    for e in store.events_after(0, 1000)? {
        println!("    {:?}, // at_ms {}", e.log_cursor, e.at_ms);
    }
    println!("];");
    println!("const STORED_AT_MS: &[(&str, i64)] = &[");
    for m in content::MESSAGES {
        let stored = store
            .message(m.peer, m.id)?
            .with_context(|| format!("{} missing", m.id))?;
        println!("    ({:?}, {}),", m.id, stored.stored_at_ms);
    }
    println!("];");
    let cache = KeyCache::open(
        store.clone(),
        Arc::new(FixtureKeyServer {
            answers: Mutex::new(HashMap::new()),
        }),
        &Username::parse(content::ME)?,
        keys.pair(content::MY_KEYS)?.0,
        keys.pair(content::MY_KEYS)?.1,
        KeyPolicy::Tofu,
        Duration::from_secs(3600),
    )?;
    println!("const FETCHED_AT_MS: &[(&str, i64)] = &[");
    for c in cache.list() {
        println!("    ({:?}, {}),", c.username.as_str(), c.fetched_at_ms);
    }
    println!("];");
    Ok(())
}
