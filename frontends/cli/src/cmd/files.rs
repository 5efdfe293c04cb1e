//! `nes files [PEER] [--json]`: the messages that carry a file, in both directions (one
//! peer's, or everyone's), oldest first.
//!
//! One line per file: time, `→ peer` (sent) or `← peer` (received), name, size, state
//! (with the percent done while it is in progress) and the id to give `nes file save` or
//! `nes file cancel`. `--json`: the JSON line of each message, as `nes history --json`
//! prints it (with its `file` object).

use crate::error::CliError;
use crate::output::{file_state_name, local_time, message_json, percent, print_json, print_line};
use crate::username::UsernameParser;
use crate::Ctx;
use nes_client::display::line;
use nes_proto::rpc::{Direction, FileState, Message};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only the files exchanged with this peer.
    #[arg(value_parser = UsernameParser)]
    pub peer: Option<nes_proto::Username>,
    /// JSON lines, one message object (with its `file`) per file.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    // Everyone's files: no peer.
    let peer = args.peer.as_ref().map_or("", |p| p.as_str());
    let mut client = ctx.client().await?;
    let messages = client.files(peer).await?;
    for message in &messages {
        if args.json {
            print_json(&message_json(message, None))?;
        } else if let Some(row) = file_row(message) {
            print_line(&row)?;
        }
    }
    if messages.is_empty() && !args.json {
        match peer {
            "" => eprintln!("nes: no files yet"),
            peer => eprintln!("nes: no files with {peer} yet"),
        }
    }
    Ok(())
}

/// One file for people:
/// `[2024-05-01 12:03:04] ← alice  report.pdf  1.2 MB  receiving 40%  <id>`
/// (`None` for a message without a file).
pub fn file_row(message: &Message) -> Option<String> {
    let file = message.file.as_ref()?;
    let arrow = match Direction::try_from(message.direction) {
        Ok(Direction::Outgoing) => "→",
        _ => "←",
    };
    let state = match FileState::try_from(file.state) {
        Ok(FileState::Sending | FileState::Receiving) => format!(
            "{} {}%",
            file_state_name(file.state),
            percent(file.transferred, file.size)
        ),
        _ => file_state_name(file.state).to_string(),
    };
    Some(format!(
        "[{}] {arrow} {}  {}  {}  {state}  {}",
        local_time(message.timestamp_ms),
        line(&message.peer),
        line(&file.name),
        nes_proto::files::human_size(file.size),
        file.id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::rpc::FileInfo;

    #[test]
    fn rows() {
        let mut m = Message {
            peer: "alice".into(),
            direction: Direction::Incoming as i32,
            file: Some(FileInfo {
                id: "ID==".into(),
                name: "report.pdf".into(),
                size: 1_200_000,
                transferred: 480_000,
                state: FileState::Receiving as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let row = file_row(&m).unwrap();
        assert!(
            row.ends_with("← alice  report.pdf  1.2 MB  receiving 40%  ID=="),
            "{row}"
        );
        m.direction = Direction::Outgoing as i32;
        if let Some(f) = m.file.as_mut() {
            f.state = FileState::Complete as i32;
        }
        let row = file_row(&m).unwrap();
        assert!(
            row.ends_with("→ alice  report.pdf  1.2 MB  complete  ID=="),
            "{row}"
        );
        assert!(file_row(&Message::default()).is_none());
    }
}
