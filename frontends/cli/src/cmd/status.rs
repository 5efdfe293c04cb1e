//! `nes status`: who the daemon is and how it is doing.
//!
//! Exit 0 when a daemon answers, 3 when none does: `nes status >/dev/null` is the way
//! for scripts to ask "is nesd up?".

use crate::error::CliError;
use crate::output::print_line;
use crate::Ctx;
use nes_proto::rpc::StatusReply;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let status = ctx.client().await?.status().await?;
    if args.json {
        print_line(&status_json(&status, &ctx.socket.display().to_string()).to_string())
    } else {
        for line in status_text(&status, &ctx.socket.display().to_string()) {
            print_line(&line)?;
        }
        Ok(())
    }
}

/// The `--json` object: every field of `StatusReply`, plus the socket.
pub fn status_json(s: &StatusReply, socket: &str) -> serde_json::Value {
    let refused: serde_json::Map<String, serde_json::Value> = s
        .refused
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "user": s.user,
        "version": s.version,
        "connected": s.connected,
        "broker": s.broker,
        "broker_protocol": s.broker_protocol,
        "broker_error": s.broker_error,
        "keyserver": s.keyserver,
        "queued": s.queued,
        "refused": refused,
        "received": s.received,
        "sent": s.sent,
        "last_cursor": s.last_cursor,
        "uptime_seconds": s.uptime_seconds,
        "client_id": s.client_id,
        "unread": s.unread,
        "pid": s.pid,
        "waiting": s.waiting,
        "inbox": s.inbox,
        "store_id": s.store_id,
        "last_log_cursor": s.last_log_cursor,
        "prekey": {
            "id": s.prekey_id,
            "expires_ms": s.prekey_expires_ms,
            "published": s.prekey_published,
            "waiting": s.prekey_waiting,
            "next_try_ms": s.prekey_next_try_ms,
        },
        "sent_by_version": {"v1": s.sent_v1, "v2": s.sent_v2, "v3": s.sent_v3},
        "received_by_version": {"v1": s.received_v1, "v2": s.received_v2, "v3": s.received_v3},
        "prekeys_lost": s.prekeys_lost,
        "receipts": {"received": s.receipts_received, "sent": s.receipts_sent},
        "presence": {"received": s.presence_received, "sent": s.presence_sent},
        "file_chunks": {"received": s.file_chunks_received, "sent": s.file_chunks_sent},
        "socket": socket,
    })
}

/// The text lines for people.
pub fn status_text(s: &StatusReply, socket: &str) -> Vec<String> {
    let mut refused: Vec<_> = s.refused.iter().filter(|(_, n)| **n > 0).collect();
    refused.sort();
    let refused = if refused.is_empty() {
        "none".to_string()
    } else {
        refused
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines = vec![
        format!(
            "nesd {} (pid {}), up {}, socket {socket}",
            s.version,
            s.pid,
            duration(s.uptime_seconds)
        ),
        format!("user:       {}", s.user),
        format!(
            "broker:     {} ({}){}",
            s.broker,
            connection_text(s),
            protocol_text(s)
        ),
        format!("client id:  {}", s.client_id),
        format!("key server: {}", s.keyserver),
        format!("queued:     {}", s.queued),
        format!(
            "sent:       {}   received: {}   unread: {}",
            s.sent, s.received, s.unread
        ),
        format!("refused:    {refused}"),
        format!(
            "waiting:    {} (frames waiting for their senders' keys)",
            s.waiting
        ),
        format!(
            "inbox:      {} (frames received, not yet decrypted)",
            s.inbox
        ),
        format!(
            "frames:     v1 {}   v2 {}   v3 {} (sealed and queued since the start)",
            s.sent_v1, s.sent_v2, s.sent_v3
        ),
        format!(
            "received:   v1 {}   v2 {}   v3 {} (messages stored since the start)",
            s.received_v1, s.received_v2, s.received_v3
        ),
        format!(
            "receipts:   received {}   sent {} (delivery and read receipts since the start)",
            s.receipts_received, s.receipts_sent
        ),
        format!(
            "presence:   received {}   sent {} (contacts' presence frames, and ours to them)",
            s.presence_received, s.presence_sent
        ),
        format!(
            "files:      chunks received {}   sent {} (up to 128 KiB each, since the start)",
            s.file_chunks_received, s.file_chunks_sent
        ),
        format!("prekey:     {}", prekey_text(s)),
    ];
    if !s.prekeys_lost.is_empty() {
        let names: Vec<String> = s
            .prekeys_lost
            .iter()
            .map(|n| nes_client::display::line(n))
            .collect();
        lines.push(format!(
            "LOST PREKEYS: {} had v3 prekeys and the key server has none now; they get v2 (`nes contacts show USER`)",
            names.join(", ")
        ));
    }
    lines.push(format!(
        "cursor:     {} (store {})",
        s.last_cursor, s.store_id
    ));
    lines
}

/// `connected`, `not connected`, or `not connected: <the last error>`.
fn connection_text(s: &StatusReply) -> String {
    if s.connected {
        "connected".into()
    } else if s.broker_error.is_empty() {
        "not connected".into()
    } else {
        format!("not connected: {}", s.broker_error)
    }
}

/// `, MQTT 5` or `, MQTT 3.1.1`; nothing while nesd has not decided (`broker_protocol =
/// "auto"` before any broker answered).
fn protocol_text(s: &StatusReply) -> String {
    if s.broker_protocol.is_empty() {
        String::new()
    } else {
        format!(", MQTT {}", s.broker_protocol)
    }
}

/// Where our v3 prekey stands with the key server.
fn prekey_text(s: &StatusReply) -> String {
    if s.prekey_id.is_empty() {
        return "none (contacts get v2 from us)".into();
    }
    if s.prekey_published {
        return format!(
            "{} published, expires {} (Unix ms)",
            s.prekey_id, s.prekey_expires_ms
        );
    }
    let in_secs = (s.prekey_next_try_ms - nes_proto::now_ms()).max(0) / 1000;
    format!(
        "{} waiting for the key server: {}; next try in {in_secs}s",
        s.prekey_id, s.prekey_waiting
    )
}

/// `3d 4h`, `2h 5m`, `5m 3s`, `12s`.
fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shows_refusals_sorted() {
        let mut s = StatusReply {
            user: "bob".into(),
            connected: true,
            ..Default::default()
        };
        s.refused.insert("signature".into(), 2);
        s.refused.insert("duplicate".into(), 1);
        s.refused.insert("bad_json".into(), 0);
        let text = status_text(&s, "/s").join("\n");
        assert!(
            text.contains("refused:    duplicate 1, signature 2"),
            "{text}"
        );
        assert!(text.contains("(connected)"));
        let v = status_json(&s, "/s");
        assert_eq!(v["refused"]["signature"], 2);
        assert_eq!(v["user"], "bob");
        s.broker_protocol = "5".into();
        let text = status_text(&s, "/s").join("\n");
        assert!(text.contains("(connected), MQTT 5"), "{text}");
        assert_eq!(status_json(&s, "/s")["broker_protocol"], "5");
        s.connected = false;
        s.broker_error = "I/O: connection refused".into();
        let text = status_text(&s, "/s").join("\n");
        assert!(
            text.contains("(not connected: I/O: connection refused), MQTT 5"),
            "{text}"
        );
        s.store_id = "0123456789abcdef".into();
        assert_eq!(status_json(&s, "/s")["store_id"], "0123456789abcdef");
    }

    #[test]
    fn lost_prekeys_and_received_versions_are_shown() {
        let s = StatusReply {
            received_v1: 1,
            received_v2: 2,
            received_v3: 3,
            prekeys_lost: vec!["carol".into(), "bob\u{1b}[2J".into()],
            receipts_received: 4,
            receipts_sent: 5,
            file_chunks_received: 6,
            file_chunks_sent: 7,
            ..Default::default()
        };
        let text = status_text(&s, "/s").join("\n");
        assert!(text.contains("received:   v1 1   v2 2   v3 3"), "{text}");
        assert!(text.contains("LOST PREKEYS: carol, bob"), "{text}");
        assert!(!text.contains('\u{1b}'), "escaped: {text}");
        let v = status_json(&s, "/s");
        assert_eq!(v["received_by_version"]["v3"], 3);
        assert_eq!(v["prekeys_lost"][0], "carol");
        assert!(text.contains("receipts:   received 4   sent 5"), "{text}");
        assert_eq!(v["receipts"]["sent"], 5);
        assert!(text.contains("chunks received 6   sent 7"), "{text}");
        assert_eq!(v["file_chunks"]["sent"], 7);
        let quiet = status_text(&StatusReply::default(), "/s").join("\n");
        assert!(!quiet.contains("LOST"), "{quiet}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(12), "12s");
        assert_eq!(duration(303), "5m 3s");
        assert_eq!(duration(7500), "2h 5m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d 4h");
    }
}
