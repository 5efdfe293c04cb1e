//! How the daemon is doing.

use std::collections::HashMap;

/// The daemon's identity, connection, queues and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This identity's username.
    pub user: String,
    /// The daemon's version (the crate's).
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// The MQTT session is up.
    pub connected: bool,
    /// The broker's URL (`mqtt://host:port`).
    pub broker: String,
    /// The MQTT version spoken with the broker (`5`, `3.1.1`); empty while not decided.
    pub broker_protocol: String,
    /// Why the MQTT session is down; empty when it is up.
    pub broker_error: String,
    /// The MQTT client id.
    pub client_id: String,
    /// The key server's base URL.
    pub keyserver: String,
    /// Entries in the outbox not yet acknowledged by the broker.
    pub queued: u64,
    /// Received frames waiting for their senders' keys.
    pub waiting: u64,
    /// Received frames kept on disk until they are decrypted.
    pub inbox: u64,
    /// Unread incoming messages over all conversations.
    pub unread: u64,
    /// The newest event's cursor (0 when none).
    pub last_cursor: u64,
    /// The same as a log cursor.
    pub last_log_cursor: String,
    /// The store's id.
    pub store_id: String,
    /// Frames refused on receive, by reason.
    pub refused: HashMap<String, u64>,
    /// Messages stored as received since the start.
    pub received: u64,
    /// Of those, the ones that came in v1 frames.
    pub received_v1: u64,
    /// ... in v2 frames.
    pub received_v2: u64,
    /// ... in v3 frames.
    pub received_v3: u64,
    /// Messages acknowledged by the broker since the start.
    pub sent: u64,
    /// Frames sealed and queued since the start, v1.
    pub sent_v1: u64,
    /// ... v2.
    pub sent_v2: u64,
    /// ... v3.
    pub sent_v3: u64,
    /// v3: this identity's newest prekey's id (hex); empty when none.
    pub prekey_id: String,
    /// v3: its `expires` (Unix ms).
    pub prekey_expires_ms: i64,
    /// v3: the key server holds it.
    pub prekey_published: bool,
    /// v3, when not published: why (the key server's last answer).
    pub prekey_waiting: String,
    /// v3, when not published: the next attempt (Unix ms).
    pub prekey_next_try_ms: i64,
    /// Contacts that had v3 prekeys and whose key server has none now.
    pub prekeys_lost: Vec<String>,
    /// Receipt frames received and applied.
    pub receipts_received: u64,
    /// Receipt frames sealed and queued.
    pub receipts_sent: u64,
    /// Presence frames received and applied.
    pub presence_received: u64,
    /// Presence frames sealed and queued.
    pub presence_sent: u64,
    /// File chunks handed to the broker.
    pub file_chunks_sent: u64,
    /// File chunks received and stored.
    pub file_chunks_received: u64,
}
