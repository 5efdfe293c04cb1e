//! `nes chat -t PEER`: a terminal chat with one peer (ratatui + crossterm).
//!
//! The screen: a title bar (who, the daemon's broker connection, the peer's key state),
//! the conversation (scrollback from `History`, then live from the event stream), and an
//! input line. Enter sends; PageUp/PageDown scroll; Esc, Ctrl-C, Ctrl-D or `/quit` leave.
//! `/file PATH` sends a file (`~/` is the home directory): it uploads in the background,
//! so the chat goes on meanwhile, and a refusal shows as a `*` line as for texts.
//!
//! Files show as `[file] report.pdf (1.2 MB)`, with the state while not complete. An
//! incoming file appears once all of it has arrived (the daemon's `file` event), never
//! while it is still coming; `nes file save ID` copies it out (the id is in `nes files`).
//!
//! Everything shown comes from nesd: the chat keeps no state of its own, so several
//! `nes chat` windows and `nes listen`s at once show the same conversation. Messages
//! sent from here appear when the daemon's event for them arrives (like those sent from
//! any other frontend), and their mark follows the delivery state: `…` queued, `→` sent,
//! `✓` acknowledged by the broker, `✗` failed. A key change of the peer shows as a
//! warning line. Incoming messages shown here are marked read.
//!
//! The order of start-up avoids a gap: take the daemon's newest cursor, load history,
//! then follow events after that cursor; a message in both is shown once (by id). If
//! nesd comes back with a store that refuses that cursor (re-created, or restored from
//! an older copy), the chat goes on from the daemon's newest event and says so.

use crate::error::{user, CliError};
use crate::output::{message_body, state_mark};
use crate::username::UsernameParser;
use crate::Ctx;
use futures::StreamExt;
use nes_client::display::line;
use nes_client::{Feed, FeedItem};
use nes_proto::rpc::{event, Direction, Event, FileState, Message, MessageState, TrustState};
use ratatui::crossterm::event::{
    Event as TermEvent, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use std::path::PathBuf;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The peer to chat with.
    #[arg(short = 't', long = "to", value_name = "PEER", value_parser = UsernameParser)]
    pub to: nes_proto::Username,
    /// How many stored messages to show first.
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub scrollback: u32,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let peer = args.to.to_string();
    let mut client = ctx.client().await?;
    let status = client.status().await?;
    // An unknown peer is refused here, before the screen is taken over.
    let contact = match client.lookup_contact(&peer, false).await {
        Ok(contact) => Some(contact),
        Err(err) if err.code() == Some(tonic::Code::NotFound) => return Err(err.into()),
        Err(err) if err.is_not_running() => return Err(err.into()),
        Err(_) => None, // key server down and nothing cached: chat still shows history
    };
    let start = if status.last_log_cursor.is_empty() {
        status.last_cursor.to_string()
    } else {
        status.last_log_cursor.clone()
    };
    let (feed, refused) = Feed::open_or_now(&ctx.socket, Some(start.as_str())).await?;
    let history = client.history(&peer, args.scrollback).await?;

    let mut chat = Chat::new(status.user.clone(), peer.clone(), status.connected);
    if let Some(contact) = &contact {
        chat.key_changed = contact.trust == TrustState::KeyChanged as i32;
        chat.presence = contact.presence.clone();
    } else {
        chat.system(format!(
            "cannot look up {peer}'s keys right now (key server unreachable?)"
        ));
    }
    for message in history.into_iter().filter(|m| !super::file::is_arriving(m)) {
        chat.upsert(message);
    }
    if chat.key_changed {
        chat.system(key_change_text(&peer));
    }
    if let Some(reason) = refused {
        chat.system(restarted_text(&reason));
    }
    mark_read(&mut client, &chat).await;

    let (tx, mut items) = tokio::sync::mpsc::channel(256);
    let follower = tokio::spawn(follow(feed, tx));
    let result = ui(ctx, &mut client, &mut chat, &mut items).await;
    follower.abort();
    result
}

/// Moves feed items into a channel, so the UI loop can wait on keys and events at once.
async fn follow(
    mut feed: Feed,
    tx: tokio::sync::mpsc::Sender<Result<FeedItem, nes_client::Error>>,
) {
    loop {
        let item = feed.next().await;
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            return;
        }
    }
}

async fn ui(
    ctx: &Ctx,
    client: &mut nes_client::Client,
    chat: &mut Chat,
    items: &mut tokio::sync::mpsc::Receiver<Result<FeedItem, nes_client::Error>>,
) -> Result<(), CliError> {
    let mut terminal = TerminalGuard::enter()?;
    let mut keys = EventStream::new();
    // Uploads run in tasks of their own (a large file takes a while); each tells how it
    // ended here. The sender is kept, so `recv` never ends.
    let (uploaded, mut uploads) = tokio::sync::mpsc::unbounded_channel();
    loop {
        terminal.draw(chat)?;
        tokio::select! {
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(key))) if key.kind != KeyEventKind::Release => {
                    match chat.key(key) {
                        Action::None => {}
                        Action::Quit => return Ok(()),
                        Action::Send(text) => send(ctx, client, chat, &text).await,
                        Action::SendFile(path) => {
                            start_upload(client.clone(), chat, path, uploaded.clone()).await
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(user(format!("terminal: {e}"))),
                None => return Ok(()),
            },
            item = items.recv() => match item {
                Some(Ok(FeedItem::Event(event))) => {
                    if chat.apply(event) {
                        mark_read(client, chat).await;
                    }
                }
                Some(Ok(FeedItem::Disconnected(_))) => {
                    chat.daemon_up = false;
                    chat.system("nesd went away; waiting for it to come back…".into());
                }
                Some(Ok(FeedItem::Restarted(reason))) => {
                    chat.daemon_up = true;
                    chat.system(restarted_text(&reason));
                    if let Ok(c) = nes_client::Client::connect(&ctx.socket).await {
                        *client = c;
                    }
                }
                Some(Ok(FeedItem::Reconnected)) => {
                    chat.daemon_up = true;
                    chat.system("reconnected to nesd".into());
                    if let Ok(c) = nes_client::Client::connect(&ctx.socket).await {
                        *client = c;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    drop(terminal);
                    return Err(err.into());
                }
                None => return Ok(()),
            },
            Some(done) = uploads.recv() => match done {
                Ok(message) => chat.upsert(message),
                Err(why) => chat.system(why.to_string()),
            },
        }
    }
}

/// Starts sending the file at `path` to the chat's peer in a task of its own; how it
/// ends comes back on `done` (the stored message, or the line saying why not).
async fn start_upload(
    mut client: nes_client::Client,
    chat: &mut Chat,
    path: PathBuf,
    done: tokio::sync::mpsc::UnboundedSender<Result<Message, UploadFailed>>,
) {
    let shown = path.display().to_string();
    let (file, name, size) = match open_upload(&path).await {
        Ok(opened) => opened,
        Err(why) => return chat.system(format!("not sent: {shown}: {why}")),
    };
    chat.system(format!(
        "sending {} ({})…",
        name,
        nes_proto::files::human_size(size)
    ));
    let peer = chat.peer.clone();
    tokio::spawn(async move {
        let result = client
            .send_file(&peer, &name, "", file, |_| {})
            .await
            .map_err(|error| UploadFailed { name, error });
        let _ = done.send(result);
    });
}

/// A `/file` upload that nesd did not take: the line the chat shows.
#[derive(Debug, thiserror::Error)]
#[error("not sent: {name}: {error}")]
struct UploadFailed {
    /// The name it was sent under.
    name: String,
    /// What the call to nesd said (shown in the line, so no `source`).
    error: nes_client::Error,
}

/// Opens a file for `/file`: a regular file with a name nesd accepts; its name and size.
async fn open_upload(path: &std::path::Path) -> Result<(tokio::fs::File, String, u64), OpenError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or(OpenError::NoName)?
        .to_string();
    nes_proto::files::check_name(&name)?;
    let file = tokio::fs::File::open(path).await?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        return Err(OpenError::NotAFile);
    }
    Ok((file, name, meta.len()))
}

/// Why [`open_upload`] refused a path: shown after `not sent: PATH: `. A type so that
/// each refusal is named once, not spelled at each `return`.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// The path has no last component that is UTF-8 (`/`, `..`, or not Unicode).
    #[error("no file name to send it under")]
    NoName,
    /// The name breaks the rules of [`nes_proto::files::check_name`].
    #[error(transparent)]
    Name(#[from] nes_proto::files::FileError),
    /// Opening it or reading its metadata failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A directory, a device or a pipe.
    #[error("not a regular file")]
    NotAFile,
}

/// The path typed after `/file`: `~/` (or `~` alone) is the home directory.
fn upload_path(typed: &str) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match typed {
        "~" => home().unwrap_or_else(|| typed.into()),
        _ => match (typed.strip_prefix("~/"), home()) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => typed.into(),
        },
    }
}

/// The line shown when nesd refused the chat's cursor and the chat went on from now.
fn restarted_text(reason: &str) -> String {
    format!("nesd's message store changed ({reason}); showing new messages from now on")
}

async fn send(ctx: &Ctx, client: &mut nes_client::Client, chat: &mut Chat, text: &str) {
    let mut result = client.send(&chat.peer, text, false).await;
    if matches!(&result, Err(e) if e.is_not_running()) {
        // The daemon may have restarted: one fresh connection, then give up.
        if let Ok(c) = nes_client::Client::connect(&ctx.socket).await {
            *client = c;
            result = client.send(&chat.peer, text, false).await;
        }
    }
    match result {
        Ok(message) => chat.upsert(message),
        Err(err) => {
            chat.input = text.to_string();
            chat.cursor = chat.input.chars().count();
            chat.system(format!("not sent: {err}"));
        }
    }
}

async fn mark_read(client: &mut nes_client::Client, chat: &Chat) {
    if let Some(last) = chat.last_unread_incoming() {
        // Best effort: a failure here only leaves the unread count up.
        let _ = client.mark_read(&chat.peer, &last).await;
    }
}

fn key_change_text(peer: &str) -> String {
    format!("⚠ {peer}'s keys changed: their messages are held and sending is refused; compare fingerprints (`nes contacts show {peer}`), then `nes contacts trust {peer}`")
}

/// What a key press asks for.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Nothing beyond editing.
    None,
    /// Leave the chat.
    Quit,
    /// Send this text.
    Send(String),
    /// Send this file (`/file PATH`).
    SendFile(PathBuf),
}

/// One line of the conversation.
#[derive(Debug, Clone)]
// Nearly every entry is a message (a file's carries its FileInfo inline); boxing it to
// shrink the rare system lines would add an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Message(Message),
    System(String),
}

/// The chat's state: what is on the screen, all of it from the daemon.
#[derive(Debug)]
pub struct Chat {
    me: String,
    peer: String,
    entries: Vec<Entry>,
    /// Text being typed, and the cursor in it (in characters).
    pub input: String,
    cursor: usize,
    /// Rows scrolled up from the bottom.
    scroll: usize,
    broker_up: bool,
    daemon_up: bool,
    key_changed: bool,
    /// The peer's presence, as the title shows it.
    presence: Option<nes_proto::rpc::Presence>,
}

impl Chat {
    /// A chat of `me` with `peer`.
    pub fn new(me: String, peer: String, broker_up: bool) -> Self {
        Chat {
            me,
            peer,
            entries: Vec::new(),
            input: String::new(),
            cursor: 0,
            scroll: 0,
            broker_up,
            daemon_up: true,
            key_changed: false,
            presence: None,
        }
    }

    fn system(&mut self, text: String) {
        self.entries.push(Entry::System(text));
    }

    /// Adds a message of this conversation, or updates it when its id is known.
    fn upsert(&mut self, message: Message) {
        if message.peer != self.peer {
            return;
        }
        let existing = self.entries.iter_mut().rev().find_map(|e| match e {
            Entry::Message(m) if m.id == message.id => Some(m),
            _ => None,
        });
        match existing {
            Some(m) => *m = message,
            None => self.entries.push(Entry::Message(message)),
        }
    }

    /// Applies one daemon event. Returns whether an incoming message arrived (so the
    /// caller marks it read).
    pub fn apply(&mut self, event: Event) -> bool {
        match event.kind {
            // An incoming file is stored before its bytes come: it shows once complete (and
            // history leaves it out until then, too).
            Some(event::Kind::Message(message)) if super::file::is_arriving(&message) => false,
            Some(event::Kind::Message(message)) if message.peer == self.peer => {
                let incoming = message.direction == Direction::Incoming as i32;
                self.upsert(message);
                incoming
            }
            Some(event::Kind::File(message)) if message.peer == self.peer => {
                let incoming = message.direction == Direction::Incoming as i32;
                let complete = message
                    .file
                    .as_ref()
                    .is_some_and(|f| f.state == FileState::Complete as i32);
                // An incoming file that never completed was never shown: nothing to say.
                if incoming && !complete {
                    return false;
                }
                self.upsert(message);
                incoming
            }
            Some(event::Kind::StateChanged(change)) => {
                for e in self.entries.iter_mut().rev() {
                    if let Entry::Message(m) = e {
                        if m.id == change.id {
                            m.state = change.state;
                            m.error = change.error.clone();
                            break;
                        }
                    }
                }
                false
            }
            Some(event::Kind::KeyChanged(k)) if k.username == self.peer => {
                self.key_changed = true;
                self.system(key_change_text(&self.peer.clone()));
                false
            }
            Some(event::Kind::Contact(c)) if c.username == self.peer => {
                let was = self.key_changed;
                self.key_changed = c.trust == TrustState::KeyChanged as i32;
                if was && !self.key_changed {
                    self.system(format!("{}'s new keys are trusted", self.peer));
                }
                false
            }
            Some(event::Kind::Connection(c)) => {
                self.broker_up = c.connected;
                false
            }
            Some(event::Kind::Presence(p)) if p.username == self.peer => {
                self.presence = Some(p);
                false
            }
            _ => false,
        }
    }

    /// The id of the newest unread incoming message.
    fn last_unread_incoming(&self) -> Option<String> {
        self.entries.iter().rev().find_map(|e| match e {
            Entry::Message(m) if m.direction == Direction::Incoming as i32 && !m.read => {
                Some(m.id.clone())
            }
            _ => None,
        })
    }

    /// Handles one key press.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Esc => return Action::Quit,
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => return Action::Quit,
            KeyCode::Char('u') if ctrl => {
                self.input.clear();
                self.cursor = 0;
            }
            KeyCode::Char('w') if ctrl => {
                let before: Vec<char> = self.input.chars().take(self.cursor).collect();
                let mut cut = before.len();
                while cut > 0 && before[cut - 1] == ' ' {
                    cut -= 1;
                }
                while cut > 0 && before[cut - 1] != ' ' {
                    cut -= 1;
                }
                let after: String = self.input.chars().skip(self.cursor).collect();
                self.input = before[..cut].iter().collect::<String>() + &after;
                self.cursor = cut;
            }
            KeyCode::Char(c) if !ctrl => {
                let at = self.byte_at(self.cursor);
                self.input.insert(at, c);
                self.cursor += 1;
            }
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                let at = self.byte_at(self.cursor);
                self.input.remove(at);
            }
            KeyCode::Delete if self.cursor < self.input.chars().count() => {
                let at = self.byte_at(self.cursor);
                self.input.remove(at);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(self.input.chars().count()),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.input.chars().count(),
            KeyCode::PageUp => self.scroll += 10,
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::Enter => {
                let text = std::mem::take(&mut self.input);
                self.cursor = 0;
                self.scroll = 0;
                if text == "/quit" {
                    return Action::Quit;
                }
                if let Some(rest) = command_arg(&text, "/file") {
                    if rest.is_empty() {
                        self.system("usage: /file PATH (sends that file to the chat)".into());
                        return Action::None;
                    }
                    return Action::SendFile(upload_path(rest));
                }
                if !text.trim().is_empty() {
                    return Action::Send(text);
                }
            }
            _ => {}
        }
        Action::None
    }

    fn byte_at(&self, chars: usize) -> usize {
        self.input
            .char_indices()
            .nth(chars)
            .map(|(i, _)| i)
            .unwrap_or(self.input.len())
    }

    /// The conversation as screen rows of at most `width` columns.
    fn rows(&self, width: usize) -> Vec<Line<'static>> {
        let mut rows = Vec::new();
        for entry in &self.entries {
            // What the sender (or the daemon) wrote goes through `display::line`: escapes
            // and newlines show as `\u{1b}`, `\n`, so a message is one entry that can
            // neither drive the terminal nor fake a line of its own.
            let (prefix, text, style, mark) = match entry {
                Entry::System(text) => (
                    "* ".to_string(),
                    line(text),
                    Style::default().fg(Color::Yellow),
                    String::new(),
                ),
                Entry::Message(m) => {
                    let outgoing = m.direction == Direction::Outgoing as i32;
                    let who = line(if outgoing { &self.me } else { &m.from });
                    let time = short_time(m.timestamp_ms);
                    let style = if outgoing {
                        Style::default().fg(Color::Cyan)
                    } else {
                        Style::default()
                    };
                    let (text, mark) = if m.state == MessageState::Held as i32 {
                        ("(held: sender's keys changed)".to_string(), String::new())
                    } else if outgoing {
                        let error = if m.error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", line(&m.error))
                        };
                        (message_body(m), format!(" {}{error}", state_mark(m.state)))
                    } else {
                        (message_body(m), String::new())
                    };
                    (format!("{time} {who}: "), text, style, mark)
                }
            };
            let full = format!("{prefix}{text}{mark}");
            for row in wrap(&full, width) {
                rows.push(Line::from(Span::styled(row, style)));
            }
        }
        rows
    }

    fn title(&self) -> String {
        let link = match (self.daemon_up, self.broker_up) {
            (false, _) => "nesd away",
            (true, true) => "online",
            (true, false) => "broker offline (sends queue)",
        };
        let keys = if self.key_changed {
            "  ⚠ KEYS CHANGED"
        } else {
            ""
        };
        let presence = match &self.presence {
            Some(p) => format!(" ({})", super::presence::presence_text(p)),
            None => String::new(),
        };
        format!(
            " nes chat: {} ⇄ {}{presence}  [{link}]{keys}  Esc to leave ",
            self.me, self.peer
        )
    }
}

/// The argument of a chat command: `/file x` → `x` for `/file`; `None` when `text` is not
/// that command (`/filex` is not `/file`).
fn command_arg<'t>(text: &'t str, command: &str) -> Option<&'t str> {
    let rest = text.trim().strip_prefix(command)?;
    match rest.chars().next() {
        None => Some(""),
        Some(c) if c.is_whitespace() => Some(rest.trim()),
        Some(_) => None,
    }
}

/// `14:03`, or `05-01 14:03` for another day.
fn short_time(ms: i64) -> String {
    use chrono::TimeZone;
    let Some(t) = chrono::Local.timestamp_millis_opt(ms).earliest() else {
        return String::new();
    };
    if t.date_naive() == chrono::Local::now().date_naive() {
        t.format("%H:%M").to_string()
    } else {
        t.format("%m-%d %H:%M").to_string()
    }
}

/// Splits `text` into rows of at most `width` display columns, at line ends and, where a
/// line is too long, at the last space that fits (or mid-word when none does).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut rows = Vec::new();
    for line in text.split('\n') {
        let mut row = String::new();
        let mut row_width = 0;
        let mut last_space: Option<usize> = None; // byte index in `row`
        for c in line.chars() {
            let w = c.width().unwrap_or(0);
            if row_width + w > width && !row.is_empty() {
                if c == ' ' {
                    // Break at this space and drop it.
                    rows.push(std::mem::take(&mut row));
                    row_width = 0;
                    last_space = None;
                    continue;
                }
                match last_space {
                    Some(at) if at > 0 => {
                        let rest = row.split_off(at + 1);
                        rows.push(row.trim_end().to_string());
                        row = rest;
                    }
                    _ => rows.push(std::mem::take(&mut row)),
                }
                row_width = row.width();
                last_space = None;
            }
            if c == ' ' {
                last_space = Some(row.len());
            }
            row.push(c);
            row_width += w;
        }
        rows.push(row);
    }
    rows
}

/// Raw mode and the alternate screen for as long as it lives; restored on drop, also
/// when leaving by an error.
struct TerminalGuard {
    terminal: ratatui::Terminal<ratatui::backend::CrosstermBackend<std::io::Stdout>>,
}

impl TerminalGuard {
    fn enter() -> Result<Self, CliError> {
        let fail = |e: std::io::Error| {
            user(format!(
                "cannot use the terminal: {e} (nes chat needs a terminal)"
            ))
        };
        terminal::enable_raw_mode().map_err(fail)?;
        let mut stdout = std::io::stdout();
        if let Err(e) = execute!(stdout, terminal::EnterAlternateScreen) {
            let _ = terminal::disable_raw_mode();
            return Err(fail(e));
        }
        let terminal = ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(stdout))
            .map_err(fail)?;
        Ok(TerminalGuard { terminal })
    }

    fn draw(&mut self, chat: &Chat) -> Result<(), CliError> {
        self.terminal
            .draw(|frame| {
                let [top, input] = Layout::vertical([Constraint::Min(3), Constraint::Length(3)])
                    .areas(frame.area());
                let block = Block::default().borders(Borders::ALL).title(chat.title());
                let inner = block.inner(top);
                let rows = chat.rows(inner.width as usize);
                let height = inner.height as usize;
                let max_scroll = rows.len().saturating_sub(height);
                let scroll = chat.scroll.min(max_scroll);
                let end = rows.len() - scroll;
                let start = end.saturating_sub(height);
                let visible: Vec<Line> = rows[start..end].to_vec();
                frame.render_widget(Paragraph::new(visible).block(block), top);

                let input_block = Block::default()
                    .borders(Borders::ALL)
                    .title(" message (Enter to send; /file PATH sends a file; /quit) ");
                let inner = input_block.inner(input);
                // Show the end of a long input, keeping the cursor in view.
                let before: String = chat.input.chars().take(chat.cursor).collect();
                let before_width = before.width();
                let skip = before_width.saturating_sub(inner.width.saturating_sub(1) as usize);
                let mut shown = String::new();
                let mut col = 0;
                for c in chat.input.chars() {
                    let w = c.width().unwrap_or(0);
                    if col >= skip {
                        shown.push(c);
                    }
                    col += w;
                }
                frame.render_widget(Paragraph::new(shown).block(input_block), input);
                let x = inner.x
                    + (before_width - skip).min(inner.width.saturating_sub(1) as usize) as u16;
                frame.set_cursor_position((x, inner.y));
            })
            .map(|_| ())
            .map_err(|e| user(format!("terminal: {e}")))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(self.terminal.backend_mut(), terminal::LeaveAlternateScreen);
        let _ = self.terminal.show_cursor();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::rpc::{KeyChanged, MessageStateChanged};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn msg(id: &str, from: &str, to: &str, direction: Direction) -> Message {
        Message {
            id: id.into(),
            from: from.into(),
            to: to.into(),
            peer: if direction == Direction::Incoming {
                from.into()
            } else {
                to.into()
            },
            direction: direction as i32,
            text: format!("text {id}"),
            state: if direction == Direction::Incoming {
                MessageState::Received
            } else {
                MessageState::Queued
            } as i32,
            ..Default::default()
        }
    }

    #[test]
    fn typing_editing_and_sending() {
        let mut chat = Chat::new("alice".into(), "bob".into(), true);
        for c in "hi bob".chars() {
            chat.key(key(KeyCode::Char(c)));
        }
        chat.key(key(KeyCode::Left));
        chat.key(key(KeyCode::Left));
        chat.key(key(KeyCode::Left));
        chat.key(key(KeyCode::Backspace));
        assert_eq!(chat.input, "hibob");
        chat.key(key(KeyCode::Char(' ')));
        assert_eq!(chat.key(key(KeyCode::Enter)), Action::Send("hi bob".into()));
        assert!(chat.input.is_empty());
        assert_eq!(
            chat.key(key(KeyCode::Enter)),
            Action::None,
            "empty input sends nothing"
        );
        for c in "ąę word".chars() {
            chat.key(key(KeyCode::Char(c)));
        }
        chat.key(KeyEvent::new(KeyCode::Char('w'), KeyModifiers::CONTROL));
        assert_eq!(chat.input, "ąę ");
        assert_eq!(
            chat.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        assert_eq!(chat.key(key(KeyCode::Esc)), Action::Quit);
    }

    #[test]
    fn events_update_the_conversation_once() {
        let mut chat = Chat::new("alice".into(), "bob".into(), true);
        let ev = |cursor, kind| Event {
            cursor,
            at_ms: 0,
            kind: Some(kind),
            ..Default::default()
        };
        assert!(chat.apply(ev(
            1,
            event::Kind::Message(msg("a", "bob", "alice", Direction::Incoming))
        )));
        assert!(!chat.apply(ev(
            2,
            event::Kind::Message(msg("b", "alice", "bob", Direction::Outgoing))
        )));
        // the same message again (e.g. from history and the stream): shown once
        chat.apply(ev(
            3,
            event::Kind::Message(msg("b", "alice", "bob", Direction::Outgoing)),
        ));
        // another conversation: not shown
        chat.apply(ev(
            4,
            event::Kind::Message(msg("c", "carol", "alice", Direction::Incoming)),
        ));
        assert_eq!(chat.entries.len(), 2);
        chat.apply(ev(
            5,
            event::Kind::StateChanged(MessageStateChanged {
                id: "b".into(),
                peer: "bob".into(),
                state: MessageState::Delivered as i32,
                error: String::new(),
            }),
        ));
        let rows: Vec<String> = chat.rows(80).iter().map(|l| l.to_string()).collect();
        assert!(rows[1].ends_with("text b ✓✓"), "{rows:?}");
        chat.apply(ev(
            5,
            event::Kind::StateChanged(MessageStateChanged {
                id: "b".into(),
                peer: "bob".into(),
                state: MessageState::Read as i32,
                error: String::new(),
            }),
        ));
        let rows: Vec<String> = chat.rows(80).iter().map(|l| l.to_string()).collect();
        assert!(rows[1].ends_with("text b ✓✓ read"), "{rows:?}");
        chat.apply(ev(
            6,
            event::Kind::KeyChanged(KeyChanged {
                username: "bob".into(),
                ..Default::default()
            }),
        ));
        assert!(chat.key_changed);
        assert!(chat.title().contains("KEYS CHANGED"));
        chat.apply(ev(
            7,
            event::Kind::Presence(nes_proto::rpc::Presence {
                username: "bob".into(),
                status: nes_proto::rpc::PresenceStatus::Away as i32,
                note: "at lunch".into(),
                ..Default::default()
            }),
        ));
        assert!(
            chat.title().contains("bob (away (at lunch))"),
            "{}",
            chat.title()
        );
        assert_eq!(chat.last_unread_incoming().as_deref(), Some("a"));
    }

    #[test]
    fn message_text_is_shown_escaped_on_one_entry() {
        let mut chat = Chat::new("bob".into(), "alice".into(), true);
        let mut m = msg("x", "alice", "bob", Direction::Incoming);
        m.text = "\x1b]0;pwned\x07\x1b[2J\r\nmallory: fake line\u{202e}\u{200b}".into();
        chat.upsert(m);
        let rows: Vec<String> = chat.rows(200).iter().map(|l| l.to_string()).collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(
            rows[0].ends_with(
                "alice: \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nmallory: fake line\\u{202e}\\u{200b}"
            ),
            "{rows:?}"
        );
    }

    fn file_msg(id: &str, direction: Direction, state: FileState) -> Message {
        let mut m = if direction == Direction::Incoming {
            msg(id, "bob", "alice", direction)
        } else {
            msg(id, "alice", "bob", direction)
        };
        m.text = String::new();
        m.file = Some(nes_proto::rpc::FileInfo {
            id: id.into(),
            name: "report.pdf".into(),
            size: 1_200_000,
            transferred: 300_000,
            state: state as i32,
            ..Default::default()
        });
        m
    }

    #[test]
    fn files_show_as_lines_and_incoming_ones_once_complete() {
        let mut chat = Chat::new("alice".into(), "bob".into(), true);
        let ev = |cursor, kind| Event {
            cursor,
            kind: Some(kind),
            ..Default::default()
        };
        // Stored while its bytes come: not shown yet.
        assert!(!chat.apply(ev(
            1,
            event::Kind::Message(file_msg("f", Direction::Incoming, FileState::Receiving))
        )));
        assert!(chat.entries.is_empty());
        // Complete: shown, and counts as an incoming message (marked read).
        assert!(chat.apply(ev(
            2,
            event::Kind::File(file_msg("f", Direction::Incoming, FileState::Complete))
        )));
        // One that never completed stays unshown.
        assert!(!chat.apply(ev(
            3,
            event::Kind::File(file_msg("g", Direction::Incoming, FileState::Cancelled))
        )));
        // Ours: shown when queued, its line updated by the file event.
        chat.apply(ev(
            4,
            event::Kind::Message(file_msg("h", Direction::Outgoing, FileState::Sending)),
        ));
        let rows: Vec<String> = chat.rows(200).iter().map(|l| l.to_string()).collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(
            rows[0].ends_with("bob: [file] report.pdf (1.2 MB)"),
            "{rows:?}"
        );
        assert!(
            rows[1].ends_with("alice: [file] report.pdf (1.2 MB) sending 25% …"),
            "{rows:?}"
        );
        let mut failed = file_msg("h", Direction::Outgoing, FileState::Failed);
        if let Some(f) = failed.file.as_mut() {
            f.error = "too_large".into();
        }
        chat.apply(ev(5, event::Kind::File(failed)));
        let rows: Vec<String> = chat.rows(200).iter().map(|l| l.to_string()).collect();
        assert!(
            rows[1].contains("[file] report.pdf (1.2 MB) failed (too_large)"),
            "{rows:?}"
        );
    }

    #[test]
    fn the_file_command() {
        let mut chat = Chat::new("alice".into(), "bob".into(), true);
        let enter = |chat: &mut Chat, text: &str| {
            for c in text.chars() {
                chat.key(key(KeyCode::Char(c)));
            }
            chat.key(key(KeyCode::Enter))
        };
        assert_eq!(
            enter(&mut chat, "/file /tmp/report.pdf"),
            Action::SendFile("/tmp/report.pdf".into())
        );
        assert_eq!(enter(&mut chat, "/file"), Action::None);
        assert!(matches!(chat.entries.last(), Some(Entry::System(t)) if t.contains("usage")));
        // Not the command: sent as text.
        assert_eq!(
            enter(&mut chat, "/files are great"),
            Action::Send("/files are great".into())
        );
        assert_eq!(command_arg("/file  a b ", "/file"), Some("a b"));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(upload_path("~/x.txt"), PathBuf::from(home).join("x.txt"));
        }
        assert_eq!(upload_path("x~/y"), PathBuf::from("x~/y"));
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("hello world", 5), vec!["hello", "world"]);
        assert_eq!(wrap("abcdefgh", 3), vec!["abc", "def", "gh"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(wrap("", 10), vec![""]);
        assert_eq!(wrap("日本語", 4), vec!["日本", "語"]);
        for row in wrap("the quick brown fox jumps over the lazy dog", 7) {
            assert!(row.width() <= 7, "{row}");
        }
    }
}
