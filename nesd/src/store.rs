//! The message store: messages in both directions, conversations, the outbox, held
//! messages, and the event log, in one sled database.
//!
//! This module holds what every family shares: the layout, the one atomic change
//! ([`Change`], applied under the writer lock), commit and flush, opening and the format
//! version. Each family of records has a module of its own: `messages` (conversations,
//! counters, unread), `outbox`, `held`, `waiting`, `inbox`, `receipts`, `presence`,
//! `files` (transfers), `contacts` (the key cache's records), `events` (the log and its
//! cursors); `records` is the store's own encoding of messages and events.
//!
//! # Layout
//! Everything the pipeline writes together lives in one tree (`data`) under one-byte
//! prefixes, so that each change is a single atomic [`sled::Batch`]: after a crash either
//! all of a message (record, id index, counters, event) is there or none of it.
//!
//! | key | value |
//! |---|---|
//! | `c` peer `\0` seq | a message record (`records`, prost) — a conversation, in arrival order |
//! | `i` peer `\0` id | seq — find a message by id; also the duplicate check (`from`+`id`) |
//! | `s` peer | [`Summary`]: total and unread counts |
//! | `u` peer `\0` seq | empty — the unread incoming messages |
//! | `h` peer `\0` seq | the frame of a message held because the sender's keys changed |
//! | `q` seq | [`OutboxRecord`]: sealed frames not yet acknowledged by the broker |
//! | `w` sender `\0` seq | a frame waiting for its sender's keys (the key server was down) |
//! | `x` seq | a frame received but not yet decrypted: the *inbox* (see [`Store::spill`]) |
//! | `r` peer `\0` state seq | a message id: a receipt owed to `peer` (see "Receipts") |
//! | `p` peer | a presence record: the peer's presence as last heard (see "Presence") |
//! | `k` peer | empty — the peer speaks kinds (it asked for receipts, or sent a receipt or presence) |
//! | `n/presence` | a presence record: this identity's presence as set |
//! | `f` file id | [`Transfer`]: a file transfer, beside its message (see `files`) |
//! | `e` cursor | an event record (`records`, prost) — the event log |
//! | `n/seq` | the next message sequence number |
//! | `n/store` | the store id: 8 random bytes, made once (see "Cursors") |
//! | `n/format` | the format version, big-endian u64 (see "Format version") |
//! | `n/pruned` | the newest event removed from the log: cursor (big-endian u64) and tag (see "Retention") |
//!
//! The key cache's records are a second tree of the same database, `contacts` (name →
//! record); a change that writes one is a sled transaction over both trees.
//!
//! `seq` and `cursor` are big-endian u64, so key order is number order: the last N of a
//! conversation is one short reverse range scan however many messages are stored.
//! Usernames cannot contain `\0`, so `peer \0` never prefixes another peer's keys.
//!
//! # Start and close
//! Opening the store is most of a daemon's start. What it reads:
//!
//! - sled's recovery: its latest snapshot of the page table (`snap.*`, about 6 MB at
//!   1,000,000 messages), a header per 512 KiB segment of the log, and **every log entry
//!   written since that snapshot**, which it applies and then writes a new snapshot.
//!   sled 0.34 writes snapshots only while opening a database (`snapshot_after_ops` does
//!   nothing in this version), so without more the first start after a busy run replays
//!   all of it: ~1 s per 1,000,000 messages (docs/BENCHMARKS.md). Segments no page uses
//!   any more are zeroed at every open.
//! - then this module: the format version, `n/seq`, the newest event (one reverse seek),
//!   and the short prefixes it counts in memory: the outbox (`q`), parked frames (`w`),
//!   the inbox (`x`); the store id. None of them grows with the number of messages.
//! - the key cache ([`crate::keycache`]): the `contacts` tree, decoded; keys are parsed
//!   at a contact's first use.
//!
//! So that the next start reads a fresh snapshot instead of the log, a clean shutdown
//! closes the store with [`Store::close`]: a flush, then the database is dropped and
//! opened once more, which replays the log since this run's start (the cost moves from
//! the next start to this shutdown) and writes the snapshot. After a crash (SIGKILL, power
//! loss) that did not happen: the next start replays everything written since the last
//! start, as before; nothing is lost either way (every change is atomic, and was flushed
//! by a commit before it was acknowledged).
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
//! # Group commit
//! sled 0.34 writes and syncs its log buffer on every `apply_batch` (it rolls the buffer
//! before each batch), so one batch per message per step cost a `pwrite` and a waiting
//! `sync_file_range` each: about four per message at a sender, two at a receiver, a
//! quarter of the daemons' CPU (docs/BENCHMARKS.md). So a change is not applied to sled
//! on its own: it joins the *pending group* in memory, and [`Store::commit`] applies the
//! whole group as one sled batch, then flushes. Atomicity holds (each change is wholly in
//! the group or not; the group is applied all or nothing), and so does durability (only
//! a commit made anything durable before, and a commit still does). Reads see every change
//! made so far: inside a change through [`Change::get`] (the change's own writes, then the
//! group's, then sled's); outside one, the store applies the group first (`Store::data`).
//! A group is also applied once it holds [`PENDING_MAX_BYTES`] or is [`PENDING_MAX_AGE`]
//! old. A change that writes the key cache's tree applies the group first, then itself in
//! one transaction over both trees, so the order of changes on disk is the order made.
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
//! # Retention
//! The log would otherwise keep a copy of every message forever (about a third of the
//! store's bytes). [`Store::prune_events`] removes the events logged before a time, oldest
//! first, never the newest one; nesd runs it every hour with `event_retention` (30 days
//! by default). The messages themselves stay (history is never pruned). What a client
//! may bring back changes with it: a cursor older than the newest removed event would
//! skip the events removed after it, so it is refused ([`CursorError::Pruned`], saying
//! how to go on) instead of resuming with a silent gap; the newest removed event's cursor
//! and tag are kept (`n/pruned`), so a client that stopped exactly there (it saw every
//! event up to it) resumes, checked as any other. `0` still means "everything the log
//! holds".
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
//! The records are the store's own (`records`), not the API's generated types: formats
//! 1 and 2 stored the API's `Message` and `Event` themselves, and the records keep those
//! field numbers (and those enumeration numbers), so old stores read as they are. The
//! store's methods take and return the domain types of [`crate::model`]; `records`
//! converts them, naming every field of both sides, so a change to the API is no change
//! here at all, and a change to a domain type does not compile until `records` decides.
//!
//! # Old stores
//! A store written by an earlier release opens in a later one. The test
//! `tests/store_fixture.rs` proves it for every release that has a fixture: it copies
//! `tests/fixtures/store-<release>/store/` (a sled directory written by that release's code,
//! made once by `examples/make_store_fixture.rs`; see the README beside it) to a temporary
//! directory, opens it, and checks every record against what the generator wrote. A
//! fixture is never made again with newer code; a release that changes a record adds a
//! fixture of its own beside the old ones.

mod contacts;
mod events;
mod files;
mod held;
mod inbox;
mod messages;
mod outbox;
mod presence;
mod receipts;
mod records;
#[cfg(test)]
mod tests;
mod waiting;

use events::log_cursor;
pub use events::CursorError;
pub use files::{Ending, Transfer, TransferState};
pub use held::Held;
use inbox::InboxCount;
pub use inbox::{Spilled, MAX_INBOX, MAX_INBOX_BYTES};
pub use messages::Summary;
pub use outbox::OutboxRecord;
pub use receipts::ReceiptsDue;
pub use records::RecordError;
use records::{decode_event, decode_message, encode_event, encode_message};
use waiting::ParkIndex;
pub use waiting::{Parked, Waiting, MAX_WAITING, MAX_WAITING_PER_SENDER};

use crate::model::{Direction, Event, EventKind, MessageState};
use nes_proto::inner::{ReceiptState, MAX_RECEIPT_IDS};
use nes_proto::now_ms;
use prost::Message as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionResult, TransactionError};
use sled::Transactional;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tracing::error;

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
const K_PRUNED: &[u8] = b"n/pruned";

/// The store format this code reads and writes (see "Format version" in the module docs).
/// 1: release 0.1.0's format, the first.
pub const FORMAT_VERSION: u64 = 2;

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
    /// A record decodes but holds what no record of this format holds.
    #[error("message store: damaged record: {0}")]
    Record(#[from] RecordError),
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
/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store's directory (for [`Store::close`]).
    path: PathBuf,
    db: sled::Db,
    data: sled::Tree,
    /// The key cache's records (see `contacts`).
    contacts: sled::Tree,
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
impl Drop for Inner {
    /// The last handle is gone: the pending group goes to sled (whose own drop flushes
    /// it), as every change did before group commit. Nothing was promised durable that a
    /// commit did not make so; this keeps a store dropped without a final flush (a test,
    /// a tool) from losing what its reads saw.
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.pending.apply(&self.data) {
            error!(error = %e, "cannot apply the store's pending changes at close");
        }
    }
}

struct Writer {
    next_seq: u64,
    next_cursor: u64,
    unreleased: VecDeque<Arc<Event>>,
    /// Changes made since the group was last applied to sled (see "Group commit").
    pending: Pending,
}

/// Writes of changes not yet applied to sled, newest value per key (`None`: removed).
#[derive(Default)]
struct Pending {
    writes: BTreeMap<Vec<u8>, Option<sled::IVec>>,
    /// Bytes of keys and values held, for the bound.
    bytes: usize,
    /// When the oldest of them was made.
    since: Option<Instant>,
}

/// The pending group is applied to sled once it holds this much, however soon a commit
/// comes (a bound on memory; one frame is at most 256 KiB).
const PENDING_MAX_BYTES: usize = 1024 * 1024;
/// ... or once it is this old: writes nobody commits (an acknowledged receipt leaving the
/// outbox) still reach sled, and with sled's own flush the disk, as they did before.
const PENDING_MAX_AGE: Duration = Duration::from_millis(200);

impl Pending {
    fn get(&self, key: &[u8]) -> Option<&Option<sled::IVec>> {
        self.writes.get(key)
    }

    fn put(&mut self, key: Vec<u8>, value: Option<sled::IVec>) {
        self.bytes += key.len() + value.as_ref().map_or(0, |v| v.len());
        self.since.get_or_insert_with(Instant::now);
        self.writes.insert(key, value);
    }

    fn is_due(&self) -> bool {
        self.bytes >= PENDING_MAX_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= PENDING_MAX_AGE)
    }

    /// Applies the group to sled as one atomic batch. On failure the writes stay pending
    /// (the next commit tries again, and reports the error meanwhile).
    fn apply(&mut self, data: &sled::Tree) -> StoreResult<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        data.apply_batch(to_batch(&self.writes))?;
        *self = Pending::default();
        Ok(())
    }
}

/// The sled batch that makes `writes` (`None`: a removal).
fn to_batch(writes: &BTreeMap<Vec<u8>, Option<sled::IVec>>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in writes {
        match v {
            Some(v) => batch.insert(k.as_slice(), v.clone()),
            None => batch.remove(k.as_slice()),
        }
    }
    batch
}

/// One atomic change being built under the writer lock.
///
/// Reads made while building it ([`Change::get`]) see this change's own writes, then
/// the pending group's, then sled's: exactly what sled would hold had every change been
/// applied on its own.
struct Change<'a> {
    store_id: &'a str,
    w: MutexGuard<'a, Writer>,
    data: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<sled::IVec>>,
    /// The key cache's tree, and what this change writes there (see `contacts`).
    contacts_tree: &'a sled::Tree,
    contacts: Option<sled::Batch>,
    next_seq: u64,
    next_cursor: u64,
    events: Vec<Arc<Event>>,
}

impl<'a> Change<'a> {
    /// sled's tree with the pending group applied, for a scan made while building this
    /// change. Only before the change writes anything: its own writes are not in sled.
    fn settled(&mut self) -> StoreResult<&'a sled::Tree> {
        debug_assert!(self.writes.is_empty(), "a scan after the change wrote");
        self.w.pending.apply(self.data)?;
        Ok(self.data)
    }

    fn seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let next = self.next_seq.to_be_bytes();
        self.insert(K_NEXT_SEQ, &next[..]);
        seq
    }

    /// Writes `key` = `value` in this change.
    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<sled::IVec>) {
        self.writes
            .insert(key.as_ref().to_vec(), Some(value.into()));
    }

    /// Removes `key` in this change.
    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.writes.insert(key.as_ref().to_vec(), None);
    }

    /// The value of `key` as this change sees it (its own writes, the pending group's,
    /// then sled's).
    fn get(&self, key: impl AsRef<[u8]>) -> StoreResult<Option<sled::IVec>> {
        let key = key.as_ref();
        if let Some(v) = self.writes.get(key).or_else(|| self.w.pending.get(key)) {
            return Ok(v.clone());
        }
        Ok(self.data.get(key)?)
    }

    /// Whether `key` holds a value, as this change sees it.
    fn contains(&self, key: impl AsRef<[u8]>) -> StoreResult<bool> {
        Ok(self.get(key)?.is_some())
    }

    fn event(&mut self, kind: EventKind) -> Arc<Event> {
        let mut event = Event {
            cursor: self.next_cursor,
            at_ms: now_ms(),
            log_cursor: String::new(),
            kind,
        };
        self.next_cursor += 1;
        // Stored without its log cursor: that is derived from the stored bytes.
        let record = encode_event(&event);
        event.log_cursor = log_cursor(self.store_id, event.cursor, &record);
        self.insert(event_key(event.cursor), record);
        let event = Arc::new(event);
        self.events.push(event.clone());
        event
    }

    /// Applies the change: into the pending group (see "Group commit"), applied to
    /// sled with the next commit; or, when it saves contacts too, the group and then this
    /// change as one sled transaction over both trees (still all or nothing, in order).
    fn apply(mut self) -> StoreResult<()> {
        match self.contacts.take() {
            None => {
                for (k, v) in std::mem::take(&mut self.writes) {
                    self.w.pending.put(k, v);
                }
                if self.w.pending.is_due() {
                    // Applied here or at the next commit: this change is in the group
                    // either way, so a failure now is reported by that commit.
                    if let Err(e) = self.w.pending.apply(self.data) {
                        error!(error = %e, "cannot apply the store's pending changes; the next commit tries again");
                    }
                }
            }
            Some(contacts) => {
                self.w.pending.apply(self.data)?;
                let batch = to_batch(&self.writes);
                let both = (self.data, self.contacts_tree);
                both.transaction(
                    |(d, c)| -> ConflictableTransactionResult<(), std::convert::Infallible> {
                        d.apply_batch(&batch)?;
                        c.apply_batch(&contacts)?;
                        Ok(())
                    },
                )
                .map_err(|e| match e {
                    TransactionError::Storage(e) => StoreError::Sled(e),
                    TransactionError::Abort(never) => match never {},
                })?
            }
        }
        self.w.next_seq = self.next_seq;
        self.w.next_cursor = self.next_cursor;
        let events = std::mem::take(&mut self.events);
        self.w.unreleased.extend(events);
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the store in the directory `path`. A store of a newer format
    /// than [`FORMAT_VERSION`] is refused ([`StoreError::TooNew`]) before anything is
    /// written to it.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let db = sled_config(path).open()?;
        let data = db.open_tree("data")?;
        let contacts = db.open_tree(contacts::TREE)?;
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
        let parked = ParkIndex::load(&data)?;
        let waiting_len = parked.len();
        let inbox = InboxCount::load(&data)?;
        let store_id = store_id(&data)?;
        let (events, _) = broadcast::channel(EVENT_BROADCAST_CAPACITY);
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                db,
                data,
                contacts,
                store_id,
                format,
                writer: Mutex::new(Writer {
                    next_seq: next_seq.max(1),
                    next_cursor: last_cursor + 1,
                    unreleased: VecDeque::new(),
                    pending: Pending::default(),
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

    fn change(&self) -> Change<'_> {
        let w = self.writer();
        Change {
            store_id: &self.inner.store_id,
            next_seq: w.next_seq,
            next_cursor: w.next_cursor,
            w,
            data: &self.inner.data,
            writes: BTreeMap::new(),
            contacts_tree: &self.inner.contacts,
            contacts: None,
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
        let upto = self.settle()?;
        self.inner.db.flush_async().await?;
        self.release(upto);
        Ok(())
    }

    /// The cursor of the newest event written, durable or not.
    fn last_logged(&self) -> u64 {
        self.writer().next_cursor - 1
    }

    /// Flushes synchronously (at shutdown).
    pub fn flush(&self) -> StoreResult<()> {
        let upto = self.settle()?;
        self.inner.db.flush()?;
        self.release(upto);
        Ok(())
    }

    /// Applies the pending group to sled (one batch); answers the cursor of the newest
    /// event it holds.
    fn settle(&self) -> StoreResult<u64> {
        let mut w = self.writer();
        w.pending.apply(&self.inner.data)?;
        Ok(w.next_cursor - 1)
    }

    /// The data tree for a read outside a change: the pending group applied first, so
    /// the read sees every change made so far. (Inside a change, [`Change::get`].)
    fn data(&self) -> StoreResult<&sled::Tree> {
        self.settle()?;
        Ok(&self.inner.data)
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave a half-applied batch (batches are
        // atomic, and the pending group is only replaced once applied), so a poisoned
        // lock is safe to keep using.
        self.inner.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the store as a clean shutdown should (see "Start and close" in the module
    /// docs): flushes it, lets go of the database, and opens it once more, which makes
    /// sled write a snapshot of its page table, so that the next start reads that instead
    /// of every log entry written since this one. Only the last handle closes the store:
    /// while another one is alive the store is flushed and stays open
    /// ([`Closed::StillInUse`]).
    pub fn close(self) -> StoreResult<Closed> {
        self.flush()?;
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(_) => return Ok(Closed::StillInUse),
        };
        let path = inner.path.clone();
        drop(inner);
        drop(reopen_when_unlocked(&path)?);
        Ok(Closed::Snapshot)
    }

    fn release(&self, upto: u64) {
        let mut w = self.writer();
        while w.unreleased.front().is_some_and(|e| e.cursor <= upto) {
            if let Some(event) = w.unreleased.pop_front() {
                self.inner.released.store(event.cursor, Ordering::Release);
                // No subscriber is fine: the log has it.
                let _ = self.inner.events.send(event);
            }
        }
    }
}

/// What [`Store::close`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Closed with a fresh snapshot: the next start reads only the log written after it.
    Snapshot,
    /// Flushed only: another handle on the store was still alive (a task that did not
    /// stop), so the database stayed open; the next start replays the log since the last
    /// open (as after a crash).
    StillInUse,
}

/// The database's settings: the same at every open.
fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(Some(500))
}

/// How long [`Store::close`] waits for sled to let go of the database's lock.
const UNLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the database at `path` again right after this process closed it, waiting while
/// sled still holds its lock: the last I/O tasks of the closed database release the file a
/// moment after the last handle is dropped.
fn reopen_when_unlocked(path: &Path) -> StoreResult<sled::Db> {
    let deadline = std::time::Instant::now() + UNLOCK_WAIT;
    loop {
        match sled_config(path).open() {
            // sled reports its lock only in the message of an I/O error.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return Ok(result?),
        }
    }
}

/// Whether an outgoing message may move from `from` to `to`: forward along queued, sent,
/// delivered, read (a receipt may overtake the broker's acknowledgement), or from queued
/// to failed.
fn advances(from: MessageState, to: MessageState) -> bool {
    match to {
        MessageState::Failed => from == MessageState::Queued,
        _ => from.progress() > 0 && to.progress() > from.progress(),
    }
}

/// Converts a format 1 store to format 2 (see "Format version"): the outgoing states.
fn convert_format_1(data: &sled::Tree) -> StoreResult<u64> {
    let mut batch = sled::Batch::default();
    for kv in data.scan_prefix([P_MSG]) {
        let (k, v) = kv?;
        let mut m = decode_message(&v)?;
        if m.direction != Direction::Outgoing {
            continue;
        }
        m.state = match m.state {
            MessageState::Sent => MessageState::Queued,
            MessageState::Delivered => MessageState::Sent,
            _ => continue,
        };
        batch.insert(k, encode_message(&m));
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

/// A text `from` stored as received, for tests.
#[cfg(test)]
pub(crate) fn incoming(id: &str, from: &str, text: &str) -> crate::model::Message {
    crate::model::Message {
        id: id.into(),
        from: from.into(),
        to: "me_".into(),
        peer: from.into(),
        direction: Direction::Incoming,
        content: crate::model::Content::Text(text.into()),
        timestamp_ms: 1,
        stored_at_ms: 0,
        state: MessageState::Received,
        read: false,
        wire_version: 2,
        error: String::new(),
        wants_receipts: false,
    }
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
