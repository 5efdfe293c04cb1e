//! Frames waiting for their sender's keys (`w`): parked while the key server cannot
//! answer, bounded in all and per sender, indexed in memory.

use super::*;

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
pub(super) struct ParkIndex {
    by_seq: std::collections::BTreeMap<u64, String>,
    per_sender: std::collections::HashMap<String, std::collections::BTreeSet<u64>>,
}

impl ParkIndex {
    /// Rebuilt from the parked frames' keys (at open).
    pub(super) fn load(data: &sled::Tree) -> StoreResult<ParkIndex> {
        let mut parked = ParkIndex::default();
        for kv in data.scan_prefix([P_WAITING]) {
            let (k, _) = kv?;
            if let Some((from, seq)) = waiting_key(&k) {
                parked.add(from, seq);
            }
        }
        Ok(parked)
    }

    /// Frames parked.
    pub(super) fn len(&self) -> u64 {
        self.by_seq.len() as u64
    }

    pub(super) fn add(&mut self, from: &str, seq: u64) {
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

impl Store {
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
            c.insert(peer_key(P_WAITING, from, &seq.to_be_bytes()), *frame);
            index.add(from, seq);
            added.push(((*from).to_owned(), seq));
            if let Some((old_seq, who)) = &oldest {
                c.remove(peer_key(P_WAITING, who, &old_seq.to_be_bytes()));
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
        if let Err(e) = c.apply() {
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
            .data()?
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
        for kv in self.data()?.scan_prefix([P_WAITING]).take(limit) {
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
        let mut c = self.change();
        for (from, seq) in frames {
            c.remove(peer_key(P_WAITING, from, &seq.to_be_bytes()));
        }
        c.apply()?;
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
}
