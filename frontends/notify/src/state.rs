//! The last cursor handled, kept on disk so a restarted `nes-notify` resumes exactly
//! where it stopped: nothing shown twice, nothing skipped.
//!
//! The file (`$XDG_STATE_HOME/nes/notify-<user>.cursor` by default) holds one decimal
//! number. It is replaced through a temporary file and a rename, so a crash leaves the
//! old or the new number, never a torn one.

use std::path::{Path, PathBuf};

/// The cursor file of `user` in the default state directory.
pub fn default_path(user: &str) -> PathBuf {
    nes_client::paths::state_dir().join(format!("notify-{user}.cursor"))
}

/// The stored cursor; `None` when there is none yet (or it is unreadable: then the
/// caller starts live and says so).
pub fn load(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Stores `cursor`.
pub fn save(path: &Path, cursor: u64) -> std::io::Result<()> {
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
        save(&path, 42).unwrap();
        assert_eq!(load(&path), Some(42));
        save(&path, 43).unwrap();
        assert_eq!(load(&path), Some(43));
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(load(&path), None);
    }
}
