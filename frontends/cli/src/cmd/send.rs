//! `nes send`: one message, or many with `--batch`.
//!
//! Forms (frontends/README.md "`nes` commands"):
//! - `nes send PEER TEXT...` (the words are joined with spaces);
//! - `nes send PEER` with the text on stdin (`nes send bob < file`, `cmd | nes send bob`);
//!   one trailing line end is dropped;
//! - `nes send -t PEER -m TEXT`, the original client's flags;
//! - `nes send --batch`: JSON lines `{"to":..,"message":..}` on stdin (also `"text"`
//!   for the text and `"legacy": true`), one JSON result line per input line on stdout,
//!   in input order, through the `SendStream` RPC. A bad line gets an error result and
//!   the batch goes on; the exit code is 1 if any line failed. Blank lines are skipped.
//!
//! - `nes send PEER --file PATH [--file PATH ...]`: each file as a message of its own,
//!   in order, streamed to nesd in 64 KiB pieces (`SendFile`); `--file -` reads stdin
//!   and needs `--name NAME`, the name the recipient sees. `--media-type` sets the
//!   media type of every file sent (default: nesd guesses from the name). No TEXT with
//!   `--file`: a text goes as a message of its own. Every file is opened before the
//!   first is sent, so a mistyped path sends nothing.
//!
//! A single send prints the message id (or the stored message as JSON with `--json`;
//! a file's with its `file` object), a file send one line per file. With `--wait` a
//! text returns only once the broker has acknowledged the message (exit 0) or the
//! daemon gave up on it (exit 1); files only once the recipient has every byte (exit 0)
//! or the transfer was cancelled or failed (exit 1, saying why). When stderr is a
//! terminal, a progress bar shows the upload and then the transfer.

use crate::error::{usage, user, CliError};
use crate::output::{message_json, print_json, print_line, state_name, strip_one_newline};
use crate::username::{refusal, username, UsernameParser};
use crate::Ctx;
use nes_client::{Feed, FeedItem};
use nes_proto::rpc::{event, MessageState, SendReply, SendRequest};
use nes_proto::Username;
use serde_json::Value;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncRead};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PEER, then the text (read from stdin when absent). With -t, all words are text.
    #[arg(value_name = "PEER [TEXT]", num_args = 0..)]
    pub words: Vec<String>,
    /// The recipient (the original client's flag).
    #[arg(short = 't', long = "to", value_name = "PEER", value_parser = UsernameParser)]
    pub to: Option<Username>,
    /// The text (the original client's flag).
    #[arg(short = 'm', long = "message", value_name = "TEXT")]
    pub message: Option<String>,
    /// Send as a v1 frame on QoS 2, for a peer on the original client.
    #[arg(long)]
    pub legacy: bool,
    /// Send this file, as a message of its own (repeatable: sent in order). `-` reads
    /// stdin (then --name is needed). No TEXT with it.
    #[arg(long = "file", value_name = "PATH", conflicts_with_all = ["message", "legacy"])]
    pub files: Vec<PathBuf>,
    /// The name the recipient sees: needed for `--file -`; with one file, instead of its
    /// own name.
    #[arg(long, value_name = "NAME", requires = "files")]
    pub name: Option<String>,
    /// The media type of the files sent, e.g. application/pdf (default: guessed from the
    /// name).
    #[arg(long, value_name = "TYPE", requires = "files")]
    pub media_type: Option<String>,
    /// Read JSON lines {"to":..,"message":..} on stdin; write one result line per input line.
    #[arg(long, conflicts_with_all = ["words", "to", "message", "wait", "json", "files"])]
    pub batch: bool,
    /// Print the stored message as a JSON line instead of its id.
    #[arg(long)]
    pub json: bool,
    /// Wait until the broker acknowledged the message (exit 1 if it failed); for a file,
    /// until the recipient has all of it (exit 1 if cancelled or failed).
    #[arg(long)]
    pub wait: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    if args.batch {
        return batch(ctx, args.legacy).await;
    }
    if !args.files.is_empty() {
        return send_files(ctx, &args).await;
    }
    let (peer, text) = recipient_and_text(&args)?;
    let text = match text {
        Some(text) => text,
        None => read_stdin_text()?,
    };
    check_text(&text)?;

    let mut client = ctx.client().await?;
    // Subscribe before sending so no state change can slip past --wait.
    let mut feed = match args.wait {
        true => Some(Feed::open(&ctx.socket, None).await?),
        false => None,
    };
    let message = client.send(peer.as_str(), &text, args.legacy).await?;
    if args.json {
        print_json(&message_json(&message, None))?;
    } else {
        print_line(&message.id)?;
    }
    let Some(feed) = feed.as_mut() else {
        return Ok(());
    };
    let mut state = message.state;
    while !is_final(state) {
        match feed.next().await? {
            FeedItem::Event(ev) => {
                if let Some(event::Kind::StateChanged(change)) = ev.kind {
                    if change.id == message.id {
                        state = change.state;
                        if state == MessageState::Failed as i32 {
                            return Err(user(format!(
                                "sending to {peer} failed: {}",
                                change.error
                            )));
                        }
                    }
                }
            }
            FeedItem::Disconnected(err) => eprintln!("nes: {err}; waiting for nesd to come back"),
            FeedItem::Reconnected => eprintln!("nes: reconnected to nesd"),
            _ => {}
        }
    }
    if state == MessageState::Failed as i32 {
        return Err(user(format!("sending to {peer} failed: {}", message.error)));
    }
    Ok(())
}

/// One file of `--file`, before it is opened.
#[derive(Debug, PartialEq, Eq)]
pub struct FileToSend {
    /// Where the bytes come from: `None` for stdin.
    pub path: Option<PathBuf>,
    /// The name the recipient sees.
    pub name: String,
}

/// Sorts out the `--file`s and `--name`: stdin at most once and only with a name, a
/// name for one file only, and a name for every file that can be sent under it (the
/// rules of `nes_proto::files::check_name`, which nesd applies too).
pub fn plan_files(files: &[PathBuf], name: Option<&str>) -> Result<Vec<FileToSend>, CliError> {
    let stdin = |p: &PathBuf| p.as_os_str() == "-";
    let from_stdin = files.iter().filter(|p| stdin(p)).count();
    if from_stdin > 1 {
        return Err(usage("stdin can be read only once: give `--file -` once"));
    }
    if from_stdin == 1 && name.is_none() {
        return Err(usage(
            "--file - reads the file from stdin: give the name the recipient sees with --name NAME",
        ));
    }
    if name.is_some() && from_stdin == 0 && files.len() > 1 {
        return Err(usage(
            "--name names one file: with several --file, use it only for `--file -`",
        ));
    }
    files
        .iter()
        .map(|path| {
            let is_stdin = stdin(path);
            // --name goes to stdin's file, or else to the one file given.
            let name = match name {
                Some(name) if is_stdin || from_stdin == 0 => name.to_string(),
                _ => own_name(path)?,
            };
            let path = (!is_stdin).then(|| path.clone());
            nes_proto::files::check_name(&name)
                .map_err(|e| user(format!("cannot send a file named {name:?}: {e}")))?;
            Ok(FileToSend { path, name })
        })
        .collect()
}

/// The name a file is sent under by default: the last part of its path.
fn own_name(path: &Path) -> Result<String, CliError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(String::from)
        .ok_or_else(|| {
            user(format!(
                "{}: no file name to send it under (give one with --name)",
                path.display()
            ))
        })
}

/// A file opened for sending, and its size when known (not for stdin).
struct Opened {
    file: FileToSend,
    reader: Box<dyn AsyncRead + Unpin + Send>,
    size: Option<u64>,
}

/// Opens a file of `--file` (a regular file, or stdin).
async fn open(file: FileToSend) -> Result<Opened, CliError> {
    let Some(path) = &file.path else {
        if std::io::stdin().is_terminal() {
            eprintln!("nes: reading {} from stdin; Ctrl-D ends it", file.name);
        }
        return Ok(Opened {
            file,
            reader: Box::new(tokio::io::stdin()),
            size: None,
        });
    };
    let cannot = |e: std::io::Error| user(format!("cannot send {}: {e}", path.display()));
    let opened = tokio::fs::File::open(path).await.map_err(cannot)?;
    let meta = opened.metadata().await.map_err(cannot)?;
    if !meta.is_file() {
        return Err(user(format!(
            "cannot send {}: not a regular file",
            path.display()
        )));
    }
    Ok(Opened {
        size: Some(meta.len()),
        reader: Box::new(opened),
        file,
    })
}

/// `nes send PEER --file PATH...`: see the module docs.
async fn send_files(ctx: &Ctx, args: &Args) -> Result<(), CliError> {
    let (peer, text) = recipient_and_text(args)?;
    if text.is_some() {
        return Err(usage(
            "with --file, give no TEXT: each file is a message of its own (send the text with another `nes send`)",
        ));
    }
    let mut opened = Vec::new();
    for file in plan_files(&args.files, args.name.as_deref())? {
        opened.push(open(file).await?);
    }
    let media_type = args.media_type.as_deref().unwrap_or("");

    let mut client = ctx.client().await?;
    let mut sent = Vec::new();
    for Opened { file, reader, size } in opened {
        let bar = crate::progress::bytes(size, &file.name);
        let result = client
            .send_file(peer.as_str(), &file.name, media_type, reader, |n| {
                bar.set_position(n)
            })
            .await;
        bar.finish_and_clear();
        let message = result.map_err(|e| match e.is_not_running() {
            true => CliError::from(e),
            false => user(format!(
                "cannot send {} to {peer}: {e}",
                nes_client::display::line(&file.name)
            )),
        })?;
        if args.json {
            print_json(&message_json(&message, None))?;
        } else {
            print_line(&message.id)?;
        }
        sent.push(message);
    }
    if !args.wait {
        return Ok(());
    }
    // Each transfer runs in nesd meanwhile; every one is waited for, and every failure
    // told, before the exit code says whether all arrived.
    let mut failed = Vec::new();
    for message in sent {
        if let Err(err) = super::file::wait_transfer(ctx, &mut client, message).await {
            match err {
                CliError::User(why) => failed.push(why),
                other => return Err(other),
            }
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(user(failed.join("; "))),
    }
}

/// Whether an outgoing state is one `--wait` stops at: the broker has it (sent, or
/// already delivered or read), or it failed.
fn is_final(state: i32) -> bool {
    nes_proto::states::reached_broker(state) || state == MessageState::Failed as i32
}

/// Sorts the positional words and `-t`/`-m` into recipient and (maybe) text.
///
/// `-t` was parsed by clap; a positional PEER cannot be (with `-t`, every word is text),
/// so it is parsed here, with the same parser and the same message.
fn recipient_and_text(args: &Args) -> Result<(Username, Option<String>), CliError> {
    let mut words = args.words.iter();
    let peer = match &args.to {
        Some(to) => to.clone(),
        None => {
            let typed = words.next().ok_or_else(|| {
                usage("send needs a recipient: `nes send PEER [TEXT]`, `nes send -t PEER -m TEXT` or `nes send --batch`")
            })?;
            username(typed).map_err(|e| user(refusal("send", "words", typed, &e)))?
        }
    };
    let rest: Vec<&String> = words.collect();
    let text = match (&args.message, rest.is_empty()) {
        (Some(_), false) => {
            return Err(usage(
                "give the text either with -m or as words after the recipient, not both",
            ))
        }
        (Some(m), true) => Some(m.clone()),
        (None, false) => Some(
            rest.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (None, true) => None,
    };
    Ok((peer, text))
}

/// Refuses an empty (or whitespace-only) message before bothering the daemon.
fn check_text(text: &str) -> Result<(), CliError> {
    if text.trim().is_empty() {
        return Err(user(
            "empty message: nothing to send (give the text as an argument, with -m, or on stdin)",
        ));
    }
    Ok(())
}

fn read_stdin_text() -> Result<String, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("nes: type the message, then Ctrl-D on a line of its own");
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| user(format!("reading the message from stdin: {e}")))?;
    let text =
        String::from_utf8(bytes).map_err(|_| user("the message on stdin is not UTF-8 text"))?;
    Ok(strip_one_newline(text))
}

/// One input line of `--batch`, parsed.
#[derive(Debug, PartialEq)]
pub enum BatchLine {
    /// Blank: skipped, no result line.
    Blank,
    /// A request to send.
    Send(SendRequest),
    /// Refused before sending; the result line says why.
    Bad { to: Option<String>, error: String },
}

/// Parses one `--batch` input line. `legacy` is the command's `--legacy` flag, the
/// default for lines without a `"legacy"` field.
pub fn parse_batch_line(line: &str, legacy: bool) -> BatchLine {
    let line = line.trim();
    if line.is_empty() {
        return BatchLine::Blank;
    }
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return BatchLine::Bad {
                to: None,
                error: format!("not a JSON object: {e}"),
            }
        }
    };
    let Some(object) = value.as_object() else {
        return BatchLine::Bad {
            to: None,
            error: "not a JSON object: expected {\"to\":..,\"message\":..}".into(),
        };
    };
    let to = match object.get("to") {
        Some(Value::String(s)) => s.trim().to_lowercase(),
        Some(_) => {
            return BatchLine::Bad {
                to: None,
                error: "\"to\" must be a string".into(),
            }
        }
        None => {
            return BatchLine::Bad {
                to: None,
                error: "missing \"to\"".into(),
            }
        }
    };
    let text = match object.get("message").or_else(|| object.get("text")) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return BatchLine::Bad {
                to: Some(to),
                error: "\"message\" must be a string".into(),
            }
        }
        None => {
            return BatchLine::Bad {
                to: Some(to),
                error: "missing \"message\"".into(),
            }
        }
    };
    let legacy = match object.get("legacy") {
        None | Some(Value::Null) => legacy,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return BatchLine::Bad {
                to: Some(to),
                error: "\"legacy\" must be true or false".into(),
            }
        }
    };
    if let Err(e) = nes_proto::Username::parse(&to) {
        return BatchLine::Bad {
            to: Some(to),
            error: e.to_string(),
        };
    }
    if text.trim().is_empty() {
        return BatchLine::Bad {
            to: Some(to),
            error: "empty message".into(),
        };
    }
    BatchLine::Send(SendRequest { to, text, legacy })
}

/// One result line of `--batch`, fields in this order: `line` (1-based input line),
/// `ok`, `to`, then `id` and `state` on success or `error` and `code` on failure.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BatchResult {
    pub line: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The result line of a reply from the daemon.
pub fn reply_json(line: u64, to: &str, reply: &SendReply) -> BatchResult {
    match (&reply.message, reply.error.is_empty()) {
        (Some(message), true) => BatchResult {
            line,
            ok: true,
            to: Some(to.into()),
            id: Some(message.id.clone()),
            state: Some(state_name(message.state)),
            error: None,
            code: None,
        },
        _ => BatchResult {
            line,
            ok: false,
            to: Some(to.into()),
            id: None,
            state: None,
            error: Some(if reply.error.is_empty() {
                "nesd returned no message".into()
            } else {
                reply.error.clone()
            }),
            code: Some(code_name(reply.code)),
        },
    }
}

/// The result line of a line refused before sending.
pub fn bad_line_json(line: u64, to: Option<&str>, error: &str) -> BatchResult {
    BatchResult {
        line,
        ok: false,
        to: to.map(String::from),
        id: None,
        state: None,
        error: Some(error.into()),
        code: Some("invalid_argument".into()),
    }
}

/// `not_found`, `invalid_argument`, ... for a gRPC code number.
fn code_name(code: i32) -> String {
    let name = format!("{:?}", tonic::Code::from_i32(code));
    // CamelCase → snake_case.
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// What the printer waits for, in input order.
enum Slot {
    /// Already decided (a bad line).
    Ready(BatchResult),
    /// The next reply of the stream belongs to this line.
    Pending { line: u64, to: String },
}

async fn batch(ctx: &Ctx, legacy: bool) -> Result<(), CliError> {
    let mut client = ctx.client().await?;
    let (requests, request_rx) = tokio::sync::mpsc::channel::<SendRequest>(64);
    let (slots, mut slot_rx) = tokio::sync::mpsc::channel::<Slot>(1024);

    // The reader feeds the stream and, in the same order, tells the printer what to
    // expect; requests go first, so a Pending slot's reply is always on its way.
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut number = 0u64;
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    number += 1;
                    let bad = bad_line_json(number, None, &format!("cannot read stdin: {e}"));
                    let _ = slots.send(Slot::Ready(bad)).await;
                    break;
                }
            };
            number += 1;
            match parse_batch_line(&line, legacy) {
                BatchLine::Blank => {}
                BatchLine::Bad { to, error } => {
                    if slots
                        .send(Slot::Ready(bad_line_json(number, to.as_deref(), &error)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                BatchLine::Send(request) => {
                    let to = request.to.clone();
                    if requests.send(request).await.is_err() {
                        break;
                    }
                    if slots
                        .send(Slot::Pending { line: number, to })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });

    let response = client
        .rpc()
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(request_rx))
        .await;
    let mut replies = response.map_err(|s| client.error(s))?.into_inner();
    let mut failed = 0u64;
    let mut gone: Option<nes_client::Error> = None;
    while let Some(slot) = slot_rx.recv().await {
        let result = match slot {
            Slot::Ready(value) => value,
            Slot::Pending { line, to } => match &gone {
                Some(err) => bad_line_json(line, Some(&to), &err.to_string()),
                None => match replies.message().await {
                    Ok(Some(reply)) => reply_json(line, &to, &reply),
                    Ok(None) => {
                        let err = nes_client::Error::NotRunning {
                            socket: ctx.socket.clone(),
                            reason: "nesd ended the batch early".into(),
                        };
                        let v = bad_line_json(line, Some(&to), &err.to_string());
                        gone = Some(err);
                        v
                    }
                    Err(status) => {
                        let err = client.error(status);
                        let v = bad_line_json(line, Some(&to), &err.to_string());
                        gone = Some(err);
                        v
                    }
                },
            },
        };
        if !result.ok {
            failed += 1;
        }
        if let Err(e) = print_json(&result) {
            reader.abort();
            return Err(e);
        }
    }
    let _ = reader.await;
    match gone {
        Some(err) if err.is_not_running() => Err(err.into()),
        _ if failed > 0 => Err(user(format!(
            "{failed} message(s) of the batch failed (see the result lines with \"ok\":false)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::rpc::Message;

    fn args(words: &[&str], to: Option<&str>, message: Option<&str>) -> Args {
        Args {
            words: words.iter().map(|s| s.to_string()).collect(),
            to: to.map(|t| username(t).unwrap()),
            message: message.map(String::from),
            legacy: false,
            files: Vec::new(),
            name: None,
            media_type: None,
            batch: false,
            json: false,
            wait: false,
        }
    }

    #[test]
    fn files_to_send() {
        let paths = |ps: &[&str]| ps.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            plan_files(&paths(&["/tmp/a.pdf", "b.txt"]), None).unwrap(),
            vec![
                FileToSend {
                    path: Some("/tmp/a.pdf".into()),
                    name: "a.pdf".into()
                },
                FileToSend {
                    path: Some("b.txt".into()),
                    name: "b.txt".into()
                },
            ]
        );
        // One file, renamed.
        assert_eq!(
            plan_files(&paths(&["/tmp/a.pdf"]), Some("report.pdf")).unwrap()[0].name,
            "report.pdf"
        );
        // Stdin needs a name; the name then goes to stdin only.
        assert!(matches!(
            plan_files(&paths(&["-"]), None),
            Err(CliError::Usage(_))
        ));
        assert_eq!(
            plan_files(&paths(&["a.txt", "-"]), Some("notes.txt")).unwrap(),
            vec![
                FileToSend {
                    path: Some("a.txt".into()),
                    name: "a.txt".into()
                },
                FileToSend {
                    path: None,
                    name: "notes.txt".into()
                },
            ]
        );
        assert!(matches!(
            plan_files(&paths(&["-", "-"]), Some("x")),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            plan_files(&paths(&["a", "b"]), Some("x")),
            Err(CliError::Usage(_))
        ));
        // Names nesd would refuse are refused here (exit 1), as is a path without one.
        assert!(matches!(
            plan_files(&paths(&["-"]), Some("../x")),
            Err(CliError::User(_))
        ));
        assert!(matches!(
            plan_files(&paths(&["/"]), None),
            Err(CliError::User(_))
        ));
    }

    #[test]
    fn file_flags_parse() {
        use clap::Parser;
        let parse = |line: &[&str]| crate::Cli::try_parse_from(line);
        assert!(parse(&["nes", "send", "bob", "--file", "a", "--file", "b"]).is_ok());
        // --name and --media-type only with --file; --file not with -m, --batch, --legacy.
        for bad in [
            &["nes", "send", "bob", "hi", "--name", "x"][..],
            &["nes", "send", "bob", "--file", "a", "-m", "hi"],
            &["nes", "send", "--batch", "--file", "a"],
            &["nes", "send", "bob", "--file", "a", "--legacy"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn forms_of_recipient_and_text() {
        let bob = username("bob").unwrap();
        assert_eq!(
            recipient_and_text(&args(&["bob", "hi", "there"], None, None)).unwrap(),
            (bob.clone(), Some("hi there".into()))
        );
        assert_eq!(
            recipient_and_text(&args(&[" Bob"], None, None)).unwrap(),
            (bob.clone(), None)
        );
        assert_eq!(
            recipient_and_text(&args(&[], Some("bob"), Some("hi"))).unwrap(),
            (bob.clone(), Some("hi".into()))
        );
        // With -t, every word is text, even one that is no username.
        assert_eq!(
            recipient_and_text(&args(&["hi!", "you"], Some("bob"), None)).unwrap(),
            (bob.clone(), Some("hi! you".into()))
        );
        assert_eq!(
            recipient_and_text(&args(&["bob"], None, Some("x"))).unwrap(),
            (bob, Some("x".into()))
        );
        // A bad positional PEER is refused as clap refuses a bad -t: exit 1, named.
        match recipient_and_text(&args(&["B@d!", "hi"], None, None)) {
            Err(CliError::User(message)) => {
                assert!(
                    message.starts_with("cannot send to \"B@d!\": invalid username"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recipient_and_text(&args(&[], None, None)),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            recipient_and_text(&args(&["bob", "x"], None, Some("y"))),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn empty_text_is_refused() {
        assert!(check_text("").is_err());
        assert!(check_text(" \n").is_err());
        assert!(check_text("x").is_ok());
    }

    #[test]
    fn batch_lines() {
        assert_eq!(parse_batch_line("   ", false), BatchLine::Blank);
        assert_eq!(
            parse_batch_line(r#"{"to":"Bob","message":"hi"}"#, false),
            BatchLine::Send(SendRequest {
                to: "bob".into(),
                text: "hi".into(),
                legacy: false
            })
        );
        assert_eq!(
            parse_batch_line(r#"{"to":"bob","text":"hi","legacy":true}"#, false),
            BatchLine::Send(SendRequest {
                to: "bob".into(),
                text: "hi".into(),
                legacy: true
            })
        );
        assert_eq!(
            parse_batch_line(r#"{"to":"bob","message":"hi"}"#, true),
            BatchLine::Send(SendRequest {
                to: "bob".into(),
                text: "hi".into(),
                legacy: true
            })
        );
        let bad = |line: &str| match parse_batch_line(line, false) {
            BatchLine::Bad { error, .. } => error,
            other => panic!("{line}: {other:?}"),
        };
        assert!(bad("not json").contains("not a JSON object"));
        assert!(bad("[1,2]").contains("not a JSON object"));
        assert!(bad(r#"{"message":"hi"}"#).contains("missing \"to\""));
        assert!(bad(r#"{"to":"bob"}"#).contains("missing \"message\""));
        assert!(bad(r#"{"to":"bob","message":""}"#).contains("empty message"));
        assert!(bad(r#"{"to":"b","message":"x"}"#).len() > 3);
        assert!(bad(r#"{"to":5,"message":"x"}"#).contains("string"));
        assert!(bad(r#"{"to":"bob","message":"x","legacy":"yes"}"#).contains("legacy"));
    }

    #[test]
    fn result_lines() {
        let ok = SendReply {
            message: Some(Message {
                id: "ID==".into(),
                state: MessageState::Queued as i32,
                ..Default::default()
            }),
            error: String::new(),
            code: 0,
        };
        let v = serde_json::to_string(&reply_json(3, "bob", &ok)).unwrap();
        assert_eq!(
            v,
            r#"{"line":3,"ok":true,"to":"bob","id":"ID==","state":"queued"}"#
        );
        let refused = SendReply {
            message: None,
            error: "unknown user zed".into(),
            code: tonic::Code::NotFound as i32,
        };
        let v = serde_json::to_string(&reply_json(4, "zed", &refused)).unwrap();
        assert_eq!(
            v,
            r#"{"line":4,"ok":false,"to":"zed","error":"unknown user zed","code":"not_found"}"#
        );
        let v = serde_json::to_string(&bad_line_json(5, None, "not a JSON object")).unwrap();
        assert_eq!(
            v,
            r#"{"line":5,"ok":false,"error":"not a JSON object","code":"invalid_argument"}"#
        );
    }

    #[test]
    fn code_names() {
        assert_eq!(
            code_name(tonic::Code::InvalidArgument as i32),
            "invalid_argument"
        );
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition as i32),
            "failed_precondition"
        );
    }
}
