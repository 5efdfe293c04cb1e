//! `nes file`: one file message by its id (the `id` that `nes files` and `nes send --file`
//! print).
//!
//! - `nes file save ID [PATH] [--force]`: writes a file's bytes to PATH (default: the
//!   file's own name in the current directory; PATH a directory: that name inside it).
//!   While the file is still arriving it waits for it (a progress bar on stderr when that
//!   is a terminal), and exits 1 if the transfer ends cancelled or failed. An existing
//!   file is never replaced without `--force`. The bytes go to a temporary file in the
//!   destination's directory, are checked against the size and SHA-256 the sender
//!   signed, and only then take the final name, so an interrupted save never leaves a
//!   partial file under it. Prints the path saved.
//! - `nes file cancel ID [--json]`: stops a transfer in either direction (the other side
//!   is told) and prints the message as it is then.
//!
//! The waiting is shared with `nes send --file --wait` ([`wait_transfer`]): it polls
//! `GetFile` every [`POLL`], and waits for a restarted nesd (transfers survive it).

use crate::error::{user, CliError};
use crate::output::{message_json, message_line, print_json, print_line};
use crate::progress;
use crate::Ctx;
use futures::StreamExt;
use nes_client::display::line;
use nes_client::Client;
use nes_proto::rpc::{Direction, FileInfo, FileState, Message, MessageState};
use sha2::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a transfer's progress is asked for while waiting.
pub const POLL: Duration = Duration::from_millis(200);

#[derive(clap::Subcommand, Debug)]
pub enum FileCommand {
    /// Save a file to disk (waiting for it while it is still arriving).
    Save {
        /// The file's id (from `nes files` or `nes listen --json`).
        id: String,
        /// Where to write it (default: its name in the current directory; a directory:
        /// its name in there).
        path: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Cancel a transfer, in either direction.
    Cancel {
        /// The file's id.
        id: String,
        /// Print the message afterwards as a JSON line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(ctx: &Ctx, command: FileCommand) -> Result<(), CliError> {
    match command {
        FileCommand::Save { id, path, force } => save(ctx, id.trim(), path.as_deref(), force).await,
        FileCommand::Cancel { id, json } => {
            let mut client = ctx.client().await?;
            let message = client.cancel_file(id.trim()).await?;
            if json {
                print_json(&message_json(&message, None))
            } else {
                print_line(&message_line(&message))
            }
        }
    }
}

async fn save(ctx: &Ctx, id: &str, path: Option<&Path>, force: bool) -> Result<(), CliError> {
    let mut client = ctx.client().await?;
    let mut message = client.get_file(id).await?;
    let file = file_of(&message)?;
    // Refuse a bad destination now rather than after a long wait; it is looked at again
    // when the bytes are there (something may have taken the name meanwhile).
    destination(path, &file.name, force)?;
    if is_arriving(&message) {
        message = wait_transfer(ctx, &mut client, message).await?;
    }
    let file = file_of(&message)?.clone();
    if message.direction == Direction::Incoming as i32 {
        if let Transfer::Ended(why) = transfer(&message) {
            return Err(user(why));
        }
    }
    let dest = destination(path, &file.name, force)?;
    write_file(&mut client, &file, &dest, force).await?;
    print_line(&dest.display().to_string())
}

/// The file of a message, or why there is none.
fn file_of(message: &Message) -> Result<&FileInfo, CliError> {
    message
        .file
        .as_ref()
        .ok_or_else(|| user(format!("message {} is not a file", message.id)))
}

/// An incoming file whose bytes are still coming: `save` waits for it, and `chat`
/// shows it only once it is complete.
pub fn is_arriving(message: &Message) -> bool {
    message.direction == Direction::Incoming as i32
        && message
            .file
            .as_ref()
            .is_some_and(|f| f.state == FileState::Receiving as i32)
}

/// Where a transfer stands, as `--wait` and `save` decide on it.
#[derive(Debug, PartialEq, Eq)]
pub enum Transfer {
    /// Still going: this many bytes of the size have arrived.
    Running { transferred: u64, size: u64 },
    /// Every byte arrived and was checked.
    Complete,
    /// It stopped for good; the text says what happened, for the user.
    Ended(String),
}

/// Where the transfer of `message` stands.
pub fn transfer(message: &Message) -> Transfer {
    let Some(file) = &message.file else {
        return Transfer::Ended(format!("message {} is not a file", message.id));
    };
    let what = transfer_name(message, file);
    let why = |word: &str, error: &str| match error.is_empty() {
        true => format!("{what} {word}"),
        false => format!("{what} {word}: {}", line(error)),
    };
    // An outgoing message can fail as a whole (no keys for the recipient, ...) while its
    // file still says sending: waiting on would never end.
    if message.state == MessageState::Failed as i32 {
        return Transfer::Ended(why("failed", &message.error));
    }
    match FileState::try_from(file.state) {
        Ok(FileState::Complete) => Transfer::Complete,
        Ok(FileState::Cancelled) => Transfer::Ended(why("was cancelled", &file.error)),
        Ok(FileState::Failed) => Transfer::Ended(why("failed", &file.error)),
        _ => Transfer::Running {
            transferred: file.transferred,
            size: file.size,
        },
    }
}

/// `sending report.pdf to bob` / `report.pdf from alice`, for messages about a transfer.
fn transfer_name(message: &Message, file: &FileInfo) -> String {
    if message.direction == Direction::Outgoing as i32 {
        format!("sending {} to {}", line(&file.name), line(&message.peer))
    } else {
        format!("{} from {}", line(&file.name), line(&message.peer))
    }
}

/// Polls `GetFile` every [`POLL`] until the transfer of `message` is complete (returns
/// the message then) or has ended otherwise (exit 1, saying why). Shows a bar of the
/// bytes transferred on stderr when that is a terminal. A nesd that goes away is waited
/// for: transfers go on after its restart.
pub async fn wait_transfer(
    ctx: &Ctx,
    client: &mut Client,
    mut message: Message,
) -> Result<Message, CliError> {
    let (name, size) = match &message.file {
        Some(f) => (f.name.clone(), f.size),
        None => return Err(user(format!("message {} is not a file", message.id))),
    };
    let bar = progress::bytes(Some(size), &name);
    let mut away = false;
    loop {
        match transfer(&message) {
            Transfer::Complete => {
                bar.finish_and_clear();
                return Ok(message);
            }
            Transfer::Ended(why) => {
                bar.finish_and_clear();
                return Err(user(why));
            }
            Transfer::Running { transferred, .. } => bar.set_position(transferred),
        }
        tokio::time::sleep(POLL).await;
        match client.get_file(&message.id).await {
            Ok(now) => {
                message = now;
                if away {
                    bar.suspend(|| eprintln!("nes: reconnected to nesd"));
                    away = false;
                }
            }
            Err(err) if err.is_not_running() => {
                if !away {
                    bar.suspend(|| eprintln!("nes: {err}; waiting for nesd to come back"));
                    away = true;
                }
                if let Ok(fresh) = Client::connect(&ctx.socket).await {
                    *client = fresh;
                }
            }
            Err(err) => {
                bar.finish_and_clear();
                return Err(err.into());
            }
        }
    }
}

/// Where `nes file save` writes a file called `name`: PATH as given; `name` inside PATH
/// when it is a directory; `name` in the current directory without PATH. Refuses a
/// destination that exists unless `force` (and a directory even then), and a `name`
/// that cannot be a file name here: it comes from the sender, so it must never reach
/// another directory (`../x`, `/etc/x`) or be `.`/`..`.
pub fn destination(path: Option<&Path>, name: &str, force: bool) -> Result<PathBuf, CliError> {
    let own_name = || {
        nes_proto::files::check_name(name).map(|()| PathBuf::from(name)).map_err(|e| {
            user(format!(
                "the file's name {:?} cannot be used as a file name ({e}): give a PATH to save it as",
                line(name)
            ))
        })
    };
    let dest = match path {
        Some(dir) if dir.is_dir() => dir.join(own_name()?),
        Some(path) => path.to_path_buf(),
        None => own_name()?,
    };
    match std::fs::symlink_metadata(&dest) {
        Ok(meta) if meta.is_dir() => Err(user(format!(
            "{} is a directory: give a file's path",
            dest.display()
        ))),
        Ok(_) if !force => Err(user(format!(
            "{} exists: give --force to replace it, or another PATH",
            dest.display()
        ))),
        _ => Ok(dest),
    }
}

/// Streams the bytes of `file` into a temporary file beside `dest`, checks them against
/// the size and hash the sender signed, and gives them `dest`'s name (replacing what is
/// there only with `force`). On any failure the temporary file is removed.
async fn write_file(
    client: &mut Client,
    file: &FileInfo,
    dest: &Path,
    force: bool,
) -> Result<(), CliError> {
    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let cannot = |e: std::io::Error| user(format!("cannot write {}: {e}", dest.display()));
    let mut part = tempfile::Builder::new()
        .prefix(".nes-save-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(cannot)?;
    let mut pieces = client.read_file(&file.id).await?;
    let bar = progress::bytes(Some(file.size), &file.name);
    let mut hash = sha2::Sha256::new();
    let mut written = 0u64;
    while let Some(piece) = pieces.next().await {
        let piece = piece.inspect_err(|_| bar.finish_and_clear())?;
        hash.update(&piece.data);
        part.write_all(&piece.data).map_err(cannot)?;
        written += piece.data.len() as u64;
        bar.set_position(written);
    }
    bar.finish_and_clear();
    part.as_file_mut().sync_all().map_err(cannot)?;
    check_copy(file, written, &hex::encode(hash.finalize()))?;
    let kept = if force {
        part.persist(dest)
    } else {
        // Never replaces: a file that took the name while we wrote is left alone.
        part.persist_noclobber(dest)
    };
    kept.map(drop).map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => user(format!(
            "{} exists (it appeared while saving): give --force to replace it, or another PATH",
            dest.display()
        )),
        _ => cannot(e.error),
    })
}

/// Whether the bytes read are the file the sender signed: its size and SHA-256 (a
/// stream cut short, or a store that went bad, must not be saved as the file).
fn check_copy(file: &FileInfo, written: u64, sha256: &str) -> Result<(), CliError> {
    if written != file.size {
        return Err(user(format!(
            "nesd gave {written} bytes of {}'s {}: not saved; try again",
            line(&file.name),
            file.size
        )));
    }
    if !file.sha256.is_empty() && !file.sha256.eq_ignore_ascii_case(sha256) {
        return Err(user(format!(
            "the bytes nesd gave for {} do not match the hash its sender signed: not saved",
            line(&file.name)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_message(direction: Direction, state: FileState) -> Message {
        Message {
            id: "F".into(),
            peer: "alice".into(),
            direction: direction as i32,
            state: MessageState::Received as i32,
            file: Some(FileInfo {
                id: "F".into(),
                name: "report.pdf".into(),
                size: 1000,
                transferred: 400,
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn destinations() {
        let dir = tempfile::tempdir().unwrap();
        // PATH a directory: the file's name inside it.
        assert_eq!(
            destination(Some(dir.path()), "report.pdf", false).unwrap(),
            dir.path().join("report.pdf")
        );
        // PATH a new file: as given.
        let new = dir.path().join("mine.pdf");
        assert_eq!(destination(Some(&new), "report.pdf", false).unwrap(), new);
        // No PATH: the name, in the current directory.
        assert_eq!(
            destination(None, "some-unlikely-name-4d1f.pdf", false).unwrap(),
            PathBuf::from("some-unlikely-name-4d1f.pdf")
        );
        // An existing file: only with --force.
        std::fs::write(&new, b"old").unwrap();
        let err = destination(Some(&new), "report.pdf", false).unwrap_err();
        assert!(
            matches!(&err, CliError::User(m) if m.contains("--force")),
            "{err}"
        );
        assert_eq!(destination(Some(&new), "report.pdf", true).unwrap(), new);
        std::fs::write(dir.path().join("report.pdf"), b"old").unwrap();
        assert!(destination(Some(dir.path()), "report.pdf", false).is_err());
        // A directory is never a destination, even with --force.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::create_dir(sub.join("report.pdf")).unwrap();
        assert!(destination(Some(&sub), "report.pdf", true).is_err());
    }

    #[test]
    fn a_senders_name_never_leaves_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["../evil", "/etc/passwd", "..", ".", "", "a\nb"] {
            assert!(
                destination(Some(dir.path()), name, false).is_err(),
                "{name:?}"
            );
            assert!(destination(None, name, false).is_err(), "{name:?}");
        }
        // A PATH given by the user is theirs to choose, whatever the name.
        let mine = dir.path().join("fine");
        assert_eq!(destination(Some(&mine), "../evil", false).unwrap(), mine);
    }

    #[test]
    fn transfer_states() {
        let m = file_message(Direction::Incoming, FileState::Receiving);
        assert_eq!(
            transfer(&m),
            Transfer::Running {
                transferred: 400,
                size: 1000
            }
        );
        assert!(is_arriving(&m));
        let m = file_message(Direction::Incoming, FileState::Complete);
        assert_eq!(transfer(&m), Transfer::Complete);
        assert!(!is_arriving(&m));
        let mut m = file_message(Direction::Outgoing, FileState::Cancelled);
        if let Some(f) = m.file.as_mut() {
            f.error = "cancelled_by_recipient".into();
        }
        assert_eq!(
            transfer(&m),
            Transfer::Ended(
                "sending report.pdf to alice was cancelled: cancelled_by_recipient".into()
            )
        );
        assert!(
            !is_arriving(&m),
            "outgoing files are never waited for by save"
        );
        let mut m = file_message(Direction::Outgoing, FileState::Sending);
        m.state = MessageState::Failed as i32;
        m.error = "no keys".into();
        assert_eq!(
            transfer(&m),
            Transfer::Ended("sending report.pdf to alice failed: no keys".into())
        );
        let m = file_message(Direction::Incoming, FileState::Failed);
        assert_eq!(
            transfer(&m),
            Transfer::Ended("report.pdf from alice failed".into())
        );
        let text = Message::default();
        assert!(matches!(transfer(&text), Transfer::Ended(_)));
    }

    #[test]
    fn copies_are_checked() {
        let file = FileInfo {
            name: "a".into(),
            size: 3,
            sha256: hex::encode(sha2::Sha256::digest(b"abc")),
            ..Default::default()
        };
        let good = hex::encode(sha2::Sha256::digest(b"abc"));
        assert!(check_copy(&file, 3, &good).is_ok());
        assert!(check_copy(&file, 2, &good).is_err());
        assert!(check_copy(&file, 3, &hex::encode(sha2::Sha256::digest(b"abd"))).is_err());
    }
}
