//! `nes-notify`: a desktop notification for every incoming NES message.
//!
//! A small user agent (run it at login, or as the `nes-notify.service` user unit): it
//! follows nesd's event stream through `nes-client` and shows each incoming message with
//! the freedesktop notification service (notify-rust, async API): the sender as summary,
//! the text (escaped, truncated) as body, app name "NES".
//!
//! - A file shows once, when all of it has arrived (the daemon's `file` event saying
//!   complete): "alice sent report.pdf (1.2 MB)". The message that stored it while its
//!   bytes were still coming shows nothing, or every file would notify twice. Mute and
//!   DND apply to files as to texts.
//! - Mute single contacts (`--mute alice`, or `notify_mute = ["alice"]` in the config
//!   file) or everything (`--dnd`, or `notify_dnd = true`); the file is read again per
//!   message, so `nes config set notify_dnd true` works at once.
//! - Resumes by cursor: the cursor of the last event handled is kept in
//!   `$XDG_STATE_HOME/nes/notify-<user>-<store id>.cursor`, so restarting nes-notify, or
//!   nesd, neither repeats nor skips a notification. A cursor nesd refuses (its store was
//!   re-created or restored from an older copy) is logged once and nes-notify goes on
//!   with new messages, rather than waiting for the log to reach it.
//!
//! Exit codes as every NES frontend: 0, 1 (a fixable error), 2 (bad usage), 3 (nesd is
//! not running; with `--wait` it waits for nesd instead).
//!
//! Modules: [`policy`] (mute, DND, truncation), [`state`] (the cursor file).

#![forbid(unsafe_code)]

mod policy;
mod state;

use clap::Parser;
use nes_client::error::exit;
use nes_client::{Client, Feed, FeedItem};
use nes_proto::rpc::{event, Direction, Event, FileState, Message, MessageState};
use policy::{FileSettings, Policy};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::{info, warn};

/// Desktop notifications for incoming NES messages.
#[derive(Parser, Debug)]
#[command(name = "nes-notify", version, about)]
struct Args {
    /// nesd's gRPC socket (default: $XDG_RUNTIME_DIR/nes/nesd.sock).
    #[arg(long, env = "NES_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (default: ~/.config/nes/config.toml).
    #[arg(short = 'c', long, env = "NES_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Show no notification for this user's messages (repeatable; adds to notify_mute).
    #[arg(short = 'm', long, value_name = "USER")]
    mute: Vec<String>,
    /// Do not disturb: show nothing (also notify_dnd = true in the config file).
    #[arg(long)]
    dnd: bool,
    /// Longest body shown, in characters (default 200, or notify_body_max).
    #[arg(long, value_name = "N")]
    body_max: Option<usize>,
    /// Notification lifetime in milliseconds (default: the server's).
    #[arg(long, value_name = "MS")]
    expire_ms: Option<u32>,
    /// Where the last cursor is kept (default: $XDG_STATE_HOME/nes/notify-<user>-<store id>.cursor).
    #[arg(long, env = "NES_NOTIFY_STATE", value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Start after this cursor instead of the stored one.
    #[arg(long, value_name = "CURSOR")]
    since: Option<String>,
    /// Wait for nesd to start instead of exiting 3.
    #[arg(long)]
    wait: bool,
    /// Also print one line per message handled on stdout (shown or why not).
    #[arg(long)]
    print: bool,
}

/// How the agent ends.
#[derive(Debug)]
enum Failure {
    /// Exit 1.
    User(String),
    /// Exit 3.
    NoDaemon(String),
}

impl From<nes_client::Error> for Failure {
    fn from(e: nes_client::Error) -> Self {
        // nes_client decides which exit code a failed call means.
        if e.exit_code() == exit::NO_DAEMON {
            Failure::NoDaemon(e.to_string())
        } else {
            Failure::User(e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("NES_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nes-notify: cannot start the async runtime: {e}");
            return ExitCode::from(exit::USER);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::User(m)) => {
            eprintln!("nes-notify: {m}");
            ExitCode::from(exit::USER)
        }
        Err(Failure::NoDaemon(m)) => {
            eprintln!("nes-notify: {m}");
            ExitCode::from(exit::NO_DAEMON)
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let socket = nes_client::paths::socket_path(args.socket.as_deref(), args.config.as_deref());
    let config = nes_client::paths::config_path(args.config.as_deref());
    let flags = Policy {
        mute: args.mute.iter().map(|u| u.trim().to_lowercase()).collect(),
        dnd: args.dnd,
        body_max: policy::DEFAULT_BODY_MAX,
    };

    let mut client = connect(&socket, args.wait).await?;
    let status = client.status().await?;
    let state_path = args
        .state_file
        .clone()
        .unwrap_or_else(|| state::default_path(&status.user, &status.store_id));
    // The file of before store ids, when this store has none of its own yet.
    let legacy = (args.state_file.is_none() && !state_path.exists())
        .then(|| state::legacy_path(&status.user));
    let stored = state::load(&state_path).or_else(|| legacy.as_deref().and_then(state::load));
    let since = args.since.clone().or(stored);
    let (mut feed, refused) = Feed::open_or_now(&socket, since.as_deref()).await?;
    match (&since, refused) {
        (Some(c), None) => {
            info!(user = %status.user, cursor = %c, state = %state_path.display(), "resuming after the stored cursor")
        }
        (Some(c), Some(reason)) => warn!(
            user = %status.user, stored = %c, cursor = feed.cursor(), state = %state_path.display(),
            "nesd refused the stored cursor: {reason}; starting with new messages"
        ),
        (None, _) => {
            info!(user = %status.user, cursor = feed.cursor(), state = %state_path.display(), "starting with new messages")
        }
    }
    save_cursor(&state_path, feed.position());
    if let Some(legacy) = legacy.filter(|l| l.exists()) {
        if let Err(e) = std::fs::remove_file(&legacy) {
            warn!(path = %legacy.display(), error = %e, "cannot remove the cursor file of before store ids");
        }
    }
    let markup = body_markup().await;

    loop {
        let event = match feed.next().await? {
            FeedItem::Event(event) => event,
            FeedItem::Disconnected(e) => {
                warn!(
                    "{e}; waiting for nesd to come back (resuming after cursor {})",
                    feed.cursor()
                );
                continue;
            }
            FeedItem::Reconnected => {
                info!(cursor = feed.cursor(), "reconnected to nesd");
                continue;
            }
            FeedItem::Restarted(reason) => {
                warn!(
                    cursor = feed.cursor(),
                    "nesd came back and refused the cursor: {reason}; going on with new messages"
                );
                save_cursor(&state_path, feed.position());
                continue;
            }
            _ => continue,
        };
        if let Some(shown) = to_show(&event) {
            let policy = Policy::merge(&flags, args.body_max, &FileSettings::read(&config));
            handle(&shown, &policy, markup, args.expire_ms, args.print).await;
        }
        save_cursor(&state_path, feed.position());
    }
}

/// Connects, or with `wait` keeps trying until nesd is there.
async fn connect(socket: &std::path::Path, wait: bool) -> Result<Client, Failure> {
    let mut told = false;
    loop {
        match Client::connect(socket).await {
            Ok(client) => return Ok(client),
            Err(e) if wait && e.is_not_running() => {
                if !told {
                    info!("{e}; waiting for it");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one notification is about: the message, and the text its body shows.
#[derive(Debug, PartialEq)]
struct Shown<'e> {
    message: &'e Message,
    /// Unescaped: [`handle`] escapes and cuts it.
    text: String,
    /// The freedesktop category hint.
    category: &'static str,
}

/// The notification an event asks for, if any: an incoming text message stored
/// verified, or an incoming file once complete (see the module docs).
fn to_show(event: &Event) -> Option<Shown<'_>> {
    match &event.kind {
        Some(event::Kind::Message(m)) if m.file.is_none() && is_shown_kind(m) => Some(Shown {
            message: m,
            text: m.text.clone(),
            category: "im.received",
        }),
        Some(event::Kind::File(m)) if m.direction == Direction::Incoming as i32 => {
            let file = m.file.as_ref()?;
            (file.state == FileState::Complete as i32).then(|| Shown {
                message: m,
                text: file_text(&m.from, &file.name, file.size),
                category: "transfer.complete",
            })
        }
        _ => None,
    }
}

/// The body of a file's notification: `alice sent report.pdf (1.2 MB)`.
fn file_text(from: &str, name: &str, size: u64) -> String {
    format!(
        "{from} sent {name} ({})",
        nes_proto::files::human_size(size)
    )
}

/// Incoming, verified messages: the ones a person is told about (held ones wait until
/// their sender's new keys are trusted, and come again then).
fn is_shown_kind(message: &Message) -> bool {
    message.direction == Direction::Incoming as i32
        && message.state == MessageState::Received as i32
}

async fn handle(
    shown: &Shown<'_>,
    policy: &Policy,
    markup: bool,
    expire_ms: Option<u32>,
    print: bool,
) {
    let message = shown.message;
    if !policy.shows(&message.from) {
        let why = if policy.dnd {
            "do not disturb"
        } else {
            "muted"
        };
        info!(from = %message.from, id = %message.id, why, "not shown");
        if print {
            println!("skipped {} {} ({why})", message.from, message.id);
        }
        return;
    }
    let text = policy::body(&shown.text, policy.body_max);
    let body = if markup {
        policy::escape_markup(&text)
    } else {
        text.clone()
    };
    let summary = nes_client::display::line(&message.from);
    let mut notification = notify_rust::Notification::new();
    notification
        .appname("NES")
        .summary(&summary)
        .body(&body)
        .icon("mail-message-new")
        .hint(notify_rust::Hint::Category(shown.category.into()));
    if let Some(ms) = expire_ms {
        notification.timeout(notify_rust::Timeout::Milliseconds(ms));
    }
    match notification.show_async().await {
        Ok(_) => {
            info!(from = %message.from, id = %message.id, "shown");
            if print {
                println!("shown {} {}: {}", message.from, message.id, text);
            }
        }
        Err(e) => {
            warn!(from = %message.from, id = %message.id, error = %e, "cannot show a notification (is a notification server running?)");
            if print {
                println!("failed {} {} ({e})", message.from, message.id);
            }
        }
    }
}

fn save_cursor(path: &std::path::Path, cursor: &str) {
    if let Err(e) = state::save(path, cursor) {
        warn!(path = %path.display(), error = %e, "cannot store the cursor; a restart may repeat notifications");
    }
}

/// Whether the notification server may interpret markup in bodies (then text is
/// escaped). A server that answers without `body-markup` shows bodies as they are; when
/// the question gets no answer, escaping is the safe guess (an entity shown literally is
/// better than markup a sender chose).
async fn body_markup() -> bool {
    let query = tokio::task::spawn_blocking(notify_rust::get_capabilities);
    match tokio::time::timeout(Duration::from_secs(5), query).await {
        Ok(Ok(Ok(caps))) => caps.iter().any(|c| c == "body-markup"),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    fn file_event(direction: Direction, state: FileState, stored: bool) -> Event {
        let m = Message {
            from: "alice".into(),
            direction: direction as i32,
            state: MessageState::Received as i32,
            file: Some(nes_proto::rpc::FileInfo {
                name: "report.pdf".into(),
                size: 1_200_000,
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        Event {
            kind: Some(if stored {
                event::Kind::Message(m)
            } else {
                event::Kind::File(m)
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_file_notifies_once_when_complete() {
        // Stored while its bytes come: nothing.
        let stored = file_event(Direction::Incoming, FileState::Receiving, true);
        assert_eq!(to_show(&stored), None);
        let done = file_event(Direction::Incoming, FileState::Complete, false);
        let shown = to_show(&done).expect("a notification");
        assert_eq!(shown.text, "alice sent report.pdf (1.2 MB)");
        assert_eq!(shown.message.from, "alice");
        assert_eq!(shown.category, "transfer.complete");
        for state in [FileState::Cancelled, FileState::Failed] {
            assert_eq!(
                to_show(&file_event(Direction::Incoming, state, false)),
                None
            );
        }
        // Files this identity sent: never.
        assert_eq!(
            to_show(&file_event(Direction::Outgoing, FileState::Complete, false)),
            None
        );
        // The body goes through the same escaping and cut as a text's.
        let text = file_text("alice", "evil\x1b[2J.pdf", 5);
        assert_eq!(text, "alice sent evil\x1b[2J.pdf (5 B)");
        assert!(!policy::body(&file_text("alice", "a\u{1b}b", 5), 200).contains('\u{1b}'));
    }

    #[test]
    fn texts_notify_with_their_text() {
        let ev = Event {
            kind: Some(event::Kind::Message(Message {
                from: "alice".into(),
                text: "hi".into(),
                direction: Direction::Incoming as i32,
                state: MessageState::Received as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let shown = to_show(&ev).expect("a notification");
        assert_eq!(shown.text, "hi");
        assert_eq!(shown.category, "im.received");
    }

    #[test]
    fn only_received_incoming_messages_notify() {
        let mut m = Message {
            direction: Direction::Incoming as i32,
            state: MessageState::Received as i32,
            ..Default::default()
        };
        assert!(is_shown_kind(&m));
        m.state = MessageState::Held as i32;
        assert!(!is_shown_kind(&m));
        m.direction = Direction::Outgoing as i32;
        m.state = MessageState::Delivered as i32;
        assert!(!is_shown_kind(&m));
    }
}
