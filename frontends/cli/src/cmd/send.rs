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
//! A single send prints the message id (or the stored message as JSON with `--json`).
//! With `--wait` it returns only once the broker has acknowledged the message (exit 0)
//! or the daemon gave up on it (exit 1).

use crate::error::{usage, user, CliError};
use crate::output::{message_json, print_json, print_line, state_name, strip_one_newline};
use crate::Ctx;
use nes_client::{Feed, FeedItem};
use nes_proto::rpc::{event, MessageState, SendReply, SendRequest};
use serde_json::Value;
use std::io::{IsTerminal, Read};
use tokio::io::AsyncBufReadExt;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PEER, then the text (read from stdin when absent). With -t, all words are text.
    #[arg(value_name = "PEER [TEXT]", num_args = 0..)]
    pub words: Vec<String>,
    /// The recipient (the original client's flag).
    #[arg(short = 't', long = "to", value_name = "PEER")]
    pub to: Option<String>,
    /// The text (the original client's flag).
    #[arg(short = 'm', long = "message", value_name = "TEXT")]
    pub message: Option<String>,
    /// Send as a v1 frame on QoS 2, for a peer on the original client.
    #[arg(long)]
    pub legacy: bool,
    /// Read JSON lines {"to":..,"message":..} on stdin; write one result line per input line.
    #[arg(long, conflicts_with_all = ["words", "to", "message", "wait", "json"])]
    pub batch: bool,
    /// Print the stored message as a JSON line instead of its id.
    #[arg(long)]
    pub json: bool,
    /// Wait until the broker acknowledged the message (exit 1 if it failed).
    #[arg(long)]
    pub wait: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    if args.batch {
        return batch(ctx, args.legacy).await;
    }
    let (peer, text) = recipient_and_text(&args)?;
    let text = match text {
        Some(text) => text,
        None => read_stdin_text()?,
    };
    check_text(&text)?;
    let typed = peer;
    let peer = typed.to_lowercase();
    nes_proto::Username::parse(&peer)
        .map_err(|e| user(format!("cannot send to {typed:?}: {e}")))?;

    let mut client = ctx.client().await?;
    // Subscribe before sending so no state change can slip past --wait.
    let mut feed = match args.wait {
        true => Some(Feed::open(&ctx.socket, None).await?),
        false => None,
    };
    let message = client.send(&peer, &text, args.legacy).await?;
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

/// Whether an outgoing state is one `--wait` stops at: the broker has it (sent, or
/// already delivered or read), or it failed.
fn is_final(state: i32) -> bool {
    nes_proto::states::reached_broker(state) || state == MessageState::Failed as i32
}

/// Sorts the positional words and `-t`/`-m` into recipient and (maybe) text.
fn recipient_and_text(args: &Args) -> Result<(String, Option<String>), CliError> {
    let mut words = args.words.iter();
    let peer = match &args.to {
        Some(to) => to.clone(),
        None => words.next().cloned().ok_or_else(|| {
            usage("send needs a recipient: `nes send PEER [TEXT]`, `nes send -t PEER -m TEXT` or `nes send --batch`")
        })?,
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
    Ok((peer.trim().to_string(), text))
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
            to: to.map(String::from),
            message: message.map(String::from),
            legacy: false,
            batch: false,
            json: false,
            wait: false,
        }
    }

    #[test]
    fn forms_of_recipient_and_text() {
        assert_eq!(
            recipient_and_text(&args(&["bob", "hi", "there"], None, None)).unwrap(),
            ("bob".into(), Some("hi there".into()))
        );
        assert_eq!(
            recipient_and_text(&args(&["Bob"], None, None)).unwrap(),
            ("Bob".into(), None)
        );
        assert_eq!(
            recipient_and_text(&args(&[], Some("bob"), Some("hi"))).unwrap(),
            ("bob".into(), Some("hi".into()))
        );
        assert_eq!(
            recipient_and_text(&args(&["hi", "you"], Some("bob"), None)).unwrap(),
            ("bob".into(), Some("hi you".into()))
        );
        assert_eq!(
            recipient_and_text(&args(&["bob"], None, Some("x"))).unwrap(),
            ("bob".into(), Some("x".into()))
        );
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
