//! This identity: its private keys, read from `DATA_DIR/keys/` as `nes generate` writes
//! them, and the device id that makes the MQTT client id stable.
//!
//! Private keys never leave this module's [`Identity`] except to sign and unwrap; nothing
//! in the API ever returns them.

use nes_proto::{PrivateKey, PublicKey, Username};
use rand::RngCore;
use std::path::{Path, PathBuf};
use tracing::warn;

/// The identity nesd runs as.
pub struct Identity {
    /// The username.
    pub user: Username,
    /// `<user>-rsa-message`: unwraps message keys.
    pub message_key: PrivateKey,
    /// `<user>-rsa-sign`: signs frames.
    pub sign_key: PrivateKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("user", &self.user).finish_non_exhaustive()
    }
}

/// Why the identity could not be loaded. One line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// No key files for the user.
    #[error("no keys for {user} in {dir} ({missing} is missing): run `nes generate --user {user} --data-dir {data_dir}` first")]
    Missing {
        /// The user.
        user: String,
        /// The keys directory.
        dir: String,
        /// The data directory.
        data_dir: String,
        /// The first missing file.
        missing: String,
    },
    /// A key file exists but cannot be used.
    #[error("cannot read key file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// `DATA_DIR/keys/<user>-rsa-message`.
pub fn message_key_path(data_dir: &Path, user: &Username) -> PathBuf {
    data_dir.join("keys").join(format!("{user}-rsa-message"))
}

/// `DATA_DIR/keys/<user>-rsa-sign`.
pub fn sign_key_path(data_dir: &Path, user: &Username) -> PathBuf {
    data_dir.join("keys").join(format!("{user}-rsa-sign"))
}

impl Identity {
    /// Reads `user`'s private keys from `data_dir/keys/`. The `.pub` files, when present,
    /// must match (a mismatch means a half-replaced identity).
    pub fn load(data_dir: &Path, user: &Username) -> Result<Identity, IdentityError> {
        let message_path = message_key_path(data_dir, user);
        let sign_path = sign_key_path(data_dir, user);
        for path in [&message_path, &sign_path] {
            if !path.exists() {
                return Err(IdentityError::Missing {
                    user: user.to_string(),
                    dir: data_dir.join("keys").display().to_string(),
                    data_dir: data_dir.display().to_string(),
                    missing: path.display().to_string(),
                });
            }
        }
        let message_key = read_private(&message_path)?;
        let sign_key = read_private(&sign_path)?;
        check_pub(&message_path, &message_key)?;
        check_pub(&sign_path, &sign_key)?;
        Ok(Identity { user: user.clone(), message_key, sign_key })
    }
}

fn read_private(path: &Path) -> Result<PrivateKey, IdentityError> {
    warn_if_readable_by_others(path);
    PrivateKey::read(path).map_err(|e| IdentityError::Unreadable {
        path: path.display().to_string(),
        reason: match e {
            // KeyError::Io repeats the path; keep only the cause.
            nes_proto::KeyError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        },
    })
}

fn check_pub(private_path: &Path, key: &PrivateKey) -> Result<(), IdentityError> {
    let mut pub_path = private_path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    if !pub_path.exists() {
        return Ok(());
    }
    let public = PublicKey::read(&pub_path).map_err(|e| IdentityError::Unreadable {
        path: pub_path.display().to_string(),
        reason: e.to_string(),
    })?;
    if &public != key.public_key() {
        return Err(IdentityError::Unreadable {
            path: pub_path.display().to_string(),
            reason: format!("it does not match the private key {}", private_path.display()),
        });
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "private key file is readable by others; chmod 600 it");
        }
    }
}

/// The device id: 8 random hex digits kept in `DATA_DIR/device-id`, made on first start.
/// With the username it forms the MQTT client id, which must stay the same across
/// restarts so the broker keeps the session (and what arrives while nesd is down).
pub fn device_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("device-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if !id.is_empty() && id.len() <= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_ascii_lowercase());
            }
            warn!(path = %path.display(), "device id file is damaged; making a new one");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let id = hex::encode(bytes);
    let tmp = data_dir.join("device-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// The MQTT client id: `nes-<user>-<device id>`.
pub fn client_id(user: &Username, device: &str) -> String {
    format!("nes-{user}-{device}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_stable() {
        let tmp = tempfile::tempdir().unwrap();
        let a = device_id(tmp.path()).unwrap();
        let b = device_id(tmp.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 8);
        let user = Username::parse("alice").unwrap();
        assert_eq!(client_id(&user, &a), format!("nes-alice-{a}"));
    }

    #[test]
    fn missing_keys_say_how_to_make_them() {
        let tmp = tempfile::tempdir().unwrap();
        let user = Username::parse("alice").unwrap();
        let err = Identity::load(tmp.path(), &user).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nes generate --user alice"), "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn unreadable_keys_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let user = Username::parse("alice").unwrap();
        std::fs::create_dir_all(tmp.path().join("keys")).unwrap();
        std::fs::write(message_key_path(tmp.path(), &user), "garbage").unwrap();
        std::fs::write(sign_key_path(tmp.path(), &user), "garbage").unwrap();
        let err = Identity::load(tmp.path(), &user).unwrap_err();
        assert!(matches!(err, IdentityError::Unreadable { .. }), "{err}");
    }
}
