//! `nes listen`: incoming messages as they arrive.
//!
//! - `--json`: one JSON line per message (see `output`), each with its `cursor`;
//!   without it, one line for people.
//! - `--from U` only U's messages; `--count N` stop after N; `--timeout S` stop after S
//!   seconds (exit 0 when no `--count` was asked for; exit 1 when fewer than N came).
//! - `--since CURSOR`: first every message after that cursor, then live. Give it the
//!   `cursor` of the last line you handled to resume without loss or repeat (`0`: every
//!   stored message). A cursor the daemon cannot place in its log (another store's, one
//!   beyond its last event, or one of a store restored from an older copy) ends the
//!   command with exit 1 and says so, also when it happens on a reconnect: waiting for it
//!   would hide every message.
//! - `--exec CMD`: run `sh -c CMD` per message, one at a time, with the text on stdin
//!   and `NES_FROM`, `NES_TO`, `NES_ID`, `NES_TIMESTAMP`, `NES_CURSOR` in the environment
//!   (and `NES_SOCKET`, so a `nes send` inside talks to the same daemon). With `--exec`,
//!   messages are printed only if `--json` is also given.
//! - `--outgoing`: also messages this identity sent (from any frontend), and each change
//!   of their state as a line of its own: sent (the broker has it), delivered and read
//!   (the recipient's receipts), failed. With `--json`:
//!   `{"event":"state","id":..,"peer":..,"state":"delivered","cursor":..}` (plus `error`
//!   when it failed). State lines do not count towards `--count` and run no `--exec`.
//! - Files: an incoming file is shown once, when all of it has arrived (the daemon's
//!   `file` event saying complete), as a message line (`[file] report.pdf (1.2 MB)`; in
//!   JSON with its `file` object, whose `path` is where nesd keeps it). Before that it
//!   is not shown: it is no file yet. `--from` and `--count` apply as to any message;
//!   `--exec` gets an empty stdin and `NES_FILE_NAME`, `NES_FILE_SIZE`, `NES_FILE_PATH`
//!   (and `nes file save $NES_ID` copies it out). With `--outgoing`, a file sent shows
//!   when queued, as a text does, and each end of its transfer as a state line:
//!   `to bob: <id> [file] report.pdf complete`, in JSON
//!   `{"event":"file","id":..,"peer":..,"state":"complete","file":{..},"cursor":..}`
//!   (`state` is the file's: complete, cancelled or failed).
//!
//! Messages held because the sender's keys changed are not shown until trusted. A
//! restarted daemon is waited for and the stream resumes by cursor. A closed stdout
//! (`nes listen | head -1`) ends the command with exit 0.

use crate::error::{usage, user, CliError};
use crate::output::{message_json, message_line, print_json, print_line, state_mark, state_name};
use crate::username::UsernameParser;
use crate::Ctx;
use nes_client::feed::{cursor_number, is_refused_cursor};
use nes_client::{Feed, FeedItem};
use nes_proto::rpc::{
    event, Direction, Event, FileState, Message, MessageState, MessageStateChanged,
};
use nes_proto::Username;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// JSON lines, one object per message.
    #[arg(long)]
    pub json: bool,
    /// Only messages from this user.
    #[arg(short = 'f', long, value_name = "USER", value_parser = UsernameParser)]
    pub from: Option<Username>,
    /// Stop after N messages.
    #[arg(short = 'n', long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after S seconds.
    #[arg(long, value_name = "S")]
    pub timeout: Option<f64>,
    /// Resume after this cursor (the `cursor` of the last message handled; 0: all).
    #[arg(long, value_name = "CURSOR")]
    pub since: Option<String>,
    /// Run CMD (with `sh -c`) per message: text on stdin, NES_FROM, NES_ID, ... in the env.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Also show messages this identity sent.
    #[arg(long)]
    pub outgoing: bool,
}

/// Which messages of the event stream `listen` shows.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only from this user.
    pub from: Option<Username>,
    /// Also outgoing messages.
    pub outgoing: bool,
}

/// What `listen` does with one event ([`Filter::classify`]).
#[derive(Debug, PartialEq)]
pub enum Shown<'e> {
    /// Print it as a message (and count it, run `--exec`).
    Message(&'e Message),
    /// Print a state line of an outgoing message (`--outgoing`).
    State(&'e MessageStateChanged),
    /// Print a state line of an outgoing file's transfer (`--outgoing`).
    FileState(&'e Message),
}

impl Filter {
    /// What to show of `event`, if anything:
    /// - a stored incoming message (not a held one), and an outgoing one when asked;
    /// - an incoming file only from its `file` event saying complete, never from the
    ///   `message` event that stored it while it was still arriving (so it shows once,
    ///   and only as a file there is);
    /// - with `--outgoing`, state changes of outgoing messages and files.
    ///
    /// `--from` applies to the sender of messages.
    pub fn classify<'e>(&self, event: &'e Event) -> Option<Shown<'e>> {
        let outgoing = |m: &Message| m.direction == Direction::Outgoing as i32;
        let incoming = |m: &Message| m.direction == Direction::Incoming as i32;
        let shown = match &event.kind {
            Some(event::Kind::StateChanged(change)) if self.outgoing => {
                return Some(Shown::State(change))
            }
            Some(event::Kind::Message(m)) if incoming(m) && m.file.is_none() => {
                (m.state == MessageState::Received as i32).then_some(m)
            }
            Some(event::Kind::Message(m)) if outgoing(m) && self.outgoing => Some(m),
            Some(event::Kind::File(m)) if incoming(m) => m
                .file
                .as_ref()
                .is_some_and(|f| f.state == FileState::Complete as i32)
                .then_some(m),
            Some(event::Kind::File(m)) if outgoing(m) && self.outgoing => {
                return Some(Shown::FileState(m))
            }
            _ => None,
        }?;
        if let Some(from) = &self.from {
            if shown.from != from.as_str() {
                return None;
            }
        }
        Some(Shown::Message(shown))
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    if args.count == Some(0) {
        return Ok(());
    }
    let deadline = match args.timeout {
        Some(s) if s.is_finite() && s >= 0.0 => {
            Some(tokio::time::Instant::now() + Duration::from_secs_f64(s))
        }
        Some(s) => {
            return Err(user(format!(
                "--timeout {s}: give a number of seconds (0 or more)"
            )))
        }
        None => None,
    };
    let filter = Filter {
        from: args.from,
        outgoing: args.outgoing,
    };
    let print = args.json || args.exec.is_none();
    if let Some(since) = args.since.as_deref().filter(|s| cursor_number(s).is_none()) {
        return Err(usage(format!("--since {since:?}: give the `cursor` of a line `nes listen --json` printed, or 0 for everything")));
    }

    let mut feed = Feed::open(&ctx.socket, args.since.as_deref())
        .await
        .map_err(|e| refused(args.since.as_deref(), e))?;
    let mut shown = 0u64;
    let closed = stdout_closed(print);
    tokio::pin!(closed);
    loop {
        let item = tokio::select! {
            item = feed.next() => item,
            _ = &mut closed => return Err(CliError::BrokenPipe),
            _ = sleep_until(deadline) => return timed_out(shown, args.count),
        };
        let event = match item.map_err(|e| refused(Some(feed.position()), e))? {
            FeedItem::Event(event) => event,
            FeedItem::Disconnected(err) => {
                eprintln!("nes: {err}; waiting for nesd to come back (messages will resume from cursor {})", feed.cursor());
                continue;
            }
            FeedItem::Reconnected => {
                eprintln!(
                    "nes: reconnected to nesd; resuming after cursor {}",
                    feed.cursor()
                );
                continue;
            }
            _ => continue,
        };
        let message = match filter.classify(&event) {
            None => continue,
            Some(Shown::Message(message)) => message,
            Some(state) => {
                if print {
                    print_state(&state, &event_cursor(&event), args.json)?;
                }
                continue;
            }
        };
        if print {
            if args.json {
                print_json(&message_json(message, Some(&event_cursor(&event))))?;
            } else {
                print_line(&message_line(message))?;
            }
        }
        if let Some(command) = &args.exec {
            run_exec(command, message, &event_cursor(&event), ctx).await;
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
    }
}

/// Prints a state line (of a message or a file), as JSON or for people.
fn print_state(shown: &Shown<'_>, cursor: &str, json: bool) -> Result<(), CliError> {
    match (shown, json) {
        (Shown::State(change), true) => print_json(&state_json(change, cursor)),
        (Shown::State(change), false) => print_line(&state_line(change)),
        (Shown::FileState(message), true) => print_json(&file_state_json(message, cursor)),
        (Shown::FileState(message), false) => print_line(&file_state_line(message)),
        (Shown::Message(_), _) => Ok(()),
    }
}

/// An outgoing file's state change as a JSON line: the file's state, and its object.
fn file_state_json(message: &Message, cursor: &str) -> serde_json::Value {
    let line = message_json(message, None);
    let file = serde_json::to_value(&line)
        .ok()
        .and_then(|v| v.get("file").cloned())
        .unwrap_or_default();
    let state = message.file.as_ref().map(|f| f.state).unwrap_or_default();
    let mut v = serde_json::json!({
        "event": "file",
        "id": message.id,
        "peer": message.peer,
        "state": crate::output::file_state_name(state),
        "file": file,
        "cursor": cursor,
    });
    if let Some(error) = message
        .file
        .as_ref()
        .map(|f| &f.error)
        .filter(|e| !e.is_empty())
    {
        v["error"] = error.clone().into();
    }
    v
}

/// An outgoing file's state change for people: `to bob: <id> [file] report.pdf complete`.
fn file_state_line(message: &Message) -> String {
    let (name, state, error) = match &message.file {
        Some(f) => (
            f.name.as_str(),
            crate::output::file_state_name(f.state),
            f.error.as_str(),
        ),
        None => ("", "unknown", ""),
    };
    let mut line = format!(
        "to {}: {} [file] {} {state}",
        nes_client::display::line(&message.peer),
        message.id,
        nes_client::display::line(name),
    );
    if !error.is_empty() {
        line.push_str(&format!(" ({})", nes_client::display::line(error)));
    }
    line
}

/// A state change as a JSON line.
fn state_json(change: &MessageStateChanged, cursor: &str) -> serde_json::Value {
    let mut v = serde_json::json!({
        "event": "state",
        "id": change.id,
        "peer": change.peer,
        "state": state_name(change.state),
        "cursor": cursor,
    });
    if !change.error.is_empty() {
        v["error"] = change.error.clone().into();
    }
    v
}

/// A state change for people: `to bob: <id> delivered`.
fn state_line(change: &MessageStateChanged) -> String {
    let mut line = format!(
        "to {}: {} {} {}",
        nes_client::display::line(&change.peer),
        change.id,
        state_mark(change.state),
        state_name(change.state)
    );
    if !change.error.is_empty() {
        line.push_str(&format!(" ({})", nes_client::display::line(&change.error)));
    }
    line
}

/// The cursor shown for an event: its log cursor (the number from a daemon without).
fn event_cursor(event: &Event) -> String {
    if event.log_cursor.is_empty() {
        event.cursor.to_string()
    } else {
        event.log_cursor.clone()
    }
}

/// The error for a failed subscription: a refused cursor says what to do about it.
fn refused(since: Option<&str>, err: nes_client::Error) -> CliError {
    match since {
        Some(since) if is_refused_cursor(&err) => user(format!(
            "cannot resume after cursor {since}: {err} (start `nes listen` without --since to listen from now, or with --since 0 for everything)"
        )),
        _ => err.into(),
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the reader of stdout is gone (a pipe whose reading end was closed), so
/// `nes listen | head -n 1` ends at once rather than at the next message's write.
/// Never resolves when nothing is printed or stdout cannot be watched (a regular file).
async fn stdout_closed(watch: bool) {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    if watch {
        // A duplicate of stdout, registered with the reactor only to hear of an error
        // condition: the kernel reports one on a pipe's writing end once its reading end
        // is closed. Nothing is read or written through it, and its blocking mode (shared
        // with stdout) is left as it is.
        if let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() {
            if let Ok(pipe) = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(fd) {
                if let Ok(ready) = pipe.ready(Interest::ERROR).await {
                    if ready.is_error() {
                        return;
                    }
                }
            }
        }
    }
    std::future::pending().await
}

fn timed_out(shown: u64, count: Option<u64>) -> Result<(), CliError> {
    match count {
        Some(n) if shown < n => Err(user(format!("timed out after {shown} of {n} messages"))),
        _ => Ok(()),
    }
}

/// The environment `--exec` gives its command for one message.
pub fn exec_env(
    message: &Message,
    cursor: &str,
    socket: &std::path::Path,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NES_FROM", message.from.clone()),
        ("NES_TO", message.to.clone()),
        ("NES_PEER", message.peer.clone()),
        ("NES_ID", message.id.clone()),
        ("NES_TIMESTAMP", message.timestamp_ms.to_string()),
        ("NES_CURSOR", cursor.to_string()),
        (
            "NES_DIRECTION",
            crate::output::direction_name(message.direction).to_string(),
        ),
        ("NES_SOCKET", socket.display().to_string()),
    ];
    if let Some(f) = &message.file {
        env.push(("NES_FILE_NAME", f.name.clone()));
        env.push(("NES_FILE_SIZE", f.size.to_string()));
        env.push(("NES_FILE_PATH", f.path.clone()));
    }
    env
}

/// Runs the `--exec` command for one message and waits for it. Its failure is reported
/// and the listening goes on: one bad message must not stop a bot.
async fn run_exec(command: &str, message: &Message, cursor: &str, ctx: &Ctx) {
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(exec_env(message, cursor, &ctx.socket))
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("nes: cannot run --exec command: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its stdin closes it early: not an error.
        let _ = stdin.write_all(message.text.as_bytes()).await;
        drop(stdin);
    }
    match child.wait().await {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!(
            "nes: --exec command {status} for message {} (cursor {cursor})",
            message.id
        ),
        Err(e) => eprintln!("nes: --exec command: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::rpc::MessageStateChanged;

    // The decisions the tests below look at one at a time.
    impl Filter {
        fn select<'e>(&self, event: &'e Event) -> Option<&'e Message> {
            match self.classify(event) {
                Some(Shown::Message(m)) => Some(m),
                _ => None,
            }
        }

        fn state_change<'e>(&self, event: &'e Event) -> Option<&'e MessageStateChanged> {
            match self.classify(event) {
                Some(Shown::State(change)) => Some(change),
                _ => None,
            }
        }
    }

    /// An event about a file `from` sent (incoming unless `from` is bob, this identity):
    /// kind `message` when `stored`, else kind `file`.
    fn file_event(cursor: u64, from: &str, state: FileState, stored: bool) -> Event {
        let direction = if from == "bob" {
            Direction::Outgoing
        } else {
            Direction::Incoming
        };
        let message = Message {
            id: format!("id{cursor}"),
            from: from.into(),
            to: if from == "bob" { "alice" } else { "bob" }.into(),
            peer: if from == "bob" { "alice" } else { from }.into(),
            direction: direction as i32,
            state: if from == "bob" {
                MessageState::Queued
            } else {
                MessageState::Received
            } as i32,
            file: Some(nes_proto::rpc::FileInfo {
                id: format!("id{cursor}"),
                name: "report.pdf".into(),
                size: 1_200_000,
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        Event {
            cursor,
            kind: Some(if stored {
                event::Kind::Message(message)
            } else {
                event::Kind::File(message)
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_incoming_file_shows_once_when_complete() {
        let f = Filter::default();
        // Stored while arriving: not shown.
        assert_eq!(
            f.classify(&file_event(1, "alice", FileState::Receiving, true)),
            None
        );
        // Its transfer ends: shown when complete, as a message.
        let done = file_event(2, "alice", FileState::Complete, false);
        assert!(matches!(f.classify(&done), Some(Shown::Message(m)) if m.id == "id2"));
        for state in [FileState::Cancelled, FileState::Failed] {
            assert_eq!(f.classify(&file_event(3, "alice", state, false)), None);
        }
        // --from applies to files too.
        let only_carol = Filter {
            from: Some("carol".parse().unwrap()),
            ..Filter::default()
        };
        assert_eq!(only_carol.classify(&done), None);
    }

    #[test]
    fn outgoing_files_with_outgoing_only() {
        let queued = file_event(1, "bob", FileState::Sending, true);
        let complete = file_event(2, "bob", FileState::Complete, false);
        let f = Filter::default();
        assert_eq!(f.classify(&queued), None);
        assert_eq!(f.classify(&complete), None);
        let f = Filter {
            outgoing: true,
            ..Filter::default()
        };
        assert!(matches!(f.classify(&queued), Some(Shown::Message(_))));
        let Some(Shown::FileState(m)) = f.classify(&complete) else {
            panic!("a file state line");
        };
        assert_eq!(
            file_state_line(m),
            "to alice: id2 [file] report.pdf complete"
        );
        let v = file_state_json(m, "c-9");
        assert_eq!(v["event"], "file");
        assert_eq!(v["state"], "complete");
        assert_eq!(v["file"]["name"], "report.pdf");
        assert_eq!(v["cursor"], "c-9");
        assert!(v.get("error").is_none());
    }

    #[test]
    fn exec_environment_of_a_file() {
        let mut ev = file_event(5, "alice", FileState::Complete, false);
        let Some(event::Kind::File(m)) = &mut ev.kind else {
            unreachable!()
        };
        if let Some(f) = m.file.as_mut() {
            f.path = "/data/files/x".into();
        }
        let env = exec_env(m, "5", std::path::Path::new("/s.sock"));
        assert!(env.contains(&("NES_FILE_NAME", "report.pdf".into())));
        assert!(env.contains(&("NES_FILE_SIZE", "1200000".into())));
        assert!(env.contains(&("NES_FILE_PATH", "/data/files/x".into())));
    }

    fn message_event(cursor: u64, from: &str, direction: Direction, state: MessageState) -> Event {
        Event {
            cursor,
            at_ms: 0,
            kind: Some(event::Kind::Message(Message {
                id: format!("id{cursor}"),
                from: from.into(),
                to: "bob".into(),
                peer: from.into(),
                direction: direction as i32,
                state: state as i32,
                text: "hi".into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn shows_received_incoming_only_by_default() {
        let f = Filter::default();
        assert!(f
            .select(&message_event(
                1,
                "alice",
                Direction::Incoming,
                MessageState::Received
            ))
            .is_some());
        assert!(f
            .select(&message_event(
                2,
                "alice",
                Direction::Incoming,
                MessageState::Held
            ))
            .is_none());
        assert!(f
            .select(&message_event(
                3,
                "bob",
                Direction::Outgoing,
                MessageState::Queued
            ))
            .is_none());
        let state = Event {
            cursor: 4,
            at_ms: 0,
            kind: Some(event::Kind::StateChanged(MessageStateChanged::default())),
            ..Default::default()
        };
        assert!(f.select(&state).is_none());
        assert!(
            f.state_change(&state).is_none(),
            "state lines only with --outgoing"
        );
        let outgoing = Filter {
            outgoing: true,
            ..Filter::default()
        };
        let change = outgoing.state_change(&state).expect("a state line");
        let delivered = MessageStateChanged {
            id: "m1".into(),
            peer: "bob".into(),
            state: MessageState::Delivered as i32,
            error: String::new(),
        };
        assert_eq!(change, &MessageStateChanged::default());
        assert_eq!(
            state_json(&delivered, "c-7"),
            serde_json::json!({"event":"state","id":"m1","peer":"bob","state":"delivered","cursor":"c-7"})
        );
        assert_eq!(state_line(&delivered), "to bob: m1 ✓✓ delivered");
    }

    #[test]
    fn outgoing_and_from_filters() {
        let f = Filter {
            from: Some("alice".parse().unwrap()),
            outgoing: true,
        };
        assert!(f
            .select(&message_event(
                1,
                "alice",
                Direction::Incoming,
                MessageState::Received
            ))
            .is_some());
        assert!(f
            .select(&message_event(
                2,
                "carol",
                Direction::Incoming,
                MessageState::Received
            ))
            .is_none());
        let f = Filter {
            from: None,
            outgoing: true,
        };
        assert!(f
            .select(&message_event(
                3,
                "bob",
                Direction::Outgoing,
                MessageState::Queued
            ))
            .is_some());
    }

    #[test]
    fn exec_environment() {
        let ev = message_event(7, "alice", Direction::Incoming, MessageState::Received);
        let Some(event::Kind::Message(m)) = &ev.kind else {
            unreachable!()
        };
        let env = exec_env(m, "7", std::path::Path::new("/s.sock"));
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("NES_FROM"), "alice");
        assert_eq!(get("NES_ID"), "id7");
        assert_eq!(get("NES_CURSOR"), "7");
        assert_eq!(get("NES_TIMESTAMP"), "0");
        assert_eq!(get("NES_SOCKET"), "/s.sock");
    }

    #[test]
    fn timeout_exit() {
        assert!(timed_out(0, None).is_ok());
        assert!(timed_out(2, Some(2)).is_ok());
        assert!(matches!(timed_out(1, Some(2)), Err(CliError::User(_))));
    }
}
