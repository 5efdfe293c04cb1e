//! `nes generate`: make an identity's key pairs, offline.
//!
//! Writes `DIR/keys/<user>-rsa-message`, `<user>-rsa-message.pub`, `<user>-rsa-sign` and
//! `<user>-rsa-sign.pub`, the original's file names and formats. Private files are 0600
//! from the moment they exist, the folders 0700. An existing identity is never
//! overwritten without `--force`: losing a private key loses every message sealed to it.

use crate::error::{user, CliError};
use crate::username::UsernameParser;
use nes_proto::keys::{write_private_file, DEFAULT_BITS};
use nes_proto::{PrivateKey, Username};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The identity's username (3-32 of a-z, 0-9, '_', '-').
    #[arg(short = 'u', long, env = "NES_USER", value_parser = UsernameParser)]
    pub user: Username,
    /// RSA modulus size: 2048, 3072 or 4096.
    #[arg(short = 's', long, default_value_t = DEFAULT_BITS)]
    pub size: usize,
    /// Data directory (default: ~/.local/share/nes).
    #[arg(short = 'd', long, env = "NES_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Replace existing keys of this user.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let name = args.user;
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let keys = data_dir.join("keys");
    let files = key_files(&keys, &name);
    if !args.force {
        if let Some(existing) = files.iter().find(|f| f.exists()) {
            return Err(user(format!(
                "{} already exists: this identity has keys; use --force to replace them (messages sealed to the old keys become unreadable)",
                existing.display()
            )));
        }
    }
    // Check the size before creating anything.
    if !nes_proto::keys::GENERATE_BITS.contains(&args.size) {
        return Err(user(format!(
            "cannot generate {}-bit keys: choose one of 2048, 3072, 4096",
            args.size
        )));
    }
    make_private_dir(&data_dir)?;
    make_private_dir(&keys)?;
    let message = PrivateKey::generate(args.size).map_err(|e| user(e.to_string()))?;
    let sign = PrivateKey::generate(args.size).map_err(|e| user(e.to_string()))?;
    let [message_file, message_pub, sign_file, sign_pub] = &files;
    for (path, key) in [(message_file, &message), (sign_file, &sign)] {
        write_private_file(path, key.to_pkcs1_pem().as_bytes(), args.force)
            .map_err(|e| user(e.to_string()))?;
    }
    for (path, key) in [(message_pub, &message), (sign_pub, &sign)] {
        std::fs::write(path, key.public_key().to_pem())
            .map_err(|e| user(format!("{}: {e}", path.display())))?;
    }
    println!(
        "generated {}-bit keys for {name} in {}",
        args.size,
        keys.display()
    );
    println!("message key sha256:{}", message.public_key().fingerprint());
    println!("sign key    sha256:{}", sign.public_key().fingerprint());
    Ok(())
}

// The four key files of a user: one definition, shared with nesd.
pub use nes_proto::keys::key_files;

/// Creates `dir` (and parents) with mode 0700, and tightens it to 0700 if it exists.
pub fn make_private_dir(dir: &Path) -> Result<(), CliError> {
    let fail = |e: std::io::Error| user(format!("{}: {e}", dir.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}

/// `~/.local/share/nes` (XDG data dir).
pub fn default_data_dir() -> Result<PathBuf, CliError> {
    directories::ProjectDirs::from("", "", "nes")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| user("cannot find the home directory; pass --data-dir"))
}
