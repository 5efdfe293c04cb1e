//! The gRPC adapter's conversions: the domain types ([`crate::model`]) to the API's
//! generated types (`messenger.proto`), and the requests that carry domain values back.
//!
//! This is the only place in nesd where both meet (the D-Bus adapter reads the domain
//! types directly, the store has records of its own). Each conversion destructures the
//! domain side in full and builds the API side in full, without `..Default::default()`,
//! so a field added to either does not compile until someone decides what it is on the
//! other. Enumerations go by their API values ([`nes_proto::model`], where the frontends
//! read them back).

use crate::model::{
    each_event_kind, ConnectionChanged, Contact, Content, Conversation, Event, EventKind, FileInfo,
    KeyChanged, MarkedRead, Message, NewText, Presence, StateChanged, Status,
};
use nes_proto::rpc;

/// Each item converted.
pub(super) fn all<T, U: From<T>>(items: Vec<T>) -> Vec<U> {
    items.into_iter().map(U::from).collect()
}

/// A domain type to its API twin, each side named in full: `plain` fields are moved,
/// `values` are enumerations (their API numbers), `nested` ones optional and converted
/// in turn, and `split` names a message's content, two fields in the API (see
/// [`text_and_file`]).
macro_rules! to_api {
    ($domain:ident -> $api:ident {
        $($plain:ident),* $(,)?
        $(; values $($value:ident),+)?
        $(; nested $($nested:ident),+)?
        $(; split $content:ident as $text:ident, $file:ident)?
    }) => {
        impl From<$domain> for rpc::$api {
            fn from(domain: $domain) -> Self {
                let $domain { $($plain,)* $($($value,)+)? $($($nested,)+)? $($content,)? } =
                    domain;
                $(let ($text, $file) = text_and_file($content);)?
                rpc::$api {
                    $($plain,)*
                    $($($value: $value.api_number(),)+)?
                    $($($nested: $nested.map(Into::into),)+)?
                    $($text, $file,)?
                }
            }
        }
    };
}

to_api!(Message -> Message {
    id, from, to, peer, timestamp_ms, stored_at_ms, read, wire_version, error,
    wants_receipts; values direction, state; split content as text, file
});
to_api!(FileInfo -> FileInfo {
    id, name, size, sha256, media_type, path, transferred, error; values state
});
to_api!(StateChanged -> MessageStateChanged { id, peer, error; values state });
to_api!(KeyChanged -> KeyChanged {
    username, old_message_key, old_sign_key, new_message_key, new_sign_key
});
to_api!(ConnectionChanged -> ConnectionChanged { connected, reason });
to_api!(MarkedRead -> MarkedRead { peer, unread });
to_api!(Contact -> Contact {
    username, message_key_fingerprint, sign_key_fingerprint,
    pending_message_key_fingerprint, pending_sign_key_fingerprint, legacy, fetched_at_ms,
    message_key_pem, sign_key_pem, frame_version, frame_version_reason, prekey_lost;
    values trust; nested presence
});
to_api!(Presence -> Presence {
    username, note, last_seen_ms, expires_ms, expired; values status
});
to_api!(Conversation -> Conversation { peer, unread, total; nested last });
to_api!(Status -> StatusReply {
    user, version, pid, uptime_seconds, connected, broker, broker_protocol, broker_error,
    client_id, keyserver, queued, waiting, inbox, unread, last_cursor, last_log_cursor,
    store_id, refused, received, received_v1, received_v2, received_v3, sent, sent_v1,
    sent_v2, sent_v3, prekey_id, prekey_expires_ms, prekey_published, prekey_waiting,
    prekey_next_try_ms, prekeys_lost, receipts_received, receipts_sent, presence_received,
    presence_sent, file_chunks_sent, file_chunks_received
});

/// The API carries a message's kind as two fields: `text`, and `file` for a file (whose
/// `text` is empty).
fn text_and_file(content: Content) -> (String, Option<rpc::FileInfo>) {
    match content {
        Content::Text(text) => (text, None),
        Content::File(file) => (String::new(), Some(file.into())),
    }
}

impl From<Event> for rpc::Event {
    fn from(event: Event) -> Self {
        let Event {
            cursor,
            at_ms,
            log_cursor,
            kind,
        } = event;
        rpc::Event {
            cursor,
            at_ms,
            log_cursor,
            kind: Some(kind.into()),
        }
    }
}

impl From<EventKind> for rpc::event::Kind {
    fn from(kind: EventKind) -> Self {
        use rpc::event::Kind;
        each_event_kind!(kind, EventKind => Kind, |k| k.into())
    }
}

impl From<rpc::SendRequest> for NewText {
    fn from(request: rpc::SendRequest) -> Self {
        let rpc::SendRequest { to, text, legacy } = request;
        NewText { to, text, legacy }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileState;

    #[test]
    fn a_text_is_text_and_a_file_is_a_file_with_no_text() {
        let m = rpc::Message::from(Message::example());
        assert_eq!(
            (m.text.as_str(), m.file, m.direction, m.state),
            (
                "hello",
                None,
                rpc::Direction::Incoming as i32,
                rpc::MessageState::Received as i32
            )
        );
        let file = Message {
            content: Content::File(FileInfo {
                id: "m-1".into(),
                name: "a.pdf".into(),
                size: 3,
                sha256: "ab".into(),
                media_type: "application/pdf".into(),
                state: FileState::Complete,
                path: "/f".into(),
                transferred: 3,
                error: String::new(),
            }),
            ..Message::example()
        };
        let m = rpc::Message::from(file);
        assert_eq!(m.text, "");
        let f = m.file.unwrap();
        assert_eq!(
            (f.name.as_str(), f.state),
            ("a.pdf", rpc::FileState::Complete as i32)
        );
    }

    #[test]
    fn events_keep_their_cursor_and_kind() {
        let contact = Contact::example();
        let e = rpc::Event::from(Event {
            cursor: 4,
            at_ms: 5,
            log_cursor: "x-4-00".into(),
            kind: EventKind::Contact(contact),
        });
        assert_eq!((e.cursor, e.at_ms, e.log_cursor.as_str()), (4, 5, "x-4-00"));
        let Some(rpc::event::Kind::Contact(c)) = e.kind else {
            panic!("{:?}", e.kind)
        };
        assert_eq!(c.trust, rpc::TrustState::KeyChanged as i32);
        assert_eq!(
            c.presence.map(|p| p.status),
            Some(rpc::PresenceStatus::Away as i32)
        );
    }

    #[test]
    fn an_unknown_presence_is_unspecified() {
        let p = rpc::Presence::from(Presence::unknown("zed"));
        assert_eq!(p.status, rpc::PresenceStatus::Unspecified as i32);
        assert_eq!(p.username, "zed");
    }
}
