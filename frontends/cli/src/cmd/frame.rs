//! `nes frame seal|open`: one frame at a time, offline, from key files.
//!
//! For tests, debugging and interoperability checks: `seal` prints one frame JSON line
//! (v2 unless `--v1`); `open` reads a frame on stdin and prints the verified inner JSON
//! bytes exactly as they were signed, or exits 1 with a one-line reason.

use crate::error::{user, CliError};
use nes_proto::frame::{self, Draft, Version};
use nes_proto::{PrivateKey, PublicKey, Username};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum FrameCommand {
    /// Seal one message into a frame and print it.
    Seal(SealArgs),
    /// Open a frame read on stdin and print its verified inner JSON.
    Open(OpenArgs),
}

#[derive(clap::Args, Debug)]
pub struct SealArgs {
    /// Sender username (inner `from`).
    #[arg(long)]
    pub from: String,
    /// Recipient username (inner `to`).
    #[arg(long)]
    pub to: String,
    /// The recipient's message public key (PEM file).
    #[arg(long, value_name = "PUB")]
    pub to_key: PathBuf,
    /// The sender's signing private key (PEM file).
    #[arg(long, value_name = "PRIV")]
    pub sign_key: PathBuf,
    /// Seal in the original v1 format.
    #[arg(long)]
    pub v1: bool,
    /// The text (read from stdin when absent).
    #[arg(short = 'm', long)]
    pub message: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct OpenArgs {
    /// The recipient's message private key (PEM file).
    #[arg(long, value_name = "PRIV")]
    pub key: PathBuf,
    /// The sender's signing public key (PEM file).
    #[arg(long, value_name = "PUB")]
    pub sender_key: PathBuf,
    /// Refuse the frame unless its inner `to` is this user.
    #[arg(long, value_name = "USER")]
    pub me: Option<String>,
}

pub fn run(command: FrameCommand) -> Result<(), CliError> {
    match command {
        FrameCommand::Seal(args) => seal(args),
        FrameCommand::Open(args) => open(args),
    }
}

fn seal(args: SealArgs) -> Result<(), CliError> {
    let from = Username::parse(&args.from).map_err(|e| user(format!("--from: {e}")))?;
    let to = Username::parse(&args.to).map_err(|e| user(format!("--to: {e}")))?;
    let to_key = PublicKey::read(&args.to_key).map_err(|e| user(format!("--to-key: {e}")))?;
    let sign_key = PrivateKey::read(&args.sign_key).map_err(|e| user(format!("--sign-key: {e}")))?;
    let text = match args.message {
        Some(text) => text,
        None => read_stdin_text()?,
    };
    let version = if args.v1 { Version::V1 } else { Version::V2 };
    let draft = Draft { from: &from, to: &to, text: &text, timestamp_ms: nes_proto::now_ms() };
    let sealed = frame::seal(version, &draft, &to_key, &sign_key).map_err(|e| user(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&sealed.frame)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn open(args: OpenArgs) -> Result<(), CliError> {
    let key = PrivateKey::read(&args.key).map_err(|e| user(format!("--key: {e}")))?;
    let sender = PublicKey::read(&args.sender_key).map_err(|e| user(format!("--sender-key: {e}")))?;
    let me = match &args.me {
        Some(me) => Some(Username::parse(me).map_err(|e| user(format!("--me: {e}")))?),
        None => None,
    };
    let mut input = Vec::new();
    // Read one byte past the limit so an oversized frame is refused, not truncated.
    std::io::stdin()
        .take(frame::MAX_FRAME_BYTES as u64 + 1)
        .read_to_end(&mut input)?;
    let trimmed = input.trim_ascii_end();
    let opened = frame::open(trimmed, &key, &sender).map_err(|e| user(format!("refused: {e}")))?;
    if let Some(me) = &me {
        opened.check_recipient(me).map_err(|e| user(format!("refused: {e}")))?;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&opened.inner_bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn read_stdin_text() -> Result<String, CliError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| user(format!("reading the message from stdin: {e}")))?;
    // `echo hi | nes ...` means "hi": drop the one line end the shell adds.
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}
