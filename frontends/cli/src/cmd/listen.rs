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
//!
//! Messages held because the sender's keys changed are not shown until trusted. A
//! restarted daemon is waited for and the stream resumes by cursor. A closed stdout
//! (`nes listen | head -1`) ends the command with exit 0.

use crate::error::{usage, user, CliError};
use crate::output::{message_json, message_line, print_json, print_line, state_mark, state_name};
use crate::Ctx;
use nes_client::feed::{cursor_number, is_refused_cursor};
use nes_client::{Feed, FeedItem};
use nes_proto::rpc::{event, Direction, Event, Message, MessageState, MessageStateChanged};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// JSON lines, one object per message.
    #[arg(long)]
    pub json: bool,
    /// Only messages from this user.
    #[arg(short = 'f', long, value_name = "USER")]
    pub from: Option<String>,
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
    /// Only from this (lower-case) user.
    pub from: Option<String>,
    /// Also outgoing messages.
    pub outgoing: bool,
}

impl Filter {
    /// The state change of an outgoing message in `event`, when outgoing messages are
    /// asked for.
    pub fn state_change<'e>(&self, event: &'e Event) -> Option<&'e MessageStateChanged> {
        match &event.kind {
            Some(event::Kind::StateChanged(change)) if self.outgoing => Some(change),
            _ => None,
        }
    }

    /// The message of `event` to show, if any: stored incoming messages (not held ones),
    /// and outgoing ones when asked; `--from` applies to the sender.
    pub fn select<'e>(&self, event: &'e Event) -> Option<&'e Message> {
        let Some(event::Kind::Message(message)) = &event.kind else {
            return None;
        };
        let incoming = message.direction == Direction::Incoming as i32;
        let show = if incoming {
            message.state == MessageState::Received as i32
        } else {
            self.outgoing && message.direction == Direction::Outgoing as i32
        };
        if !show {
            return None;
        }
        if let Some(from) = &self.from {
            if &message.from != from {
                return None;
            }
        }
        Some(message)
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    if args.count == Some(0) {
        return Ok(());
    }
    let from = match &args.from {
        Some(f) => {
            let name = f.trim().to_lowercase();
            nes_proto::Username::parse(&name).map_err(|e| user(format!("--from {f:?}: {e}")))?;
            Some(name)
        }
        None => None,
    };
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
        from,
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
        if let Some(change) = filter.state_change(&event) {
            if print {
                let cursor = event_cursor(&event);
                if args.json {
                    print_json(&state_json(change, &cursor))?;
                } else {
                    print_line(&state_line(change))?;
                }
            }
            continue;
        }
        let Some(message) = filter.select(&event) else {
            continue;
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
    vec![
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
    ]
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
            from: Some("alice".into()),
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
