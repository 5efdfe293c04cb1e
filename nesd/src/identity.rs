//! This identity: its private keys, read from `DATA_DIR/keys/` as `nes generate` writes
//! them, and the device id that makes the MQTT client id stable.
//!
//! Private keys never leave this module's [`Identity`] except to sign and unwrap; nothing
//! in the API ever returns them.

use nes_proto::keys::{key_files, KEYS_DIR};
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
        f.debug_struct("Identity")
            .field("user", &self.user)
            .finish_non_exhaustive()
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

/// `DATA_DIR/keys/<user>-rsa-message` (names from `nes_proto::keys::key_files`).
pub fn message_key_path(data_dir: &Path, user: &Username) -> PathBuf {
    let [message, ..] = key_files(&data_dir.join(KEYS_DIR), user);
    message
}

/// `DATA_DIR/keys/<user>-rsa-sign`.
pub fn sign_key_path(data_dir: &Path, user: &Username) -> PathBuf {
    let [_, _, sign, _] = key_files(&data_dir.join(KEYS_DIR), user);
    sign
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
        Ok(Identity {
            user: user.clone(),
            message_key,
            sign_key,
        })
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
            reason: format!(
                "it does not match the private key {}",
                private_path.display()
            ),
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

/// Random bytes in a device id: 128 bits from the OS RNG, as hex.
pub const DEVICE_ID_BYTES: usize = 16;
/// How many hex digits of the device id Status and the log show.
pub const SHOWN_DEVICE_DIGITS: usize = 8;

/// The device id: [`DEVICE_ID_BYTES`] random bytes (32 hex digits) kept in
/// `DATA_DIR/device-id` (mode 600), made on first start. With the username it forms the
/// MQTT client id, which must stay the same across restarts so the broker keeps the
/// session (and what arrives while nesd is down). The id is a secret of sorts: whoever
/// knows it can connect in nesd's place and take the session (and acknowledge away what
/// is queued there), so it is never shown or logged in full ([`shown_client_id`]).
///
/// An id made by an older nesd (8 hex digits: 32 bits, guessable) is replaced by a new
/// long one: that first start begins a new broker session (see nesd/README.md).
pub fn device_id(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join("device-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            let hex_id = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
            if hex_id && id.len() == 2 * DEVICE_ID_BYTES {
                if let Ok(meta) = std::fs::metadata(&path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        // Ours to fix: it was written before it was a secret.
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                    }
                }
                return Ok(id.to_ascii_lowercase());
            }
            if hex_id && id.len() < 2 * DEVICE_ID_BYTES {
                warn!(
                    path = %path.display(),
                    "the device id is short (made by an older nesd, guessable): making a 128-bit one; \
                     the broker starts a new session, and frames still queued in the old one are not delivered"
                );
            } else {
                warn!(path = %path.display(), "device id file is damaged; making a new one");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; DEVICE_ID_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let id = hex::encode(bytes);
    let tmp = data_dir.join("device-id.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// The MQTT client id: `nes-<user>-<device id>`.
pub fn client_id(user: &Username, device: &str) -> String {
    format!("nes-{user}-{device}")
}

/// The client id as Status and the log show it: `nes-<user>-<first 8 hex digits>…`.
/// Enough to tell devices apart, far too little to take over the session.
pub fn shown_client_id(user: &Username, device: &str) -> String {
    let prefix: String = device.chars().take(SHOWN_DEVICE_DIGITS).collect();
    format!("nes-{user}-{prefix}…")
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
        assert_eq!(a.len(), 32, "128 bits");
        let user = Username::parse("alice").unwrap();
        assert_eq!(client_id(&user, &a), format!("nes-alice-{a}"));
        let shown = shown_client_id(&user, &a);
        assert_eq!(shown, format!("nes-alice-{}…", &a[..8]));
        assert!(!shown.contains(&a));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("device-id"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the device id file is private");
    }

    #[test]
    fn a_short_device_id_is_replaced_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("device-id"), "1a2b3c4d\n").unwrap();
        let a = device_id(tmp.path()).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(
            device_id(tmp.path()).unwrap(),
            a,
            "stable after the migration"
        );
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
