//! `nes history PEER [--last N] [--json]`: a stored conversation, oldest first.
//! Without PEER: the list of conversations, most recent first, with unread counts.
//!
//! Showing a conversation marks the messages it showed read (up to the newest one shown,
//! as `nes chat` does when opened), which sends read receipts to senders that asked for
//! them unless `read_receipts = false`; `--keep-unread` leaves them unread.

use crate::error::CliError;
use crate::output::{local_time, message_json, message_line, print_json, print_line};
use crate::username::UsernameParser;
use crate::Ctx;
use nes_proto::rpc::{Direction, MessageState};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The conversation's peer (none: list conversations).
    #[arg(value_parser = UsernameParser)]
    pub peer: Option<nes_proto::Username>,
    /// Only the last N messages.
    #[arg(short = 'n', long, value_name = "N")]
    pub last: Option<u32>,
    /// JSON lines, one object per message (or conversation).
    #[arg(long)]
    pub json: bool,
    /// Leave the shown messages unread (no read receipts).
    #[arg(long)]
    pub keep_unread: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let mut client = ctx.client().await?;
    let Some(peer) = args.peer else {
        return conversations(&mut client, args.json).await;
    };
    let peer = peer.as_str();
    if args.last == Some(0) {
        return Ok(());
    }
    let messages = client.history(peer, args.last.unwrap_or(0)).await?;
    for message in &messages {
        if args.json {
            print_json(&message_json(message, None))?;
        } else {
            print_line(&message_line(message))?;
        }
    }
    if messages.is_empty() && !args.json {
        eprintln!("nes: no messages with {peer} yet");
    }
    let newest_unread = messages.iter().rev().find(|m| {
        m.direction == Direction::Incoming as i32
            && m.state == MessageState::Received as i32
            && !m.read
    });
    if let (Some(m), false) = (newest_unread, args.keep_unread) {
        client.mark_read(peer, &m.id).await?;
    }
    Ok(())
}

async fn conversations(client: &mut nes_client::Client, json_out: bool) -> Result<(), CliError> {
    let conversations = client.conversations().await?;
    for c in &conversations {
        if json_out {
            print_json(&json!({
                "peer": c.peer,
                "unread": c.unread,
                "total": c.total,
                "last": c.last.as_ref().map(|m| message_json(m, None)),
            }))?;
        } else {
            let last = c
                .last
                .as_ref()
                .map(|m| {
                    format!(
                        "[{}] {}: {}",
                        local_time(m.timestamp_ms),
                        nes_client::display::line(&m.from),
                        first_line(&m.text)
                    )
                })
                .unwrap_or_default();
            let unread = if c.unread > 0 {
                format!(" ({} unread)", c.unread)
            } else {
                String::new()
            };
            print_line(&format!(
                "{}{}  {} messages  {}",
                nes_client::display::line(&c.peer),
                unread,
                c.total,
                last
            ))?;
        }
    }
    if conversations.is_empty() && !json_out {
        eprintln!("nes: no conversations yet");
    }
    Ok(())
}

/// The first line of a text, shortened to 60 characters and escaped for the terminal
/// (`nes_client::display`).
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let shown = nes_client::display::line_max(line, 61);
    if text.lines().nth(1).is_some() && !shown.ends_with('…') {
        return format!("{shown}…");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::first_line;

    #[test]
    fn first_lines() {
        assert_eq!(first_line("hi"), "hi");
        assert_eq!(first_line("hi\nthere"), "hi…");
        assert_eq!(first_line(&"x".repeat(70)), format!("{}…", "x".repeat(60)));
        assert_eq!(first_line(""), "");
        assert_eq!(first_line("a\x1b[2Jb\rc"), "a\\u{1b}[2Jb\\rc");
    }
}
