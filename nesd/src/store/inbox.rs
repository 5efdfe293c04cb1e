//! The inbox (`x`): frames acknowledged to the broker before they were decrypted.

use super::*;

/// How much the inbox holds (kept beside it so that a full inbox is known without a scan).
#[derive(Debug, Default)]
pub(super) struct InboxCount {
    frames: u64,
    bytes: u64,
    last_seq: u64,
    /// Each held frame's [`frame_digest`], counted: whether a frame the broker sends again
    /// is in the inbox already.
    digests: std::collections::HashMap<[u8; 16], u32>,
}

impl InboxCount {
    /// Counted from the inbox's records (at open).
    pub(super) fn load(data: &sled::Tree) -> StoreResult<InboxCount> {
        let mut inbox = InboxCount::default();
        for kv in data.scan_prefix([P_INBOX]) {
            let (k, v) = kv?;
            inbox.add(&v);
            inbox.last_seq = inbox.last_seq.max(be_u64(&k[1..]).unwrap_or(0));
        }
        Ok(inbox)
    }

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
            c.insert(inbox_key(seq).as_slice(), *frame);
            seqs.push(seq);
        }
        c.apply()?;
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
            .data()?
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
        let mut c = self.change();
        let key = inbox_key(seq);
        if let Some(old) = c.get(key)? {
            c.remove(key);
            c.apply()?;
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
