//! The inner message: the JSON that is signed and encrypted inside a frame.
//!
//! `{"from": .., "to": .., "timestamp": <unix ms>, "message": ..}`, plus `"id"` in v2.
//! We write it as Go's `json.Marshal` does (field order, HTML-safe escaping), so a v1
//! frame we seal is byte-for-byte what the original would have sealed for the same
//! fields; we read any valid JSON object with those fields and ignore unknown ones, so
//! later kinds of message can add fields.
//!
//! # Kinds
//! An inner message without `"kind"` (every original frame) or with `"kind":"text"` is a
//! text. Other kinds (docs/PROTOCOL.md "Kinds") add their own fields after `id`:
//!
//! - `"kind":"receipt"`, `"receipt":{"state":"delivered"|"read","ids":[<id>, ...]}` (1 to
//!   [`MAX_RECEIPT_IDS`] v2 ids, `"message":""`): the sender stored (or its user read)
//!   the messages with those ids that the recipient sent it.
//! - `"kind":"presence"`, `"presence":{"status":"online"|"away"|"busy"|"offline",
//!   "note":TEXT,"expires":<unix ms>}` (`"message":""`): the sender's presence, until
//!   `expires` (later than `timestamp`, at most [`MAX_PRESENCE_TTL_MS`] after it; 0 with
//!   offline); the note at most [`MAX_PRESENCE_NOTE`] bytes.
//! - `"kind":"file"`, `"kind":"file_chunk"`, `"kind":"file_ack"`, `"kind":"file_cancel"`
//!   with `"file"`, `"chunk"`, `"file_ack"`, `"file_cancel"` bodies: a file and its
//!   transfer ([`crate::files`]).
//! - `"receipts":true` on a text: its sender understands receipts and asks for them
//!   (releases before receipts ignore the field; they are never sent receipts).
//!
//! A kind this code does not know parses ([`Kind::Unknown`]) so that the receiver can
//! refuse it by name instead of showing it as an empty text; a known kind whose fields
//! are malformed does not parse.

use crate::files::{FileAck, FileCancel, FileChunk, FileError, FileOffer};
use serde::Deserialize;

/// Length of a v2 message id in bytes (before base64url).
pub const ID_BYTES: usize = 16;

/// The fields of an inner message, as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Inner {
    /// Inner `from`: the sender's username, as the sender wrote it.
    pub from: String,
    /// Inner `to`: the recipient's username (the original wrote it as typed).
    pub to: String,
    /// Inner `timestamp`: Unix milliseconds when the sender sealed the message.
    pub timestamp: i64,
    /// Inner `message`: the text.
    pub message: String,
    /// Inner `id` (v2 only): 16 random bytes, base64url with padding.
    #[serde(default)]
    pub id: Option<String>,
    /// Inner `kind`: absent for a text (see "Kinds").
    #[serde(default)]
    pub kind: Option<String>,
    /// Inner `receipt`, with `"kind":"receipt"`.
    #[serde(default, deserialize_with = "lenient")]
    pub receipt: Option<Receipt>,
    /// Inner `presence`, with `"kind":"presence"`.
    #[serde(default, deserialize_with = "lenient")]
    pub presence: Option<PresenceBody>,
    /// Inner `file`, with `"kind":"file"`.
    #[serde(default, deserialize_with = "lenient")]
    pub file: Option<FileOffer>,
    /// Inner `chunk`, with `"kind":"file_chunk"`.
    #[serde(default, deserialize_with = "lenient")]
    pub chunk: Option<FileChunk>,
    /// Inner `file_ack`, with `"kind":"file_ack"`.
    #[serde(default, deserialize_with = "lenient")]
    pub file_ack: Option<FileAck>,
    /// Inner `file_cancel`, with `"kind":"file_cancel"`.
    #[serde(default, deserialize_with = "lenient")]
    pub file_cancel: Option<FileCancel>,
    /// Inner `receipts`: the sender asks for receipts (see "Kinds").
    #[serde(default, deserialize_with = "lenient_flag")]
    pub receipts: bool,
}

/// A kind's body: `None` unless it is one. A field of that name on a message of another
/// kind, in a shape this code does not know, is ignored like any unknown field (readers
/// "ignore unknown fields"); on a message of that kind, `Inner::parse` refuses it.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    Ok(serde_json::from_str(raw.get()).ok())
}

/// `receipts`: true only when it is `true`.
fn lenient_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(lenient::<D, bool>(d)?.unwrap_or(false))
}

/// Most ids one receipt acknowledges.
pub const MAX_RECEIPT_IDS: usize = 256;

/// What a receipt says about the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptState {
    /// Stored by the recipient's daemon.
    Delivered,
    /// Read by the recipient.
    Read,
}

impl ReceiptState {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptState::Delivered => "delivered",
            ReceiptState::Read => "read",
        }
    }
}

/// A receipt's body: `{"state": .., "ids": [..]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Receipt {
    /// Delivered or read.
    pub state: ReceiptState,
    /// The acknowledged message ids (v2 ids of messages the receipt's recipient sent).
    pub ids: Vec<String>,
}

/// Longest presence note, in bytes.
pub const MAX_PRESENCE_NOTE: usize = 256;
/// Longest a presence may claim to last past its timestamp: a day.
pub const MAX_PRESENCE_TTL_MS: i64 = 24 * 3600 * 1000;

/// A presence status as the wire names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// Available.
    Online,
    /// Away from the keyboard.
    Away,
    /// Do not disturb.
    Busy,
    /// Gone (a clean shutdown, or invisible).
    Offline,
}

impl PresenceStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Busy => "busy",
            PresenceStatus::Offline => "offline",
        }
    }
}

/// A presence's body: `{"status": .., "note": .., "expires": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresenceBody {
    /// The status.
    pub status: PresenceStatus,
    /// A short text ("at lunch").
    #[serde(default)]
    pub note: String,
    /// Unix ms after which it no longer holds unless refreshed (0 with offline).
    #[serde(default)]
    pub expires: i64,
}

/// What a non-text inner message carries, for sealing ([`crate::frame::Draft`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control<'a> {
    /// A receipt.
    Receipt(&'a Receipt),
    /// A presence.
    Presence(&'a PresenceBody),
    /// A file offer (or a probe: the offer again).
    File(&'a FileOffer),
    /// A chunk of a file.
    Chunk(&'a FileChunk),
    /// A receiver's progress.
    FileAck(&'a FileAck),
    /// A cancellation.
    FileCancel(&'a FileCancel),
}

impl Control<'_> {
    /// Its `"kind"` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Receipt(_) => KIND_RECEIPT,
            Control::Presence(_) => KIND_PRESENCE,
            Control::File(_) => crate::files::KIND_FILE,
            Control::Chunk(_) => crate::files::KIND_FILE_CHUNK,
            Control::FileAck(_) => crate::files::KIND_FILE_ACK,
            Control::FileCancel(_) => crate::files::KIND_FILE_CANCEL,
        }
    }
}

/// The kind of an inner message (see "Kinds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A text: `message`.
    Text,
    /// A receipt for messages the recipient sent.
    Receipt(&'a Receipt),
    /// The sender's presence.
    Presence(&'a PresenceBody),
    /// A file offer.
    File(&'a FileOffer),
    /// A chunk of a file.
    Chunk(&'a FileChunk),
    /// How far the receiver of a file got.
    FileAck(&'a FileAck),
    /// A transfer stopped by the other side.
    FileCancel(&'a FileCancel),
    /// A kind this code does not know (a later release's): refused by name.
    Unknown(&'a str),
}

/// The wire name of the receipt kind.
pub const KIND_RECEIPT: &str = "receipt";
/// The wire name of the presence kind.
pub const KIND_PRESENCE: &str = "presence";
/// The wire name of the text kind (also what no `kind` means).
pub const KIND_TEXT: &str = "text";

impl Inner {
    /// Parses inner JSON bytes, and checks the fields of its kind.
    pub fn parse(bytes: &[u8]) -> Result<Self, InnerError> {
        let inner: Inner = serde_json::from_slice(bytes)?;
        if inner.kind.as_deref() == Some(KIND_RECEIPT) {
            let receipt = inner
                .receipt
                .as_ref()
                .ok_or(InnerError::BadBody { field: "receipt" })?;
            if receipt.ids.is_empty() || receipt.ids.len() > MAX_RECEIPT_IDS {
                return Err(InnerError::ReceiptIdCount {
                    count: receipt.ids.len(),
                });
            }
            if !receipt.ids.iter().all(|id| is_message_id(id)) {
                return Err(InnerError::ReceiptId);
            }
        }
        if inner.kind.as_deref() == Some(KIND_PRESENCE) {
            let p = inner
                .presence
                .as_ref()
                .ok_or(InnerError::BadBody { field: "presence" })?;
            if p.note.len() > MAX_PRESENCE_NOTE {
                return Err(InnerError::PresenceNoteLength { len: p.note.len() });
            }
            let lasts = p.expires.saturating_sub(inner.timestamp);
            if p.status != PresenceStatus::Offline && !(1..=MAX_PRESENCE_TTL_MS).contains(&lasts) {
                return Err(InnerError::PresenceExpiry { lasts });
            }
        }
        use crate::files as f;
        match inner.kind.as_deref() {
            Some(f::KIND_FILE) => inner
                .file
                .as_ref()
                .ok_or(InnerError::BadBody { field: "file" })?
                .check()?,
            Some(f::KIND_FILE_CHUNK) => f::check_ref(
                &inner
                    .chunk
                    .as_ref()
                    .ok_or(InnerError::BadBody { field: "chunk" })?
                    .file,
            )?,
            Some(f::KIND_FILE_ACK) => f::check_ref(
                &inner
                    .file_ack
                    .as_ref()
                    .ok_or(InnerError::BadBody { field: "file_ack" })?
                    .file,
            )?,
            Some(f::KIND_FILE_CANCEL) => {
                let c = inner.file_cancel.as_ref().ok_or(InnerError::BadBody {
                    field: "file_cancel",
                })?;
                f::check_ref(&c.file)?;
                f::check_reason(&c.reason)?;
            }
            _ => {}
        }
        Ok(inner)
    }

    /// The message's kind.
    pub fn kind(&self) -> Kind<'_> {
        match (self.kind.as_deref(), &self.receipt) {
            (None | Some(KIND_TEXT), _) => Kind::Text,
            (Some(KIND_RECEIPT), Some(receipt)) => Kind::Receipt(receipt),
            (Some(KIND_PRESENCE), _) if self.presence.is_some() => self
                .presence
                .as_ref()
                .map_or(Kind::Unknown(KIND_PRESENCE), Kind::Presence),
            (Some(crate::files::KIND_FILE), _) if self.file.is_some() => self
                .file
                .as_ref()
                .map_or(Kind::Unknown(KIND_TEXT), Kind::File),
            (Some(crate::files::KIND_FILE_CHUNK), _) if self.chunk.is_some() => self
                .chunk
                .as_ref()
                .map_or(Kind::Unknown(KIND_TEXT), Kind::Chunk),
            (Some(crate::files::KIND_FILE_ACK), _) if self.file_ack.is_some() => self
                .file_ack
                .as_ref()
                .map_or(Kind::Unknown(KIND_TEXT), Kind::FileAck),
            (Some(crate::files::KIND_FILE_CANCEL), _) if self.file_cancel.is_some() => self
                .file_cancel
                .as_ref()
                .map_or(Kind::Unknown(KIND_TEXT), Kind::FileCancel),
            (Some(other), _) => Kind::Unknown(other),
        }
    }

    /// Serialises as Go's `json.Marshal` of the original struct: keys in the order
    /// from, to, timestamp, message (then id when present), compact, HTML-safe escapes.
    pub fn to_go_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.message.len() + 96);
        out.push_str("{\"from\":");
        push_go_string(&mut out, &self.from);
        out.push_str(",\"to\":");
        push_go_string(&mut out, &self.to);
        out.push_str(",\"timestamp\":");
        out.push_str(&self.timestamp.to_string());
        out.push_str(",\"message\":");
        push_go_string(&mut out, &self.message);
        if let Some(id) = &self.id {
            out.push_str(",\"id\":");
            push_go_string(&mut out, id);
        }
        if let Some(kind) = &self.kind {
            out.push_str(",\"kind\":");
            push_go_string(&mut out, kind);
        }
        if let Some(r) = &self.receipt {
            out.push_str(",\"receipt\":{\"state\":");
            push_go_string(&mut out, r.state.as_str());
            out.push_str(",\"ids\":[");
            for (i, id) in r.ids.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_go_string(&mut out, id);
            }
            out.push_str("]}");
        }
        if let Some(p) = &self.presence {
            out.push_str(",\"presence\":{\"status\":");
            push_go_string(&mut out, p.status.as_str());
            out.push_str(",\"note\":");
            push_go_string(&mut out, &p.note);
            out.push_str(",\"expires\":");
            out.push_str(&p.expires.to_string());
            out.push('}');
        }
        if let Some(f) = &self.file {
            out.push_str(",\"file\":{\"id\":");
            push_go_string(&mut out, &f.id);
            out.push_str(",\"name\":");
            push_go_string(&mut out, &f.name);
            out.push_str(&format!(",\"size\":{},\"sha256\":", f.size));
            push_go_string(&mut out, &f.sha256);
            out.push_str(",\"media_type\":");
            push_go_string(&mut out, &f.media_type);
            out.push_str(&format!(",\"chunk_size\":{}", f.chunk_size));
            if f.probe != 0 {
                out.push_str(&format!(",\"probe\":{}", f.probe));
            }
            out.push('}');
        }
        if let Some(c) = &self.chunk {
            out.reserve(c.data.len() * 4 / 3 + 96);
            out.push_str(",\"chunk\":{\"file\":");
            push_go_string(&mut out, &c.file);
            out.push_str(&format!(",\"index\":{},\"data\":\"", c.index));
            // base64url needs no JSON escaping.
            out.push_str(&crate::b64::encode(&c.data));
            out.push_str("\"}");
        }
        if let Some(a) = &self.file_ack {
            out.push_str(",\"file_ack\":{\"file\":");
            push_go_string(&mut out, &a.file);
            out.push_str(&format!(",\"have\":{}", a.have));
            if a.probe != 0 {
                out.push_str(&format!(",\"probe\":{}", a.probe));
            }
            out.push('}');
        }
        if let Some(c) = &self.file_cancel {
            out.push_str(",\"file_cancel\":{\"file\":");
            push_go_string(&mut out, &c.file);
            out.push_str(",\"reason\":");
            push_go_string(&mut out, &c.reason);
            out.push('}');
        }
        if self.receipts {
            out.push_str(",\"receipts\":true");
        }
        out.push('}');
        out.into_bytes()
    }
}

/// Why [`Inner::parse`] refused inner JSON: it is not an inner message, or it is of a
/// known kind whose body is missing or out of bounds. A kind this code does not know is
/// no error (it parses, as [`Kind::Unknown`], and the receiver refuses it by name). A
/// type of its own so that a caller can tell malformed JSON from a bad body by variant,
/// not by message; frames carry its message in [`crate::frame::FrameError::Inner`]
/// (counted `bad_inner`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InnerError {
    /// Not a JSON object with the inner fields (serde_json's message).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A known kind whose body field is absent or of a shape this code does not read.
    #[error("a {field} without a valid `{field}` field")]
    BadBody {
        /// The body's field, which is also the kind's name (`chunk` for `file_chunk`).
        field: &'static str,
    },
    /// A receipt of no ids, or of more than [`MAX_RECEIPT_IDS`].
    #[error("a receipt names {count} ids; 1 to {MAX_RECEIPT_IDS} are allowed")]
    ReceiptIdCount {
        /// How many it names.
        count: usize,
    },
    /// A receipt id that is not a v2 message id.
    #[error("a receipt id is not 16 bytes of base64url")]
    ReceiptId,
    /// A presence note over [`MAX_PRESENCE_NOTE`] bytes.
    #[error("a presence note of {len} bytes; at most {MAX_PRESENCE_NOTE}")]
    PresenceNoteLength {
        /// Its length in bytes.
        len: usize,
    },
    /// A presence (not offline) that expires at or before its timestamp, or more than
    /// [`MAX_PRESENCE_TTL_MS`] after it.
    #[error("a presence that expires {lasts} ms after its timestamp; 1 ms to a day")]
    PresenceExpiry {
        /// `expires - timestamp`, in ms.
        lasts: i64,
    },
    /// A field of a file kind ([`crate::files`]).
    #[error(transparent)]
    File(#[from] FileError),
}

/// Whether `id` is a v2 message id: 16 bytes, base64url with padding.
pub fn is_message_id(id: &str) -> bool {
    crate::b64::decode(id).map(|b| b.len()) == Some(ID_BYTES)
}

/// Appends `s` as a JSON string the way Go's encoder does with HTML escaping on.
pub fn push_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_go_writes() {
        let inner = Inner {
            from: "alice".into(),
            to: "bob".into(),
            timestamp: 1735689601000,
            message: "a\"b\\c\nd\te<f>&\u{1}\u{8}\u{c}\u{2028}ą🙂\u{7f}".into(),
            id: None,
            kind: None,
            receipt: None,
            presence: None,
            file: None,
            chunk: None,
            file_ack: None,
            file_cancel: None,
            receipts: false,
        };
        assert_eq!(
            String::from_utf8(inner.to_go_json()).unwrap(),
            "{\"from\":\"alice\",\"to\":\"bob\",\"timestamp\":1735689601000,\"message\":\
             \"a\\\"b\\\\c\\nd\\te\\u003cf\\u003e\\u0026\\u0001\\u0008\\u000c\\u2028ą🙂\u{7f}\"}"
        );
        assert_eq!(Inner::parse(&inner.to_go_json()).unwrap(), inner);
    }

    #[test]
    fn reads_any_order_and_ignores_unknown_fields() {
        let inner =
            Inner::parse(br#"{ "message":"hi","x":[1],"timestamp":5,"to":"bob","from":"al" }"#)
                .unwrap();
        assert_eq!(inner.message, "hi");
        assert_eq!(inner.id, None);
        assert!(Inner::parse(br#"{"from":"a","to":"b","message":"m"}"#).is_err());
        assert!(
            Inner::parse(br#"{"from":"a","from":"b","to":"b","timestamp":1,"message":"m"}"#)
                .is_err()
        );
    }

    const ID: &str = "AAAAAAAAAAAAAAAAAAAAAA==";

    #[test]
    fn a_receipt_round_trips_and_is_checked() {
        let inner = Inner {
            from: "bob".into(),
            to: "alice".into(),
            timestamp: 7,
            message: String::new(),
            id: Some(ID.into()),
            kind: Some(KIND_RECEIPT.into()),
            receipt: Some(Receipt {
                state: ReceiptState::Read,
                ids: vec![ID.into(), "AQEBAQEBAQEBAQEBAQEBAQ==".into()],
            }),
            presence: None,
            file: None,
            chunk: None,
            file_ack: None,
            file_cancel: None,
            receipts: false,
        };
        let json = String::from_utf8(inner.to_go_json()).unwrap();
        assert_eq!(
            json,
            format!(
                "{{\"from\":\"bob\",\"to\":\"alice\",\"timestamp\":7,\"message\":\"\",\"id\":\"{ID}\",\
                 \"kind\":\"receipt\",\"receipt\":{{\"state\":\"read\",\"ids\":[\"{ID}\",\"AQEBAQEBAQEBAQEBAQEBAQ==\"]}}}}"
            )
        );
        let back = Inner::parse(json.as_bytes()).unwrap();
        assert_eq!(back, inner);
        assert!(
            matches!(back.kind(), Kind::Receipt(r) if r.state == ReceiptState::Read && r.ids.len() == 2)
        );

        let head = r#""from":"b","to":"a","timestamp":1,"message":"","id":"AAAAAAAAAAAAAAAAAAAAAA==","kind":"receipt""#;
        for (body, why) in [
            (String::new(), "no receipt field"),
            (
                r#","receipt":{"state":"read","ids":[]}"#.to_owned(),
                "no ids",
            ),
            (
                r#","receipt":{"state":"seen","ids":["AAAAAAAAAAAAAAAAAAAAAA=="]}"#.to_owned(),
                "unknown state",
            ),
            (
                r#","receipt":{"state":"read","ids":["short"]}"#.to_owned(),
                "bad id",
            ),
            (
                format!(
                    r#","receipt":{{"state":"read","ids":[{}]}}"#,
                    vec![format!("\"{ID}\""); MAX_RECEIPT_IDS + 1].join(",")
                ),
                "too many ids",
            ),
        ] {
            let json = format!("{{{head}{body}}}");
            assert!(Inner::parse(json.as_bytes()).is_err(), "{why}: {json}");
        }
    }

    #[test]
    fn a_presence_round_trips_and_is_checked() {
        let inner = Inner {
            from: "bob".into(),
            to: "alice".into(),
            timestamp: 1_000,
            message: String::new(),
            id: Some(ID.into()),
            kind: Some(KIND_PRESENCE.into()),
            receipt: None,
            presence: Some(PresenceBody {
                status: PresenceStatus::Away,
                note: "at <lunch>".into(),
                expires: 61_000,
            }),
            file: None,
            chunk: None,
            file_ack: None,
            file_cancel: None,
            receipts: false,
        };
        let json = String::from_utf8(inner.to_go_json()).unwrap();
        assert!(
            json.ends_with(r#""kind":"presence","presence":{"status":"away","note":"at \u003clunch\u003e","expires":61000}}"#),
            "{json}"
        );
        let back = Inner::parse(json.as_bytes()).unwrap();
        assert_eq!(back, inner);
        assert!(matches!(back.kind(), Kind::Presence(p) if p.status == PresenceStatus::Away));
        let head = r#""from":"b","to":"a","timestamp":1000,"message":"","id":"AAAAAAAAAAAAAAAAAAAAAA==","kind":"presence""#;
        let long = "x".repeat(MAX_PRESENCE_NOTE + 1);
        for (body, why) in [
            (String::new(), "no presence field"),
            (
                r#","presence":{"status":"online","expires":1000}"#.to_owned(),
                "expires at its timestamp",
            ),
            (r#","presence":{"status":"online"}"#.to_owned(), "no expiry"),
            (
                format!(
                    r#","presence":{{"status":"busy","expires":{}}}"#,
                    1000 + MAX_PRESENCE_TTL_MS + 1
                ),
                "over a day",
            ),
            (
                r#","presence":{"status":"asleep","expires":2000}"#.to_owned(),
                "unknown status",
            ),
            (
                format!(r#","presence":{{"status":"online","note":"{long}","expires":2000}}"#),
                "long note",
            ),
        ] {
            let json = format!("{{{head}{body}}}");
            assert!(Inner::parse(json.as_bytes()).is_err(), "{why}: {json}");
        }
        let why = |body: &str| {
            Inner::parse(format!("{{{head}{body}}}").as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(why(""), "a presence without a valid `presence` field");
        assert_eq!(
            why(r#","presence":{"status":"online","expires":1000}"#),
            "a presence that expires 0 ms after its timestamp; 1 ms to a day"
        );
        assert!(matches!(
            Inner::parse(
                br#"{"from":"a","to":"b","timestamp":1,"message":"","kind":"file_chunk"}"#
            ),
            Err(InnerError::BadBody { field: "chunk" })
        ));
        assert!(matches!(
            Inner::parse(b"not json"),
            Err(InnerError::Json(_))
        ));
        let offline = format!(r#"{{{head},"presence":{{"status":"offline"}}}}"#);
        assert!(matches!(
            Inner::parse(offline.as_bytes()).unwrap().kind(),
            Kind::Presence(p) if p.status == PresenceStatus::Offline && p.expires == 0
        ));
    }

    #[test]
    fn texts_and_unknown_kinds() {
        let plain = Inner::parse(br#"{"from":"a","to":"b","timestamp":1,"message":"m"}"#).unwrap();
        assert_eq!(plain.kind(), Kind::Text);
        assert!(!plain.receipts);
        let asks = Inner::parse(
            br#"{"from":"a","to":"b","timestamp":1,"message":"m","kind":"text","receipts":true}"#,
        )
        .unwrap();
        assert_eq!(asks.kind(), Kind::Text);
        assert!(asks.receipts);
        assert!(String::from_utf8(asks.to_go_json())
            .unwrap()
            .ends_with(r#""kind":"text","receipts":true}"#));
        let later = Inner::parse(
            br#"{"from":"a","to":"b","timestamp":1,"message":"","kind":"hologram","hologram":{}}"#,
        )
        .unwrap();
        assert_eq!(later.kind(), Kind::Unknown("hologram"));
        // A receipt's fields on a text change nothing: the kind decides.
        let stray = Inner::parse(
            br#"{"from":"a","to":"b","timestamp":1,"message":"m","receipt":{"state":"read","ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(stray.kind(), Kind::Text);
    }

    #[test]
    fn the_file_kinds_round_trip_and_are_checked() {
        use crate::files::*;
        let base = || Inner {
            from: "alice".into(),
            to: "bob".into(),
            timestamp: 5,
            message: String::new(),
            id: Some(ID.into()),
            kind: None,
            receipt: None,
            presence: None,
            file: None,
            chunk: None,
            file_ack: None,
            file_cancel: None,
            receipts: false,
        };
        let offer = FileOffer {
            id: ID.into(),
            name: "r<e>port.pdf".into(),
            size: 3000,
            sha256: "0f".repeat(32),
            media_type: "application/pdf".into(),
            chunk_size: 1024,
            probe: 9,
        };
        let all = [
            Inner {
                kind: Some(KIND_FILE.into()),
                file: Some(offer.clone()),
                receipts: true,
                ..base()
            },
            Inner {
                kind: Some(KIND_FILE_CHUNK.into()),
                chunk: Some(FileChunk {
                    file: ID.into(),
                    index: 2,
                    data: vec![1, 2, 3],
                }),
                ..base()
            },
            Inner {
                kind: Some(KIND_FILE_ACK.into()),
                file_ack: Some(FileAck {
                    file: ID.into(),
                    have: 2,
                    probe: 9,
                }),
                ..base()
            },
            Inner {
                kind: Some(KIND_FILE_CANCEL.into()),
                file_cancel: Some(FileCancel {
                    file: ID.into(),
                    reason: "too_large".into(),
                }),
                ..base()
            },
        ];
        for inner in &all {
            let json = inner.to_go_json();
            assert_eq!(
                &Inner::parse(&json).unwrap(),
                inner,
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
        let json = String::from_utf8(all[0].to_go_json()).unwrap();
        assert!(json.contains(r#""kind":"file","file":{"id":"AAAAAAAAAAAAAAAAAAAAAA==","name":"r\u003ce\u003eport.pdf","size":3000,"#), "{json}");
        assert!(
            matches!(Inner::parse(json.as_bytes()).unwrap().kind(), Kind::File(o) if o.probe == 9)
        );
        let json = String::from_utf8(all[1].to_go_json()).unwrap();
        assert!(
            json.ends_with(
                r#""chunk":{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":2,"data":"AQID"}}"#
            ),
            "{json}"
        );

        let head =
            r#""from":"a","to":"b","timestamp":1,"message":"","id":"AAAAAAAAAAAAAAAAAAAAAA==""#;
        for (body, why) in [
            (r#","kind":"file""#, "no file field"),
            (
                r#","kind":"file","file":{"id":"AAAAAAAAAAAAAAAAAAAAAA==","name":"../x","size":1,"sha256":"0000000000000000000000000000000000000000000000000000000000000000","media_type":"a/b","chunk_size":1024}"#,
                "a path as name",
            ),
            (
                r#","kind":"file_chunk","chunk":{"file":"short","index":0,"data":"AQID"}"#,
                "bad file id",
            ),
            (
                r#","kind":"file_chunk","chunk":{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":0,"data":"AQI"}"#,
                "unpadded data",
            ),
            (
                r#","kind":"file_chunk","chunk":{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":-1,"data":"AQID"}"#,
                "negative index",
            ),
            (
                r#","kind":"file_ack","file_ack":{"file":"AAAAAAAAAAAAAAAAAAAAAA=="}"#,
                "no have",
            ),
            (
                r#","kind":"file_cancel","file_cancel":{"file":"AAAAAAAAAAAAAAAAAAAAAA==","reason":"Bad Reason"}"#,
                "reason",
            ),
        ] {
            let json = format!("{{{head}{body}}}");
            assert!(Inner::parse(json.as_bytes()).is_err(), "{why}: {json}");
        }
    }

    /// The fuzz target `inner_parse` starts from these (proto/fuzz/seeds/inner_parse):
    /// each parses, to the kind its name says, and writes back to itself.
    #[test]
    fn the_inner_parse_fuzz_seeds_parse_to_their_kinds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/inner_parse");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let inner = Inner::parse(bytes.trim_ascii_end()).unwrap();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let kind = match inner.kind() {
                Kind::Text => "text",
                Kind::Receipt(_) => KIND_RECEIPT,
                Kind::Presence(_) => KIND_PRESENCE,
                Kind::File(_) => crate::files::KIND_FILE,
                Kind::Chunk(_) => crate::files::KIND_FILE_CHUNK,
                Kind::FileAck(_) => crate::files::KIND_FILE_ACK,
                Kind::FileCancel(_) => crate::files::KIND_FILE_CANCEL,
                Kind::Unknown(k) => panic!("{name}: unknown kind {k}"),
            };
            assert_eq!(kind, name, "{}", path.display());
            assert_eq!(Inner::parse(&inner.to_go_json()).unwrap(), inner);
            seen += 1;
        }
        assert!(seen >= 7, "{seen} seeds");
    }

    /// Readers ignore fields they do not know: on a text, a field that happens to have the
    /// name of a kind's body (another client's, or a later release's) changes nothing.
    #[test]
    fn a_kind_body_on_another_kind_is_an_unknown_field() {
        let text = Inner::parse(
            br#"{"from":"a","to":"b","timestamp":1,"message":"m","file":5,"chunk":"x","receipt":[1],"presence":{"status":"dancing"},"file_ack":null,"file_cancel":{},"receipts":"yes"}"#,
        )
        .unwrap();
        assert_eq!(text.kind(), Kind::Text);
        assert_eq!((text.file, text.chunk, text.receipts), (None, None, false));
        assert!(Inner::parse(
            br#"{"from":"a","to":"b","timestamp":1,"message":"","kind":"file","file":5}"#
        )
        .is_err());
    }
}
