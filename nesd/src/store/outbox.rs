//! The outbox: sealed frames not yet acknowledged by the broker (`q` seq), in the order
//! they were queued; a frame leaves in the batch that moves its message on.

use super::*;

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

impl Store {
    /// Outgoing messages not yet acknowledged by the broker.
    pub fn outbox_len(&self) -> u64 {
        self.inner.outbox_len.load(Ordering::Acquire)
    }

    /// Applies `c`, in which `leaving` outbox entries were removed and `adding` added. The
    /// count changes before the change is visible, so a reader who sees the new state
    /// never sees the old count.
    pub(super) fn apply_with_outbox(
        &self,
        c: Change<'_>,
        leaving: u64,
        adding: u64,
    ) -> StoreResult<()> {
        let len = &self.inner.outbox_len;
        len.fetch_sub(leaving, Ordering::AcqRel);
        len.fetch_add(adding, Ordering::AcqRel);
        if let Err(e) = c.apply() {
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
        if !c.contains(outbox_key(seq))? {
            return Ok(());
        }
        c.remove(outbox_key(seq));
        self.apply_with_outbox(c, 1, 0)
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
            c.insert(&outbox_key(seq)[..], record.encode_to_vec());
        }
        self.apply_with_outbox(c, 0, n)
    }

    /// Outbox entries with a sequence number greater than `after`, in order, at most `limit`.
    pub fn outbox_after(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, OutboxRecord)>> {
        let mut out = Vec::new();
        let start = outbox_key(after.saturating_add(1));
        for kv in self.data()?.range(start..).take(limit) {
            let (k, v) = kv?;
            if k.first() != Some(&P_OUTBOX) {
                break;
            }
            let seq = be_u64(&k[1..]).unwrap_or(0);
            out.push((seq, OutboxRecord::decode(&v[..])?));
        }
        Ok(out)
    }
}
