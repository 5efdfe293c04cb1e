//! `nes-keyserver keygen --out FILE`: the server's signing key pair.
//!
//! FILE gets the private key (PEM `RSA PRIVATE KEY`, PKCS#1, mode 0600 from the moment
//! it exists), FILE.pub the public key (PEM `PUBLIC KEY`, SPKI), and the public PEM is
//! printed so it can be piped into the clients' configuration. Existing files are left
//! alone unless `--force`: losing a server key means every client must be reconfigured.

use crate::cli::KeygenArgs;
use nes_proto::keys::write_private_file;
use nes_proto::{KeyError, PrivateKey};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why `keygen` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeygenError {
    /// A target file exists and `--force` was not given.
    #[error("{0} already exists: pass --force to overwrite it (clients that hold the old key will refuse answers)")]
    Exists(String),
    /// Generation or writing failed.
    #[error("{0}")]
    Key(#[from] KeyError),
    /// FILE.pub could not be written, or stdout failed.
    #[error("{path}: {source}")]
    Io {
        /// The file (or "stdout").
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The public key's file: FILE with `.pub` appended.
pub fn public_path(private: &Path) -> PathBuf {
    let mut name: OsString = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Runs `keygen`: writes both files and prints the public PEM on `out`.
pub fn run(args: &KeygenArgs, out: &mut dyn Write) -> Result<PrivateKey, KeygenError> {
    let public_file = public_path(&args.out);
    if !args.force {
        for path in [&args.out, &public_file] {
            if path.exists() {
                return Err(KeygenError::Exists(path.display().to_string()));
            }
        }
    }
    let key = PrivateKey::generate(args.bits)?;
    let public_pem = key.public_key().to_pem();
    write_private_file(&args.out, key.to_pkcs1_pem().as_bytes(), args.force)?;
    write_public_file(&public_file, &public_pem, args.force)?;
    match out
        .write_all(public_pem.as_bytes())
        .and_then(|()| out.flush())
    {
        // A reader that stopped early (`| head -1`) is not an error: the files are written.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(KeygenError::Io {
                path: "stdout".into(),
                source: e,
            })
        }
        _ => {}
    }
    Ok(key)
}

fn write_public_file(path: &Path, pem: &str, overwrite: bool) -> Result<(), KeygenError> {
    let io = |source| KeygenError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(pem.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_path_appends() {
        assert_eq!(
            public_path(Path::new("/a/server.key")),
            PathBuf::from("/a/server.key.pub")
        );
        assert_eq!(public_path(Path::new("k")), PathBuf::from("k.pub"));
    }
}
