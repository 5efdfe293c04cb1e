//! Files: sent and received in chunks, with constant memory, across restarts of either
//! daemon and of the broker (docs/PROTOCOL.md "Files").
//!
//! ```text
//! sender                                   receiver
//! SendFile ─▶ DATA/files/upload/<id> (hashing as it comes, max_file_size)
//!          ─▶ DATA/files/<id>, message QUEUED + transfer record, offer (probe 1) ──▶ offer:
//!                                                  message RECEIVING + record, partial file
//!          ◀── file_ack {have 0, probe 1} ◀──────────────────────────────────────┘
//! pump: chunks have..have+WINDOW_CHUNKS ─────────▶ chunk: written at its offset (fsync before
//!          ◀── file_ack {have} every ACK_EVERY ◀── the flush that acknowledges the frame)
//!     ... last chunk ─▶ whole file hashed; equal: DATA/files/<id>, COMPLETE, `file` event
//!          ◀── file_ack {have = chunks} ◀───────── (else: deleted, FAILED, file_cancel)
//! DELIVERED, COMPLETE
//! ```
//!
//! - Memory: the CLI streams the file to nesd in 64 KiB pieces; nesd reads a few chunks
//!   at a time to seal them and keeps at most [`WINDOW_CHUNKS`] unacknowledged by the
//!   receiver; the receiver writes each chunk where it belongs as it arrives.
//! - Chunks go straight to the MQTT session, not through the outbox (they are made again
//!   from the file whenever needed, so nothing of them is written to the store). The
//!   offer and the control frames go through the outbox.
//! - Faults: the sender goes on only from what the receiver reports. After a restart, or
//!   when no report came for [`PROBE_AFTER`] (chunks lost with a broker restart, the
//!   receiver down), it sends the offer again with a new `probe` number and waits for the
//!   answer; the receiver answers every offer with how far it got and the same number, and
//!   everything sent before that offer has reached it by then (one session, one QoS, in
//!   order), so the sender goes on from there. A chunk the receiver already has changes
//!   nothing; a killed receiver gets the frames it had not acknowledged again from the
//!   broker.
//! - The receiver keeps a file only when all of it matches the hash in the signed offer;
//!   until then it is a partial file under `partial/`, shown nowhere as a file.

use crate::error::ServiceError;
use crate::model::{Content, Direction, Message, MessageState};
use crate::store::{Ending, Store, Transfer, TransferState};
use crate::sync::lock;
use nes_proto::files::{FileAck, FileCancel, FileChunk, FileOffer};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

/// Chunks sent and not yet reported by the receiver, at most (4 MiB of 128 KiB chunks).
pub const WINDOW_CHUNKS: u64 = 32;
/// The receiver reports its progress every this many chunks.
pub const ACK_EVERY: u64 = 8;
/// With chunks out and no report for this long, the sender asks (probes); the wait
/// doubles for each unanswered probe, up to [`PROBE_MAX`].
pub const PROBE_AFTER: Duration = Duration::from_secs(3);
/// Longest wait between probes.
pub const PROBE_MAX: Duration = Duration::from_secs(60);
/// Incoming transfers at once, at most (more offers are refused `busy`).
pub const MAX_INCOMING: usize = 16;
/// An incoming transfer without a chunk for this long no longer counts against
/// [`MAX_INCOMING`]: it is failed and its partial file deleted when room is needed (a
/// contact cannot block every other file by starting 16 and sending nothing).
pub const STALLED_AFTER_MS: i64 = 24 * 3600 * 1000;
/// Chunks read and sealed per task of the blocking pool.
const SEAL_BATCH: u64 = 4;
/// How often the pump looks at the transfers without a wake.
const TICK: Duration = Duration::from_millis(500);

/// The files part of the daemon; clones share it.
#[derive(Clone)]
pub struct Files {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    store: Store,
    max_size: u64,
    wake: Notify,
    /// Partial files written since the last [`Files::sync_dirty`].
    dirty: std::sync::Mutex<HashSet<PathBuf>>,
    /// Control frames to send (the pump seals and queues them).
    due: std::sync::Mutex<Vec<Due>>,
    /// Outgoing transfers being sent, by file id.
    pumps: std::sync::Mutex<HashMap<String, Pump>>,
}

/// A control frame owed to a peer.
#[derive(Debug, Clone)]
pub enum Due {
    /// Progress (receiver to sender).
    Ack(String, FileAck),
    /// A cancellation (either way).
    Cancel(String, FileCancel),
    /// The offer again, with a probe number (sender to receiver).
    Probe(String, FileOffer),
}

impl Due {
    /// The peer it goes to.
    pub fn peer(&self) -> &str {
        match self {
            Due::Ack(p, _) | Due::Cancel(p, _) | Due::Probe(p, _) => p,
        }
    }
}

/// The sender's state of one transfer, in memory (what is durable is the record).
#[derive(Debug)]
struct Pump {
    /// The next chunk to send.
    next: u64,
    /// Waiting for the answer to this probe, sent then.
    probe: Option<(u64, Instant)>,
    /// How long to wait for the next answer.
    probe_every: Duration,
    /// The last report that moved it on (or answered a probe).
    last_progress: Instant,
}

impl Pump {
    fn probing(number: u64) -> Pump {
        Pump {
            next: 0,
            probe: Some((number, Instant::now())),
            probe_every: PROBE_AFTER,
            last_progress: Instant::now(),
        }
    }
}

/// What became of a file frame, for the receive pipeline.
#[derive(Debug)]
pub enum Handled {
    /// Something was written: flush, then acknowledge.
    Stored,
    /// Nothing to keep (a late or repeated frame): acknowledge.
    Ignored,
    /// Refused, with the reason counter and a detail for the log.
    Refused(&'static str, String),
    /// The store failed: do not acknowledge (the broker will deliver it again).
    Failed(String),
}

impl From<crate::store::StoreError> for Handled {
    fn from(e: crate::store::StoreError) -> Self {
        Handled::Failed(e.to_string())
    }
}

/// A file being uploaded by a frontend: written and hashed as it comes; deleted when
/// dropped unfinished.
pub struct Upload {
    id: String,
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Sha256,
    size: u64,
    max: u64,
    final_path: PathBuf,
}

impl Upload {
    /// The file id it will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends bytes; refused past `max_file_size` (and the upload is dropped).
    pub fn write(&mut self, data: &[u8]) -> Result<(), ServiceError> {
        self.size += data.len() as u64;
        if self.size > self.max {
            return Err(ServiceError::InvalidArgument(format!(
                "the file is larger than max_file_size ({})",
                nes_proto::files::human_size(self.max)
            )));
        }
        self.hasher.update(data);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| ServiceError::Internal("upload already finished".into()))?;
        file.write_all(data)
            .map_err(|e| ServiceError::Internal(format!("cannot write the file: {e}")))
    }

    /// Ends the upload: the file is synced and moved to its place. Returns its size and
    /// hash (hex).
    pub fn finish(mut self) -> Result<(u64, String, PathBuf), ServiceError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| ServiceError::Internal("upload already finished".into()))?;
        file.sync_all()
            .map_err(|e| ServiceError::Internal(format!("cannot write the file: {e}")))?;
        drop(file);
        std::fs::rename(&self.path, &self.final_path)
            .map_err(|e| ServiceError::Internal(format!("cannot keep the file: {e}")))?;
        let hash = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok((self.size, hash, self.final_path.clone()))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Files {
    /// Files under `data_dir/files` (made 0700 when missing), records in `store`.
    pub fn open(data_dir: &Path, store: Store, max_size: u64) -> std::io::Result<Files> {
        let dir = data_dir.join("files");
        for d in [dir.clone(), dir.join("partial"), dir.join("upload")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        // Uploads a killed daemon left behind can never finish.
        if let Ok(entries) = std::fs::read_dir(dir.join("upload")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Files {
            inner: Arc::new(Inner {
                dir,
                store,
                max_size,
                wake: Notify::new(),
                dirty: Default::default(),
                due: Default::default(),
                pumps: Default::default(),
            }),
        })
    }

    /// `max_file_size`.
    pub fn max_size(&self) -> u64 {
        self.inner.max_size
    }

    /// Where a complete file (either direction) is kept.
    pub fn path_of(&self, id: &str) -> Option<PathBuf> {
        Some(self.inner.dir.join(hex_id(id)?))
    }

    fn partial_of(&self, id: &str) -> Option<PathBuf> {
        Some(self.inner.dir.join("partial").join(hex_id(id)?))
    }

    /// Starts an upload of a new file (a fresh random id).
    pub fn begin_upload(&self) -> Result<Upload, ServiceError> {
        let mut raw = [0u8; nes_proto::inner::ID_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let id = nes_proto::b64::encode(&raw);
        let name = hex::encode(raw);
        let path = self.inner.dir.join("upload").join(&name);
        let file = create_private(&path)
            .map_err(|e| ServiceError::Internal(format!("cannot store the file: {e}")))?;
        Ok(Upload {
            id,
            path,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
            max: self.inner.max_size,
            final_path: self.inner.dir.join(name),
        })
    }

    /// A new outgoing transfer was stored with its offer (probe `probe`): send it.
    pub fn start(&self, id: &str, probe: u64) {
        lock(&self.inner.pumps).insert(id.to_owned(), Pump::probing(probe));
        self.inner.wake.notify_one();
    }

    /// Fsyncs the partial files written since the last call (before the store's flush
    /// that lets their frames be acknowledged).
    pub fn sync_dirty(&self) {
        let dirty: Vec<PathBuf> = lock(&self.inner.dirty).drain().collect();
        for path in dirty {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                if let Err(e) = f.sync_data() {
                    warn!(path = %path.display(), error = %e, "cannot sync a partial file");
                }
            }
        }
    }

    fn owe(&self, due: Due) {
        lock(&self.inner.due).push(due);
        self.inner.wake.notify_one();
    }

    /// An offer from `from` (verified, to this identity `me`): a new transfer, or (the
    /// same offer again) a probe to answer.
    pub fn offer(
        &self,
        from: &str,
        me: &str,
        offer: &FileOffer,
        wire_version: u32,
        wants_receipts: bool,
        timestamp_ms: i64,
    ) -> Handled {
        let store = &self.inner.store;
        let signed = FileOffer {
            probe: 0,
            ..offer.clone()
        };
        match store.transfer(&offer.id) {
            Err(e) => return e.into(),
            Ok(Some(t)) => {
                if t.outgoing || t.peer != from {
                    return Handled::Refused(
                        "file_unknown",
                        format!("from {from}: an offer with the id of another transfer"),
                    );
                }
                if t.offer != signed {
                    return Handled::Refused(
                        "bad_inner",
                        format!("from {from}: an offer again, with other fields"),
                    );
                }
                let chunks = t.offer.chunks();
                self.owe(match t.state {
                    TransferState::Active => {
                        Due::Ack(from.to_owned(), ack(&offer.id, t.have, offer.probe))
                    }
                    TransferState::Complete => {
                        Due::Ack(from.to_owned(), ack(&offer.id, chunks, offer.probe))
                    }
                    TransferState::Cancelled | TransferState::Failed => {
                        Due::Cancel(from.to_owned(), cancel(&offer.id, "cancelled"))
                    }
                });
                return Handled::Ignored;
            }
            Ok(None) => {}
        }
        if offer.size > self.inner.max_size {
            self.owe(Due::Cancel(from.to_owned(), cancel(&offer.id, "too_large")));
            return Handled::Refused(
                "file_too_large",
                format!(
                    "from {from}: a file of {} bytes; max_file_size is {}",
                    offer.size, self.inner.max_size
                ),
            );
        }
        let active = match self.active_incoming() {
            Ok(n) => n,
            Err(e) => return e.into(),
        };
        if active >= MAX_INCOMING {
            self.owe(Due::Cancel(from.to_owned(), cancel(&offer.id, "busy")));
            return Handled::Refused(
                "file_busy",
                format!("from {from}: {active} files are being received already"),
            );
        }
        let Some(partial) = self.partial_of(&offer.id) else {
            return Handled::Refused("bad_inner", "a bad file id".into());
        };
        if let Err(e) = create_private(&partial) {
            return Handled::Failed(format!("cannot create a partial file: {e}"));
        }
        let t = Transfer::new(false, from, signed);
        let message = Message {
            id: offer.id.clone(),
            from: from.to_owned(),
            to: me.to_owned(),
            peer: from.to_owned(),
            direction: Direction::Incoming,
            content: Content::File(t.info("")),
            timestamp_ms,
            stored_at_ms: 0,
            state: MessageState::Received,
            read: false,
            wire_version,
            error: String::new(),
            wants_receipts,
        };
        match store.insert_incoming_file(message, &t) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = std::fs::remove_file(&partial);
                return Handled::Refused(
                    "duplicate",
                    format!("from {from}: a file with the id of a message"),
                );
            }
            Err(e) => return e.into(),
        }
        info!(%from, id = %offer.id, size = offer.size, "receiving a file");
        if t.offer.chunks() == 0 {
            return self.complete(t);
        }
        self.owe(Due::Ack(from.to_owned(), ack(&offer.id, 0, offer.probe)));
        Handled::Stored
    }

    /// A chunk from `from`: written at its place; the last one completes the file.
    pub fn chunk(&self, from: &str, chunk: &FileChunk) -> Handled {
        let store = &self.inner.store;
        let mut t = match store.transfer(&chunk.file) {
            Ok(Some(t)) if !t.outgoing && t.peer == from => t,
            Ok(_) => {
                return Handled::Refused(
                    "file_unknown",
                    format!("from {from}: a chunk of a file never offered"),
                )
            }
            Err(e) => return e.into(),
        };
        if t.state != TransferState::Active || t.has_chunk(chunk.index) {
            return Handled::Ignored;
        }
        let expected = t.offer.chunk_len(chunk.index);
        if expected == 0 || chunk.data.len() as u64 != expected {
            return Handled::Refused(
                "bad_chunk",
                format!(
                    "from {from}: chunk {} of {} bytes, {expected} expected",
                    chunk.index,
                    chunk.data.len()
                ),
            );
        }
        let Some(partial) = self.partial_of(&chunk.file) else {
            return Handled::Refused("bad_chunk", "a bad file id".into());
        };
        let offset = chunk.index * u64::from(t.offer.chunk_size);
        // Made again if it went missing: the hash check at the end then decides.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&partial)
            .and_then(|f| f.write_all_at(&chunk.data, offset));
        if let Err(e) = written {
            return Handled::Failed(format!("cannot write a chunk: {e}"));
        }
        lock(&self.inner.dirty).insert(partial);
        let before = t.have;
        t.set_chunk(chunk.index);
        t.touched_ms = nes_proto::now_ms();
        if t.have == t.offer.chunks() {
            return self.complete(t);
        }
        if let Err(e) = store.put_transfer(&t) {
            return e.into();
        }
        if t.have / ACK_EVERY > before / ACK_EVERY {
            self.owe(Due::Ack(from.to_owned(), ack(&chunk.file, t.have, 0)));
        }
        Handled::Stored
    }

    /// Incoming transfers still going; stalled ones ([`STALLED_AFTER_MS`]) are failed
    /// here and do not count.
    fn active_incoming(&self) -> Result<usize, crate::store::StoreError> {
        let now = nes_proto::now_ms();
        let mut active = 0;
        for mut t in self.inner.store.transfers()? {
            if t.outgoing || t.state != TransferState::Active {
                continue;
            }
            if now.saturating_sub(t.touched_ms) < STALLED_AFTER_MS {
                active += 1;
                continue;
            }
            t.state = TransferState::Failed;
            t.error = "stalled: no data for a day".into();
            self.stop(&t);
            info!(from = %t.peer, id = %t.offer.id, "a stalled incoming file given up");
            self.inner.store.end_transfer(&t, Ending::default())?;
        }
        Ok(active)
    }

    /// Every chunk is in: hashed against the offer; kept, or thrown away.
    fn complete(&self, mut t: Transfer) -> Handled {
        let (Some(partial), Some(path)) = (self.partial_of(&t.offer.id), self.path_of(&t.offer.id))
        else {
            return Handled::Refused("bad_inner", "a bad file id".into());
        };
        lock(&self.inner.dirty).remove(&partial);
        let matches = match hash_file(&partial) {
            Ok(hash) => hash == t.offer.sha256,
            Err(e) => return Handled::Failed(format!("cannot read a partial file: {e}")),
        };
        let peer = t.peer.clone();
        let id = t.offer.id.clone();
        if !matches {
            let _ = std::fs::remove_file(&partial);
            t.state = TransferState::Failed;
            t.error = "its bytes did not match the hash the sender signed".into();
            warn!(from = %peer, %id, "a received file did not match its hash; deleted");
            if let Err(e) = self.inner.store.end_transfer(&t, Ending::default()) {
                return e.into();
            }
            self.owe(Due::Cancel(peer, cancel(&id, "hash_mismatch")));
            return Handled::Stored;
        }
        let synced = std::fs::File::open(&partial).and_then(|f| f.sync_all());
        if let Err(e) = synced.and_then(|_| std::fs::rename(&partial, &path)) {
            return Handled::Failed(format!("cannot keep a received file: {e}"));
        }
        t.state = TransferState::Complete;
        t.have = t.offer.chunks();
        let ending = Ending {
            path: path.display().to_string(),
            outgoing_state: None,
            owe_delivery: true,
        };
        if let Err(e) = self.inner.store.end_transfer(&t, ending) {
            return e.into();
        }
        info!(from = %peer, %id, size = t.offer.size, "file received");
        self.owe(Due::Ack(peer, ack(&id, t.offer.chunks(), 0)));
        Handled::Stored
    }

    /// The receiver's report on a file this identity sends.
    pub fn ack(&self, from: &str, report: &FileAck) -> Handled {
        let store = &self.inner.store;
        let mut t = match store.transfer(&report.file) {
            Ok(Some(t)) if t.outgoing && t.peer == from => t,
            Ok(_) => {
                return Handled::Refused(
                    "file_unknown",
                    format!("from {from}: a report on a file not sent to it"),
                )
            }
            Err(e) => return e.into(),
        };
        if t.state != TransferState::Active {
            return Handled::Ignored;
        }
        let chunks = t.offer.chunks();
        if report.have > chunks {
            return Handled::Refused(
                "bad_inner",
                format!("from {from}: a report of more chunks than the file has"),
            );
        }
        if report.have == chunks {
            t.state = TransferState::Complete;
            t.have = chunks;
            lock(&self.inner.pumps).remove(&report.file);
            let ending = Ending {
                path: self
                    .path_of(&report.file)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                outgoing_state: Some(MessageState::Delivered),
                owe_delivery: false,
            };
            return match store.end_transfer(&t, ending) {
                Ok(_) => {
                    info!(to = %from, id = %report.file, "file delivered");
                    Handled::Stored
                }
                Err(e) => e.into(),
            };
        }
        let moved = report.have > t.have;
        if moved {
            t.have = report.have;
            if let Err(e) = store.put_transfer(&t) {
                return e.into();
            }
        }
        {
            let mut pumps = lock(&self.inner.pumps);
            let pump = pumps
                .entry(report.file.clone())
                .or_insert_with(|| Pump::probing(0));
            if moved {
                pump.last_progress = Instant::now();
            }
            match pump.probe {
                Some((n, _)) if n == report.probe && n != 0 => {
                    // Everything sent before that probe has reached the receiver: what
                    // it lacks from `have` on was lost.
                    pump.next = report.have;
                    pump.probe = None;
                    pump.probe_every = PROBE_AFTER;
                    pump.last_progress = Instant::now();
                }
                _ => pump.next = pump.next.max(report.have),
            }
        }
        self.inner.wake.notify_one();
        if moved {
            Handled::Stored
        } else {
            Handled::Ignored
        }
    }

    /// The other side stopped a transfer.
    pub fn cancelled(&self, from: &str, c: &FileCancel) -> Handled {
        let store = &self.inner.store;
        let mut t = match store.transfer(&c.file) {
            Ok(Some(t)) if t.peer == from => t,
            Ok(_) => {
                return Handled::Refused(
                    "file_unknown",
                    format!("from {from}: a cancellation of a file it has no part in"),
                )
            }
            Err(e) => return e.into(),
        };
        if t.state != TransferState::Active {
            return Handled::Ignored;
        }
        let (state, why) = match c.reason.as_str() {
            "cancelled" => (TransferState::Cancelled, format!("cancelled by {from}")),
            "too_large" => (
                TransferState::Failed,
                format!("refused by {from}: larger than it accepts"),
            ),
            "hash_mismatch" => (
                TransferState::Failed,
                format!("{from} received it damaged (the hash did not match)"),
            ),
            "busy" => (
                TransferState::Failed,
                format!("refused by {from}: it is receiving too many files; send again later"),
            ),
            other => (
                TransferState::Failed,
                format!("refused by {from} ({other})"),
            ),
        };
        t.state = state;
        t.error = why;
        self.stop(&t);
        info!(peer = %from, id = %c.file, reason = %c.reason, "transfer stopped by the peer");
        match store.end_transfer(&t, Ending::default()) {
            Ok(_) => Handled::Stored,
            Err(e) => e.into(),
        }
    }

    fn stop(&self, t: &Transfer) {
        lock(&self.inner.pumps).remove(&t.offer.id);
        if !t.outgoing {
            if let Some(p) = self.partial_of(&t.offer.id) {
                lock(&self.inner.dirty).remove(&p);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// This identity's user cancels a transfer (either direction); the peer is told.
    pub async fn cancel(&self, id: &str) -> Result<Message, ServiceError> {
        let store = &self.inner.store;
        let mut t = store
            .transfer(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no file with id {id}")))?;
        if t.state != TransferState::Active {
            return Err(ServiceError::FailedPrecondition(format!(
                "the transfer of {} is over ({})",
                t.offer.name,
                t.file_state().name()
            )));
        }
        t.state = TransferState::Cancelled;
        t.error = "cancelled".into();
        self.stop(&t);
        let message = store.end_transfer(&t, Ending::default())?;
        store.commit().await?;
        self.owe(Due::Cancel(t.peer.clone(), cancel(id, "cancelled")));
        message.ok_or_else(|| ServiceError::NotFound(format!("no message for file {id}")))
    }

    /// A file message by file id, with live progress.
    pub fn message(&self, id: &str) -> Result<Message, ServiceError> {
        let t = self
            .inner
            .store
            .transfer(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no file with id {id}")))?;
        self.message_of(&t)?
            .ok_or_else(|| ServiceError::NotFound(format!("no message for file {id}")))
    }

    fn message_of(&self, t: &Transfer) -> Result<Option<Message>, ServiceError> {
        let Some(mut m) = self.inner.store.message(&t.peer, &t.offer.id)? else {
            return Ok(None);
        };
        with_progress(&mut m, t);
        Ok(Some(m))
    }

    /// Refreshes the progress of the file messages among `messages` (history).
    pub fn refresh(&self, messages: &mut [Message]) {
        for m in messages.iter_mut().filter(|m| m.file().is_some()) {
            if let Ok(Some(t)) = self.inner.store.transfer(&m.id) {
                if t.peer == m.peer {
                    with_progress(m, &t);
                }
            }
        }
    }

    /// File messages (one peer's, or all), oldest first.
    pub fn list(&self, peer: &str) -> Result<Vec<Message>, ServiceError> {
        let mut out = Vec::new();
        for t in self.inner.store.transfers()? {
            if !peer.is_empty() && t.peer != peer {
                continue;
            }
            if let Some(m) = self.message_of(&t)? {
                out.push(m);
            }
        }
        out.sort_by_key(|m| (m.stored_at_ms, m.timestamp_ms));
        Ok(out)
    }

    /// The path of a complete file, to read.
    pub fn readable(&self, id: &str) -> Result<PathBuf, ServiceError> {
        let t = self
            .inner
            .store
            .transfer(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no file with id {id}")))?;
        // A file being sent is whole here already.
        if t.state != TransferState::Complete && !t.outgoing {
            return Err(ServiceError::FailedPrecondition(format!(
                "{} is not complete yet ({}%)",
                t.offer.name,
                percent(t.transferred(), t.offer.size)
            )));
        }
        self.path_of(id)
            .filter(|p| p.exists())
            .ok_or_else(|| ServiceError::NotFound(format!("the file {id} is gone")))
    }

    /// Outgoing transfers still active (at start: each is asked how far it got).
    fn resume(&self) {
        let Ok(all) = self.inner.store.transfers() else {
            return;
        };
        let mut pumps = lock(&self.inner.pumps);
        for t in all {
            if t.outgoing && t.state == TransferState::Active {
                // A probe as if sent long ago: the first step sends one at once, and its
                // answer says where to go on (the last run may have died mid-window).
                let mut pump = Pump::probing(new_probe());
                let long_ago = Instant::now()
                    .checked_sub(PROBE_MAX)
                    .unwrap_or_else(Instant::now);
                pump.probe = pump.probe.map(|(n, _)| (n, long_ago));
                pump.next = t.have;
                pumps.entry(t.offer.id.clone()).or_insert(pump);
            }
        }
    }

    /// Takes the control frames owed.
    fn take_due(&self) -> Vec<Due> {
        std::mem::take(&mut *lock(&self.inner.due))
    }
}

/// A fresh probe number: not 0, and not one an earlier run used (time-based).
fn new_probe() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(nes_proto::now_ms()).unwrap_or(1).max(1);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// What the service does for the pump.
pub trait Sender: Send + Sync {
    /// Whether the MQTT session is up.
    fn connected(&self) -> bool;
    /// Seals control frames to `peer` and queues them in the outbox.
    fn queue_controls(
        &self,
        peer: &str,
        due: Vec<Due>,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + Send;
    /// Seals chunks to `peer` and hands them to the MQTT session.
    fn send_chunks(
        &self,
        peer: &str,
        chunks: Vec<FileChunk>,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + Send;
}

/// The pump: sends what is owed and the chunks of outgoing files, until `shutdown`.
pub async fn run<S: Sender>(files: Files, sender: S, mut shutdown: watch::Receiver<bool>) {
    files.resume();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Err(e) = files.step(&sender).await {
            warn!(error = %e, "file transfers: trying again later");
        }
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = files.inner.wake.notified() => {}
            _ = tick.tick() => {}
        }
    }
}

impl Files {
    async fn step<S: Sender>(&self, sender: &S) -> Result<(), ServiceError> {
        let mut by_peer: HashMap<String, Vec<Due>> = HashMap::new();
        for due in self.take_due() {
            by_peer.entry(due.peer().to_owned()).or_default().push(due);
        }
        for (peer, due) in by_peer {
            // A lost control frame is made again: the sender probes, the receiver answers.
            if let Err(e) = sender.queue_controls(&peer, due).await {
                info!(%peer, error = %e, "file control frames not sent");
            }
        }
        if !sender.connected() {
            return Ok(());
        }
        let ids: Vec<String> = lock(&self.inner.pumps).keys().cloned().collect();
        for id in ids {
            // One transfer's trouble (its peer now legacy, its keys changed) must not
            // hold up the others: it is tried again at the next step.
            if let Err(e) = self.pump_one(sender, &id).await {
                debug!(%id, error = %e, "file transfer waits");
            }
        }
        Ok(())
    }

    async fn pump_one<S: Sender>(&self, sender: &S, id: &str) -> Result<(), ServiceError> {
        let Some(t) = self.inner.store.transfer(id)? else {
            lock(&self.inner.pumps).remove(id);
            return Ok(());
        };
        if !t.outgoing || t.state != TransferState::Active {
            lock(&self.inner.pumps).remove(id);
            return Ok(());
        }
        let chunks = t.offer.chunks();
        // Decide under the lock, act without it.
        let (from, upto, probe) = {
            let mut pumps = lock(&self.inner.pumps);
            let Some(p) = pumps.get_mut(id) else {
                return Ok(());
            };
            let now = Instant::now();
            match p.probe {
                Some((_, at)) if now.duration_since(at) < p.probe_every => return Ok(()),
                Some(_) => {
                    p.probe_every = (p.probe_every * 2).min(PROBE_MAX);
                    let n = new_probe();
                    p.probe = Some((n, now));
                    (0, 0, Some(n))
                }
                None => {
                    let upto = chunks.min(t.have + WINDOW_CHUNKS);
                    if p.next >= upto {
                        if now.duration_since(p.last_progress) < PROBE_AFTER {
                            return Ok(());
                        }
                        let n = new_probe();
                        p.probe = Some((n, now));
                        (0, 0, Some(n))
                    } else {
                        (p.next, upto, None)
                    }
                }
            }
        };
        if let Some(n) = probe {
            let offer = FileOffer {
                probe: n,
                ..t.offer.clone()
            };
            return sender
                .queue_controls(&t.peer, vec![Due::Probe(t.peer.clone(), offer)])
                .await;
        }
        let Some(path) = self.path_of(id) else {
            return Ok(());
        };
        let mut next = from;
        while next < upto {
            let end = upto.min(next + SEAL_BATCH);
            let offer = t.offer.clone();
            let path = path.clone();
            let read = tokio::task::spawn_blocking(move || read_chunks(&path, &offer, next, end))
                .await
                .map_err(|e| ServiceError::Internal(format!("reading chunks: {e}")))?;
            let batch = match read {
                Ok(b) => b,
                Err(e) => {
                    warn!(%id, error = %e, "cannot read a file being sent");
                    return Ok(());
                }
            };
            sender.send_chunks(&t.peer, batch).await?;
            next = end;
            let mut pumps = lock(&self.inner.pumps);
            match pumps.get_mut(id) {
                // A probe went out meanwhile (or it stopped): its answer decides.
                Some(p) if p.probe.is_none() => p.next = p.next.max(next),
                _ => return Ok(()),
            }
        }
        Ok(())
    }
}

/// Reads chunks `from..to` of the file at `path`.
fn read_chunks(
    path: &Path,
    offer: &FileOffer,
    from: u64,
    to: u64,
) -> std::io::Result<Vec<FileChunk>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for index in from..to {
        let len = usize::try_from(offer.chunk_len(index)).unwrap_or(0);
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, index * u64::from(offer.chunk_size))?;
        out.push(FileChunk {
            file: offer.id.clone(),
            index,
            data,
        });
    }
    Ok(out)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The file name of an id: its 16 bytes in hex (base64 has `-`, `_`, `=`).
fn hex_id(id: &str) -> Option<String> {
    nes_proto::b64::decode(id)
        .filter(|b| b.len() == nes_proto::inner::ID_BYTES)
        .map(hex::encode)
}

/// Shows `t`'s progress in its message `m`, keeping the path the message has (it is set
/// once, when the file is complete).
fn with_progress(m: &mut Message, t: &Transfer) {
    let path = m.file().map(|f| f.path.clone()).unwrap_or_default();
    m.content = Content::File(t.info(&path));
}

fn ack(file: &str, have: u64, probe: u64) -> FileAck {
    FileAck {
        file: file.to_owned(),
        have,
        probe,
    }
}

fn cancel(file: &str, reason: &str) -> FileCancel {
    FileCancel {
        file: file.to_owned(),
        reason: reason.to_owned(),
    }
}

fn percent(part: u64, whole: u64) -> u64 {
    part.saturating_mul(100).checked_div(whole).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ID: &str = "AAAAAAAAAAAAAAAAAAAAAA==";

    fn setup(max: u64) -> (tempfile::TempDir, Store, Files) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let files = Files::open(dir.path(), store.clone(), max).unwrap();
        (dir, store, files)
    }

    fn offer_of(bytes: &[u8], id: &str) -> FileOffer {
        FileOffer {
            id: id.into(),
            name: "a.bin".into(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            media_type: "application/octet-stream".into(),
            chunk_size: 1024,
            probe: 7,
        }
    }

    fn chunk(bytes: &[u8], id: &str, i: u64) -> FileChunk {
        let start = (i * 1024) as usize;
        FileChunk {
            file: id.into(),
            index: i,
            data: bytes[start..(start + 1024).min(bytes.len())].to_vec(),
        }
    }

    #[test]
    fn chunks_in_any_order_make_the_file_once_it_matches_its_hash() {
        let (_dir, store, files) = setup(1 << 20);
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i % 253) as u8).collect();
        let offer = offer_of(&bytes, ID);
        assert!(matches!(
            files.offer("alice", "bob", &offer, 3, true, 1),
            Handled::Stored
        ));
        let m = store.message("alice", ID).unwrap().unwrap();
        assert_eq!(m.file().unwrap().state, crate::model::FileState::Receiving);
        assert!(m.file().unwrap().path.is_empty(), "not a file yet");
        assert!(matches!(
            files.chunk("alice", &chunk(&bytes, ID, 2)),
            Handled::Stored
        ));
        assert!(matches!(
            files.chunk("alice", &chunk(&bytes, ID, 2)),
            Handled::Ignored
        ));
        assert!(matches!(
            files.chunk("carol", &chunk(&bytes, ID, 0)),
            Handled::Refused("file_unknown", _)
        ));
        let mut short = chunk(&bytes, ID, 0);
        short.data.pop();
        assert!(matches!(
            files.chunk("alice", &short),
            Handled::Refused("bad_chunk", _)
        ));
        assert!(matches!(
            files.chunk("alice", &chunk(&bytes, ID, 0)),
            Handled::Stored
        ));
        assert!(matches!(
            files.chunk("alice", &chunk(&bytes, ID, 1)),
            Handled::Stored
        ));
        let t = store.transfer(ID).unwrap().unwrap();
        assert_eq!((t.state, t.have), (TransferState::Complete, 3));
        let path = files.path_of(ID).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let m = store.message("alice", ID).unwrap().unwrap();
        assert_eq!(m.file().unwrap().path, path.display().to_string());
        // The first answer echoes the probe; the last reports every chunk.
        let due = files.take_due();
        assert!(matches!(&due[0], Due::Ack(p, a) if p == "alice" && a.have == 0 && a.probe == 7));
        assert!(matches!(due.last(), Some(Due::Ack(_, a)) if a.have == 3));
        // The offer again (a probe after the sender restarted): complete.
        let again = FileOffer { probe: 8, ..offer };
        assert!(matches!(
            files.offer("alice", "bob", &again, 3, true, 1),
            Handled::Ignored
        ));
        assert!(matches!(&files.take_due()[..], [Due::Ack(_, a)] if a.have == 3 && a.probe == 8));
    }

    #[test]
    fn a_file_that_does_not_match_its_hash_is_thrown_away() {
        let (dir, store, files) = setup(1 << 20);
        let bytes = vec![5u8; 1500];
        let mut offer = offer_of(&bytes, ID);
        offer.sha256 = "00".repeat(32);
        files.offer("alice", "bob", &offer, 3, true, 1);
        files.chunk("alice", &chunk(&bytes, ID, 0));
        files.chunk("alice", &chunk(&bytes, ID, 1));
        let t = store.transfer(ID).unwrap().unwrap();
        assert_eq!(t.state, TransferState::Failed);
        assert!(!files.path_of(ID).unwrap().exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("files/partial"))
                .unwrap()
                .count(),
            0
        );
        assert!(files
            .take_due()
            .iter()
            .any(|d| matches!(d, Due::Cancel(_, c) if c.reason == "hash_mismatch")));
    }

    #[test]
    fn an_offer_over_the_limit_keeps_nothing() {
        let (dir, store, files) = setup(1000);
        let offer = offer_of(&[1u8; 1001], ID);
        assert!(matches!(
            files.offer("alice", "bob", &offer, 3, true, 1),
            Handled::Refused("file_too_large", _)
        ));
        assert!(store.transfer(ID).unwrap().is_none());
        assert!(store.message("alice", ID).unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("files/partial"))
                .unwrap()
                .count(),
            0
        );
        assert!(matches!(&files.take_due()[..], [Due::Cancel(_, c)] if c.reason == "too_large"));
    }

    #[test]
    fn a_stalled_incoming_file_makes_room_for_a_new_one() {
        let (_dir, store, files) = setup(1 << 20);
        let bytes = vec![1u8; 2048];
        let ids: Vec<String> = (0..=MAX_INCOMING as u8)
            .map(|i| nes_proto::b64::encode(&[i; 16]))
            .collect();
        for id in &ids[..MAX_INCOMING] {
            assert!(matches!(
                files.offer("alice", "bob", &offer_of(&bytes, id), 3, true, 1),
                Handled::Stored
            ));
        }
        let last = offer_of(&bytes, &ids[MAX_INCOMING]);
        assert!(matches!(
            files.offer("alice", "bob", &last, 3, true, 1),
            Handled::Refused("file_busy", _)
        ));
        // The first one went quiet a day ago.
        let mut t = store.transfer(&ids[0]).unwrap().unwrap();
        t.touched_ms -= STALLED_AFTER_MS + 1;
        store.put_transfer(&t).unwrap();
        assert!(matches!(
            files.offer("alice", "bob", &last, 3, true, 1),
            Handled::Stored
        ));
        assert_eq!(
            store.transfer(&ids[0]).unwrap().unwrap().state,
            TransferState::Failed
        );
        assert!(!files.partial_of(&ids[0]).unwrap().exists());
    }

    #[test]
    fn an_upload_over_the_limit_leaves_nothing_and_one_within_it_is_hashed() {
        let (dir, _store, files) = setup(10);
        let mut up = files.begin_upload().unwrap();
        assert!(up.write(b"0123456789").is_ok());
        assert!(up.write(b"x").is_err());
        drop(up);
        assert_eq!(
            std::fs::read_dir(dir.path().join("files/upload"))
                .unwrap()
                .count(),
            0
        );
        let mut up = files.begin_upload().unwrap();
        up.write(b"abc").unwrap();
        let (size, hash, path) = up.finish().unwrap();
        assert_eq!(size, 3);
        assert_eq!(hash, hex::encode(Sha256::digest(b"abc")));
        assert_eq!(std::fs::read(path).unwrap(), b"abc");
    }
}
