//! Held messages: incoming messages whose sender's keys changed (`h`), kept with their
//! frame until the user trusts the new keys or drops them.

use super::*;
use crate::model::{Content, Message};

/// A held message and the frame to open again once its sender's keys are trusted.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its sequence number.
    pub seq: u64,
    /// The stored message (state HELD, an empty text).
    pub message: Message,
    /// The frame as received.
    pub frame: Vec<u8>,
}

impl Store {
    /// Messages of `peer` held because its keys changed, oldest first.
    pub fn held(&self, peer: &str) -> StoreResult<Vec<Held>> {
        let mut out = Vec::new();
        let data = self.data()?;
        for kv in data.scan_prefix(peer_key(P_HELD, peer, &[])) {
            let (k, frame) = kv?;
            let seq_bytes = &k[k.len() - 8..];
            let seq = be_u64(seq_bytes).unwrap_or(0);
            if let Some(bytes) = data.get(peer_key(P_MSG, peer, seq_bytes))? {
                out.push(Held {
                    seq,
                    message: decode_message(&bytes)?,
                    frame: frame.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// Releases a held message after its sender's new keys were trusted and it verified:
    /// it becomes RECEIVED with its text (and owes its delivery receipt now, if asked).
    pub fn release_held(&self, peer: &str, seq: u64, text: String) -> StoreResult<Option<Message>> {
        let mut c = self.change();
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = c.get(&key)? else {
            return Ok(None);
        };
        let mut message = decode_message(&bytes)?;
        if message.state != MessageState::Held {
            return Ok(None);
        }
        message.state = MessageState::Received;
        message.content = Content::Text(text);
        message.error.clear();
        message.read = false;
        let mut summary = c.summary(peer)?;
        summary.unread += 1;
        c.insert(key, encode_message(&message));
        c.remove(peer_key(P_HELD, peer, &seq.to_be_bytes()));
        c.insert(peer_key(P_UNREAD, peer, &seq.to_be_bytes()), &[]);
        c.insert(summary_key(peer), summary.encode_to_vec());
        if message.wants_receipts {
            c.insert(
                receipt_key(peer, ReceiptState::Delivered, seq),
                message.id.as_bytes(),
            );
        }
        c.event(EventKind::Message(message.clone()));
        c.apply()?;
        Ok(Some(message))
    }

    /// Deletes a held message that does not verify under the trusted keys.
    pub fn drop_held(&self, peer: &str, seq: u64) -> StoreResult<()> {
        let mut c = self.change();
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = c.get(&key)? else {
            return Ok(());
        };
        let message = decode_message(&bytes)?;
        let mut summary = c.summary(peer)?;
        summary.total = summary.total.saturating_sub(1);
        c.remove(key);
        c.remove(peer_key(P_ID, peer, message.id.as_bytes()));
        c.remove(peer_key(P_HELD, peer, &seq.to_be_bytes()));
        c.insert(summary_key(peer), summary.encode_to_vec());
        c.apply()
    }
}
