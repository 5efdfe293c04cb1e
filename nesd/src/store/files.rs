//! File transfers in the store: one record per file, beside its message.
//!
//! `f` file-id → [`Transfer`] (JSON with a version, `"v":1`): who the other side is, the
//! signed offer, how far it got and its state. The file's bytes are never here: they are
//! files under the data directory ([`crate::files`]). A transfer record is written in
//! the same batch as its message when the message is stored, and in the same batch as
//! the message's new [`FileInfo`] and its `file` event when the transfer ends, so
//! after a crash the two always agree. Progress (chunks stored, chunks acknowledged) is
//! written to the record alone.

use super::{
    decode_message, encode_message, peer_key, receipt_key, Change, Store, StoreResult, P_MSG,
};
use crate::model::{Content, Direction, EventKind, FileInfo, FileState, Message, MessageState};
use nes_proto::files::FileOffer;
use nes_proto::inner::ReceiptState;
use serde::{Deserialize, Serialize};

/// Prefix of transfer records.
pub(super) const P_FILE: u8 = b'f';
/// The version of [`Transfer`]'s JSON.
const TRANSFER_FORMAT: u32 = 1;

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    /// Sending, or receiving.
    Active,
    /// Every byte at the receiver, checked against the hash.
    Complete,
    /// Stopped by a user of either side.
    Cancelled,
    /// Refused by the receiver, or the bytes did not match the hash.
    Failed,
}

/// One file transfer, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// [`TRANSFER_FORMAT`].
    pub v: u32,
    /// This identity sends it.
    pub outgoing: bool,
    /// The other side.
    pub peer: String,
    /// The offer as signed by the sender (`probe` means nothing here).
    pub offer: FileOffer,
    /// Where it is.
    pub state: TransferState,
    /// Incoming: chunks stored from the first on; outgoing: chunks the receiver reported.
    pub have: u64,
    /// Incoming: which chunks are stored, one bit each (chunk i: byte i/8, bit i%8), hex.
    #[serde(default)]
    pub bits: String,
    /// Why it was cancelled or failed.
    #[serde(default)]
    pub error: String,
    /// When it last moved (Unix ms): made, or a chunk stored.
    #[serde(default)]
    pub touched_ms: i64,
}

impl Transfer {
    /// A new transfer of `offer` with `peer`.
    pub fn new(outgoing: bool, peer: &str, offer: FileOffer) -> Transfer {
        let bytes = usize::try_from(offer.chunks().div_ceil(8)).unwrap_or(0);
        Transfer {
            v: TRANSFER_FORMAT,
            outgoing,
            peer: peer.to_owned(),
            offer,
            state: TransferState::Active,
            have: 0,
            bits: if outgoing {
                String::new()
            } else {
                hex::encode(vec![0u8; bytes])
            },
            error: String::new(),
            touched_ms: nes_proto::now_ms(),
        }
    }

    /// Whether chunk `index` is stored (incoming).
    pub fn has_chunk(&self, index: u64) -> bool {
        let bits = hex::decode(&self.bits).unwrap_or_default();
        usize::try_from(index / 8)
            .ok()
            .and_then(|i| bits.get(i))
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    /// Marks chunk `index` stored and moves `have` on; false when it was already.
    pub fn set_chunk(&mut self, index: u64) -> bool {
        if index >= self.offer.chunks() {
            return false;
        }
        let mut bits = hex::decode(&self.bits).unwrap_or_default();
        let Some(byte) = usize::try_from(index / 8)
            .ok()
            .and_then(|i| bits.get_mut(i))
        else {
            return false;
        };
        if *byte & (1 << (index % 8)) != 0 {
            return false;
        }
        *byte |= 1 << (index % 8);
        let has = |i: u64| {
            usize::try_from(i / 8)
                .ok()
                .and_then(|j| bits.get(j))
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        };
        let mut have = self.have;
        while have < self.offer.chunks() && has(have) {
            have += 1;
        }
        self.have = have;
        self.bits = hex::encode(&bits);
        true
    }

    /// Bytes the receiver holds (as far as this side knows).
    pub fn transferred(&self) -> u64 {
        let cs = u64::from(self.offer.chunk_size);
        match self.state {
            TransferState::Complete => self.offer.size,
            _ if self.outgoing => (self.have * cs).min(self.offer.size),
            // Stored chunks, not only the first `have`: what a progress bar should show.
            _ => {
                let stored: u64 = hex::decode(&self.bits)
                    .unwrap_or_default()
                    .iter()
                    .map(|b| u64::from(b.count_ones()))
                    .sum();
                (stored * cs).min(self.offer.size)
            }
        }
    }

    /// The state frontends see.
    pub fn file_state(&self) -> FileState {
        match (self.state, self.outgoing) {
            (TransferState::Active, true) => FileState::Sending,
            (TransferState::Active, false) => FileState::Receiving,
            (TransferState::Complete, _) => FileState::Complete,
            (TransferState::Cancelled, _) => FileState::Cancelled,
            (TransferState::Failed, _) => FileState::Failed,
        }
    }

    /// What a message says about its file, with `path` once it is there.
    pub fn info(&self, path: &str) -> FileInfo {
        FileInfo {
            id: self.offer.id.clone(),
            name: self.offer.name.clone(),
            size: self.offer.size,
            sha256: self.offer.sha256.clone(),
            media_type: self.offer.media_type.clone(),
            state: self.file_state(),
            path: path.to_owned(),
            transferred: self.transferred(),
            error: self.error.clone(),
        }
    }
}

/// How a transfer's end changes its message.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// The file's path, once it is complete here.
    pub path: String,
    /// Outgoing: the message moves to this state (DELIVERED when the receiver has it all).
    pub outgoing_state: Option<MessageState>,
    /// Incoming: a delivery receipt is owed now (the sender asked for receipts).
    pub owe_delivery: bool,
}

fn file_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(P_FILE);
    k.extend_from_slice(id.as_bytes());
    k
}

impl Store {
    /// The transfer of file `id`.
    pub fn transfer(&self, id: &str) -> StoreResult<Option<Transfer>> {
        match self.data()?.get(file_key(id))? {
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => Ok(None),
        }
    }

    /// Every transfer, by file id.
    pub fn transfers(&self) -> StoreResult<Vec<Transfer>> {
        let mut out = Vec::new();
        for kv in self.data()?.scan_prefix([P_FILE]) {
            let (_, v) = kv?;
            if let Ok(t) = serde_json::from_slice::<Transfer>(&v) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Records progress (not flushed: the caller commits).
    pub fn put_transfer(&self, t: &Transfer) -> StoreResult<()> {
        let mut c = self.change();
        c.insert(file_key(&t.offer.id), encode(t));
        c.apply()
    }

    /// Adds a new transfer record to a change (with its message).
    pub(super) fn add_transfer(c: &mut Change<'_>, t: &Transfer) {
        c.insert(file_key(&t.offer.id), encode(t));
    }

    /// A transfer ended (complete, cancelled, failed): the record, the message's file
    /// info (and state), and a `file` event, in one batch. Returns the message as it is
    /// now (`None` when it is not stored).
    pub fn end_transfer(&self, t: &Transfer, ending: Ending) -> StoreResult<Option<Message>> {
        let mut c = self.change();
        c.insert(file_key(&t.offer.id), encode(t));
        let mut leaving = 0;
        if let Some(state) = ending.outgoing_state {
            if let Some((_, left)) = self.advance(&mut c, &t.peer, &t.offer.id, state, "")? {
                leaving = left;
            }
        }
        let Some(seq) = c.seq_of(&t.peer, &t.offer.id)? else {
            self.apply_with_outbox(c, leaving, 0)?;
            return Ok(None);
        };
        let key = peer_key(P_MSG, &t.peer, &seq.to_be_bytes());
        let Some(bytes) = c.get(&key)? else {
            self.apply_with_outbox(c, leaving, 0)?;
            return Ok(None);
        };
        let mut message = decode_message(&bytes)?;
        if let Some(state) = ending.outgoing_state {
            if message.direction == Direction::Outgoing && super::advances(message.state, state) {
                message.state = state;
            }
        }
        message.content = Content::File(t.info(&ending.path));
        c.insert(key, encode_message(&message));
        if ending.owe_delivery && message.wants_receipts {
            c.insert(
                receipt_key(&t.peer, ReceiptState::Delivered, seq),
                message.id.as_bytes(),
            );
        }
        c.event(EventKind::File(message.clone()));
        self.apply_with_outbox(c, leaving, 0)?;
        Ok(Some(message))
    }
}

fn encode(t: &Transfer) -> Vec<u8> {
    // A struct of strings and numbers: serialising it cannot fail.
    serde_json::to_vec(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(size: u64) -> FileOffer {
        FileOffer {
            id: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
            name: "a.bin".into(),
            size,
            sha256: "00".repeat(32),
            media_type: "application/octet-stream".into(),
            chunk_size: 1024,
            probe: 0,
        }
    }

    #[test]
    fn chunks_stored_out_of_order_move_have_once_the_gap_fills() {
        let mut t = Transfer::new(false, "alice", offer(10 * 1024 + 5));
        assert_eq!(t.offer.chunks(), 11);
        assert!(t.set_chunk(1));
        assert!(t.set_chunk(2));
        assert_eq!(t.have, 0);
        assert!(!t.set_chunk(2), "twice is not new");
        assert!(t.set_chunk(0));
        assert_eq!(t.have, 3);
        assert!(!t.set_chunk(11), "beyond the last chunk");
        assert!(t.has_chunk(1) && !t.has_chunk(3));
        assert_eq!(t.transferred(), 3 * 1024);
        for i in 3..11 {
            t.set_chunk(i);
        }
        assert_eq!(t.have, 11);
        assert_eq!(t.transferred(), 10 * 1024 + 5);
        assert_eq!(t.file_state(), FileState::Receiving);
    }

    #[test]
    fn a_record_reads_back_and_carries_its_version() {
        let t = Transfer::new(true, "bob", offer(1));
        let json = String::from_utf8(encode(&t)).unwrap();
        assert!(json.starts_with("{\"v\":1,"), "{json}");
        let back: Transfer = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.file_state(), FileState::Sending);
    }
}
