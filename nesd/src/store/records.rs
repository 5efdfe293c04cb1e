//! The store's own records of messages and events: what `c`, `h` and `e` hold.
//!
//! Format 2 and release 0.1.0 (format 1) stored the API's generated types
//! (`rpc::Message`, `rpc::Event`) as they were, so a change to `messenger.proto` was a
//! change to the disk format. These records are the store's alone: their field numbers
//! are the ones those formats wrote (so every old record reads as it is, and the tag of a
//! logged event, the hash of its stored bytes, is unchanged), and from now on the API
//! and the records only meet in the conversions below.
//!
//! The conversions destructure both sides field by field, so a field added to the API
//! does not compile until someone decides whether the store keeps it (a new record
//! field, and a [`super::FORMAT_VERSION`] step if old records need converting) or not.
//! Enumerations are kept as their numbers, as stored; the API's enums give their meaning.

use super::StoreResult;
use nes_proto::rpc::{
    event::Kind as ApiKind, ConnectionChanged as ApiConnectionChanged, Contact as ApiContact,
    Event as ApiEvent, FileInfo as ApiFileInfo, KeyChanged as ApiKeyChanged,
    MarkedRead as ApiMarkedRead, Message as ApiMessage,
    MessageStateChanged as ApiMessageStateChanged, Presence as ApiPresence,
};
use prost::Message as _;

/// A stored message, in either direction (`c` and `h` records, and inside events).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct MessageRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    from: String,
    #[prost(string, tag = "3")]
    to: String,
    #[prost(string, tag = "4")]
    peer: String,
    /// `Direction`.
    #[prost(int32, tag = "5")]
    direction: i32,
    #[prost(string, tag = "6")]
    text: String,
    #[prost(int64, tag = "7")]
    timestamp_ms: i64,
    #[prost(int64, tag = "8")]
    stored_at_ms: i64,
    /// `MessageState` (format 2's meanings; format 1's are converted at open).
    #[prost(int32, tag = "9")]
    state: i32,
    #[prost(bool, tag = "10")]
    read: bool,
    #[prost(uint32, tag = "11")]
    wire_version: u32,
    #[prost(string, tag = "12")]
    error: String,
    #[prost(bool, tag = "13")]
    wants_receipts: bool,
    #[prost(message, optional, tag = "14")]
    file: Option<FileRecord>,
}

/// What a file message carries.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct FileRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(uint64, tag = "3")]
    size: u64,
    #[prost(string, tag = "4")]
    sha256: String,
    #[prost(string, tag = "5")]
    media_type: String,
    /// `FileState`.
    #[prost(int32, tag = "6")]
    state: i32,
    #[prost(string, tag = "7")]
    path: String,
    #[prost(uint64, tag = "8")]
    transferred: u64,
    #[prost(string, tag = "9")]
    error: String,
}

/// A logged event (`e` records). Its log cursor is not stored: it is derived from the
/// stored bytes (see "Cursors").
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct EventRecord {
    #[prost(uint64, tag = "1")]
    cursor: u64,
    #[prost(int64, tag = "2")]
    at_ms: i64,
    #[prost(oneof = "KindRecord", tags = "3, 4, 5, 6, 7, 8, 9, 10")]
    kind: Option<KindRecord>,
}

/// What an event says.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum KindRecord {
    #[prost(message, tag = "3")]
    Message(MessageRecord),
    #[prost(message, tag = "4")]
    StateChanged(StateChangedRecord),
    #[prost(message, tag = "5")]
    KeyChanged(KeyChangedRecord),
    #[prost(message, tag = "6")]
    Connection(ConnectionRecord),
    #[prost(message, tag = "7")]
    Contact(ContactRecord),
    #[prost(message, tag = "8")]
    MarkedRead(MarkedReadRecord),
    #[prost(message, tag = "9")]
    Presence(PresenceRecord),
    #[prost(message, tag = "10")]
    File(MessageRecord),
}

/// An outgoing message moved on.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StateChangedRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    peer: String,
    /// `MessageState`.
    #[prost(int32, tag = "3")]
    state: i32,
    #[prost(string, tag = "4")]
    error: String,
}

/// A pinned contact's keys changed at the key server.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct KeyChangedRecord {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    old_message_key: String,
    #[prost(string, tag = "3")]
    old_sign_key: String,
    #[prost(string, tag = "4")]
    new_message_key: String,
    #[prost(string, tag = "5")]
    new_sign_key: String,
}

/// The MQTT session went up or down.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ConnectionRecord {
    #[prost(bool, tag = "1")]
    connected: bool,
    #[prost(string, tag = "2")]
    reason: String,
}

/// A contact as an event showed it.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ContactRecord {
    #[prost(string, tag = "1")]
    username: String,
    /// `TrustState`.
    #[prost(int32, tag = "2")]
    trust: i32,
    #[prost(string, tag = "3")]
    message_key_fingerprint: String,
    #[prost(string, tag = "4")]
    sign_key_fingerprint: String,
    #[prost(string, tag = "5")]
    pending_message_key_fingerprint: String,
    #[prost(string, tag = "6")]
    pending_sign_key_fingerprint: String,
    #[prost(bool, tag = "7")]
    legacy: bool,
    #[prost(int64, tag = "8")]
    fetched_at_ms: i64,
    #[prost(string, tag = "9")]
    message_key_pem: String,
    #[prost(string, tag = "10")]
    sign_key_pem: String,
    #[prost(uint32, tag = "11")]
    frame_version: u32,
    #[prost(string, tag = "12")]
    frame_version_reason: String,
    #[prost(bool, tag = "13")]
    prekey_lost: bool,
    #[prost(message, optional, tag = "14")]
    presence: Option<PresenceRecord>,
}

/// Messages of a conversation were marked read.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct MarkedReadRecord {
    #[prost(string, tag = "1")]
    peer: String,
    #[prost(uint64, tag = "2")]
    unread: u64,
}

/// A presence as an event showed it.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PresenceRecord {
    #[prost(string, tag = "1")]
    username: String,
    /// `PresenceStatus`.
    #[prost(int32, tag = "2")]
    status: i32,
    #[prost(string, tag = "3")]
    note: String,
    #[prost(int64, tag = "4")]
    last_seen_ms: i64,
    #[prost(int64, tag = "5")]
    expires_ms: i64,
    #[prost(bool, tag = "6")]
    expired: bool,
}

/// Conversions both ways between a record and its API type, each side destructured in
/// full: `plain` fields are copied, `nested` ones (optional messages) converted.
macro_rules! mirror {
    ($record:ident <-> $api:ident { $($plain:ident),* $(; $($nested:ident),*)? }) => {
        impl From<$record> for $api {
            fn from(record: $record) -> Self {
                let $record { $($plain,)* $($($nested,)*)? } = record;
                $api { $($plain,)* $($($nested: $nested.map(Into::into),)*)? }
            }
        }

        impl From<&$api> for $record {
            #[allow(clippy::clone_on_copy)]
            fn from(api: &$api) -> Self {
                let $api { $($plain,)* $($($nested,)*)? } = api;
                $record {
                    $($plain: $plain.clone(),)*
                    $($($nested: $nested.as_ref().map(Into::into),)*)?
                }
            }
        }
    };
}

mirror!(MessageRecord <-> ApiMessage {
    id, from, to, peer, direction, text, timestamp_ms, stored_at_ms, state, read,
    wire_version, error, wants_receipts; file
});
mirror!(FileRecord <-> ApiFileInfo {
    id, name, size, sha256, media_type, state, path, transferred, error
});
mirror!(StateChangedRecord <-> ApiMessageStateChanged { id, peer, state, error });
mirror!(KeyChangedRecord <-> ApiKeyChanged {
    username, old_message_key, old_sign_key, new_message_key, new_sign_key
});
mirror!(ConnectionRecord <-> ApiConnectionChanged { connected, reason });
mirror!(ContactRecord <-> ApiContact {
    username, trust, message_key_fingerprint, sign_key_fingerprint,
    pending_message_key_fingerprint, pending_sign_key_fingerprint, legacy, fetched_at_ms,
    message_key_pem, sign_key_pem, frame_version, frame_version_reason, prekey_lost;
    presence
});
mirror!(MarkedReadRecord <-> ApiMarkedRead { peer, unread });
mirror!(PresenceRecord <-> ApiPresence {
    username, status, note, last_seen_ms, expires_ms, expired
});

impl From<KindRecord> for ApiKind {
    fn from(kind: KindRecord) -> Self {
        match kind {
            KindRecord::Message(m) => ApiKind::Message(m.into()),
            KindRecord::StateChanged(s) => ApiKind::StateChanged(s.into()),
            KindRecord::KeyChanged(k) => ApiKind::KeyChanged(k.into()),
            KindRecord::Connection(c) => ApiKind::Connection(c.into()),
            KindRecord::Contact(c) => ApiKind::Contact(c.into()),
            KindRecord::MarkedRead(m) => ApiKind::MarkedRead(m.into()),
            KindRecord::Presence(p) => ApiKind::Presence(p.into()),
            KindRecord::File(m) => ApiKind::File(m.into()),
        }
    }
}

impl From<&ApiKind> for KindRecord {
    fn from(kind: &ApiKind) -> Self {
        match kind {
            ApiKind::Message(m) => KindRecord::Message(m.into()),
            ApiKind::StateChanged(s) => KindRecord::StateChanged(s.into()),
            ApiKind::KeyChanged(k) => KindRecord::KeyChanged(k.into()),
            ApiKind::Connection(c) => KindRecord::Connection(c.into()),
            ApiKind::Contact(c) => KindRecord::Contact(c.into()),
            ApiKind::MarkedRead(m) => KindRecord::MarkedRead(m.into()),
            ApiKind::Presence(p) => KindRecord::Presence(p.into()),
            ApiKind::File(m) => KindRecord::File(m.into()),
        }
    }
}

/// A message's stored bytes.
pub(super) fn encode_message(message: &ApiMessage) -> Vec<u8> {
    MessageRecord::from(message).encode_to_vec()
}

/// A message from its stored bytes.
pub(super) fn decode_message(bytes: &[u8]) -> StoreResult<ApiMessage> {
    Ok(MessageRecord::decode(bytes)?.into())
}

/// An event's stored bytes (without its log cursor).
pub(super) fn encode_event(event: &ApiEvent) -> Vec<u8> {
    let ApiEvent {
        cursor,
        at_ms,
        log_cursor: _,
        kind,
    } = event;
    EventRecord {
        cursor: *cursor,
        at_ms: *at_ms,
        kind: kind.as_ref().map(Into::into),
    }
    .encode_to_vec()
}

/// An event from its stored bytes; the caller sets its log cursor.
pub(super) fn decode_event(bytes: &[u8]) -> StoreResult<ApiEvent> {
    let EventRecord {
        cursor,
        at_ms,
        kind,
    } = EventRecord::decode(bytes)?;
    Ok(ApiEvent {
        cursor,
        at_ms,
        log_cursor: String::new(),
        kind: kind.map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::rpc::{Direction, FileState, MessageState, PresenceStatus, TrustState};

    fn message() -> ApiMessage {
        ApiMessage {
            id: "m-1".into(),
            from: "alice".into(),
            to: "bob".into(),
            peer: "alice".into(),
            direction: Direction::Incoming as i32,
            text: "hello".into(),
            timestamp_ms: 1_700_000_000_000,
            stored_at_ms: 1_700_000_000_123,
            state: MessageState::Received as i32,
            read: true,
            wire_version: 3,
            error: "e".into(),
            wants_receipts: true,
            file: Some(ApiFileInfo {
                id: "m-1".into(),
                name: "report.pdf".into(),
                size: 1234,
                sha256: "ab".repeat(32),
                media_type: "application/pdf".into(),
                state: FileState::Complete as i32,
                path: "/d/files/m-1".into(),
                transferred: 1234,
                error: String::new(),
            }),
        }
    }

    fn events() -> Vec<ApiEvent> {
        let presence = ApiPresence {
            username: "carol".into(),
            status: PresenceStatus::Away as i32,
            note: "lunch".into(),
            last_seen_ms: 5,
            expires_ms: 6,
            expired: true,
        };
        let kinds = vec![
            ApiKind::Message(message()),
            ApiKind::StateChanged(ApiMessageStateChanged {
                id: "m-2".into(),
                peer: "bob".into(),
                state: MessageState::Read as i32,
                error: "x".into(),
            }),
            ApiKind::KeyChanged(ApiKeyChanged {
                username: "dave".into(),
                old_message_key: "a".into(),
                old_sign_key: "b".into(),
                new_message_key: "c".into(),
                new_sign_key: "d".into(),
            }),
            ApiKind::Connection(ApiConnectionChanged {
                connected: true,
                reason: "up".into(),
            }),
            ApiKind::Contact(ApiContact {
                username: "carol".into(),
                trust: TrustState::KeyChanged as i32,
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
                presence: Some(presence.clone()),
            }),
            ApiKind::MarkedRead(ApiMarkedRead {
                peer: "alice".into(),
                unread: 3,
            }),
            ApiKind::Presence(presence),
            ApiKind::File(message()),
        ];
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| ApiEvent {
                cursor: i as u64 + 1,
                at_ms: 1_700_000_000_000 + i as i64,
                log_cursor: String::new(),
                kind: Some(kind),
            })
            .collect()
    }

    #[test]
    fn every_field_of_a_message_survives_the_record() {
        let m = message();
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        let bare = ApiMessage::default();
        assert_eq!(decode_message(&encode_message(&bare)).unwrap(), bare);
    }

    #[test]
    fn every_kind_of_event_survives_the_record() {
        for e in events() {
            assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
        }
    }

    /// Formats 1 and 2 stored the API's own encoding: the records read those bytes, and
    /// write the very same bytes (so the tags of logged events stay what they were).
    #[test]
    fn the_records_read_and_write_what_format_2_stored() {
        let m = message();
        let stored = m.encode_to_vec();
        assert_eq!(decode_message(&stored).unwrap(), m);
        assert_eq!(encode_message(&m), stored);
        for e in events() {
            let stored = e.encode_to_vec();
            assert_eq!(decode_event(&stored).unwrap(), e);
            assert_eq!(encode_event(&e), stored);
        }
    }

    #[test]
    fn a_damaged_record_is_an_error() {
        assert!(decode_message(&[0x0a, 0xff]).is_err());
        assert!(decode_event(&[0x1a, 0x05, 0x01]).is_err());
    }
}
