//! `nes presence [online|away|busy|invisible] [--note TEXT] [--json]`: this identity's
//! presence. Without a status it shows the one set (`nes presence USER` is not a form:
//! a contact's presence is in `nes contacts`). nesd tells the contacts that have talked
//! with it, encrypted to each (docs/PROTOCOL.md "Presence"); `invisible` tells them
//! "offline" once and then nothing.

use crate::error::{usage, CliError};
use crate::output::{local_time, print_json, print_line};
use crate::Ctx;
use nes_proto::names::{presence_name, presence_of_name};
use nes_proto::rpc::{Presence, PresenceStatus};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// online, away, busy or invisible (none: show the presence set).
    #[arg(value_name = "STATUS")]
    pub status: Option<String>,
    /// A short note shown with it ("at lunch"; at most 256 bytes). Empty clears it.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let mut client = ctx.client().await?;
    let presence = match args.status.as_deref() {
        None if args.note.is_some() => {
            // A new note for the status already set.
            let own = client.presence("").await?;
            let status = PresenceStatus::try_from(own.status).unwrap_or(PresenceStatus::Online);
            client
                .set_presence(status, args.note.as_deref().unwrap_or_default())
                .await?
        }
        None => client.presence("").await?,
        Some(name) => {
            let status = presence_of_name(&name.trim().to_lowercase()).ok_or_else(|| {
                usage(format!(
                    "presence {name:?}: give online, away, busy or invisible"
                ))
            })?;
            let note = match &args.note {
                Some(n) => n.clone(),
                // Changing the status keeps the note unless one is given.
                None => client.presence("").await?.note,
            };
            client.set_presence(status, &note).await?
        }
    };
    if args.json {
        print_json(&presence_json(&presence))
    } else {
        print_line(&presence_text(&presence))
    }
}

/// A presence for people: `away (at lunch)`, `offline (last seen 2024-05-01 12:03:04)`.
/// The note came from the network: it is shown through `nes_client::display`.
pub fn presence_text(p: &Presence) -> String {
    let mut text = presence_name(p.status).to_owned();
    if !p.note.is_empty() {
        text.push_str(&format!(" ({})", nes_client::display::line(&p.note)));
    }
    if p.status == PresenceStatus::Offline as i32 && p.last_seen_ms > 0 {
        text.push_str(&format!(", last seen {}", local_time(p.last_seen_ms)));
        if p.expired {
            text.push_str(" (not heard from since)");
        }
    }
    text
}

/// A presence as JSON: status, note, last_seen (Unix ms), expires, expired.
pub fn presence_json(p: &Presence) -> serde_json::Value {
    json!({
        "username": p.username,
        "status": presence_name(p.status),
        "note": p.note,
        "last_seen": p.last_seen_ms,
        "expires": p.expires_ms,
        "expired": p.expired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_is_shown_with_its_note_escaped_and_last_seen() {
        let p = Presence {
            username: "bob".into(),
            status: PresenceStatus::Away as i32,
            note: "at lunch\u{1b}[2J".into(),
            last_seen_ms: 1,
            expires_ms: 2,
            expired: false,
        };
        let text = presence_text(&p);
        assert!(text.starts_with("away (at lunch"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        let gone = Presence {
            status: PresenceStatus::Offline as i32,
            note: String::new(),
            expired: true,
            ..p.clone()
        };
        let text = presence_text(&gone);
        assert!(text.starts_with("offline, last seen"), "{text}");
        assert!(text.ends_with("(not heard from since)"), "{text}");
        let v = presence_json(&gone);
        assert_eq!(v["status"], "offline");
        assert_eq!(v["expired"], true);
    }
}
