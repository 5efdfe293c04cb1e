//! `nes prekey new`: make a v3 prekey and signing certificate, offline.
//!
//! Reads the identity's RSA sign key from `DIR/keys/<user>-rsa-sign` (as `nes generate`
//! writes it), makes a prekey (X25519 + ML-KEM-768) and an Ed25519 signing certificate,
//! both valid from now to now + 2 × `--rotation`, signs them, saves their private files
//! under `DIR/keys/prekeys/` and `DIR/keys/certificates/` (0600, folders 0700), and
//! prints the signed prekey: the exact document to publish (`PUT /users/<user>/prekey`)
//! or to hand to a sender (`nes frame seal --v3 --to-prekey FILE`), then a newline.

use crate::cmd::generate::{default_data_dir, key_files};
use crate::error::{user, CliError};
use crate::username::UsernameParser;
use nes_proto::v3::KeyDir;
use nes_proto::{PrivateKey, Username};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Subcommand, Debug)]
pub enum PrekeyCommand {
    /// Make a new prekey and signing certificate; print the signed prekey.
    New(NewArgs),
}

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The identity's username.
    #[arg(short = 'u', long, env = "NES_USER", value_parser = UsernameParser)]
    pub user: Username,
    /// Data directory holding the identity's keys (default: ~/.local/share/nes).
    #[arg(short = 'd', long, env = "NES_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// How often nesd makes a new one; both expire after twice this. A number with a
    /// unit s, m, h or d.
    #[arg(long, default_value = "7d", value_parser = nes_proto::v3::parse_duration, env = "NES_PREKEY_ROTATION")]
    pub rotation: Duration,
}

pub fn run(command: PrekeyCommand) -> Result<(), CliError> {
    match command {
        PrekeyCommand::New(args) => new(args),
    }
}

fn new(args: NewArgs) -> Result<(), CliError> {
    let name = args.user;
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let [_, _, sign_file, _] = key_files(&data_dir.join("keys"), &name);
    if !sign_file.exists() {
        return Err(user(format!(
            "{} does not exist: make the identity first with `nes generate --user {name} --data-dir {}`",
            sign_file.display(),
            data_dir.display()
        )));
    }
    let sign_key = PrivateKey::read(&sign_file).map_err(|e| user(e.to_string()))?;
    let keys = KeyDir::new(&data_dir);
    let (prekey, _certificate) = keys
        .create(&name, &sign_key, args.rotation, nes_proto::now_ms())
        .map_err(|e| user(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    out.write_all(prekey.signed().as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}
