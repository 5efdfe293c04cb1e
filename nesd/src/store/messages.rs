//! Messages and conversations: the records of both directions (`c`), the id index (`i`),
//! the per-conversation counters (`s`) and the unread set (`u`).

use super::*;
use crate::model::{Conversation, MarkedRead, Message, StateChanged};

/// Counters of one conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// Messages stored.
    #[prost(uint64, tag = "1")]
    pub total: u64,
    /// Incoming messages not read.
    #[prost(uint64, tag = "2")]
    pub unread: u64,
}

impl Store {
    /// Stores a verified incoming message (state RECEIVED, or HELD with its frame).
    /// Returns `None` for a duplicate: the conversation already has that id.
    pub fn insert_incoming(
        &self,
        message: Message,
        held_frame: Option<Vec<u8>>,
    ) -> StoreResult<Option<Message>> {
        self.insert_incoming_with(message, held_frame, None)
    }

    /// Stores an incoming file message and its transfer record together. `None` for a
    /// duplicate id. Its delivery receipt is owed only once the file is complete.
    pub fn insert_incoming_file(
        &self,
        message: Message,
        transfer: &Transfer,
    ) -> StoreResult<Option<Message>> {
        self.insert_incoming_with(message, None, Some(transfer))
    }

    fn insert_incoming_with(
        &self,
        mut message: Message,
        held_frame: Option<Vec<u8>>,
        transfer: Option<&Transfer>,
    ) -> StoreResult<Option<Message>> {
        let mut c = self.change();
        if let Some(t) = transfer {
            Store::add_transfer(&mut c, t);
        }
        let peer = message.peer.clone();
        let idk = peer_key(P_ID, &peer, message.id.as_bytes());
        if c.contains(&idk)? {
            return Ok(None);
        }
        let seq = c.seq();
        message.stored_at_ms = now_ms();
        let mut summary = c.summary(&peer)?;
        summary.total += 1;
        let unread = message.state == MessageState::Received && !message.read;
        if unread {
            summary.unread += 1;
            c.insert(peer_key(P_UNREAD, &peer, &seq.to_be_bytes()), &[]);
        }
        if let Some(frame) = held_frame {
            c.insert(peer_key(P_HELD, &peer, &seq.to_be_bytes()), frame);
        }
        c.insert(
            peer_key(P_MSG, &peer, &seq.to_be_bytes()),
            encode_message(&message),
        );
        c.insert(idk, &seq.to_be_bytes());
        c.insert(summary_key(&peer), summary.encode_to_vec());
        // Read before written: every message of a contact asks, the mark is written once.
        let capable = peer_key(P_CAPABLE, &peer, &[]);
        if message.wants_receipts && !c.contains(&capable)? {
            c.insert(capable, &[]);
        }
        // A file's receipt is owed once its transfer completes (`end_transfer`).
        if message.wants_receipts
            && message.state == MessageState::Received
            && message.content.whole_on_arrival()
        {
            c.insert(
                receipt_key(&peer, ReceiptState::Delivered, seq),
                message.id.as_bytes(),
            );
        }
        c.event(EventKind::Message(message.clone()));
        c.apply()?;
        Ok(Some(message))
    }

    /// Stores an outgoing message (state QUEUED) and its sealed frame in the outbox.
    pub fn insert_outgoing(&self, message: Message, outbox: OutboxRecord) -> StoreResult<Message> {
        self.insert_outgoing_with(message, outbox, None)
    }

    /// Stores an outgoing file message (its offer queued in the outbox) and its transfer
    /// record together.
    pub fn insert_outgoing_file(
        &self,
        message: Message,
        outbox: OutboxRecord,
        transfer: &Transfer,
    ) -> StoreResult<Message> {
        self.insert_outgoing_with(message, outbox, Some(transfer))
    }

    fn insert_outgoing_with(
        &self,
        mut message: Message,
        outbox: OutboxRecord,
        transfer: Option<&Transfer>,
    ) -> StoreResult<Message> {
        let mut c = self.change();
        if let Some(t) = transfer {
            Store::add_transfer(&mut c, t);
        }
        let peer = message.peer.clone();
        let idk = peer_key(P_ID, &peer, message.id.as_bytes());
        if c.contains(&idk)? {
            return Err(StoreError::IdTaken(message.id));
        }
        let seq = c.seq();
        message.stored_at_ms = now_ms();
        let mut summary = c.summary(&peer)?;
        summary.total += 1;
        c.insert(
            peer_key(P_MSG, &peer, &seq.to_be_bytes()),
            encode_message(&message),
        );
        c.insert(idk, &seq.to_be_bytes());
        c.insert(summary_key(&peer), summary.encode_to_vec());
        c.insert(&outbox_key(seq)[..], outbox.encode_to_vec());
        c.event(EventKind::Message(message.clone()));
        c.apply()?;
        self.inner.outbox_len.fetch_add(1, Ordering::AcqRel);
        Ok(message)
    }

    /// Moves an outgoing message on (SENT, DELIVERED, READ, FAILED). States only move
    /// forward; every one of them takes it out of the outbox. Returns the updated message,
    /// or `None` when nothing changed.
    pub fn set_outgoing_state(
        &self,
        peer: &str,
        id: &str,
        state: MessageState,
        error: &str,
    ) -> StoreResult<Option<Message>> {
        let mut c = self.change();
        let Some((message, leaves_outbox)) = self.advance(&mut c, peer, id, state, error)? else {
            return Ok(None);
        };
        self.apply_with_outbox(c, leaves_outbox, 0)?;
        Ok(Some(message))
    }

    /// Adds moving one outgoing message to `state` to the change `c`: the record, the
    /// outbox entry leaving, the event. `None` when it does not move; else the message and
    /// how many outbox entries leave (0 or 1).
    pub(super) fn advance(
        &self,
        c: &mut Change<'_>,
        peer: &str,
        id: &str,
        state: MessageState,
        error: &str,
    ) -> StoreResult<Option<(Message, u64)>> {
        let Some(seq) = c.seq_of(peer, id)? else {
            return Ok(None);
        };
        let key = peer_key(P_MSG, peer, &seq.to_be_bytes());
        let Some(bytes) = c.get(&key)? else {
            return Ok(None);
        };
        let mut message = decode_message(&bytes)?;
        if message.direction != Direction::Outgoing || !advances(message.state, state) {
            return Ok(None);
        }
        message.state = state;
        message.error = error.to_owned();
        c.insert(key, encode_message(&message));
        let leaves_outbox = c.contains(outbox_key(seq))?;
        if leaves_outbox {
            c.remove(outbox_key(seq));
        }
        c.event(EventKind::StateChanged(StateChanged {
            id: id.to_owned(),
            peer: peer.to_owned(),
            state,
            error: error.to_owned(),
        }));
        Ok(Some((message, u64::from(leaves_outbox))))
    }

    /// One message by conversation and id.
    pub fn message(&self, peer: &str, id: &str) -> StoreResult<Option<Message>> {
        let Some(seq) = self.seq_of(peer, id)? else {
            return Ok(None);
        };
        match self
            .data()?
            .get(peer_key(P_MSG, peer, &seq.to_be_bytes()))?
        {
            Some(bytes) => Ok(Some(decode_message(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The conversation with `peer`, oldest first: the last `limit` (0: all) messages
    /// stored before `before_id` (when given).
    pub fn history(
        &self,
        peer: &str,
        limit: usize,
        before_id: Option<&str>,
    ) -> StoreResult<Vec<Message>> {
        let end = match before_id {
            Some(id) => match self.seq_of(peer, id)? {
                Some(seq) => peer_key(P_MSG, peer, &seq.to_be_bytes()),
                None => {
                    return Err(StoreError::UnknownId {
                        peer: peer.to_owned(),
                        id: id.to_owned(),
                    })
                }
            },
            None => {
                let mut k = peer_key(P_MSG, peer, &[]);
                k.push(0xff); // after every 8-byte seq of this peer
                k
            }
        };
        let start = peer_key(P_MSG, peer, &[]);
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        for kv in self.data()?.range(start..end).rev().take(limit) {
            let (_, v) = kv?;
            out.push(decode_message(&v)?);
        }
        out.reverse();
        Ok(out)
    }

    /// Every conversation with its counters and newest message, most recent first.
    pub fn conversations(&self) -> StoreResult<Vec<Conversation>> {
        let mut found = Vec::new();
        let data = self.data()?;
        for kv in data.scan_prefix([P_SUMMARY]) {
            let (k, v) = kv?;
            let peer = String::from_utf8_lossy(&k[1..]).into_owned();
            let summary = Summary::decode(&v[..])?;
            let last = data
                .scan_prefix(peer_key(P_MSG, &peer, &[]))
                .next_back()
                .transpose()?;
            let (seq, last) = match last {
                Some((k, v)) => (
                    be_u64(&k[k.len() - 8..]).unwrap_or(0),
                    Some(decode_message(&v)?),
                ),
                None => (0, None),
            };
            found.push((
                seq,
                Conversation {
                    peer,
                    unread: summary.unread,
                    total: summary.total,
                    last,
                },
            ));
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found.into_iter().map(|(_, c)| c).collect())
    }

    /// Total unread incoming messages.
    pub fn unread_total(&self) -> StoreResult<u64> {
        let mut total = 0u64;
        for kv in self.data()?.scan_prefix([P_SUMMARY]) {
            let (_, v) = kv?;
            total = total.saturating_add(Summary::decode(&v[..])?.unread);
        }
        Ok(total)
    }

    /// Marks incoming messages of `peer` read: all, or up to and including `up_to_id`;
    /// with `read_receipts`, those whose sender asked for receipts owe a read receipt.
    /// Returns how many changed.
    pub fn mark_read(
        &self,
        peer: &str,
        up_to_id: Option<&str>,
        read_receipts: bool,
    ) -> StoreResult<u64> {
        let mut c = self.change();
        let last = match up_to_id {
            Some(id) => match c.seq_of(peer, id)? {
                Some(seq) => seq,
                None => {
                    return Err(StoreError::UnknownId {
                        peer: peer.to_owned(),
                        id: id.to_owned(),
                    })
                }
            },
            None => u64::MAX,
        };
        let mut marked = 0u64;
        // The scan below needs every change made so far in sled (this one has written
        // nothing yet).
        let data = c.settled()?;
        for kv in data
            .range(peer_key(P_UNREAD, peer, &[])..=peer_key(P_UNREAD, peer, &last.to_be_bytes()))
        {
            let (k, _) = kv?;
            let seq_bytes = &k[k.len() - 8..];
            let mkey = peer_key(P_MSG, peer, seq_bytes);
            if let Some(bytes) = data.get(&mkey)? {
                let mut message = decode_message(&bytes)?;
                message.read = true;
                if read_receipts && message.wants_receipts {
                    let seq = be_u64(seq_bytes).unwrap_or(0);
                    c.insert(
                        receipt_key(peer, ReceiptState::Read, seq),
                        message.id.as_bytes(),
                    );
                }
                c.insert(mkey, encode_message(&message));
            }
            c.remove(k);
            marked += 1;
        }
        if marked == 0 {
            return Ok(0);
        }
        let mut summary = c.summary(peer)?;
        summary.unread = summary.unread.saturating_sub(marked);
        c.insert(summary_key(peer), summary.encode_to_vec());
        c.event(EventKind::MarkedRead(MarkedRead {
            peer: peer.to_owned(),
            unread: summary.unread,
        }));
        c.apply()?;
        Ok(marked)
    }

    /// The sequence number of message `id` in the conversation with `peer`.
    pub(super) fn seq_of(&self, peer: &str, id: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .data()?
            .get(peer_key(P_ID, peer, id.as_bytes()))?
            .and_then(|v| be_u64(&v)))
    }
}

impl Change<'_> {
    /// The counters of the conversation with `peer`, as this change sees them.
    pub(super) fn summary(&self, peer: &str) -> StoreResult<Summary> {
        match self.get(summary_key(peer))? {
            Some(v) => Ok(Summary::decode(&v[..])?),
            None => Ok(Summary::default()),
        }
    }

    /// [`Store::seq_of`], as this change sees it.
    pub(super) fn seq_of(&self, peer: &str, id: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .get(peer_key(P_ID, peer, id.as_bytes()))?
            .and_then(|v| be_u64(&v)))
    }
}
