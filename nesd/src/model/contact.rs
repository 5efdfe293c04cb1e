//! A contact as the service shows it.

use super::{Presence, TrustState};

/// A contact as shown: its pinned keys (public only) and their fingerprints, its trust,
/// the frame version the next message to it gets, and its presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The username.
    pub username: String,
    /// Whether its keys are the pinned ones.
    pub trust: TrustState,
    /// Fingerprint (SHA-256 of the SPKI DER, hex) of the pinned message key.
    pub message_key_fingerprint: String,
    /// Fingerprint of the pinned signing key.
    pub sign_key_fingerprint: String,
    /// With [`TrustState::KeyChanged`]: the fingerprint of the message key answered now.
    pub pending_message_key_fingerprint: String,
    /// With [`TrustState::KeyChanged`]: the fingerprint of the signing key answered now.
    pub pending_sign_key_fingerprint: String,
    /// Messages to it go out as v1 frames.
    pub legacy: bool,
    /// When its keys were last fetched and verified (Unix ms).
    pub fetched_at_ms: i64,
    /// The pinned message key, PEM.
    pub message_key_pem: String,
    /// The pinned signing key, PEM.
    pub sign_key_pem: String,
    /// The frame version the next message to it gets (1, 2 or 3); 0 while not known.
    pub frame_version: u32,
    /// Why that version, one line for people.
    pub frame_version_reason: String,
    /// It had v3 prekeys and the key server has none now.
    pub prekey_lost: bool,
    /// Its presence as last heard; `None` when it never told one.
    pub presence: Option<Presence>,
}

#[cfg(test)]
impl Contact {
    /// A contact for tests: carol, her keys changed, every field set.
    pub(crate) fn example() -> Contact {
        Contact {
            username: "carol".into(),
            trust: TrustState::KeyChanged,
            message_key_fingerprint: "1".into(),
            sign_key_fingerprint: "2".into(),
            pending_message_key_fingerprint: "3".into(),
            pending_sign_key_fingerprint: "4".into(),
            legacy: true,
            fetched_at_ms: 7,
            message_key_pem: "5".into(),
            sign_key_pem: "6".into(),
            frame_version: 2,
            frame_version_reason: "no prekey".into(),
            prekey_lost: true,
            presence: Some(Presence {
                username: "carol".into(),
                status: super::PresenceStatus::Away,
                note: "lunch".into(),
                last_seen_ms: 5,
                expires_ms: 6,
                expired: true,
            }),
        }
    }
}
