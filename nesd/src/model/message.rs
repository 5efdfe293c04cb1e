//! A message in either direction, what it carries (its kind), and a text to send.

use super::{Direction, FileInfo, MessageState};

/// A stored message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its id: the 16 random bytes of the inner `id`, base64url (a v1 frame, which has no
    /// id, gets one derived from its bytes).
    pub id: String,
    /// The sender (the inner `from`).
    pub from: String,
    /// The recipient (the inner `to`).
    pub to: String,
    /// The other side of the conversation: `to` when outgoing, `from` when incoming.
    pub peer: String,
    /// Which way it went.
    pub direction: Direction,
    /// What it carries.
    pub content: Content,
    /// The inner `timestamp`: when the sender sealed it (Unix ms).
    pub timestamp_ms: i64,
    /// When this daemon stored it (Unix ms); the store sets it.
    pub stored_at_ms: i64,
    /// Where it is.
    pub state: MessageState,
    /// Incoming: marked read. Outgoing: always true.
    pub read: bool,
    /// The version of its frame: 1, 2 or 3.
    pub wire_version: u32,
    /// Why it failed (FAILED) or is held (HELD); empty otherwise.
    pub error: String,
    /// Incoming: its sender asked for receipts. Outgoing: this daemon asked for them.
    pub wants_receipts: bool,
}

/// What a message carries: its kind. A new kind of stored message is a new variant, and
/// every place that must decide about it (the store's records, the adapters, the
/// receipt owed on arrival) stops compiling until it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A text, as the sender wrote it; empty while the message is held (it has not
    /// verified under trusted keys yet).
    Text(String),
    /// A file, with its transfer's progress.
    File(FileInfo),
}

impl Content {
    /// Whether a message of this kind is whole when it is stored, so that its delivery
    /// receipt is owed at once: a text is; a file only once its transfer completes.
    pub fn whole_on_arrival(&self) -> bool {
        match self {
            Content::Text(_) => true,
            Content::File(_) => false,
        }
    }
}

impl Message {
    /// Its text; empty for a message of another kind.
    pub fn text(&self) -> &str {
        match &self.content {
            Content::Text(text) => text,
            Content::File(_) => "",
        }
    }

    /// Its file; `None` for a message of another kind.
    pub fn file(&self) -> Option<&FileInfo> {
        match &self.content {
            Content::File(file) => Some(file),
            Content::Text(_) => None,
        }
    }
}

#[cfg(test)]
impl Message {
    /// A message for tests: a text from alice to bob, received and read, every field set.
    pub(crate) fn example() -> Message {
        Message {
            id: "m-1".into(),
            from: "alice".into(),
            to: "bob".into(),
            peer: "alice".into(),
            direction: Direction::Incoming,
            content: Content::Text("hello".into()),
            timestamp_ms: 1_700_000_000_000,
            stored_at_ms: 1_700_000_000_123,
            state: MessageState::Received,
            read: true,
            wire_version: 3,
            error: "e".into(),
            wants_receipts: true,
        }
    }
}

/// A text to seal and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewText {
    /// The recipient, as given (checked by the service).
    pub to: String,
    /// The text (UTF-8, not empty).
    pub text: String,
    /// Send it as a v1 frame, as the original client does, whatever the contact's
    /// setting.
    pub legacy: bool,
}
