//! A conversation as listed.

use super::Message;

/// A conversation: its counters and its newest message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The other side.
    pub peer: String,
    /// Incoming messages not marked read.
    pub unread: u64,
    /// All messages stored.
    pub total: u64,
    /// The newest message.
    pub last: Option<Message>,
}
