//! The last cursor handled, kept on disk so a restarted `nes-notify` resumes exactly
//! where it stopped: nothing shown twice, nothing skipped.
//!
//! The file (`$XDG_STATE_HOME/nes/notify-<user>-<store id>.cursor` by default) holds one
//! log cursor: an opaque string that names the daemon's store and the event. It is keyed
//! by the store twice over: by its name, so two stores of the same user name keep their
//! own files, and by its content, which nesd checks (a cursor of another store, or of a
//! store restored from an older copy, is refused and nes-notify starts from now). It is
//! replaced through a temporary file and a rename, so a crash leaves the old or the new
//! cursor, never a torn one.
//!
//! A file of before store ids (`notify-<user>.cursor`, a bare number) is read once when
//! the store's own file does not exist yet, and removed once the new one is written:
//! left behind, it would be read again for the next, re-created store.

use std::path::{Path, PathBuf};

/// The cursor file of `user`'s store `store_id` in the default state directory.
pub fn default_path(user: &str, store_id: &str) -> PathBuf {
    nes_client::paths::state_dir().join(format!("notify-{user}-{store_id}.cursor"))
}

/// The cursor file of `user` as nes-notify kept it before store ids.
pub fn legacy_path(user: &str) -> PathBuf {
    nes_client::paths::state_dir().join(format!("notify-{user}.cursor"))
}

/// The stored cursor; `None` when there is none yet (or it is unreadable: then the
/// caller starts live and says so).
pub fn load(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let cursor = text.trim();
    nes_client::feed::cursor_number(cursor).map(|_| cursor.to_owned())
}

/// Stores `cursor`.
pub fn save(path: &Path, cursor: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("cursor.tmp");
    std::fs::write(&tmp, format!("{cursor}\n"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/notify.cursor");
        assert_eq!(load(&path), None);
        save(&path, "0123456789abcdef-42-9c1e33ab").unwrap();
        assert_eq!(load(&path).as_deref(), Some("0123456789abcdef-42-9c1e33ab"));
        save(&path, "0123456789abcdef-43-00aa11bb").unwrap();
        assert_eq!(load(&path).as_deref(), Some("0123456789abcdef-43-00aa11bb"));
        std::fs::write(&path, "17\n").unwrap();
        assert_eq!(
            load(&path).as_deref(),
            Some("17"),
            "a file of before store ids"
        );
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(load(&path), None);
    }

    #[test]
    fn default_files_are_per_store() {
        assert_ne!(
            default_path("bob", "0123456789abcdef"),
            default_path("bob", "fedcba9876543210")
        );
        assert_ne!(default_path("bob", "0123456789abcdef"), legacy_path("bob"));
    }
}
