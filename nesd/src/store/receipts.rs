//! Receipts in the store: what this identity owes its peers (`r`), and the receipts that
//! come back moving outgoing messages forward (see "Receipts" in the store's docs).

use super::*;

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

impl Store {
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
        let known = c.contains(&capable)?;
        if !known {
            c.insert(capable, &[]);
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

    /// Receipts owed, grouped by peer and state, each group at most [`MAX_RECEIPT_IDS`]
    /// ids, at most `limit` groups.
    pub fn receipts_due(&self, limit: usize) -> StoreResult<Vec<ReceiptsDue>> {
        let mut out: Vec<ReceiptsDue> = Vec::new();
        for kv in self.data()?.scan_prefix([P_RECEIPT]) {
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
        c.insert(&outbox_key(seq)[..], record.encode_to_vec());
        for k in &due.keys {
            c.remove(&k[..]);
        }
        self.apply_with_outbox(c, 0, 1)
    }

    /// Forgets owed receipts that cannot be sent (the peer is a legacy contact now, or its
    /// keys changed and are not trusted).
    pub fn drop_receipts(&self, due: &ReceiptsDue) -> StoreResult<()> {
        let mut c = self.change();
        for k in &due.keys {
            c.remove(&k[..]);
        }
        c.apply()
    }

    /// Whether any receipt is owed.
    pub fn receipts_owed(&self) -> bool {
        // A store that cannot be read owes nothing it could send.
        self.data()
            .is_ok_and(|data| data.scan_prefix([P_RECEIPT]).next().is_some())
    }
}
