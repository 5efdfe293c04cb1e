//! The inner message: the JSON that is signed and encrypted inside a frame.
//!
//! `{"from": .., "to": .., "timestamp": <unix ms>, "message": ..}`, plus `"id"` in v2.
//! We write it as Go's `json.Marshal` does (field order, HTML-safe escaping), so a v1
//! frame we seal is byte-for-byte what the original would have sealed for the same
//! fields; we read any valid JSON object with those fields and ignore unknown ones, so
//! later kinds of message (files, receipts) can add fields.

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
}

impl Inner {
    /// Parses inner JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
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
        out.push('}');
        out.into_bytes()
    }
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
}
