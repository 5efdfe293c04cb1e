//! One entry of the event log, and what each kind of event says.

use super::{Contact, Message, MessageState, Presence};

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its position in the log; strictly increasing.
    pub cursor: u64,
    /// When it was logged (Unix ms).
    pub at_ms: i64,
    /// `cursor` as a string that also names the log (`<store id>-<cursor>-<tag>`, see
    /// [`crate::store`] "Cursors"): what a client resumes from.
    pub log_cursor: String,
    /// What happened.
    pub kind: EventKind,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A message was stored: received, or queued for sending.
    Message(Message),
    /// An outgoing message moved on.
    StateChanged(StateChanged),
    /// The key server answers different keys for a pinned contact.
    KeyChanged(KeyChanged),
    /// The MQTT session went up or down.
    Connection(ConnectionChanged),
    /// A contact's keys were accepted or its settings changed.
    Contact(Contact),
    /// Messages of a conversation were marked read.
    MarkedRead(MarkedRead),
    /// A contact's presence changed or ran out, or this identity's own was set.
    Presence(Presence),
    /// A file message's transfer changed state (complete, cancelled, failed): the whole
    /// message as it is now.
    File(Message),
}

/// An outgoing message moved on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChanged {
    /// The message's id.
    pub id: String,
    /// Its recipient.
    pub peer: String,
    /// Its new state.
    pub state: MessageState,
    /// Why it failed, with [`MessageState::Failed`].
    pub error: String,
}

/// A pinned contact's keys changed at the key server; fingerprints (SHA-256 of the SPKI
/// DER, hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChanged {
    /// The contact.
    pub username: String,
    /// The pinned message key's fingerprint.
    pub old_message_key: String,
    /// The pinned signing key's fingerprint.
    pub old_sign_key: String,
    /// The message key's fingerprint the key server answers now.
    pub new_message_key: String,
    /// The signing key's fingerprint the key server answers now.
    pub new_sign_key: String,
}

/// The MQTT session went up or down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionChanged {
    /// Up.
    pub connected: bool,
    /// Why it went down, when it did.
    pub reason: String,
}

/// Messages of a conversation were marked read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkedRead {
    /// The conversation.
    pub peer: String,
    /// Its unread count afterwards.
    pub unread: u64,
}

/// Maps an [`EventKind`] to the same variant of the enums that mirror it (the store's
/// record, the API's), or back: `$convert` converts each variant's content, bound to
/// `$inner`. Every kind is named here once, so a new kind does not compile until each of
/// those enums has it and each conversion can convert it.
macro_rules! each_event_kind {
    ($kind:expr, $from:ident => $to:ident, |$inner:ident| $convert:expr) => {
        match $kind {
            $from::Message($inner) => $to::Message($convert),
            $from::StateChanged($inner) => $to::StateChanged($convert),
            $from::KeyChanged($inner) => $to::KeyChanged($convert),
            $from::Connection($inner) => $to::Connection($convert),
            $from::Contact($inner) => $to::Contact($convert),
            $from::MarkedRead($inner) => $to::MarkedRead($convert),
            $from::Presence($inner) => $to::Presence($convert),
            $from::File($inner) => $to::File($convert),
        }
    };
}
pub(crate) use each_event_kind;
