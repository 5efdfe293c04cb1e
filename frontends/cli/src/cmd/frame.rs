//! `nes frame seal|open`: one frame at a time, offline, from key files.
//!
//! For tests, debugging and interoperability checks: `seal` prints one frame JSON line
//! (v2 unless `--v1` or `--v3`); `open` reads a frame on stdin and prints the verified
//! inner JSON bytes exactly as they were signed, or exits 1 with a one-line reason.
//!
//! v3 (`--v3` / `open --data-dir`) works from a data directory as `nes prekey new` and
//! nesd lay it out: sealing signs with the sender's newest valid certificate in
//! `DIR/keys/certificates/`, opening finds the frame's prekey in `DIR/keys/prekeys/` (and,
//! for v1/v2 frames, the message key `DIR/keys/<user>-rsa-message`).

use crate::error::{usage, user, CliError};
use crate::username::UsernameParser;
use nes_proto::frame::{self, Draft, Version};
use nes_proto::keys::{key_files, KEYS_DIR, MESSAGE_KEY_SUFFIX};
use nes_proto::v3::{KeyDir, SignedPrekey};
use nes_proto::{PrivateKey, PublicKey, Username};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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
    #[arg(long, value_parser = UsernameParser)]
    pub from: Username,
    /// Recipient username (inner `to`).
    #[arg(long, value_parser = UsernameParser)]
    pub to: Username,
    /// The recipient's message public key (PEM file; v1 and v2).
    #[arg(long, value_name = "PUB", required_unless_present = "v3")]
    pub to_key: Option<PathBuf>,
    /// The sender's signing private key (PEM file; v1 and v2).
    #[arg(long, value_name = "PRIV", required_unless_present = "v3")]
    pub sign_key: Option<PathBuf>,
    /// Seal in the original v1 format.
    #[arg(long, conflicts_with = "v3")]
    pub v1: bool,
    /// Seal a v3 frame to the recipient's signed prekey, with the sender's certificate.
    #[arg(long, requires_all = ["to_prekey", "to_sign_key", "data_dir"], conflicts_with_all = ["to_key", "sign_key"])]
    pub v3: bool,
    /// v3: the recipient's signed prekey (the JSON document `nes prekey new` prints).
    #[arg(long, value_name = "SIGNED_PREKEY_FILE", requires = "v3")]
    pub to_prekey: Option<PathBuf>,
    /// v3: the recipient's (pinned) signing public key, which must have signed the prekey.
    #[arg(long, value_name = "PUB", requires = "v3")]
    pub to_sign_key: Option<PathBuf>,
    /// v3: the sender's data directory (certificates in DIR/keys/certificates/).
    #[arg(long, value_name = "DIR", requires = "v3")]
    pub data_dir: Option<PathBuf>,
    /// The text (read from stdin when absent).
    #[arg(short = 'm', long)]
    pub message: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct OpenArgs {
    /// The recipient's message private key (PEM file; v1 and v2).
    #[arg(long, value_name = "PRIV", required_unless_present = "data_dir")]
    pub key: Option<PathBuf>,
    /// The recipient's data directory: prekeys from DIR/keys/prekeys/ (v3), and the
    /// message key DIR/keys/<me>-rsa-message (v1, v2; without --me, the only one there).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The sender's signing public key (PEM file).
    #[arg(long, value_name = "PUB")]
    pub sender_key: PathBuf,
    /// Refuse the frame unless its inner `to` is this user.
    #[arg(long, value_name = "USER", value_parser = UsernameParser)]
    pub me: Option<Username>,
}

pub fn run(command: FrameCommand) -> Result<(), CliError> {
    match command {
        FrameCommand::Seal(args) => seal(args),
        FrameCommand::Open(args) => open(args),
    }
}

fn seal(args: SealArgs) -> Result<(), CliError> {
    if args.v3 {
        return seal_v3(args);
    }
    let (Some(to_key), Some(sign_key)) = (&args.to_key, &args.sign_key) else {
        return Err(usage(
            "--to-key and --sign-key are required (or --v3 with its options)",
        ));
    };
    let to_key = PublicKey::read(to_key).map_err(|e| user(format!("--to-key: {e}")))?;
    let sign_key = PrivateKey::read(sign_key).map_err(|e| user(format!("--sign-key: {e}")))?;
    let text = match args.message {
        Some(text) => text,
        None => read_stdin_text()?,
    };
    let version = if args.v1 { Version::V1 } else { Version::V2 };
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &args.from,
        to: &args.to,
        text: &text,
        timestamp_ms: nes_proto::now_ms(),
    };
    let sealed =
        frame::seal(version, &draft, &to_key, &sign_key).map_err(|e| user(e.to_string()))?;
    print_line(&sealed.frame)
}

fn seal_v3(args: SealArgs) -> Result<(), CliError> {
    let (from, to) = (&args.from, &args.to);
    let (Some(prekey_file), Some(to_sign_key), Some(data_dir)) =
        (&args.to_prekey, &args.to_sign_key, &args.data_dir)
    else {
        return Err(usage(
            "--v3 needs --to-prekey, --to-sign-key and --data-dir",
        ));
    };
    let to_sign_key =
        PublicKey::read(to_sign_key).map_err(|e| user(format!("--to-sign-key: {e}")))?;
    let bytes = std::fs::read(prekey_file)
        .map_err(|e| user(format!("--to-prekey {}: {e}", prekey_file.display())))?;
    let prekey = SignedPrekey::parse(bytes.trim_ascii()).map_err(|e| {
        user(format!(
            "--to-prekey {}: not a signed prekey: {e}",
            prekey_file.display()
        ))
    })?;
    prekey
        .verify_for(to, &to_sign_key)
        .map_err(|e| user(format!("--to-prekey: {e} (is --to-sign-key {to}'s key?)")))?;
    let now = nes_proto::now_ms();
    let keys = KeyDir::new(data_dir);
    let certificate = keys.current_certificate(from, now).map_err(|e| {
        user(format!(
            "{e}: make one with `nes prekey new --user {from} --data-dir {}`",
            data_dir.display()
        ))
    })?;
    // A certificate the sender's own sign key did not make would be refused by every
    // recipient: say so here when the key is at hand.
    let [_, _, _, own_sign_pub] = key_files(&data_dir.join(KEYS_DIR), from);
    if own_sign_pub.exists() {
        let own = PublicKey::read(&own_sign_pub).map_err(|e| user(e.to_string()))?;
        certificate
            .signed()
            .verify(&own)
            .map_err(|e| user(format!("{}: {e}", own_sign_pub.display())))?;
    }
    let text = match args.message {
        Some(text) => text,
        None => read_stdin_text()?,
    };
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from,
        to,
        text: &text,
        timestamp_ms: now,
    };
    let sealed =
        nes_proto::v3::seal(&draft, &prekey, &certificate, now).map_err(|e| user(e.to_string()))?;
    print_line(&sealed.frame)
}

fn print_line(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn open(args: OpenArgs) -> Result<(), CliError> {
    if args.data_dir.is_some() {
        return open_from_dir(args);
    }
    let Some(key) = &args.key else {
        return Err(usage("--key or --data-dir is required"));
    };
    let key = PrivateKey::read(key).map_err(|e| user(format!("--key: {e}")))?;
    let sender =
        PublicKey::read(&args.sender_key).map_err(|e| user(format!("--sender-key: {e}")))?;
    let me = &args.me;
    let mut input = Vec::new();
    // Read one byte past the limit so an oversized frame is refused, not truncated.
    std::io::stdin()
        .take(frame::MAX_FRAME_BYTES as u64 + 1)
        .read_to_end(&mut input)?;
    let trimmed = input.trim_ascii_end();
    let opened = frame::open(trimmed, &key, &sender).map_err(|e| user(format!("refused: {e}")))?;
    if let Some(me) = &me {
        opened
            .check_recipient(me)
            .map_err(|e| user(format!("refused: {e}")))?;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&opened.inner_bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn open_from_dir(args: OpenArgs) -> Result<(), CliError> {
    let data_dir = args.data_dir.as_deref().unwrap_or(Path::new("."));
    let sender =
        PublicKey::read(&args.sender_key).map_err(|e| user(format!("--sender-key: {e}")))?;
    let me = &args.me;
    let message_key = match &args.key {
        Some(path) => Some(PrivateKey::read(path).map_err(|e| user(format!("--key: {e}")))?),
        None => match message_key_file(data_dir, me.as_ref())? {
            Some(path) => Some(PrivateKey::read(&path).map_err(|e| user(e.to_string()))?),
            None => None,
        },
    };
    let keys = KeyDir::new(data_dir);
    let input = read_frame()?;
    let opened = frame::open_with(input.trim_ascii_end(), message_key.as_ref(), &keys, &sender)
        .map_err(|e| {
            let hint = match &e {
                frame::FrameError::UnknownPrekey => {
                    format!(
                        " (no such prekey in {}: never made here, or deleted)",
                        keys.prekeys_dir().display()
                    )
                }
                frame::FrameError::Unwrap if message_key.is_none() => {
                    format!(
                        " (no message key in {}; pass --me or --key)",
                        data_dir.join("keys").display()
                    )
                }
                _ => String::new(),
            };
            user(format!("refused ({}): {e}{hint}", e.reason()))
        })?;
    if let Some(me) = &me {
        opened
            .check_recipient(me)
            .map_err(|e| user(format!("refused ({}): {e}", e.reason())))?;
    }
    print_line(&opened.inner_bytes)
}

/// `DIR/keys/<me>-rsa-message` when `me` is given (and exists); without `me`, the only
/// `*-rsa-message` file there, if there is exactly one.
fn message_key_file(data_dir: &Path, me: Option<&Username>) -> Result<Option<PathBuf>, CliError> {
    let keys = data_dir.join(KEYS_DIR);
    if let Some(me) = me {
        let [path, ..] = key_files(&keys, me);
        return Ok(path.exists().then_some(path));
    }
    let Ok(entries) = std::fs::read_dir(&keys) else {
        return Ok(None);
    };
    let found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(MESSAGE_KEY_SUFFIX))
        })
        .collect();
    Ok(match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    })
}

fn read_frame() -> Result<Vec<u8>, CliError> {
    let mut input = Vec::new();
    // Read one byte past the limit so an oversized frame is refused, not truncated.
    std::io::stdin()
        .take(frame::MAX_FRAME_BYTES as u64 + 1)
        .read_to_end(&mut input)?;
    Ok(input)
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
