//! The message store: messages in both directions, conversations, the outbox, held
//! messages, and the event log, in one sled database.
//!
//! # Layout
//! Everything the pipeline writes together lives in one tree (`data`) under one-byte
//! prefixes, so that each change is a single atomic [`sled::Batch`]: after a crash either
//! all of a message (record, id index, counters, event) is there or none of it.
//!
//! | key | value |
//! |---|---|
//! | `c` peer `\0` seq | the [`rpc::Message`] (prost) — a conversation, in arrival order |
//! | `i` peer `\0` id | seq — find a message by id; also the duplicate check (`from`+`id`) |
//! | `s` peer | [`Summary`]: total and unread counts |
//! | `u` peer `\0` seq | empty — the unread incoming messages |
//! | `h` peer `\0` seq | the frame of a message held because the sender's keys changed |
//! | `q` seq | [`OutboxRecord`]: sealed frames not yet acknowledged by the broker |
//! | `w` sender `\0` seq | a frame waiting for its sender's keys (the key server was down) |
//! | `x` seq | a frame received but not yet decrypted: the *inbox* (see [`Store::spill`]) |
//! | `r` peer `\0` state seq | a message id: a receipt owed to `peer` (see "Receipts") |
//! | `p` peer | [`PeerPresence`]: the peer's presence as last heard (see "Presence") |
//! | `k` peer | empty — the peer speaks kinds (it asked for receipts, or sent a receipt or presence) |
//! | `n/presence` | [`OwnPresence`]: this identity's presence as set |
//! | `f` file id | [`Transfer`]: a file transfer, beside its message (see `files`) |
//! | `e` cursor | the [`rpc::Event`] (prost) — the event log |
//! | `n/seq` | the next message sequence number |
//! | `n/store` | the store id: 8 random bytes, made once (see "Cursors") |
//! | `n/format` | the format version, big-endian u64 (see "Format version") |
//!
//! `seq` and `cursor` are big-endian u64, so key order is number order: the last N of a
//! conversation is one short reverse range scan however many messages are stored.
//! Usernames cannot contain `\0`, so `peer \0` never prefixes another peer's keys.
//!
//! # Receipts
//! A message stored RECEIVED whose sender asked for receipts (`wants_receipts`) owes its
//! sender a delivery receipt, and, when marked read with read receipts on, a read
//! receipt: an `r` record written in the same batch as the message (or the read mark),
//! so a crash cannot lose one. [`crate::receipts`] seals the owed ids of a peer into one
//! receipt frame and queues it in the outbox in one batch that also removes the records
//! ([`Store::queue_receipt`]); such an outbox entry has no message (its acknowledgement
//! only takes it out, [`Store::outbox_forget`]). Receipts that come back move outgoing
//! messages forward ([`Store::apply_receipt`]): queued, sent (the broker acknowledged
//! it), delivered, read; never back.
//!
//! # Presence
//! A peer's presence is kept as it last told it (`p`), with the sender's timestamp, so
//! that an older presence (a replay, a late redelivery) never overwrites a newer one; it
//! reads as offline once its `expires` has passed ([`Store::peer_presence`]). A change of
//! status or note logs a presence event, and so does an expiry, once
//! ([`Store::expire_presences`]); a refresh that changes neither logs nothing. Presence is
//! sent only to peers known to speak kinds (`k`): releases before kinds would show it as
//! an empty text.
//!
//! # Durability and events
//! Writers are serialised by one mutex (they are short: a few reads and one batch).
//! [`Store::commit`] flushes to disk and only then hands the new events to the live
//! broadcast, so a client never sees a cursor that a crash could take back; callers
//! commit before acknowledging a frame to the broker or answering a Send.
//!
//! # Cursors
//! Clients see an event's position as a *log cursor*, `<store id>-<cursor>-<tag>`: the
//! store id (16 hex digits, random, made when the store is created, or at the first open
//! of a store from before store ids), the number, and a tag of that very event (the
//! first 4 bytes of the SHA-256 of its stored record, hex). [`Store::resolve_since`]
//! turns a cursor a client brings back into a number, or refuses it ([`CursorError`])
//! when it cannot mean a position in this log: another store's id, a number beyond the
//! last event, or a tag that does not match the event stored under that number (a
//! restored older copy that has logged other events since). The tag is computed from the
//! stored bytes rather than stored, so events logged before log cursors existed have one
//! too. A bare number (the cursors of before) is checked against the last event only.
//!
//! # Format version
//! The records' format (this module's keys and values, and the key cache's `contacts`
//! tree in the same database) has a version, [`FORMAT_VERSION`], kept under `n/format`.
//! A new store gets it when created. Release 0.1.0 wrote none: a store without one is
//! format 1 (0.1.0's format is format 1) and gets the record at its first open.
//! [`Store::open`] reads it before anything else and refuses a store of a newer format
//! ([`StoreError::TooNew`]: written by a later release, which may have changed records
//! this code would misread or overwrite), writing nothing to it. A change of a record's
//! meaning or layout raises [`FORMAT_VERSION`], and `open` converts older formats (or
//! reads both). Format 2 gave the outgoing states their receipt-era meanings: format 1's
//! SENT ("handed to the MQTT client") is QUEUED now, and its DELIVERED ("acknowledged by
//! the broker") is SENT, since DELIVERED now means the recipient stored it; `open`
//! rewrites the outgoing messages of a format 1 store in one batch (the event log keeps
//! the state changes it logged then, under their old names). sled's own file format is sled's: its `conf` names its version.
//!
//! # Old stores
//! A store written by an earlier release opens in a later one. The test
//! `tests/store_fixture.rs` proves it for every release that has a fixture: it copies
//! `tests/fixtures/store-<release>/store/` (a sled directory written by that release's code,
//! made once by `examples/make_store_fixture.rs`; see the README beside it) to a temporary
//! directory, opens it, and checks every record against what the generator wrote. A
//! fixture is never made again with newer code; a release that changes a record adds a
//! fixture of its own beside the old ones.

mod files;

pub use files::{Ending, Transfer, TransferState};
use nes_proto::inner::{ReceiptState, MAX_RECEIPT_IDS};
use nes_proto::now_ms;
use nes_proto::rpc::{self, event::Kind, Direction, Event, MessageState};
use prost::Message as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// Live events kept for subscribers that are behind; past this a subscriber lags and is
/// told to resume by cursor.
pub const EVENT_BROADCAST_CAPACITY: usize = 4096;

const P_MSG: u8 = b'c';
const P_ID: u8 = b'i';
const P_SUMMARY: u8 = b's';
const P_UNREAD: u8 = b'u';
const P_HELD: u8 = b'h';
const P_OUTBOX: u8 = b'q';
const P_EVENT: u8 = b'e';
const P_WAITING: u8 = b'w';
const P_INBOX: u8 = b'x';
const P_RECEIPT: u8 = b'r';
const P_PRESENCE: u8 = b'p';
const P_CAPABLE: u8 = b'k';
const K_OWN_PRESENCE: &[u8] = b"n/presence";
const K_NEXT_SEQ: &[u8] = b"n/seq";
const K_STORE_ID: &[u8] = b"n/store";
const K_FORMAT: &[u8] = b"n/format";

/// The store format this code reads and writes (see "Format version" in the module docs).
/// 1: release 0.1.0's format, the first.
pub const FORMAT_VERSION: u64 = 2;
/// The tag of position 0 (no event there) in a log cursor.
const START_TAG: &str = "00000000";

/// A sealed frame waiting for the broker's acknowledgement.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboxRecord {
    /// The recipient.
    #[prost(string, tag = "1")]
    pub peer: String,
    /// The message id.
    #[prost(string, tag = "2")]
    pub id: String,
    /// Publish with QoS 2 (v1 frames, as the original does) instead of QoS 1.
    #[prost(bool, tag = "3")]
    pub exactly_once: bool,
    /// The frame bytes, published as they are (the same bytes on every retry, so the
    /// receiver's duplicate check works for v1 too).
    #[prost(bytes = "vec", tag = "4")]
    pub frame: Vec<u8>,
}

/// Receipts owed to one peer, of one state ([`Store::receipts_due`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsDue {
    /// Who gets the receipt.
    pub peer: String,
    /// What it says.
    pub state: ReceiptState,
    /// The ids it acknowledges.
    pub ids: Vec<String>,
    /// The owed records, removed once the receipt is queued.
    keys: Vec<Vec<u8>>,
}

/// A peer's presence as last heard.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerPresence {
    /// [`rpc::PresenceStatus`].
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// Its note.
    #[prost(string, tag = "2")]
    pub note: String,
    /// The sender's timestamp of the frame that told it.
    #[prost(int64, tag = "3")]
    pub at_ms: i64,
    /// When it runs out (0: offline).
    #[prost(int64, tag = "4")]
    pub expires_ms: i64,
    /// Its expiry was logged as an event already.
    #[prost(bool, tag = "5")]
    pub expiry_logged: bool,
}

impl PeerPresence {
    /// As the API shows it at `now`: offline (and `expired`) once it ran out.
    fn shown(&self, peer: &str, now: i64) -> rpc::Presence {
        let offline = rpc::PresenceStatus::Offline as i32;
        let expired = self.status != offline && self.expires_ms <= now;
        rpc::Presence {
            username: peer.to_owned(),
            status: if expired { offline } else { self.status },
            note: if expired {
                String::new()
            } else {
                self.note.clone()
            },
            last_seen_ms: self.at_ms,
            expires_ms: if expired { 0 } else { self.expires_ms },
            expired,
        }
    }
}

/// This identity's presence as set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OwnPresence {
    /// [`rpc::PresenceStatus`] (online, away, busy or invisible).
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// The note.
    #[prost(string, tag = "2")]
    pub note: String,
}

/// Counters of one conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// Messages stored.
    #[prost(uint64, tag = "1")]
    pub total: u64,
    /// Incoming messages not read.
    #[prost(uint64, tag = "2")]
    pub unread: u64,
}

/// A held message and the frame to open again once its sender's keys are trusted.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its sequence number.
    pub seq: u64,
    /// The stored record (state HELD, no text).
    pub message: rpc::Message,
    /// The frame as received.
    pub frame: Vec<u8>,
}

/// Most frames kept waiting for their senders' keys: past this, the oldest parked frame
/// is dropped to make room (rather than filling the disk, since anyone who knows the
/// recipient's public key can seal frames with made-up senders). Oldest first because
/// lookups go newest first: when a burst of made-up senders outruns the lookup budget,
/// the frames dropped are the burst's old ones the budget never reached.
pub const MAX_WAITING: u64 = 10_000;
/// Most frames parked for one sender: past this, that sender's new frames are refused
/// (one busy made-up name cannot take the parking area).
pub const MAX_WAITING_PER_SENDER: u32 = 256;

/// What [`Store::park`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parked {
    /// Kept; `evicted` names the sender of the oldest parked frame dropped to make room.
    Kept {
        /// The sender whose frame was dropped, if one was.
        evicted: Option<String>,
    },
    /// Not kept: [`MAX_WAITING_PER_SENDER`] frames of this sender are parked already.
    TooManyFromSender,
}

/// The parked frames by arrival and by sender, in memory (rebuilt at open).
#[derive(Default)]
struct ParkIndex {
    by_seq: std::collections::BTreeMap<u64, String>,
    per_sender: std::collections::HashMap<String, std::collections::BTreeSet<u64>>,
}

impl ParkIndex {
    fn add(&mut self, from: &str, seq: u64) {
        self.by_seq.insert(seq, from.to_owned());
        self.per_sender
            .entry(from.to_owned())
            .or_default()
            .insert(seq);
    }

    fn remove(&mut self, from: &str, seq: u64) {
        if self.by_seq.remove(&seq).is_some() {
            if let Some(seqs) = self.per_sender.get_mut(from) {
                seqs.remove(&seq);
                if seqs.is_empty() {
                    self.per_sender.remove(from);
                }
            }
        }
    }
}

/// A frame waiting for its sender's keys.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The sender the decrypted frame names (not yet verified).
    pub from: String,
    /// Arrival order.
    pub seq: u64,
    /// The frame as received.
    pub frame: Vec<u8>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("message store: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode.
    #[error("message store: damaged record: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message id that is not in the conversation.
    #[error("no message {id} in the conversation with {peer}")]
    UnknownId {
        /// The conversation.
        peer: String,
        /// The id asked for.
        id: String,
    },
    /// A message id already used in that conversation.
    #[error("message id {0} is already used")]
    IdTaken(String),
    /// The store has a format newer than this code knows: a later release wrote it. It is
    /// left as it is.
    #[error("the message store has format {found}, newer than this nesd knows (format {supported}): a later release of nesd wrote it; run that release or a newer one (the store was left unchanged)")]
    TooNew {
        /// The store's format version.
        found: u64,
        /// [`FORMAT_VERSION`].
        supported: u64,
    },
    /// The format version record is not a version (8 bytes, at least 1).
    #[error("message store: damaged format version record ({0:02x?})")]
    DamagedFormat(Vec<u8>),
}

/// Result of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// Why a cursor a client brought back is refused (see "Cursors" in the module docs).
/// Each message says what happened, for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CursorError {
    /// Not a cursor at all.
    #[error("{cursor:?} is not an event cursor (give the `cursor` of an event, or a number)")]
    Malformed {
        /// What was given.
        cursor: String,
    },
    /// A cursor of another store.
    #[error("cursor {cursor} belongs to another message store (this one is {store}): the store was re-created, or the cursor was saved from another machine or identity")]
    OtherStore {
        /// What was given.
        cursor: String,
        /// This store's id.
        store: String,
    },
    /// A number this log has not reached.
    #[error("cursor {cursor} is beyond the last event of this message store ({last}): the store was re-created or restored from an older copy, or the cursor comes from another store")]
    Beyond {
        /// What was given.
        cursor: String,
        /// The last durable cursor.
        last: u64,
    },
    /// The event under that number is another one.
    #[error("cursor {cursor} names an event this message store does not have (its event {seq} is a different one): the store was restored from an older copy and has logged other events since")]
    OtherEvent {
        /// What was given.
        cursor: String,
        /// The number in it.
        seq: u64,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    data: sled::Tree,
    store_id: String,
    format: u64,
    writer: Mutex<Writer>,
    events: broadcast::Sender<Arc<Event>>,
    /// The highest cursor known durable and handed to the broadcast.
    released: AtomicU64,
    outbox_len: AtomicU64,
    waiting_len: AtomicU64,
    parked: Mutex<ParkIndex>,
    inbox: Mutex<InboxCount>,
}

/// How much the inbox holds (kept beside it so that a full inbox is known without a scan).
#[derive(Debug, Default)]
struct InboxCount {
    frames: u64,
    bytes: u64,
    last_seq: u64,
    /// Each held frame's [`frame_digest`], counted: whether a frame the broker sends again
    /// is in the inbox already.
    digests: std::collections::HashMap<[u8; 16], u32>,
}

impl InboxCount {
    fn add(&mut self, frame: &[u8]) {
        self.frames += 1;
        self.bytes += frame.len() as u64;
        *self.digests.entry(frame_digest(frame)).or_default() += 1;
    }

    fn remove(&mut self, frame: &[u8]) {
        self.frames = self.frames.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(frame.len() as u64);
        let d = frame_digest(frame);
        if let Some(n) = self.digests.get_mut(&d) {
            *n -= 1;
            if *n == 0 {
                self.digests.remove(&d);
            }
        }
    }
}

fn frame_digest(frame: &[u8]) -> [u8; 16] {
    let mut d = [0u8; 16];
    d.copy_from_slice(&Sha256::digest(frame)[..16]);
    d
}

struct Writer {
    next_seq: u64,
    next_cursor: u64,
    unreleased: VecDeque<Arc<Event>>,
}

/// One atomic change being built under the writer lock.
struct Change<'a> {
    store_id: &'a str,
    w: MutexGuard<'a, Writer>,
    batch: sled::Batch,
    next_seq: u64,
    next_cursor: u64,
    events: Vec<Arc<Event>>,
}

impl Change<'_> {
    fn seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.batch.insert(K_NEXT_SEQ, &self.next_seq.to_be_bytes());
        seq
    }

    fn event(&mut self, kind: Kind) -> Arc<Event> {
        let mut event = Event {
            cursor: self.next_cursor,
            at_ms: now_ms(),
            kind: Some(kind),
            ..Default::default()
        };
        self.next_cursor += 1;
        // Stored without its log cursor: that is derived from the stored bytes.
        let record = event.encode_to_vec();
        event.log_cursor = log_cursor(self.store_id, event.cursor, &record);
        self.batch.insert(&event_key(event.cursor)[..], record);
        let event = Arc::new(event);
        self.events.push(event.clone());
        event
    }

    fn apply(mut self, data: &sled::Tree) -> StoreResult<()> {
        data.apply_batch(self.batch)?;
        self.w.next_seq = self.next_seq;
        self.w.next_cursor = self.next_cursor;
        self.w.unreleased.extend(self.events);
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the store in the directory `path`. A store of a newer format
    /// than [`FORMAT_VERSION`] is refused ([`StoreError::TooNew`]) before anything is
    /// written to it.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(500))
            .open()?;
        let data = db.open_tree("data")?;
        // First, before anything is written.
        let mut format = format_version(&data)?;
        if format == 1 {
            format = convert_format_1(&data)?;
        }
        let next_seq = match data.get(K_NEXT_SEQ)? {
            Some(v) => be_u64(&v).unwrap_or(1),
            None => 1,
        };
        let last_cursor = match data.scan_prefix([P_EVENT]).next_back() {
            Some(kv) => be_u64(&kv?.0[1..]).unwrap_or(0),
            None => 0,
        };
        let outbox_len = data.scan_prefix([P_OUTBOX]).count() as u64;
        let mut parked = ParkIndex::default();
        for kv in data.scan_prefix([P_WAITING]) {
            let (k, _) = kv?;
            if let Some((from, seq)) = waiting_key(&k) {
                parked.add(from, seq);
            }
        }
        let waiting_len = parked.by_seq.len() as u64;
        let mut inbox = InboxCount::default();
        for kv in data.scan_prefix([P_INBOX]) {
            let (k, v) = kv?;
            inbox.add(&v);
            inbox.last_seq = inbox.last_seq.max(be_u64(&k[1..]).unwrap_or(0));
        }
        let store_id = store_id(&data)?;
        let (events, _) = broadcast::channel(EVENT_BROADCAST_CAPACITY);
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                data,
                store_id,
                format,
                writer: Mutex::new(Writer {
                    next_seq: next_seq.max(1),
                    next_cursor: last_cursor + 1,
                    unreleased: VecDeque::new(),
                }),
                events,
                released: AtomicU64::new(last_cursor),
                outbox_len: AtomicU64::new(outbox_len),
                waiting_len: AtomicU64::new(waiting_len),
                parked: Mutex::new(parked),
                inbox: Mutex::new(inbox),
            }),
        })
    }

    /// A tree of the same database for another component (the key cache).
    pub fn tree(&self, name: &str) -> StoreResult<sled::Tree> {
        Ok(self.inner.db.open_tree(name)?)
    }

    fn change(&self) -> Change<'_> {
        // A panic while holding the lock cannot leave a half-applied batch (batches are
        // atomic), so a poisoned lock is safe to keep using.
        let w = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        Change {
            store_id: &self.inner.store_id,
            next_seq: w.next_seq,
            next_cursor: w.next_cursor,
            w,
            batch: sled::Batch::default(),
            events: Vec::new(),
        }
    }

    /// Subscribes to events as they become durable.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.events.subscribe()
    }

    /// The cursor of the newest durable event (0 when none).
    pub fn last_cursor(&self) -> u64 {
        self.inner.released.load(Ordering::Acquire)
    }

    /// The store's format version (see "Format version" in the module docs).
    pub fn format_version(&self) -> u64 {
        self.inner.format
    }

    /// This store's id (16 hex digits), kept for the life of the store.
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// The log cursor of the newest durable event (position 0 when none): where a client
    /// that starts "from now" resumes.
    pub fn last_log_cursor(&self) -> StoreResult<String> {
        let last = self.last_cursor();
        if last == 0 {
            return Ok(format!("{}-0-{START_TAG}", self.inner.store_id));
        }
        match self.inner.data.get(event_key(last))? {
            Some(record) => Ok(log_cursor(&self.inner.store_id, last, &record)),
            // Cannot happen (released events are stored); the bare number still resumes.
            None => Ok(last.to_string()),
        }
    }

    /// The number of the event a client's `since` names, once it is sure to be a position
    /// in this log (see "Cursors" in the module docs): a log cursor of this store whose
    /// event is the one stored under its number, or a bare number not beyond the last
    /// event. `0` (or this store's position 0) means "from the start".
    pub fn resolve_since(&self, since: &str) -> Result<u64, CursorError> {
        let cursor = since.trim();
        let last = self.last_cursor();
        let beyond = |seq: u64| {
            if seq > last {
                Err(CursorError::Beyond {
                    cursor: cursor.to_owned(),
                    last,
                })
            } else {
                Ok(seq)
            }
        };
        if let Ok(seq) = cursor.parse::<u64>() {
            return beyond(seq);
        }
        let malformed = || CursorError::Malformed {
            cursor: cursor.to_owned(),
        };
        let mut parts = cursor.splitn(3, '-');
        let (Some(id), Some(seq), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed());
        };
        let seq: u64 = seq.parse().map_err(|_| malformed())?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        if id != self.inner.store_id {
            return Err(CursorError::OtherStore {
                cursor: cursor.to_owned(),
                store: self.inner.store_id.clone(),
            });
        }
        beyond(seq)?;
        if seq == 0 {
            return Ok(0);
        }
        let other = || CursorError::OtherEvent {
            cursor: cursor.to_owned(),
            seq,
        };
        let record = self
            .inner
            .data
            .get(event_key(seq))
            .map_err(StoreError::from)?
            .ok_or_else(other)?;
        if event_tag(&record) != tag {
            return Err(other());
        }
        Ok(seq)
    }

    /// Outgoing messages not yet acknowledged by the broker.
    pub fn outbox_len(&self) -> u64 {
        self.inner.outbox_len.load(Ordering::Acquire)
    }

    /// Flushes everything written so far to disk, then publishes the events it contained.
    pub async fn commit(&self) -> StoreResult<()> {
        if self.last_logged() <= self.last_cursor() {
            return Ok(());
        }
        self.commit_all().await
    }

    /// Flushes to disk even when no event was logged (parked frames log none), then
    /// publishes the events written so far.
    pub async fn commit_all(&self) -> StoreResult<()> {
        let upto = self.last_logged();
        self.inner.db.flush_async().await?;
        self.release(upto);
        Ok(())
    }

    /// The cursor of the newest event written, durable or not.
    fn last_logged(&self) -> u64 {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_cursor
            - 1
    }

    /// Flushes synchronously (at shutdown).
    pub fn flush(&self) -> StoreResult<()> {
        let upto = self.last_logged();
        self.inner.db.flush()?;
        self.release(upto);
        Ok(())
    }

    fn release(&self, upto: u64) {
        let mut w = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        while w.unreleased.front().is_some_and(|e| e.cursor <= upto) {
            if let Some(event) = w.unreleased.pop_front() {
                self.inner.released.store(event.cursor, Ordering::Release);
                // No subscriber is fine: the log has it.
                let _ = self.inner.events.send(event);
            }
        }
    }

    /// Durable events with a cursor greater than `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<Event>>> {
        let released = self.last_cursor();
        if after >= released {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self
            .inner
            .data
            .range(event_key(after + 1)..=event_key(released))
            .take(limit)
        {
            let (_, v) = kv?;
            let mut event = Event::decode(&v[..])?;
            event.log_cursor = log_cursor(&self.inner.store_id, event.cursor, &v);
            out.push(Arc::new(event));
        }
        Ok(out)
    }

    /// Stores a verified incoming message (state RECEIVED, or HELD with its frame).
    /// Returns `None` for a duplicate: the conversation already has that id.
    pub fn insert_incoming(
        &self,
        message: rpc::Message,
        held_frame: Option<Vec<u8>>,
    ) -> StoreResult<Option<rpc::Message>> {
        self.insert_incoming_with(message, held_frame, None)
    }

    /// Stores an incoming file message and its transfer record together. `None` for a
    /// duplicate id. Its delivery receipt is owed only once the file is complete.
    pub fn insert_incoming_file(
        &self,
        message: rpc::Message,
        transfer: &Transfer,
    ) -> StoreResult<Option<rpc::Message>> {
        self.insert_incoming_with(message, None, Some(transfer))
    }

    fn insert_incoming_with(
        &self,
        mut message: rpc::Message,
        held_frame: Option<Vec<u8>>,
        transfer: Option<&Transfer>,
    ) -> StoreResult<Option<rpc::Message>> {
        let data = &self.inner.data;
        let mut c = self.change();
        if let Some(t) = transfer {
            Store::add_transfer(&mut c, t);
        }
        let peer = message.peer.clone();
        let idk = peer_key(P_ID, &peer, message.id.as_bytes());
        if data.contains_key(&idk)? {
            return Ok(None);
        }
        let seq = c.seq();
        message.stored_at_ms = now_ms();
        let mut summary = self.summary(&peer)?;
        summary.total += 1;
        let unread = message.state == MessageState::Received as i32 && !message.read;
        if unread {
            summary.unread += 1;
            c.batch
                .insert(peer_key(P_UNREAD, &peer, &seq.to_be_bytes()), &[]);
        }
        if let Some(frame) = held_frame {
            c.batch
                .insert(peer_key(P_HELD, &peer, &seq.to_be_bytes()), frame);
        }
        c.batch.insert(
            peer_key(P_MSG, &peer, &seq.to_be_bytes()),
            message.encode_to_vec(),
        );
        c.batch.insert(idk, &seq.to_be_bytes());
        c.batch.insert(summary_key(&peer), summary.encode_to_vec());
        // Read before written: every message of a contact asks, the mark is written once.
        let capable = peer_key(P_CAPABLE, &peer, &[]);
        if message.wants_receipts && !data.contains_key(&capable)? {
            c.batch.insert(capable, &[]);
        }
        if message.wants_receipts
            && message.state == MessageState::Received as i32
            && message.file.is_none()
        {
            c.batch.insert(
                receipt_key(&peer, ReceiptState::Delivered, seq),
                message.id.as_bytes(),
            );
        }
        c.event(Kind::Message(message.clone()));
        c.apply(data)?;
        Ok(Some(message))
    }

    /// Stores an outgoing message (state QUEUED) and its sealed frame in the outbox.
    pub fn insert_outgoing(
        &self,
        message: rpc::Message,
        outbox: OutboxRecord,
    ) -> StoreResult<rpc::Message> {
        self.insert_outgoing_with(message, outbox, None)
    }

    /// Stores an outgoing file message (its offer queued in the outbox) and its transfer
    /// record together.
    pub fn insert_outgoing_file(
        &self,
        message: rpc::Message,
        outbox: OutboxRecord,
        transfer: &Transfer,
    ) -> StoreResult<rpc::Message> {
        self.insert_outgoing_with(message, outbox, Some(transfer))
    }

    fn insert_outgoing_with(
        &self,
        mut message: rpc::Message,
        outbox: OutboxRecord,
        transfer: Option<&Transfer>,
    ) -> StoreResult<rpc::Message> {
        let data = &self.inner.data;
        let mut c = self.change();
        if let Some(t) = transfer {
            Store::add_transfer(&mut c, t);
        }
        let peer = message.peer.clone();
        let idk = peer_key(P_ID, &peer, message.id.as_bytes());
        if data.contains_key(&idk)? {
            return Err(StoreError::IdTaken(message.id));
        }
        let seq = c.seq();
        message.stored_at_ms = now_ms();
        let mut summary = self.summary(&peer)?;
        summary.total += 1;
        c.batch.insert(
            peer_key(P_MSG, &peer, &seq.to_be_bytes()),
            message.encode_to_vec(),
        );
        c.batch.insert(idk, &seq.to_be_bytes());
        c.batch.insert(summary_key(&peer), summary.encode_to_vec());
        c.batch.insert(&outbox_key(seq)[..], outbox.encode_to_vec());
        c.event(Kind::Message(message.clone()));
        c.apply(data)?;
        self.inner.outbox_len.fetch_add(1, Ordering::AcqRel);
        Ok(message)
    }

    /// Moves an outgoing message on (SENT, DELIVERED, READ, FAILED). States only move
    /// forward; every one of them takes it out of the outbox. Returns the updated message,
    /// or `None` when nothing changed.
    pub fn set_outgoing_state(
        &self,
        peer: &str,
        id: &str,
        state: MessageState,
        error: &str,
    ) -> StoreResult<Option<rpc::Message>> {
        let mut c = self.change();
        let Some((message, leaves_outbox)) = self.advance(&mut c, peer, id, state, error)? else {
            return Ok(None);
        };
        self.apply_with_outbox(c, leaves_outbox, 0)?;
        Ok(Some(message))
    }

    /// Adds moving one outgoing message to `state` to the change `c`: the record, the
    /// outbox entry leaving, the event. `None` when it does not move; else the message and
    /// how many outbox entries leave (0 or 1).
    fn advance(
        &self,
        c: &mut Change<'_>,
        peer: &str,
        id: &str,
        state: MessageState,
        error: &str,
    ) -> StoreResult<Option<(rpc::Message, u64)>> {
        let data = &self.inner.data;
        let Some(seq) = self.seq_of(peer, id)? else {
            return Ok(None);
        };
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = data.get(&key)? else {
            return Ok(None);
        };
        let mut message = rpc::Message::decode(&bytes[..])?;
        if message.direction != Direction::Outgoing as i32 || !advances(message.state(), state) {
            return Ok(None);
        }
        message.state = state as i32;
        message.error = error.to_owned();
        c.batch.insert(key, message.encode_to_vec());
        let leaves_outbox = data.contains_key(outbox_key(seq))?;
        if leaves_outbox {
            c.batch.remove(&outbox_key(seq));
        }
        c.event(Kind::StateChanged(rpc::MessageStateChanged {
            id: id.to_owned(),
            peer: peer.to_owned(),
            state: state as i32,
            error: error.to_owned(),
        }));
        Ok(Some((message, u64::from(leaves_outbox))))
    }

    /// Applies `c`, in which `leaving` outbox entries were removed and `adding` added. The
    /// count changes before the change is visible, so a reader who sees the new state
    /// never sees the old count.
    fn apply_with_outbox(&self, c: Change<'_>, leaving: u64, adding: u64) -> StoreResult<()> {
        let len = &self.inner.outbox_len;
        len.fetch_sub(leaving, Ordering::AcqRel);
        len.fetch_add(adding, Ordering::AcqRel);
        if let Err(e) = c.apply(&self.inner.data) {
            len.fetch_add(leaving, Ordering::AcqRel);
            len.fetch_sub(adding, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// The broker acknowledged (or refused) outbox entry `seq` and no message moved on
    /// with it (a receipt, or a message a receipt moved on first): it leaves the outbox.
    pub fn outbox_forget(&self, seq: u64) -> StoreResult<()> {
        let mut c = self.change();
        if !self.inner.data.contains_key(outbox_key(seq))? {
            return Ok(());
        }
        c.batch.remove(&outbox_key(seq));
        self.apply_with_outbox(c, 1, 0)
    }

    /// A receipt from `peer`: moves the outgoing messages to `peer` that it names to
    /// DELIVERED or READ (only forward; ids that are not such messages are ignored).
    /// Returns how many moved.
    pub fn apply_receipt(
        &self,
        peer: &str,
        state: ReceiptState,
        ids: &[String],
    ) -> StoreResult<u64> {
        let to = match state {
            ReceiptState::Delivered => MessageState::Delivered,
            ReceiptState::Read => MessageState::Read,
        };
        let mut c = self.change();
        let capable = peer_key(P_CAPABLE, peer, &[]);
        let known = self.inner.data.contains_key(&capable)?;
        if !known {
            c.batch.insert(capable, &[]);
        }
        let (mut moved, mut leaving) = (0u64, 0u64);
        for id in ids {
            if let Some((_, left)) = self.advance(&mut c, peer, id, to, "")? {
                moved += 1;
                leaving += left;
            }
        }
        if moved > 0 || !known {
            self.apply_with_outbox(c, leaving, 0)?;
        }
        Ok(moved)
    }

    /// Peers known to speak kinds (the ones presence goes to), in name order.
    pub fn capable_peers(&self) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for kv in self.inner.data.scan_prefix([P_CAPABLE]) {
            let (k, _) = kv?;
            if let Some(peer) = k.get(1..k.len().saturating_sub(1)) {
                out.push(String::from_utf8_lossy(peer).into_owned());
            }
        }
        Ok(out)
    }

    /// A peer told its presence (a verified frame with the sender's timestamp `at_ms`).
    /// An older one than the last heard is ignored (`None`); else it is kept, the peer
    /// counts as speaking kinds, and a change of status or note (or the first news after
    /// an expiry) logs a presence event. Returns the presence as shown now.
    pub fn set_peer_presence(
        &self,
        peer: &str,
        status: rpc::PresenceStatus,
        note: &str,
        at_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<Option<rpc::Presence>> {
        let key = peer_key(P_PRESENCE, peer, &[]);
        let mut c = self.change();
        let old = match self.inner.data.get(&key)? {
            Some(v) => Some(PeerPresence::decode(&v[..])?),
            None => None,
        };
        if old.as_ref().is_some_and(|o| o.at_ms >= at_ms) {
            return Ok(None);
        }
        let new = PeerPresence {
            status: status as i32,
            note: note.to_owned(),
            at_ms,
            expires_ms,
            expiry_logged: false,
        };
        let now = now_ms();
        let shown = new.shown(peer, now);
        let changed = match &old {
            None => true,
            Some(o) => {
                let before = o.shown(peer, now);
                before.status != shown.status || before.note != shown.note
            }
        };
        c.batch.insert(key, new.encode_to_vec());
        c.batch.insert(peer_key(P_CAPABLE, peer, &[]), &[]);
        if changed {
            c.event(Kind::Presence(shown.clone()));
        }
        c.apply(&self.inner.data)?;
        Ok(Some(shown))
    }

    /// A peer's presence as shown now (`None`: it never told any).
    pub fn peer_presence(&self, peer: &str) -> StoreResult<Option<rpc::Presence>> {
        Ok(
            match self.inner.data.get(peer_key(P_PRESENCE, peer, &[]))? {
                Some(v) => Some(PeerPresence::decode(&v[..])?.shown(peer, now_ms())),
                None => None,
            },
        )
    }

    /// Logs a presence event (offline, expired) for each peer whose presence ran out by
    /// `now` and was not logged yet; returns them.
    pub fn expire_presences(&self, now: i64) -> StoreResult<Vec<rpc::Presence>> {
        let mut c = self.change();
        let mut out = Vec::new();
        for kv in self.inner.data.scan_prefix([P_PRESENCE]) {
            let (k, v) = kv?;
            let mut p = PeerPresence::decode(&v[..])?;
            if p.expiry_logged
                || p.status == rpc::PresenceStatus::Offline as i32
                || p.expires_ms > now
            {
                continue;
            }
            let peer = String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)]).into_owned();
            p.expiry_logged = true;
            c.batch.insert(k, p.encode_to_vec());
            let shown = p.shown(&peer, now);
            c.event(Kind::Presence(shown.clone()));
            out.push(shown);
        }
        if !out.is_empty() {
            c.apply(&self.inner.data)?;
        }
        Ok(out)
    }

    /// This identity's presence as set (online when never set).
    pub fn own_presence(&self) -> StoreResult<OwnPresence> {
        Ok(match self.inner.data.get(K_OWN_PRESENCE)? {
            Some(v) => OwnPresence::decode(&v[..])?,
            None => OwnPresence {
                status: rpc::PresenceStatus::Online as i32,
                note: String::new(),
            },
        })
    }

    /// Sets this identity's presence and logs it as an event (username empty).
    pub fn set_own_presence(&self, own: &OwnPresence) -> StoreResult<()> {
        let mut c = self.change();
        c.batch.insert(K_OWN_PRESENCE, own.encode_to_vec());
        c.event(Kind::Presence(rpc::Presence {
            username: String::new(),
            status: own.status,
            note: own.note.clone(),
            ..Default::default()
        }));
        c.apply(&self.inner.data)
    }

    /// Queues sealed frames that are not messages (presence) in the outbox, in one batch.
    pub fn queue_frames(&self, records: Vec<OutboxRecord>) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut c = self.change();
        let n = records.len() as u64;
        for record in records {
            let seq = c.seq();
            c.batch.insert(&outbox_key(seq)[..], record.encode_to_vec());
        }
        self.apply_with_outbox(c, 0, n)
    }

    /// Receipts owed, grouped by peer and state, each group at most [`MAX_RECEIPT_IDS`]
    /// ids, at most `limit` groups.
    pub fn receipts_due(&self, limit: usize) -> StoreResult<Vec<ReceiptsDue>> {
        let mut out: Vec<ReceiptsDue> = Vec::new();
        for kv in self.inner.data.scan_prefix([P_RECEIPT]) {
            let (k, id) = kv?;
            let Some(zero) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let (Some(peer), Some(&state)) = (k.get(1..zero), k.get(zero + 1)) else {
                continue;
            };
            let Some(state) = receipt_state_of_byte(state) else {
                continue;
            };
            let peer = String::from_utf8_lossy(peer);
            let id = String::from_utf8_lossy(&id).into_owned();
            match out.last_mut() {
                Some(g) if g.peer == peer && g.state == state => {
                    // A full group leaves the rest of its ids to the next round.
                    if g.ids.len() < MAX_RECEIPT_IDS {
                        g.ids.push(id);
                        g.keys.push(k.to_vec());
                    }
                }
                _ => {
                    if out.len() == limit {
                        break;
                    }
                    out.push(ReceiptsDue {
                        peer: peer.into_owned(),
                        state,
                        ids: vec![id],
                        keys: vec![k.to_vec()],
                    });
                }
            }
        }
        Ok(out)
    }

    /// Queues a sealed receipt in the outbox and forgets the owed records it carries, in
    /// one batch.
    pub fn queue_receipt(&self, due: &ReceiptsDue, record: OutboxRecord) -> StoreResult<()> {
        let mut c = self.change();
        let seq = c.seq();
        c.batch.insert(&outbox_key(seq)[..], record.encode_to_vec());
        for k in &due.keys {
            c.batch.remove(&k[..]);
        }
        self.apply_with_outbox(c, 0, 1)
    }

    /// Forgets owed receipts that cannot be sent (the peer is a legacy contact now, or its
    /// keys changed and are not trusted).
    pub fn drop_receipts(&self, due: &ReceiptsDue) -> StoreResult<()> {
        let mut c = self.change();
        for k in &due.keys {
            c.batch.remove(&k[..]);
        }
        c.apply(&self.inner.data)
    }

    /// Whether any receipt is owed.
    pub fn receipts_owed(&self) -> bool {
        self.inner.data.scan_prefix([P_RECEIPT]).next().is_some()
    }

    /// Outbox entries with a sequence number greater than `after`, in order, at most `limit`.
    pub fn outbox_after(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, OutboxRecord)>> {
        let mut out = Vec::new();
        let start = outbox_key(after.saturating_add(1));
        for kv in self.inner.data.range(start..).take(limit) {
            let (k, v) = kv?;
            if k.first() != Some(&P_OUTBOX) {
                break;
            }
            let seq = be_u64(&k[1..]).unwrap_or(0);
            out.push((seq, OutboxRecord::decode(&v[..])?));
        }
        Ok(out)
    }

    /// One message by conversation and id.
    pub fn message(&self, peer: &str, id: &str) -> StoreResult<Option<rpc::Message>> {
        let Some(seq) = self.seq_of(peer, id)? else {
            return Ok(None);
        };
        match self
            .inner
            .data
            .get(peer_key(P_MSG, peer, &seq.to_be_bytes()))?
        {
            Some(bytes) => Ok(Some(rpc::Message::decode(&bytes[..])?)),
            None => Ok(None),
        }
    }

    /// The conversation with `peer`, oldest first: the last `limit` (0: all) messages
    /// stored before `before_id` (when given).
    pub fn history(
        &self,
        peer: &str,
        limit: usize,
        before_id: Option<&str>,
    ) -> StoreResult<Vec<rpc::Message>> {
        let end = match before_id {
            Some(id) => match self.seq_of(peer, id)? {
                Some(seq) => peer_key(P_MSG, peer, &seq.to_be_bytes()),
                None => {
                    return Err(StoreError::UnknownId {
                        peer: peer.to_owned(),
                        id: id.to_owned(),
                    })
                }
            },
            None => {
                let mut k = peer_key(P_MSG, peer, &[]);
                k.push(0xff); // after every 8-byte seq of this peer
                k
            }
        };
        let start = peer_key(P_MSG, peer, &[]);
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        for kv in self.inner.data.range(start..end).rev().take(limit) {
            let (_, v) = kv?;
            out.push(rpc::Message::decode(&v[..])?);
        }
        out.reverse();
        Ok(out)
    }

    /// Every conversation with its counters and newest message, most recent first.
    pub fn conversations(&self) -> StoreResult<Vec<rpc::Conversation>> {
        let mut found = Vec::new();
        for kv in self.inner.data.scan_prefix([P_SUMMARY]) {
            let (k, v) = kv?;
            let peer = String::from_utf8_lossy(&k[1..]).into_owned();
            let summary = Summary::decode(&v[..])?;
            let last = self
                .inner
                .data
                .scan_prefix(peer_key(P_MSG, &peer, &[]))
                .next_back()
                .transpose()?;
            let (seq, last) = match last {
                Some((k, v)) => (
                    be_u64(&k[k.len() - 8..]).unwrap_or(0),
                    Some(rpc::Message::decode(&v[..])?),
                ),
                None => (0, None),
            };
            found.push((
                seq,
                rpc::Conversation {
                    peer,
                    unread: summary.unread,
                    total: summary.total,
                    last,
                },
            ));
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found.into_iter().map(|(_, c)| c).collect())
    }

    /// Total unread incoming messages.
    pub fn unread_total(&self) -> StoreResult<u64> {
        let mut total = 0u64;
        for kv in self.inner.data.scan_prefix([P_SUMMARY]) {
            let (_, v) = kv?;
            total = total.saturating_add(Summary::decode(&v[..])?.unread);
        }
        Ok(total)
    }

    /// Marks incoming messages of `peer` read: all, or up to and including `up_to_id`;
    /// with `read_receipts`, those whose sender asked for receipts owe a read receipt.
    /// Returns how many changed.
    pub fn mark_read(
        &self,
        peer: &str,
        up_to_id: Option<&str>,
        read_receipts: bool,
    ) -> StoreResult<u64> {
        let data = &self.inner.data;
        let mut c = self.change();
        let last = match up_to_id {
            Some(id) => match self.seq_of(peer, id)? {
                Some(seq) => seq,
                None => {
                    return Err(StoreError::UnknownId {
                        peer: peer.to_owned(),
                        id: id.to_owned(),
                    })
                }
            },
            None => u64::MAX,
        };
        let mut marked = 0u64;
        for kv in data
            .range(peer_key(P_UNREAD, peer, &[])..=peer_key(P_UNREAD, peer, &last.to_be_bytes()))
        {
            let (k, _) = kv?;
            let seq_bytes = &k[k.len() - 8..];
            let mkey = peer_key(P_MSG, peer, seq_bytes);
            if let Some(bytes) = data.get(&mkey)? {
                let mut message = rpc::Message::decode(&bytes[..])?;
                message.read = true;
                if read_receipts && message.wants_receipts {
                    let seq = be_u64(seq_bytes).unwrap_or(0);
                    c.batch.insert(
                        receipt_key(peer, ReceiptState::Read, seq),
                        message.id.as_bytes(),
                    );
                }
                c.batch.insert(mkey, message.encode_to_vec());
            }
            c.batch.remove(k);
            marked += 1;
        }
        if marked == 0 {
            return Ok(0);
        }
        let mut summary = self.summary(peer)?;
        summary.unread = summary.unread.saturating_sub(marked);
        c.batch.insert(summary_key(peer), summary.encode_to_vec());
        c.event(Kind::MarkedRead(rpc::MarkedRead {
            peer: peer.to_owned(),
            unread: summary.unread,
        }));
        c.apply(data)?;
        Ok(marked)
    }

    /// Messages of `peer` held because its keys changed, oldest first.
    pub fn held(&self, peer: &str) -> StoreResult<Vec<Held>> {
        let mut out = Vec::new();
        for kv in self.inner.data.scan_prefix(peer_key(P_HELD, peer, &[])) {
            let (k, frame) = kv?;
            let seq_bytes = &k[k.len() - 8..];
            let seq = be_u64(seq_bytes).unwrap_or(0);
            if let Some(bytes) = self.inner.data.get(peer_key(P_MSG, peer, seq_bytes))? {
                out.push(Held {
                    seq,
                    message: rpc::Message::decode(&bytes[..])?,
                    frame: frame.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// Releases a held message after its sender's new keys were trusted and it verified:
    /// it becomes RECEIVED with its text (and owes its delivery receipt now, if asked).
    pub fn release_held(
        &self,
        peer: &str,
        seq: u64,
        text: String,
    ) -> StoreResult<Option<rpc::Message>> {
        let data = &self.inner.data;
        let mut c = self.change();
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = data.get(&key)? else {
            return Ok(None);
        };
        let mut message = rpc::Message::decode(&bytes[..])?;
        if message.state != MessageState::Held as i32 {
            return Ok(None);
        }
        message.state = MessageState::Received as i32;
        message.text = text;
        message.error.clear();
        message.read = false;
        let mut summary = self.summary(peer)?;
        summary.unread += 1;
        c.batch.insert(key, message.encode_to_vec());
        c.batch.remove(peer_key(P_HELD, peer, &seq.to_be_bytes()));
        c.batch
            .insert(peer_key(P_UNREAD, peer, &seq.to_be_bytes()), &[]);
        c.batch.insert(summary_key(peer), summary.encode_to_vec());
        if message.wants_receipts {
            c.batch.insert(
                receipt_key(peer, ReceiptState::Delivered, seq),
                message.id.as_bytes(),
            );
        }
        c.event(Kind::Message(message.clone()));
        c.apply(data)?;
        Ok(Some(message))
    }

    /// Deletes a held message that does not verify under the trusted keys.
    pub fn drop_held(&self, peer: &str, seq: u64) -> StoreResult<()> {
        let data = &self.inner.data;
        let mut c = self.change();
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = data.get(&key)? else {
            return Ok(());
        };
        let message = rpc::Message::decode(&bytes[..])?;
        let mut summary = self.summary(peer)?;
        summary.total = summary.total.saturating_sub(1);
        c.batch.remove(key);
        c.batch.remove(peer_key(P_ID, peer, message.id.as_bytes()));
        c.batch.remove(peer_key(P_HELD, peer, &seq.to_be_bytes()));
        c.batch.insert(summary_key(peer), summary.encode_to_vec());
        c.apply(data)
    }

    fn park_index(&self) -> MutexGuard<'_, ParkIndex> {
        // Plain maps, updated after each write: a panic cannot leave them half changed.
        self.inner.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a frame whose sender's keys are not known yet, behind any other frame of that
    /// sender already waiting. With [`MAX_WAITING`] frames waiting the oldest one is
    /// dropped; with [`MAX_WAITING_PER_SENDER`] of this sender nothing is kept. Durable
    /// after the next [`Store::commit_all`].
    pub fn park(&self, from: &str, frame: &[u8]) -> StoreResult<Parked> {
        let mut answers = self.park_all(&[(from, frame)])?;
        Ok(answers.pop().unwrap_or(Parked::TooManyFromSender))
    }

    /// [`Store::park`] for several frames, in order, written as one change: a flood of
    /// frames from unknown senders costs one write per batch, not one per frame. One
    /// answer per frame.
    pub fn park_all(&self, frames: &[(&str, &[u8])]) -> StoreResult<Vec<Parked>> {
        let mut index = self.park_index();
        let mut c = self.change();
        // Applied to the index as decided (each frame's limits see the ones before it),
        // undone if the write fails.
        let mut added: Vec<(String, u64)> = Vec::new();
        let mut evicted: Vec<(String, u64)> = Vec::new();
        let mut answers = Vec::with_capacity(frames.len());
        for (from, frame) in frames {
            if index
                .per_sender
                .get(*from)
                .is_some_and(|seqs| seqs.len() >= MAX_WAITING_PER_SENDER as usize)
            {
                answers.push(Parked::TooManyFromSender);
                continue;
            }
            let oldest = if index.by_seq.len() as u64 >= MAX_WAITING {
                index
                    .by_seq
                    .iter()
                    .next()
                    .map(|(seq, who)| (*seq, who.clone()))
            } else {
                None
            };
            let seq = c.seq();
            c.batch
                .insert(peer_key(P_WAITING, from, &seq.to_be_bytes()), *frame);
            index.add(from, seq);
            added.push(((*from).to_owned(), seq));
            if let Some((old_seq, who)) = &oldest {
                c.batch
                    .remove(peer_key(P_WAITING, who, &old_seq.to_be_bytes()));
                index.remove(who, *old_seq);
                evicted.push((who.clone(), *old_seq));
            }
            answers.push(Parked::Kept {
                evicted: oldest.map(|(_, who)| who),
            });
        }
        if added.is_empty() {
            return Ok(answers);
        }
        if let Err(e) = c.apply(&self.inner.data) {
            for (who, seq) in &added {
                index.remove(who, *seq);
            }
            for (who, seq) in &evicted {
                if !added.iter().any(|(_, s)| s == seq) {
                    index.add(who, *seq);
                }
            }
            return Err(e);
        }
        self.inner
            .waiting_len
            .store(index.by_seq.len() as u64, Ordering::Release);
        Ok(answers)
    }

    /// The frames of `from` waiting for its keys, in arrival order, at most `limit`.
    pub fn waiting_of(&self, from: &str, limit: usize) -> StoreResult<Vec<Waiting>> {
        let mut out = Vec::new();
        for kv in self
            .inner
            .data
            .scan_prefix(peer_key(P_WAITING, from, &[]))
            .take(limit)
        {
            let (k, frame) = kv?;
            if let Some((who, seq)) = waiting_key(&k) {
                out.push(Waiting {
                    from: who.to_owned(),
                    seq,
                    frame: frame.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// The senders with parked frames, oldest frame first, at most `limit`.
    pub fn waiting_senders(&self, limit: usize) -> Vec<String> {
        let index = self.park_index();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for who in index.by_seq.values() {
            if out.len() >= limit {
                break;
            }
            if seen.insert(who.as_str()) {
                out.push(who.clone());
            }
        }
        out
    }

    /// Frames waiting for their senders' keys: each sender's in arrival order, at most
    /// `limit`.
    pub fn waiting(&self, limit: usize) -> StoreResult<Vec<Waiting>> {
        let mut out = Vec::new();
        for kv in self.inner.data.scan_prefix([P_WAITING]).take(limit) {
            let (k, frame) = kv?;
            let Some((from, seq)) = waiting_key(&k) else {
                continue;
            };
            out.push(Waiting {
                from: from.to_owned(),
                seq,
                frame: frame.to_vec(),
            });
        }
        Ok(out)
    }

    /// The arrival numbers of the frames of `from` waiting for its keys, in order, from
    /// memory (to forget them unread: [`Store::unpark_all`]).
    pub fn waiting_seqs(&self, from: &str) -> Vec<u64> {
        self.park_index()
            .per_sender
            .get(from)
            .map(|seqs| seqs.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether frames of `from` are waiting (a new one must then wait behind them).
    pub fn has_waiting(&self, from: &str) -> StoreResult<bool> {
        Ok(self.park_index().per_sender.contains_key(from))
    }

    /// Forgets a waiting frame once it was stored or refused.
    pub fn unpark(&self, from: &str, seq: u64) -> StoreResult<()> {
        self.unpark_all(&[(from, seq)])
    }

    /// [`Store::unpark`] for several frames, as one write.
    pub fn unpark_all(&self, frames: &[(&str, u64)]) -> StoreResult<()> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut index = self.park_index();
        let mut batch = sled::Batch::default();
        for (from, seq) in frames {
            batch.remove(peer_key(P_WAITING, from, &seq.to_be_bytes()));
        }
        self.inner.data.apply_batch(batch)?;
        for (from, seq) in frames {
            index.remove(from, *seq);
        }
        self.inner
            .waiting_len
            .store(index.by_seq.len() as u64, Ordering::Release);
        Ok(())
    }

    /// How many frames wait for their senders' keys.
    pub fn waiting_len(&self) -> u64 {
        self.inner.waiting_len.load(Ordering::Acquire)
    }

    /// Logs an event that is not a message change (key changed, contact, connection).
    pub fn log_event(&self, kind: Kind) -> StoreResult<Arc<Event>> {
        let mut c = self.change();
        let event = c.event(kind);
        c.apply(&self.inner.data)?;
        Ok(event)
    }

    fn summary(&self, peer: &str) -> StoreResult<Summary> {
        match self.inner.data.get(summary_key(peer))? {
            Some(v) => Ok(Summary::decode(&v[..])?),
            None => Ok(Summary::default()),
        }
    }

    fn seq_of(&self, peer: &str, id: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .inner
            .data
            .get(peer_key(P_ID, peer, id.as_bytes()))?
            .and_then(|v| be_u64(&v)))
    }
}

/// Most frames the inbox holds; past this (or [`MAX_INBOX_BYTES`]) nothing more is
/// spilled, frames stay unacknowledged in memory and the broker keeps the rest.
pub const MAX_INBOX: u64 = 100_000;
/// Most bytes of frames the inbox holds.
pub const MAX_INBOX_BYTES: u64 = 256 * 1024 * 1024;

/// A frame kept in the inbox, and its place there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spilled {
    /// Its sequence number (arrival order).
    pub seq: u64,
    /// The frame as received.
    pub frame: Vec<u8>,
}

/// The inbox: frames received from the broker and acknowledged before they were decrypted,
/// so that a backlog of frames that are expensive to open (RSA) does not hold up the
/// broker's delivery of cheap ones (receive.rs, "lanes"). A frame is written here and
/// flushed before its acknowledgement, and removed only after what it became (a stored
/// message, or nothing) is flushed: a crash in between opens it again, and the duplicate
/// check drops the second copy.
impl Store {
    fn inbox_count(&self) -> MutexGuard<'_, InboxCount> {
        // Plain counters, updated after each write: a panic cannot leave them half changed.
        self.inner.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many of `frames` (from the first) fit in the inbox now.
    pub fn inbox_room(&self, frames: &[&[u8]]) -> usize {
        let (mut n, mut bytes) = {
            let count = self.inbox_count();
            (count.frames, count.bytes)
        };
        frames
            .iter()
            .take_while(|f| {
                n += 1;
                bytes += f.len() as u64;
                n <= MAX_INBOX && bytes <= MAX_INBOX_BYTES
            })
            .count()
    }

    /// Adds frames to the inbox in this order, in one atomic change; durable after the
    /// next [`Store::commit_all`]. The caller checks [`Store::inbox_room`] first.
    pub fn spill(&self, frames: &[&[u8]]) -> StoreResult<Vec<u64>> {
        let mut count = self.inbox_count();
        let mut c = self.change();
        let mut seqs = Vec::with_capacity(frames.len());
        for frame in frames {
            let seq = c.seq();
            c.batch.insert(inbox_key(seq).as_slice(), *frame);
            seqs.push(seq);
        }
        c.apply(&self.inner.data)?;
        for frame in frames {
            count.add(frame);
        }
        if let Some(last) = seqs.last() {
            count.last_seq = *last;
        }
        Ok(seqs)
    }

    /// Inbox frames after `after` in arrival order, at most `limit`.
    pub fn inbox_after(&self, after: u64, limit: usize) -> StoreResult<Vec<Spilled>> {
        let mut out = Vec::new();
        let from = inbox_key(after.saturating_add(1));
        for kv in self
            .inner
            .data
            .range(from.as_slice()..)
            .take_while(|kv| {
                kv.as_ref()
                    .map_or(true, |(k, _)| k.first() == Some(&P_INBOX))
            })
            .take(limit)
        {
            let (k, frame) = kv?;
            if let Some(seq) = be_u64(&k[1..]) {
                out.push(Spilled {
                    seq,
                    frame: frame.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// The sequence number of the newest frame ever spilled into the inbox (0: none since
    /// the store was opened with an empty inbox).
    pub fn inbox_last_seq(&self) -> u64 {
        self.inbox_count().last_seq
    }

    /// Forgets an inbox frame once it was handled and what it became is flushed.
    pub fn inbox_remove(&self, seq: u64) -> StoreResult<()> {
        let mut count = self.inbox_count();
        if let Some(old) = self.inner.data.remove(inbox_key(seq).as_slice())? {
            count.remove(&old);
        }
        Ok(())
    }

    /// Whether these very bytes wait in the inbox (a frame the broker sends again after
    /// its acknowledgement was lost).
    pub fn inbox_holds(&self, frame: &[u8]) -> bool {
        self.inbox_count()
            .digests
            .contains_key(&frame_digest(frame))
    }

    /// How many frames wait in the inbox.
    pub fn inbox_len(&self) -> u64 {
        self.inbox_count().frames
    }
}

fn inbox_key(seq: u64) -> [u8; 9] {
    let mut k = [P_INBOX; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Whether an outgoing message may move from `from` to `to`: forward along queued, sent,
/// delivered, read (a receipt may overtake the broker's acknowledgement), or from queued
/// to failed.
fn advances(from: MessageState, to: MessageState) -> bool {
    use nes_proto::states::progress;
    match to {
        MessageState::Failed => from == MessageState::Queued,
        _ => progress(from as i32) > 0 && progress(to as i32) > progress(from as i32),
    }
}

/// Converts a format 1 store to format 2 (see "Format version"): the outgoing states.
fn convert_format_1(data: &sled::Tree) -> StoreResult<u64> {
    let mut batch = sled::Batch::default();
    for kv in data.scan_prefix([P_MSG]) {
        let (k, v) = kv?;
        let mut m = rpc::Message::decode(&v[..])?;
        if m.direction != Direction::Outgoing as i32 {
            continue;
        }
        let state = match MessageState::try_from(m.state) {
            Ok(MessageState::Sent) => MessageState::Queued,
            Ok(MessageState::Delivered) => MessageState::Sent,
            _ => continue,
        };
        m.state = state as i32;
        batch.insert(k, m.encode_to_vec());
    }
    batch.insert(K_FORMAT, &2u64.to_be_bytes());
    data.apply_batch(batch)?;
    Ok(2)
}

/// `r` peer `\0` state seq.
fn receipt_key(peer: &str, state: ReceiptState, seq: u64) -> Vec<u8> {
    let mut tail = [0u8; 9];
    tail[0] = receipt_state_byte(state);
    tail[1..].copy_from_slice(&seq.to_be_bytes());
    peer_key(P_RECEIPT, peer, &tail)
}

fn receipt_state_byte(state: ReceiptState) -> u8 {
    match state {
        ReceiptState::Delivered => b'd',
        ReceiptState::Read => b'r',
    }
}

fn receipt_state_of_byte(b: u8) -> Option<ReceiptState> {
    [ReceiptState::Delivered, ReceiptState::Read]
        .into_iter()
        .find(|&s| receipt_state_byte(s) == b)
}

/// `w` sender `\0` seq, split.
fn waiting_key(k: &[u8]) -> Option<(&str, u64)> {
    let zero = k.iter().position(|&b| b == 0)?;
    Some((
        std::str::from_utf8(k.get(1..zero)?).ok()?,
        be_u64(k.get(zero + 1..)?)?,
    ))
}

fn peer_key(prefix: u8, peer: &str, tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + peer.len() + tail.len());
    k.push(prefix);
    k.extend_from_slice(peer.as_bytes());
    k.push(0);
    k.extend_from_slice(tail);
    k
}

fn summary_key(peer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + peer.len());
    k.push(P_SUMMARY);
    k.extend_from_slice(peer.as_bytes());
    k
}

fn outbox_key(seq: u64) -> [u8; 9] {
    prefixed_u64(P_OUTBOX, seq)
}

fn event_key(cursor: u64) -> [u8; 9] {
    prefixed_u64(P_EVENT, cursor)
}

fn prefixed_u64(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

/// The store id, made (from the OS's randomness) and stored at the first open.
fn store_id(data: &sled::Tree) -> StoreResult<String> {
    if let Some(id) = data.get(K_STORE_ID)? {
        if id.len() == 8 {
            return Ok(hex::encode(&id));
        }
    }
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    // Kept at once, before any event can carry it.
    data.insert(K_STORE_ID, &id)?;
    data.flush()?;
    Ok(hex::encode(id))
}

/// The store's format version, read and checked before anything is written; a store
/// without one gets it (see "Format version").
fn format_version(data: &sled::Tree) -> StoreResult<u64> {
    if let Some(v) = data.get(K_FORMAT)? {
        let found = match be_u64(&v) {
            Some(n) if n >= 1 => n,
            _ => return Err(StoreError::DamagedFormat(v.to_vec())),
        };
        if found > FORMAT_VERSION {
            return Err(StoreError::TooNew {
                found,
                supported: FORMAT_VERSION,
            });
        }
        return Ok(found);
    }
    // None: a new store, made now in this format, or one of release 0.1.0, which wrote
    // no version and is format 1. (Durable with the next flush; until then the next open
    // decides the same way.)
    let format = if data.is_empty() { FORMAT_VERSION } else { 1 };
    data.insert(K_FORMAT, &format.to_be_bytes())?;
    Ok(format)
}

/// The tag of a stored event record (see "Cursors").
fn event_tag(record: &[u8]) -> String {
    hex::encode(&Sha256::digest(record)[..4])
}

/// The log cursor of the event `cursor` stored as `record`.
fn log_cursor(store_id: &str, cursor: u64, record: &[u8]) -> String {
    format!("{store_id}-{cursor}-{}", event_tag(record))
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Opens a store in a test, waiting while sled still holds the lock of a store that was
/// just dropped in this process (its flusher thread lets go of it a moment later), so
/// that tests that reopen a store do not depend on that moment.
#[cfg(test)]
pub(crate) fn open_in_test(path: &Path) -> Store {
    retry_locked(|| Store::open(path))
        .unwrap_or_else(|e| panic!("cannot open the store at {}: {e}", path.display()))
}

/// Runs `open` again while it fails because sled's lock of a store just dropped in this
/// process is still held (see [`open_in_test`]).
#[cfg(test)]
fn retry_locked<T>(open: impl Fn() -> StoreResult<T>) -> StoreResult<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(id: &str, from: &str, text: &str) -> rpc::Message {
        rpc::Message {
            id: id.into(),
            from: from.into(),
            to: "me_".into(),
            peer: from.into(),
            direction: Direction::Incoming as i32,
            text: text.into(),
            timestamp_ms: 1,
            stored_at_ms: 0,
            state: MessageState::Received as i32,
            read: false,
            wire_version: 2,
            error: String::new(),
            wants_receipts: false,
            file: None,
        }
    }

    fn outgoing(id: &str, to: &str) -> (rpc::Message, OutboxRecord) {
        let m = rpc::Message {
            id: id.into(),
            from: "me_".into(),
            to: to.into(),
            peer: to.into(),
            direction: Direction::Outgoing as i32,
            text: format!("text {id}"),
            state: MessageState::Queued as i32,
            read: true,
            wire_version: 2,
            ..Default::default()
        };
        let o = OutboxRecord {
            peer: to.into(),
            id: id.into(),
            exactly_once: false,
            frame: id.as_bytes().to_vec(),
        };
        (m, o)
    }

    #[tokio::test]
    async fn inbox_frames_keep_arrival_order_survive_a_reopen_and_are_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let seqs = {
            let store = open_in_test(tmp.path());
            assert_eq!(store.inbox_len(), 0);
            assert_eq!(store.inbox_last_seq(), 0);
            let frames: [&[u8]; 3] = [b"one", b"two", b"three"];
            assert_eq!(store.inbox_room(&frames), 3);
            let seqs = store.spill(&frames).unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
            assert_eq!(store.inbox_last_seq(), seqs[2]);
            // A message stored meanwhile takes a sequence number of its own.
            store
                .insert_incoming(incoming("m1", "alice", "hi"), None)
                .unwrap();
            store.commit_all().await.unwrap();
            seqs
        };
        let store = open_in_test(tmp.path());
        assert_eq!(store.inbox_len(), 3, "counted again at open");
        assert_eq!(store.inbox_last_seq(), seqs[2]);
        let all = store.inbox_after(0, 10).unwrap();
        let frames: Vec<&[u8]> = all.iter().map(|s| s.frame.as_slice()).collect();
        assert_eq!(frames, [&b"one"[..], b"two", b"three"]);
        let after_first = store.inbox_after(seqs[0], 1).unwrap();
        assert_eq!(after_first.len(), 1, "the limit holds");
        assert_eq!(after_first[0].frame, b"two");
        assert!(store.inbox_after(seqs[2], 10).unwrap().is_empty());
        assert!(store.inbox_holds(b"two") && !store.inbox_holds(b"four"));
        store.inbox_remove(seqs[1]).unwrap();
        store.inbox_remove(seqs[1]).unwrap();
        assert!(!store.inbox_holds(b"two"), "forgotten with its frame");
        assert!(store.inbox_holds(b"three"));
        assert_eq!(store.inbox_len(), 2, "removing twice counts once");
        let left: Vec<u64> = store
            .inbox_after(0, 10)
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(left, [seqs[0], seqs[2]]);
        // Other prefixes are not the inbox.
        assert_eq!(store.history("alice", 10, None).unwrap().len(), 1);
    }

    #[test]
    fn the_inbox_room_stops_at_its_byte_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let big = vec![0u8; (MAX_INBOX_BYTES / 2) as usize];
        let frames: [&[u8]; 3] = [&big, &big, &big];
        assert_eq!(store.inbox_room(&frames), 2);
    }

    #[tokio::test]
    async fn parked_frames_survive_a_reopen_in_per_sender_order_and_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            assert!(!store.has_waiting("alice").unwrap());
            assert_eq!(
                store.park("alice", b"a1").unwrap(),
                Parked::Kept { evicted: None }
            );
            assert_eq!(
                store.park("bob", b"b1").unwrap(),
                Parked::Kept { evicted: None }
            );
            assert_eq!(
                store.park("alice", b"a2").unwrap(),
                Parked::Kept { evicted: None }
            );
            store.commit_all().await.unwrap();
        }
        let store = open_in_test(tmp.path());
        assert_eq!(store.waiting_len(), 3, "counted again at open");
        assert!(store.has_waiting("alice").unwrap());
        assert!(!store.has_waiting("carol").unwrap());
        assert!(
            !store.has_waiting("alic").unwrap(),
            "a prefix of a name is another sender"
        );
        let w = store.waiting(10).unwrap();
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.from.as_str(), w.frame.as_slice()))
            .collect();
        assert_eq!(
            got,
            [("alice", &b"a1"[..]), ("alice", b"a2"), ("bob", b"b1")]
        );
        assert!(w[0].seq < w[1].seq);
        assert_eq!(store.waiting(1).unwrap().len(), 1);
        store.unpark("alice", w[0].seq).unwrap();
        store.unpark("alice", w[0].seq).unwrap();
        assert_eq!(
            store.waiting_len(),
            2,
            "a second unpark of the same frame counts nothing"
        );
        // The per-sender cap: past it, that sender's frames are not kept; others' are.
        for i in 0..MAX_WAITING_PER_SENDER {
            assert!(matches!(
                store.park("dave", format!("d{i}").as_bytes()).unwrap(),
                Parked::Kept { evicted: None }
            ));
        }
        assert_eq!(
            store.park("dave", b"one too many").unwrap(),
            Parked::TooManyFromSender
        );
        assert_eq!(
            store.waiting_of("dave", 1000).unwrap().len(),
            MAX_WAITING_PER_SENDER as usize
        );
        // The global cap: the oldest parked frame makes room for a new one.
        let before = store.waiting_len();
        for i in 0..MAX_WAITING - before {
            store.park(&format!("flood{}", i % 5000), b"f").unwrap();
        }
        assert_eq!(store.waiting_len(), MAX_WAITING);
        assert_eq!(
            store.waiting_senders(1),
            vec!["bob".to_owned()],
            "bob's frame is the oldest left"
        );
        assert_eq!(
            store.park("carol", b"c1").unwrap(),
            Parked::Kept {
                evicted: Some("bob".into())
            }
        );
        assert_eq!(store.waiting_len(), MAX_WAITING);
        assert!(store.has_waiting("carol").unwrap());
        assert!(!store.has_waiting("bob").unwrap());
    }

    #[tokio::test]
    async fn frames_parked_together_keep_each_limit_in_order_and_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            // Fill one sender to one short of its cap, then a batch that crosses it: the
            // batch's own frames count against the cap as they come.
            let first: Vec<Vec<u8>> = (0..MAX_WAITING_PER_SENDER - 1)
                .map(|i| format!("d{i}").into_bytes())
                .collect();
            let first: Vec<(&str, &[u8])> = first.iter().map(|f| ("dave", f.as_slice())).collect();
            assert!(store
                .park_all(&first)
                .unwrap()
                .iter()
                .all(|p| *p == Parked::Kept { evicted: None }));
            let answers = store
                .park_all(&[
                    ("alice", b"a1"),
                    ("dave", b"last one"),
                    ("dave", b"one too many"),
                    ("alice", b"a2"),
                ])
                .unwrap();
            assert_eq!(
                answers,
                vec![
                    Parked::Kept { evicted: None },
                    Parked::Kept { evicted: None },
                    Parked::TooManyFromSender,
                    Parked::Kept { evicted: None },
                ]
            );
            assert_eq!(store.waiting_len(), u64::from(MAX_WAITING_PER_SENDER) + 2);
            store.commit_all().await.unwrap();
        }
        let store = open_in_test(tmp.path());
        let alice = store.waiting_of("alice", 10).unwrap();
        let frames: Vec<&[u8]> = alice.iter().map(|w| w.frame.as_slice()).collect();
        assert_eq!(frames, vec![&b"a1"[..], &b"a2"[..]], "in arrival order");
        assert_eq!(
            store.waiting_seqs("alice"),
            alice.iter().map(|w| w.seq).collect::<Vec<_>>(),
            "the index, rebuilt at open, knows the same frames"
        );
        let dave = store.waiting_of("dave", 1000).unwrap();
        assert_eq!(dave.len(), MAX_WAITING_PER_SENDER as usize);
        assert_eq!(dave.last().unwrap().frame, b"last one");
        // Forgotten together, counted down together; an unknown key changes nothing.
        let keys: Vec<(&str, u64)> = dave
            .iter()
            .map(|w| ("dave", w.seq))
            .chain([("alice", alice[0].seq), ("nobody", 1)])
            .collect();
        store.unpark_all(&keys).unwrap();
        assert_eq!(store.waiting_len(), 1);
        assert!(!store.has_waiting("dave").unwrap());
        assert_eq!(store.waiting_of("alice", 10).unwrap()[0].frame, b"a2");
        // The global cap within one batch: each frame past it evicts the oldest.
        let flood: Vec<String> = (0..MAX_WAITING).map(|i| format!("flood{i}")).collect();
        let flood: Vec<(&str, &[u8])> = flood.iter().map(|n| (n.as_str(), &b"f"[..])).collect();
        let answers = store.park_all(&flood).unwrap();
        assert_eq!(store.waiting_len(), MAX_WAITING);
        assert_eq!(
            answers.last().unwrap(),
            &Parked::Kept {
                evicted: Some("alice".into())
            },
            "alice's frame was the oldest"
        );
        assert!(!store.has_waiting("alice").unwrap());
        assert!(store.has_waiting("flood0").unwrap());
    }

    #[tokio::test]
    async fn incoming_is_stored_once_and_counted_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let mut live = store.subscribe();
        assert!(store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap()
            .is_some());
        assert!(store
            .insert_incoming(incoming("a", "bob", "again"), None)
            .unwrap()
            .is_none());
        // The same id from someone else is another message.
        assert!(store
            .insert_incoming(incoming("a", "eve", "x"), None)
            .unwrap()
            .is_some());
        assert!(live.try_recv().is_err(), "events wait for the commit");
        store.commit().await.unwrap();
        assert_eq!(live.try_recv().unwrap().cursor, 1);
        assert_eq!(live.try_recv().unwrap().cursor, 2);
        let h = store.history("bob", 0, None).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].text, "1");
        assert_eq!(store.unread_total().unwrap(), 2);
        assert_eq!(store.mark_read("bob", None, false).unwrap(), 1);
        assert_eq!(store.mark_read("bob", None, false).unwrap(), 0);
        assert_eq!(store.unread_total().unwrap(), 1);
        assert!(store.history("bob", 0, None).unwrap()[0].read);
    }

    #[tokio::test]
    async fn history_pages_backwards_and_conversations_sort_by_recency() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        for i in 0..2000 {
            store
                .insert_incoming(incoming(&format!("id{i}"), "bob", &format!("{i}")), None)
                .unwrap();
            if i % 500 == 0 {
                store
                    .insert_incoming(incoming(&format!("x{i}"), "carol", "c"), None)
                    .unwrap();
            }
        }
        let last = store.history("bob", 3, None).unwrap();
        assert_eq!(
            last.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["1997", "1998", "1999"]
        );
        let before = store.history("bob", 2, Some("id1997")).unwrap();
        assert_eq!(
            before.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["1995", "1996"]
        );
        assert!(matches!(
            store.history("bob", 2, Some("nope")),
            Err(StoreError::UnknownId { .. })
        ));
        assert!(store.history("nobody", 0, None).unwrap().is_empty());
        // A peer whose name is a prefix of another's does not see its messages.
        assert!(store.history("bo", 0, None).unwrap().is_empty());
        let convs = store.conversations().unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!(convs[0].peer, "bob");
        assert_eq!(convs[0].total, 2000);
        assert_eq!(convs[0].unread, 2000);
        assert_eq!(convs[0].last.as_ref().unwrap().text, "1999");
        assert_eq!(convs[1].total, 4);
        assert_eq!(store.mark_read("bob", Some("id9"), false).unwrap(), 10);
        assert_eq!(store.conversations().unwrap()[0].unread, 1990);
    }

    #[tokio::test]
    async fn outbox_keeps_order_and_states_only_move_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        for i in 0..5 {
            let (m, o) = outgoing(&format!("o{i}"), if i % 2 == 0 { "bob" } else { "carol" });
            store.insert_outgoing(m, o).unwrap();
        }
        assert_eq!(store.outbox_len(), 5);
        let all = store.outbox_after(0, 100).unwrap();
        assert_eq!(
            all.iter().map(|(_, o)| o.id.as_str()).collect::<Vec<_>>(),
            ["o0", "o1", "o2", "o3", "o4"]
        );
        let after = store.outbox_after(all[1].0, 2).unwrap();
        assert_eq!(
            after.iter().map(|(_, o)| o.id.as_str()).collect::<Vec<_>>(),
            ["o2", "o3"]
        );

        assert!(store
            .set_outgoing_state("bob", "o0", MessageState::Sent, "")
            .unwrap()
            .is_some());
        assert!(store
            .set_outgoing_state("bob", "o0", MessageState::Delivered, "")
            .unwrap()
            .is_some());
        assert!(store
            .set_outgoing_state("bob", "o0", MessageState::Sent, "")
            .unwrap()
            .is_none());
        assert!(store
            .set_outgoing_state("carol", "o1", MessageState::Failed, "no keys")
            .unwrap()
            .is_some());
        assert!(store
            .set_outgoing_state("carol", "missing", MessageState::Sent, "")
            .unwrap()
            .is_none());
        assert_eq!(store.outbox_len(), 3);
        assert_eq!(store.outbox_after(0, 100).unwrap()[0].1.id, "o2");
        let h = store.history("carol", 0, None).unwrap();
        assert_eq!(h[0].state, MessageState::Failed as i32);
        assert_eq!(h[0].error, "no keys");
    }

    #[tokio::test]
    async fn reopening_keeps_counters_cursor_and_outbox() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            let (m, o) = outgoing("o1", "bob");
            store.insert_outgoing(m, o).unwrap();
            store
                .insert_incoming(incoming("i1", "bob", "hi"), None)
                .unwrap();
            store.commit().await.unwrap();
            assert_eq!(store.last_cursor(), 2);
        }
        let store = open_in_test(tmp.path());
        assert_eq!(store.last_cursor(), 2);
        assert_eq!(store.outbox_len(), 1);
        assert!(
            store
                .insert_incoming(incoming("i1", "bob", "hi"), None)
                .unwrap()
                .is_none(),
            "dedup survives"
        );
        store
            .insert_incoming(incoming("i2", "bob", "two"), None)
            .unwrap();
        store.commit().await.unwrap();
        let events = store.events_after(0, 100).unwrap();
        assert_eq!(
            events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(store.events_after(2, 100).unwrap().len(), 1);
        let h = store.history("bob", 0, None).unwrap();
        assert_eq!(
            h.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["o1", "i1", "i2"]
        );
    }

    /// Copies a (closed) store directory, as a backup would.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    fn refusal(store: &Store, since: &str) -> CursorError {
        match store.resolve_since(since) {
            Ok(n) => panic!("{since} was accepted as {n}"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn log_cursors_name_their_store_and_event() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let id = store.store_id().to_owned();
        assert_eq!(id.len(), 16);
        assert_eq!(
            store.last_log_cursor().unwrap(),
            format!("{id}-0-{START_TAG}")
        );
        assert_eq!(
            store
                .resolve_since(&store.last_log_cursor().unwrap())
                .unwrap(),
            0
        );
        let mut live = store.subscribe();
        store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap();
        store
            .insert_incoming(incoming("b", "bob", "2"), None)
            .unwrap();
        store.commit().await.unwrap();
        let logged = store.events_after(0, 10).unwrap();
        let first = live.try_recv().unwrap();
        assert_eq!(
            first.log_cursor, logged[0].log_cursor,
            "live and replayed events carry the same cursor"
        );
        assert!(
            first.log_cursor.starts_with(&format!("{id}-1-")),
            "{}",
            first.log_cursor
        );
        assert_ne!(logged[0].log_cursor, logged[1].log_cursor);
        assert_eq!(store.last_log_cursor().unwrap(), logged[1].log_cursor);
        assert_eq!(store.resolve_since(&logged[0].log_cursor).unwrap(), 1);
        assert_eq!(store.resolve_since(&logged[1].log_cursor).unwrap(), 2);
        // Bare numbers, as cursors were before: up to the last event.
        assert_eq!(store.resolve_since("0").unwrap(), 0);
        assert_eq!(store.resolve_since(" 2 ").unwrap(), 2);
        assert!(matches!(
            refusal(&store, "3"),
            CursorError::Beyond { last: 2, .. }
        ));
        assert!(matches!(
            refusal(&store, "1000"),
            CursorError::Beyond { last: 2, .. }
        ));
        let beyond = format!("{id}-3-{START_TAG}");
        assert!(matches!(
            refusal(&store, &beyond),
            CursorError::Beyond { .. }
        ));
        let wrong_tag = format!("{id}-2-{START_TAG}");
        assert!(matches!(
            refusal(&store, &wrong_tag),
            CursorError::OtherEvent { seq: 2, .. }
        ));
        let other = format!("{}-1-{}", "0123456789abcdef", &logged[0].log_cursor[19..]);
        let e = refusal(&store, &other);
        assert!(matches!(e, CursorError::OtherStore { .. }), "{e}");
        assert!(e.to_string().contains("another message store"), "{e}");
        let (bad_number, no_tag) = (format!("{id}-x-1"), format!("{id}-1"));
        let bads: [&str; 6] = ["", "x", "-5", "abc-1-2", &bad_number, &no_tag];
        for bad in bads {
            assert!(
                matches!(refusal(&store, bad), CursorError::Malformed { .. }),
                "{bad:?}"
            );
        }
        // The id stays across a reopen, and so do the cursors.
        drop(live);
        drop(store);
        let store = open_in_test(tmp.path());
        assert_eq!(store.store_id(), id);
        assert_eq!(store.resolve_since(&logged[1].log_cursor).unwrap(), 2);
        assert_eq!(
            store.events_after(1, 10).unwrap()[0].log_cursor,
            logged[1].log_cursor
        );
        // A re-created store (a new directory) has another id and refuses the old cursors.
        let tmp2 = tempfile::tempdir().unwrap();
        let fresh = open_in_test(tmp2.path());
        assert_ne!(fresh.store_id(), id);
        fresh
            .insert_incoming(incoming("x", "bob", "x"), None)
            .unwrap();
        fresh
            .insert_incoming(incoming("y", "bob", "y"), None)
            .unwrap();
        fresh.commit().await.unwrap();
        assert!(matches!(
            refusal(&fresh, &logged[1].log_cursor),
            CursorError::OtherStore { .. }
        ));
    }

    #[tokio::test]
    async fn a_restored_older_copy_refuses_cursors_it_never_logged() {
        let tmp = tempfile::tempdir().unwrap();
        let (live_dir, backup) = (tmp.path().join("store"), tmp.path().join("backup"));
        {
            let store = open_in_test(&live_dir);
            store
                .insert_incoming(incoming("a", "bob", "1"), None)
                .unwrap();
            store.commit().await.unwrap();
        }
        copy_dir(&live_dir, &backup);
        let (shared, third, fourth) = {
            let store = open_in_test(&live_dir);
            store
                .insert_incoming(incoming("b", "bob", "2"), None)
                .unwrap();
            store
                .insert_incoming(incoming("c", "bob", "3"), None)
                .unwrap();
            store
                .insert_incoming(incoming("d", "bob", "4"), None)
                .unwrap();
            store.commit().await.unwrap();
            let e = store.events_after(0, 10).unwrap();
            (
                e[0].log_cursor.clone(),
                e[2].log_cursor.clone(),
                e[3].log_cursor.clone(),
            )
        };
        // The backup comes back in place of the store.
        std::fs::remove_dir_all(&live_dir).unwrap();
        copy_dir(&backup, &live_dir);
        let store = open_in_test(&live_dir);
        assert_eq!(store.last_cursor(), 1);
        assert!(
            shared.starts_with(store.store_id()),
            "the same store, so the same id"
        );
        assert_eq!(
            store.resolve_since(&shared).unwrap(),
            1,
            "history both copies share still resumes"
        );
        assert!(matches!(
            refusal(&store, &fourth),
            CursorError::Beyond { last: 1, .. }
        ));
        // It logs other events under the numbers the lost ones had.
        store
            .insert_incoming(incoming("e", "carol", "other 2"), None)
            .unwrap();
        store
            .insert_incoming(incoming("f", "carol", "other 3"), None)
            .unwrap();
        store.commit().await.unwrap();
        let e = refusal(&store, &third);
        assert!(matches!(e, CursorError::OtherEvent { seq: 3, .. }), "{e}");
        assert!(e.to_string().contains("restored from an older copy"), "{e}");
        assert!(matches!(
            refusal(&store, &fourth),
            CursorError::Beyond { last: 3, .. }
        ));
    }

    #[tokio::test]
    async fn a_store_from_before_store_ids_gets_one_and_keeps_its_data() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            store
                .insert_incoming(incoming("a", "bob", "1"), None)
                .unwrap();
            store.commit().await.unwrap();
            // As a store written by a daemon that had no store id.
            store.inner.data.remove(K_STORE_ID).unwrap();
            store.flush().unwrap();
        }
        let store = open_in_test(tmp.path());
        let id = store.store_id().to_owned();
        assert_eq!(store.history("bob", 0, None).unwrap()[0].text, "1");
        assert_eq!(store.last_cursor(), 1);
        assert_eq!(
            store.resolve_since("1").unwrap(),
            1,
            "a number saved before still resumes"
        );
        let old = store.events_after(0, 10).unwrap();
        assert!(
            old[0].log_cursor.starts_with(&format!("{id}-1-")),
            "old events have log cursors too"
        );
        assert_eq!(store.resolve_since(&old[0].log_cursor).unwrap(), 1);
        drop(store);
        assert_eq!(open_in_test(tmp.path()).store_id(), id, "made once");
    }

    /// Every record of every tree, as sled holds it.
    fn records(path: &Path) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let db = retry_locked(|| Ok(sled::open(path)?)).unwrap();
        let mut out = Vec::new();
        for name in db.tree_names() {
            for kv in db.open_tree(&name).unwrap().iter() {
                let (k, v) = kv.unwrap();
                out.push((name.to_vec(), k.to_vec(), v.to_vec()));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_store_of_a_newer_format_is_refused_and_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            assert_eq!(store.format_version(), FORMAT_VERSION);
            store
                .insert_incoming(incoming("a", "bob", "1"), None)
                .unwrap();
            store.commit().await.unwrap();
            // As a later release would have written it.
            store
                .inner
                .data
                .insert(K_FORMAT, &(FORMAT_VERSION + 1).to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        let before = records(tmp.path());
        assert!(before.iter().any(|(_, k, _)| k == K_STORE_ID));
        for _ in 0..2 {
            let e = match retry_locked(|| Store::open(tmp.path())) {
                Ok(_) => panic!("a store of a newer format was opened"),
                Err(e) => e,
            };
            assert!(
                matches!(e, StoreError::TooNew { found, supported: FORMAT_VERSION } if found == FORMAT_VERSION + 1),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains("format 2") && text.contains("later release"),
                "{text}"
            );
            assert_eq!(records(tmp.path()), before, "nothing was written");
        }
    }

    #[tokio::test]
    async fn a_store_without_a_format_version_is_format_1_and_gets_one() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = open_in_test(tmp.path());
            store
                .insert_incoming(incoming("a", "bob", "1"), None)
                .unwrap();
            store.commit().await.unwrap();
            // As release 0.1.0 wrote it.
            store.inner.data.remove(K_FORMAT).unwrap();
            // Format 1's outgoing states: 2 "handed to MQTT", 3 "acknowledged by the broker".
            for (id, old) in [
                ("o-handed", 2),
                ("o-acked", 3),
                ("o-failed", 4),
                ("o-queued", 1),
            ] {
                let (mut m, o) = outgoing(id, "bob");
                store.insert_outgoing(m.clone(), o).unwrap();
                let seq = store.seq_of("bob", id).unwrap().unwrap();
                m.state = old;
                store
                    .inner
                    .data
                    .insert(
                        peer_key(P_MSG, "bob", &seq.to_be_bytes()),
                        m.encode_to_vec(),
                    )
                    .unwrap();
            }
            store.flush().unwrap();
        }
        let store = open_in_test(tmp.path());
        // Format 1, converted to format 2 at once.
        assert_eq!(store.format_version(), 2);
        assert_eq!(
            store.inner.data.get(K_FORMAT).unwrap().as_deref(),
            Some(&2u64.to_be_bytes()[..])
        );
        assert_eq!(store.history("bob", 0, None).unwrap()[0].text, "1");
        let state = |id: &str| store.message("bob", id).unwrap().unwrap().state;
        assert_eq!(state("o-handed"), MessageState::Queued as i32);
        assert_eq!(state("o-acked"), MessageState::Sent as i32);
        assert_eq!(state("o-failed"), MessageState::Failed as i32);
        assert_eq!(state("o-queued"), MessageState::Queued as i32);
        assert_eq!(
            store.message("bob", "a").unwrap().unwrap().state,
            MessageState::Received as i32,
            "incoming messages keep their state"
        );
        // A damaged record is refused, not taken for a version.
        store.inner.data.insert(K_FORMAT, &[1u8][..]).unwrap();
        store.flush().unwrap();
        drop(store);
        assert!(matches!(
            retry_locked(|| Store::open(tmp.path())),
            Err(StoreError::DamagedFormat(_))
        ));
    }

    #[tokio::test]
    async fn receipts_are_owed_with_the_message_and_the_read_mark_and_queued_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let asks = |id: &str| rpc::Message {
            wants_receipts: true,
            ..incoming(id, "bob", "hi")
        };
        store.insert_incoming(asks("b1"), None).unwrap();
        store.insert_incoming(asks("b2"), None).unwrap();
        store
            .insert_incoming(incoming("b3", "bob", "no receipts asked"), None)
            .unwrap();
        store.insert_incoming(asks("c1"), None).unwrap().unwrap();
        let held = rpc::Message {
            state: MessageState::Held as i32,
            ..asks("h1")
        };
        store
            .insert_incoming(held, Some(b"frame".to_vec()))
            .unwrap();
        // A duplicate owes nothing more.
        assert!(store.insert_incoming(asks("b1"), None).unwrap().is_none());
        let due = store.receipts_due(10).unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].peer.as_str(), due[0].state, due[0].ids.clone()),
            (
                "bob",
                ReceiptState::Delivered,
                vec!["b1".to_string(), "b2".into(), "c1".into()]
            )
        );
        store
            .queue_receipt(
                &due[0],
                OutboxRecord {
                    peer: "bob".into(),
                    id: "r1".into(),
                    exactly_once: false,
                    frame: b"receipt".to_vec(),
                },
            )
            .unwrap();
        assert!(!store.receipts_owed());
        assert_eq!(store.outbox_len(), 1);
        let (seq, record) = store.outbox_after(0, 10).unwrap().remove(0);
        assert_eq!(record.id, "r1");
        // Its acknowledgement moves no message and takes it out.
        assert!(store
            .set_outgoing_state("bob", "r1", MessageState::Sent, "")
            .unwrap()
            .is_none());
        store.outbox_forget(seq).unwrap();
        assert_eq!(store.outbox_len(), 0);
        assert!(store.outbox_after(0, 10).unwrap().is_empty());

        // Read with read receipts off: nothing owed; on: the ones that asked.
        assert_eq!(store.mark_read("bob", Some("b1"), false).unwrap(), 1);
        assert!(!store.receipts_owed());
        assert_eq!(store.mark_read("bob", None, true).unwrap(), 3);
        let due = store.receipts_due(10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].state, ReceiptState::Read);
        assert_eq!(due[0].ids, ["b2", "c1"]);
        store.drop_receipts(&due[0]).unwrap();
        assert!(!store.receipts_owed());
    }

    #[tokio::test]
    async fn many_owed_receipts_go_in_groups_of_at_most_max_receipt_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        for i in 0..MAX_RECEIPT_IDS + 10 {
            let m = rpc::Message {
                wants_receipts: true,
                ..incoming(&format!("m{i:04}"), "bob", "hi")
            };
            store.insert_incoming(m, None).unwrap();
        }
        let m = rpc::Message {
            wants_receipts: true,
            ..incoming("x", "carol", "hi")
        };
        store.insert_incoming(m, None).unwrap();
        let due = store.receipts_due(10).unwrap();
        assert_eq!(due.len(), 2, "bob's first group, then carol's");
        assert_eq!(due[0].ids.len(), MAX_RECEIPT_IDS);
        assert_eq!((due[1].peer.as_str(), due[1].ids.len()), ("carol", 1));
        assert_eq!(store.receipts_due(1).unwrap().len(), 1);
        store.drop_receipts(&due[0]).unwrap();
        let rest = store.receipts_due(10).unwrap();
        assert_eq!(rest[0].ids.len(), 10);
        assert_eq!(rest[0].ids[0], format!("m{MAX_RECEIPT_IDS:04}"));
    }

    #[tokio::test]
    async fn receipts_move_only_the_peers_messages_and_only_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let (m, o) = outgoing("o1", "bob");
        store.insert_outgoing(m, o).unwrap();
        store
            .insert_incoming(incoming("i1", "bob", "in"), None)
            .unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // carol cannot acknowledge alice's message to bob; an incoming one cannot move.
        assert_eq!(
            store
                .apply_receipt("carol", ReceiptState::Read, &ids(&["o1"]))
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .apply_receipt("bob", ReceiptState::Read, &ids(&["i1", "nope"]))
                .unwrap(),
            0
        );
        // A receipt may overtake the broker's acknowledgement: out of the outbox.
        assert_eq!(
            store
                .apply_receipt("bob", ReceiptState::Delivered, &ids(&["o1"]))
                .unwrap(),
            1
        );
        assert_eq!(store.outbox_len(), 0);
        assert!(store
            .set_outgoing_state("bob", "o1", MessageState::Sent, "")
            .unwrap()
            .is_none());
        assert_eq!(
            store
                .apply_receipt("bob", ReceiptState::Read, &ids(&["o1"]))
                .unwrap(),
            1
        );
        // Replays: nothing moves back.
        assert_eq!(
            store
                .apply_receipt("bob", ReceiptState::Delivered, &ids(&["o1"]))
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .apply_receipt("bob", ReceiptState::Read, &ids(&["o1"]))
                .unwrap(),
            0
        );
        assert!(store
            .set_outgoing_state("bob", "o1", MessageState::Failed, "late")
            .unwrap()
            .is_none());
        let m = store.message("bob", "o1").unwrap().unwrap();
        assert_eq!(m.state, MessageState::Read as i32);
        store.commit().await.unwrap();
        let events = store.events_after(0, 100).unwrap();
        let states: Vec<i32> = events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::StateChanged(c)) => Some(c.state),
                _ => None,
            })
            .collect();
        assert_eq!(
            states,
            [MessageState::Delivered as i32, MessageState::Read as i32]
        );
    }

    #[tokio::test]
    async fn presence_keeps_the_newest_expires_once_and_marks_capable_peers() {
        use rpc::PresenceStatus as P;
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        assert!(store.capable_peers().unwrap().is_empty());
        let asks = rpc::Message {
            wants_receipts: true,
            ..incoming("m1", "carol", "hi")
        };
        store.insert_incoming(asks, None).unwrap();
        store
            .insert_incoming(incoming("m2", "dave", "hi"), None)
            .unwrap();
        assert_eq!(store.capable_peers().unwrap(), ["carol"]);

        let now = now_ms();
        let p = store
            .set_peer_presence("bob", P::Away, "lunch", now - 10, now + 60_000)
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.status, p.note.as_str(), p.expired),
            (P::Away as i32, "lunch", false)
        );
        assert_eq!(store.capable_peers().unwrap(), ["bob", "carol"]);
        // An older one (a replay) changes nothing; a newer one does.
        assert!(store
            .set_peer_presence("bob", P::Online, "", now - 20, now + 60_000)
            .unwrap()
            .is_none());
        assert_eq!(
            store.peer_presence("bob").unwrap().unwrap().status,
            P::Away as i32
        );
        // A refresh with the same status logs no event.
        store.commit().await.unwrap();
        let before = store.last_cursor();
        store
            .set_peer_presence("bob", P::Away, "lunch", now - 5, now + 60_000)
            .unwrap()
            .unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_cursor(), before);
        // Running out: offline, expired, one event, once.
        store
            .set_peer_presence("bob", P::Busy, "", now - 1, now + 1)
            .unwrap()
            .unwrap();
        let later = now + 5;
        let gone = store.expire_presences(later).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].status, gone[0].expired), (P::Offline as i32, true));
        assert!(store.expire_presences(later + 1).unwrap().is_empty());
        let shown = store.peer_presence("bob").unwrap().unwrap();
        assert_eq!(shown.last_seen_ms, now - 1);
        assert!(store.peer_presence("zed").unwrap().is_none());

        // Own presence: online until set, kept across a reopen.
        assert_eq!(store.own_presence().unwrap().status, P::Online as i32);
        store
            .set_own_presence(&OwnPresence {
                status: P::Invisible as i32,
                note: "x".into(),
            })
            .unwrap();
        store.commit().await.unwrap();
        drop(store);
        let store = open_in_test(tmp.path());
        assert_eq!(store.own_presence().unwrap().status, P::Invisible as i32);
    }

    #[tokio::test]
    async fn held_messages_are_released_or_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_in_test(tmp.path());
        let mut m = incoming("h1", "carol", "");
        m.state = MessageState::Held as i32;
        store.insert_incoming(m, Some(b"frame1".to_vec())).unwrap();
        let mut m = incoming("h2", "carol", "");
        m.state = MessageState::Held as i32;
        store.insert_incoming(m, Some(b"frame2".to_vec())).unwrap();
        assert_eq!(
            store.unread_total().unwrap(),
            0,
            "held messages are not unread"
        );
        let held = store.held("carol").unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].frame, b"frame1");
        let released = store
            .release_held("carol", held[0].seq, "hello".into())
            .unwrap()
            .unwrap();
        assert_eq!(released.state, MessageState::Received as i32);
        store.drop_held("carol", held[1].seq).unwrap();
        assert!(store.held("carol").unwrap().is_empty());
        let h = store.history("carol", 0, None).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].text, "hello");
        assert_eq!(store.unread_total().unwrap(), 1);
        assert_eq!(store.conversations().unwrap()[0].total, 1);
    }
}
