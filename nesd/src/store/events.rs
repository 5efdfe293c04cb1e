//! The event log: what changed, in order, under cursors a client can resume from (see
//! "Cursors" and "Durability and events" in the store's docs).

use super::*;

/// The tag of position 0 (no event there) in a log cursor.
pub(super) const START_TAG: &str = "00000000";

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
    /// Events after the cursor were removed by retention: resuming would skip them.
    #[error("cursor {cursor} is older than the event log keeps (`event_retention`): the events up to {pruned} were removed, so resuming from it would skip some; the messages themselves are still in the history (`nes history`)")]
    Pruned {
        /// What was given.
        cursor: String,
        /// The newest removed event.
        pruned: u64,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The most events one pruning change removes: keeps the writer lock short (a few
/// milliseconds) however much there is to remove; [`Store::prune_events`] goes on in the
/// next change.
pub(super) const PRUNE_BATCH: usize = 2000;

/// The newest event removed by retention (`n/pruned`, see "Retention").
#[derive(Debug, Clone, PartialEq, Eq)]
struct PrunedMark {
    cursor: u64,
    tag: String,
}

impl PrunedMark {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.cursor.to_be_bytes().to_vec();
        v.extend_from_slice(self.tag.as_bytes());
        v
    }

    /// `None` for bytes no mark has (the record is damaged).
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (cursor, tag) = bytes.split_at_checked(8)?;
        let tag = std::str::from_utf8(tag).ok()?;
        (tag.len() == START_TAG.len() && tag.bytes().all(|b| b.is_ascii_hexdigit())).then(|| {
            PrunedMark {
                cursor: u64::from_be_bytes(cursor.try_into().unwrap_or_default()),
                tag: tag.to_owned(),
            }
        })
    }
}

/// The tag of a stored event record (see "Cursors").
fn event_tag(record: &[u8]) -> String {
    hex::encode(&Sha256::digest(record)[..4])
}

/// The log cursor of the event `cursor` stored as `record`.
pub(super) fn log_cursor(store_id: &str, cursor: u64, record: &[u8]) -> String {
    format!("{store_id}-{cursor}-{}", event_tag(record))
}

impl Store {
    /// The log cursor of the newest durable event (position 0 when none): where a client
    /// that starts "from now" resumes.
    pub fn last_log_cursor(&self) -> StoreResult<String> {
        let last = self.last_cursor();
        if last == 0 {
            return Ok(format!("{}-0-{START_TAG}", self.inner.store_id));
        }
        match self.data()?.get(event_key(last))? {
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
        let pruned = self.pruned_mark()?;
        // Resuming after `seq` skips nothing only if every event after it is still here.
        let kept = |seq: u64| match &pruned {
            Some(mark) if seq != 0 && seq < mark.cursor => Err(CursorError::Pruned {
                cursor: cursor.to_owned(),
                pruned: mark.cursor,
            }),
            _ => Ok(seq),
        };
        if let Ok(seq) = cursor.parse::<u64>() {
            return kept(beyond(seq)?);
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
        kept(beyond(seq)?)?;
        if seq == 0 {
            return Ok(0);
        }
        let other = || CursorError::OtherEvent {
            cursor: cursor.to_owned(),
            seq,
        };
        if let Some(mark) = pruned.filter(|m| m.cursor == seq) {
            // Its record is gone; its tag was kept for this.
            return if mark.tag == tag {
                Ok(seq)
            } else {
                Err(other())
            };
        }
        let record = self
            .data()?
            .get(event_key(seq))
            .map_err(StoreError::from)?
            .ok_or_else(other)?;
        if event_tag(&record) != tag {
            return Err(other());
        }
        Ok(seq)
    }

    /// Durable events with a cursor greater than `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<Event>>> {
        let released = self.last_cursor();
        if after >= released {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self
            .data()?
            .range(event_key(after + 1)..=event_key(released))
            .take(limit)
        {
            let (_, v) = kv?;
            let mut event = decode_event(&v)?;
            event.log_cursor = log_cursor(&self.inner.store_id, event.cursor, &v);
            out.push(Arc::new(event));
        }
        Ok(out)
    }

    /// The newest event retention removed, if any.
    fn pruned_mark(&self) -> StoreResult<Option<PrunedMark>> {
        match self.data()?.get(K_PRUNED)? {
            None => Ok(None),
            Some(v) => PrunedMark::decode(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Record(RecordError::DamagedMark("n/pruned"))),
        }
    }

    /// Removes the durable events logged before `before_ms` (Unix ms), oldest first, and
    /// never the newest one (it is where "from now" starts), in changes of at most
    /// [`PRUNE_BATCH`]; keeps the newest removed one's cursor and tag (see "Retention").
    /// Returns how many were removed. The removals reach the disk with the next commit;
    /// a crash before that only means they are removed again.
    pub fn prune_events(&self, before_ms: i64) -> StoreResult<usize> {
        let mut total = 0;
        loop {
            let newest = self.last_cursor();
            let mut c = self.change();
            let data = c.settled()?;
            let mut removed = Vec::new();
            let mut newest_removed = None;
            for kv in data
                .range(event_key(0)..event_key(newest))
                .take(PRUNE_BATCH)
            {
                let (k, v) = kv?;
                let event = decode_event(&v)?;
                if event.at_ms >= before_ms {
                    break;
                }
                newest_removed = Some((event.cursor, v));
                removed.push(k);
            }
            let Some((cursor, record)) = newest_removed else {
                return Ok(total);
            };
            let mark = PrunedMark {
                cursor,
                tag: event_tag(&record),
            };
            for k in &removed {
                c.remove(k);
            }
            c.insert(K_PRUNED, mark.encode());
            c.apply()?;
            total += removed.len();
            if removed.len() < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Logs an event that is not a message change (key changed, contact, connection).
    pub fn log_event(&self, kind: EventKind) -> StoreResult<Arc<Event>> {
        let mut c = self.change();
        let event = c.event(kind);
        c.apply()?;
        Ok(event)
    }
}
