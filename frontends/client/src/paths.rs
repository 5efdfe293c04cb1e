//! Where nesd's socket and the user's config file are.
//!
//! The socket is found, first match wins:
//! 1. `--socket PATH` (the frontend's flag);
//! 2. the `NES_SOCKET` environment variable;
//! 3. `socket = "..."` in the config file (`~/.config/nes/config.toml`);
//! 4. `$XDG_RUNTIME_DIR/nes/nesd.sock` (the daemon's default);
//! 5. without `XDG_RUNTIME_DIR`: `/run/user/<uid>/nes/nesd.sock` when `/run/user/<uid>`
//!    exists (systemd-logind made it), else `<tmp>/nes-<uid>/nesd.sock`.
//!
//! The config file is `--config`, else `NES_CONFIG`, else `$XDG_CONFIG_HOME/nes/config.toml`
//! (`~/.config/nes/config.toml`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The socket file name inside the runtime directory.
pub const SOCKET_NAME: &str = "nesd.sock";

/// Finds the socket from the real environment and config file; `explicit` is the
/// `--socket` flag (clap may already have folded `NES_SOCKET` into it; that is fine).
pub fn socket_path(explicit: Option<&Path>, config: Option<&Path>) -> PathBuf {
    let config_socket = explicit
        .is_none()
        .then(|| config_value(&config_path(config), "socket"))
        .flatten()
        .map(|s| expand_home(&s));
    resolve_socket(explicit, config_socket, |name| std::env::var_os(name), current_uid())
}

/// The resolution order of the module docs, with the environment given as a lookup so it
/// can be tested.
pub fn resolve_socket(
    explicit: Option<&Path>,
    config_socket: Option<PathBuf>,
    env: impl Fn(&str) -> Option<OsString>,
    uid: Option<u32>,
) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    if let Some(path) = env("NES_SOCKET").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(path) = config_socket {
        return path;
    }
    if let Some(dir) = env("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("nes").join(SOCKET_NAME);
    }
    fallback_socket(uid, env)
}

/// Where the socket is when there is no `XDG_RUNTIME_DIR`.
fn fallback_socket(uid: Option<u32>, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let uid = uid.map(|u| u.to_string()).unwrap_or_else(|| "user".into());
    let run = PathBuf::from(format!("/run/user/{uid}"));
    if run.is_dir() {
        return run.join("nes").join(SOCKET_NAME);
    }
    let tmp = env("TMPDIR").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
    tmp.join(format!("nes-{uid}")).join(SOCKET_NAME)
}

/// The config file: `explicit` (`--config`), else `NES_CONFIG`, else the XDG default.
pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    if let Some(path) = std::env::var_os("NES_CONFIG").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    config_dir().join("config.toml")
}

/// `$XDG_CONFIG_HOME/nes` (`~/.config/nes`).
pub fn config_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "nes")
        .map(|d| d.config_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".config/nes"))
}

/// `$XDG_STATE_HOME/nes` (`~/.local/state/nes`), where frontends keep small state such as
/// the last cursor they handled. Falls back to the data dir where there is no state dir.
pub fn state_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "nes")
        .map(|d| d.state_dir().unwrap_or_else(|| d.data_dir()).to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".local/state/nes"))
}

/// One top-level string (or number/bool, as text) of the config file; `None` when the
/// file or the key is missing or the file does not parse (the daemon reports bad config
/// files; a frontend just falls back to defaults).
pub fn config_value(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = text.parse().ok()?;
    match table.get(key)? {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `~/x` → `$HOME/x`; anything else unchanged.
pub fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// This process's user id, read from the owner of `/proc/self` (no libc call needed).
pub fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> =
            pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn flag_wins_over_everything() {
        let got = resolve_socket(
            Some(Path::new("/flag.sock")),
            Some("/config.sock".into()),
            env(&[("NES_SOCKET", "/env.sock"), ("XDG_RUNTIME_DIR", "/run/user/7")]),
            Some(7),
        );
        assert_eq!(got, PathBuf::from("/flag.sock"));
    }

    #[test]
    fn env_wins_over_config_and_xdg() {
        let got = resolve_socket(
            None,
            Some("/config.sock".into()),
            env(&[("NES_SOCKET", "/env.sock"), ("XDG_RUNTIME_DIR", "/run/user/7")]),
            Some(7),
        );
        assert_eq!(got, PathBuf::from("/env.sock"));
    }

    #[test]
    fn config_wins_over_xdg() {
        let got = resolve_socket(None, Some("/config.sock".into()), env(&[("XDG_RUNTIME_DIR", "/r")]), Some(7));
        assert_eq!(got, PathBuf::from("/config.sock"));
    }

    #[test]
    fn xdg_runtime_dir_default() {
        let got = resolve_socket(None, None, env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]), Some(1000));
        assert_eq!(got, PathBuf::from("/run/user/1000/nes/nesd.sock"));
    }

    #[test]
    fn empty_values_are_unset() {
        let got = resolve_socket(None, None, env(&[("NES_SOCKET", ""), ("XDG_RUNTIME_DIR", "/x")]), Some(1));
        assert_eq!(got, PathBuf::from("/x/nes/nesd.sock"));
    }

    #[test]
    fn fallback_without_runtime_dir_is_per_user() {
        // uid 4294967 has no /run/user directory on any test machine.
        let got = resolve_socket(None, None, env(&[("TMPDIR", "/tmpx")]), Some(4_294_967));
        assert_eq!(got, PathBuf::from("/tmpx/nes-4294967/nesd.sock"));
        let got = resolve_socket(None, None, env(&[]), Some(4_294_967));
        assert_eq!(got, PathBuf::from("/tmp/nes-4294967/nesd.sock"));
    }

    #[test]
    fn config_value_reads_top_level_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "socket = \"/s.sock\"\nport = 5\n[x]\ny = 1\n").unwrap();
        assert_eq!(config_value(&file, "socket").as_deref(), Some("/s.sock"));
        assert_eq!(config_value(&file, "port").as_deref(), Some("5"));
        assert_eq!(config_value(&file, "x"), None);
        assert_eq!(config_value(&dir.path().join("missing"), "socket"), None);
        std::fs::write(&file, "not toml [").unwrap();
        assert_eq!(config_value(&file, "socket"), None);
    }

    #[test]
    fn current_uid_is_known_on_linux() {
        assert!(current_uid().is_some());
    }
}
