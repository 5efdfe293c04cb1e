//! Presence: a contact's as shown, this identity's as set.

use super::PresenceStatus;

/// A presence as shown: a contact's as last heard (offline once it ran out), or this
/// identity's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Whose (empty in the event of this identity's own).
    pub username: String,
    /// The status.
    pub status: PresenceStatus,
    /// A short text ("at lunch"), as the sender wrote it.
    pub note: String,
    /// When the contact last told it (the sender's timestamp, Unix ms).
    pub last_seen_ms: i64,
    /// When it runs out unless told again (Unix ms; 0: offline).
    pub expires_ms: i64,
    /// Offline because it was not told again in time.
    pub expired: bool,
}

impl Presence {
    /// The presence of a contact that never told one.
    pub fn unknown(username: &str) -> Presence {
        Presence {
            username: username.to_owned(),
            status: PresenceStatus::Unknown,
            note: String::new(),
            last_seen_ms: 0,
            expires_ms: 0,
            expired: false,
        }
    }
}

/// This identity's presence as set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnPresence {
    /// Online, away, busy or invisible.
    pub status: PresenceStatus,
    /// The note.
    pub note: String,
}

impl OwnPresence {
    /// As shown, under `username` (empty in its event).
    pub fn shown(&self, username: &str) -> Presence {
        Presence {
            username: username.to_owned(),
            status: self.status,
            note: self.note.clone(),
            last_seen_ms: 0,
            expires_ms: 0,
            expired: false,
        }
    }
}
