//! How messages look: JSON lines for scripts, one short line for people.
//!
//! The JSON line of a message (`history --json`, `listen --json`, `send --json`) has the
//! fields of frontends/README.md and a few more:
//!
//! ```json
//! {"id":"..","from":"alice","to":"bob","peer":"alice","timestamp":1700000000000,
//!  "message":"hi","direction":"incoming","state":"received","read":false,
//!  "stored_at":1700000000123,"wire_version":2,"cursor":"3f9a0c1d2e4b5a67-42-9c1e33ab"}
//! ```
//! `timestamp` is the sender's inner timestamp (Unix ms); `cursor` only on `listen` (an
//! opaque string naming the daemon's store and the event: give it back to `--since`);
//! `error` only when the daemon gave one (failed or held messages). The text appears
//! once, as `message`. A file message has an empty `message` and a `file` object:
//! `{"id","name","size","sha256","media_type","state","transferred"}`, plus `path` once
//! the file is complete here and `error` when its transfer failed or was cancelled.

use crate::error::CliError;
use nes_proto::rpc::{Direction, FileInfo, FileState, Message, MessageState};
use std::io::Write;

/// One message as a JSON line, fields in this order (a struct, so the order is the
/// declaration's rather than alphabetical). `cursor` only on event-stream output,
/// `error` only when the daemon gave one.
#[derive(Debug, serde::Serialize)]
pub struct MessageLine<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    peer: &'a str,
    timestamp: i64,
    message: &'a str,
    direction: &'static str,
    state: &'static str,
    read: bool,
    stored_at: i64,
    wire_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<FileJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
}

/// The `file` object of a file message's JSON line.
#[derive(Debug, serde::Serialize)]
pub struct FileJson<'a> {
    id: &'a str,
    name: &'a str,
    size: u64,
    sha256: &'a str,
    media_type: &'a str,
    state: &'static str,
    transferred: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn file_json(f: &FileInfo) -> FileJson<'_> {
    FileJson {
        id: &f.id,
        name: &f.name,
        size: f.size,
        sha256: &f.sha256,
        media_type: &f.media_type,
        state: file_state_name(f.state),
        transferred: f.transferred,
        path: (!f.path.is_empty()).then_some(f.path.as_str()),
        error: (!f.error.is_empty()).then_some(f.error.as_str()),
    }
}

/// A file for people: `[file] report.pdf (1.2 MB)`, with its state while not complete.
pub fn file_text(f: &FileInfo) -> String {
    use nes_client::display::line;
    let size = nes_proto::files::human_size(f.size);
    let state = match FileState::try_from(f.state) {
        Ok(FileState::Complete) => String::new(),
        Ok(FileState::Sending | FileState::Receiving) => format!(
            " {} {}%",
            file_state_name(f.state),
            percent(f.transferred, f.size)
        ),
        _ => format!(" {}", file_state_name(f.state)),
    };
    format!("[file] {} ({size}){state}", line(&f.name))
}

/// Whole percent of `size` that `done` is (100 for an empty file).
pub fn percent(done: u64, size: u64) -> u64 {
    done.min(size)
        .saturating_mul(100)
        .checked_div(size)
        .unwrap_or(100)
}

/// The JSON line of one message; `cursor` is added for event-stream output.
pub fn message_json<'a>(message: &'a Message, cursor: Option<&'a str>) -> MessageLine<'a> {
    MessageLine {
        id: &message.id,
        from: &message.from,
        to: &message.to,
        peer: &message.peer,
        timestamp: message.timestamp_ms,
        message: &message.text,
        direction: direction_name(message.direction),
        state: state_name(message.state),
        read: message.read,
        stored_at: message.stored_at_ms,
        wire_version: message.wire_version,
        error: (!message.error.is_empty()).then_some(message.error.as_str()),
        file: message.file.as_ref().map(file_json),
        cursor,
    }
}

// The names every frontend and the D-Bus API show: one definition, in nes-proto.
pub use nes_proto::names::{direction_name, file_state_name, state_name};

/// A short mark of an outgoing message's delivery state, as chat and history show it:
/// `…` queued, `✓` sent (the broker has it), `✓✓` delivered (the recipient's nesd stored
/// it), `✓✓ read` (its user read it), `✗` failed.
pub fn state_mark(state: i32) -> &'static str {
    match MessageState::try_from(state) {
        Ok(MessageState::Queued) => "…",
        Ok(MessageState::Sent) => "✓",
        Ok(MessageState::Delivered) => "✓✓",
        Ok(MessageState::Read) => "✓✓ read",
        Ok(MessageState::Failed) => "✗",
        Ok(MessageState::Held) => "!",
        _ => "",
    }
}

/// Local time of a Unix-ms timestamp: `2024-05-01 12:03:04`.
pub fn local_time(ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        }
        chrono::LocalResult::None => ms.to_string(),
    }
}

/// One line for people: `[2024-05-01 12:03:04] alice → bob: text ✓`. Everything from the
/// network goes through [`nes_client::display::line`]: the text can neither send escape
/// sequences to the terminal nor start a line of its own (its newlines show as `\n`).
pub fn message_line(message: &Message) -> String {
    use nes_client::display::line;
    let mark = match Direction::try_from(message.direction) {
        Ok(Direction::Outgoing) => format!(" {}", state_mark(message.state)),
        _ if message.state == MessageState::Held as i32 => " (held: sender's keys changed)".into(),
        _ => String::new(),
    };
    let error = if message.error.is_empty() {
        String::new()
    } else {
        format!(" ({})", line(&message.error))
    };
    format!(
        "[{}] {} → {}: {}{}{}",
        local_time(message.timestamp_ms),
        line(&message.from),
        line(&message.to),
        message_body(message),
        mark,
        error
    )
}

/// What a message says, escaped for the terminal: its text, or for a file
/// `[file] report.pdf (1.2 MB)` with its state when not complete and why it stopped.
pub fn message_body(message: &Message) -> String {
    use nes_client::display::line;
    match &message.file {
        Some(f) if f.error.is_empty() => file_text(f),
        Some(f) => format!("{} ({})", file_text(f), line(&f.error)),
        None => line(&message.text),
    }
}

/// Writes one line to stdout and flushes it, so a reader of a pipe sees each line as it
/// is made. A closed pipe becomes [`CliError::BrokenPipe`] (a normal exit).
pub fn print_line(line: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes one JSON value as a line.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let line = serde_json::to_string(value)
        .map_err(|e| crate::error::user(format!("cannot encode JSON: {e}")))?;
    print_line(&line)
}

/// Drops the one line end a shell adds (`echo hi | nes send bob` sends "hi").
pub fn strip_one_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            id: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
            from: "alice".into(),
            to: "bob".into(),
            peer: "alice".into(),
            direction: Direction::Incoming as i32,
            text: "hi \"bob\"\nline 2".into(),
            timestamp_ms: 1_700_000_000_000,
            stored_at_ms: 1_700_000_000_123,
            state: MessageState::Received as i32,
            read: false,
            wire_version: 2,
            error: String::new(),
            wants_receipts: true,
            file: None,
        }
    }

    #[test]
    fn a_file_message_carries_its_file_object_and_a_short_line() {
        let mut m = sample();
        m.text = String::new();
        m.file = Some(FileInfo {
            id: m.id.clone(),
            name: "report\u{1b}.pdf".into(),
            size: 1_200_000,
            sha256: "ab".repeat(32),
            media_type: "application/pdf".into(),
            state: FileState::Receiving as i32,
            path: String::new(),
            transferred: 600_000,
            error: String::new(),
        });
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&message_json(&m, None)).unwrap()).unwrap();
        assert_eq!(v["message"], "");
        assert_eq!(v["file"]["state"], "receiving");
        assert_eq!(v["file"]["size"], 1_200_000);
        assert!(v["file"].get("path").is_none(), "no path before complete");
        let text = message_line(&m);
        assert!(
            text.ends_with("alice → bob: [file] report\\u{1b}.pdf (1.2 MB) receiving 50%"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "no escape reaches the terminal");
        if let Some(f) = m.file.as_mut() {
            f.state = FileState::Complete as i32;
            f.path = "/data/files/00".into();
            f.transferred = f.size;
        }
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&message_json(&m, None)).unwrap()).unwrap();
        assert_eq!(v["file"]["path"], "/data/files/00");
        assert!(
            message_line(&m).ends_with("(1.2 MB)"),
            "{}",
            message_line(&m)
        );
        let v = serde_json::to_value(message_json(&m, None)).unwrap();
        let mut keys: Vec<&str> = v["file"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "id",
                "media_type",
                "name",
                "path",
                "sha256",
                "size",
                "state",
                "transferred"
            ],
            "no error while there is none"
        );
        assert_eq!(v["file"]["media_type"], "application/pdf");
        assert_eq!(v["file"]["transferred"], 1_200_000);
        if let Some(f) = m.file.as_mut() {
            f.state = FileState::Cancelled as i32;
            f.path = String::new();
            f.error = "cancelled_by_sender".into();
        }
        let v = serde_json::to_value(message_json(&m, None)).unwrap();
        assert_eq!(v["file"]["state"], "cancelled");
        assert_eq!(v["file"]["error"], "cancelled_by_sender");
        assert!(v["file"].get("path").is_none());
        assert!(
            message_line(&m).ends_with("(1.2 MB) cancelled (cancelled_by_sender)"),
            "{}",
            message_line(&m)
        );
        assert!(serde_json::to_string(&message_json(&sample(), None))
            .unwrap()
            .find("\"file\"")
            .is_none());
    }

    #[test]
    fn json_line_has_the_design_fields_and_text_once() {
        let line = serde_json::to_string(&message_json(
            &sample(),
            Some("3f9a0c1d2e4b5a67-42-9c1e33ab"),
        ))
        .unwrap();
        assert!(
            line.starts_with(
                "{\"id\":\"AAAAAAAAAAAAAAAAAAAAAA==\",\"from\":\"alice\",\"to\":\"bob\""
            ),
            "{line}"
        );
        assert!(!line.contains('\n'), "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], "AAAAAAAAAAAAAAAAAAAAAA==");
        assert_eq!(v["from"], "alice");
        assert_eq!(v["to"], "bob");
        assert_eq!(v["timestamp"], 1_700_000_000_000i64);
        assert_eq!(v["message"], "hi \"bob\"\nline 2");
        assert_eq!(v["direction"], "incoming");
        assert_eq!(v["state"], "received");
        assert_eq!(v["cursor"], "3f9a0c1d2e4b5a67-42-9c1e33ab");
        assert!(v.get("error").is_none());
        assert_eq!(line.matches("line 2").count(), 1, "the text appears once");
    }

    #[test]
    fn percents() {
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(5, 3), 100);
    }

    #[test]
    fn history_json_has_no_cursor() {
        let v = serde_json::to_value(message_json(&sample(), None)).unwrap();
        assert!(v.get("cursor").is_none());
    }

    #[test]
    fn names_of_states_and_directions() {
        assert_eq!(state_name(MessageState::Delivered as i32), "delivered");
        assert_eq!(state_name(MessageState::Held as i32), "held");
        assert_eq!(state_name(99), "unknown");
        assert_eq!(direction_name(Direction::Outgoing as i32), "outgoing");
        assert_eq!(direction_name(0), "unknown");
    }

    #[test]
    fn human_line_marks_outgoing_state() {
        let mut m = sample();
        m.direction = Direction::Outgoing as i32;
        m.state = MessageState::Sent as i32;
        assert!(
            message_line(&m).ends_with("line 2 ✓"),
            "{}",
            message_line(&m)
        );
        m.state = MessageState::Delivered as i32;
        assert!(message_line(&m).ends_with(" ✓✓"), "{}", message_line(&m));
        m.state = MessageState::Read as i32;
        assert!(
            message_line(&m).ends_with(" ✓✓ read"),
            "{}",
            message_line(&m)
        );
        m.state = MessageState::Failed as i32;
        m.error = "no keys".into();
        assert!(message_line(&m).contains("✗ (no keys)"));
    }

    #[test]
    fn human_line_escapes_what_the_sender_wrote() {
        let mut m = sample();
        m.text = "\x1b]0;pwned\x07\x1b[2J\rx\nmallory: fake line\u{202e}a\u{200b}b".into();
        let shown = message_line(&m);
        assert!(
            !shown.contains(['\x1b', '\x07', '\r', '\n', '\u{202e}', '\u{200b}']),
            "{shown:?}"
        );
        assert!(shown.contains("alice → bob: \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\rx\\nmallory: fake line\\u{202e}a\\u{200b}b"), "{shown}");
        // --json keeps the exact text.
        let v = serde_json::to_value(message_json(&m, None)).unwrap();
        assert_eq!(v["message"], m.text.as_str());
    }

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(strip_one_newline("hi\n".into()), "hi");
        assert_eq!(strip_one_newline("hi\r\n".into()), "hi");
        assert_eq!(strip_one_newline("hi\n\n".into()), "hi\n");
        assert_eq!(strip_one_newline("hi".into()), "hi");
    }
}
