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
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
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

    /// Logs an event that is not a message change (key changed, contact, connection).
    pub fn log_event(&self, kind: EventKind) -> StoreResult<Arc<Event>> {
        let mut c = self.change();
        let event = c.event(kind);
        c.apply()?;
        Ok(event)
    }
}
