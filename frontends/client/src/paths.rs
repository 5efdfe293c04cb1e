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
//!
//! Whatever path is found, [`check_socket`] decides whether it may be used: with the
//! `/tmp/nes-<uid>` fallback (or a careless `--socket`) another local user could have put
//! a socket of their own there and would read every message sent through it.

use crate::error::Error;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The socket file name inside the runtime directory.
pub const SOCKET_NAME: &str = "nesd.sock";

/// Finds the socket from the real environment and config file; `explicit` is the
/// `--socket` flag (clap may already have folded `NES_SOCKET` into it; that is fine).
pub fn socket_path(explicit: Option<&Path>, config: Option<&Path>) -> PathBuf {
    let config_socket = explicit
        .is_none()
        .then(|| config_value(&config_path(config), crate::settings::SOCKET))
        .flatten()
        .map(|s| expand_home(&s));
    resolve_socket(
        explicit,
        config_socket,
        |name| std::env::var_os(name),
        current_uid(),
    )
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
    default_socket(env, uid)
}

/// Steps 4 and 5 of the module docs: the socket when nothing names one. nesd serves on
/// this path by default and the frontends look for it there: one rule for both sides.
pub fn default_socket(env: impl Fn(&str) -> Option<OsString>, uid: Option<u32>) -> PathBuf {
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
    let tmp = env("TMPDIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
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

/// Whether `socket` may be connected to: it must exist (else [`Error::NotRunning`], exit
/// 3), and the socket and the folder it is in (after following symlinks) must be owned by
/// this user or by root, with the folder writable by no one else (else
/// [`Error::Untrusted`], exit 1). Root is trusted because it can read any user's messages
/// anyway; a group- or other-writable folder is refused even with the sticky bit, since
/// whoever can write there could have made the socket before nesd did.
///
/// This checks the file system before connecting; [`crate::Client::connect`] then also
/// checks who listens on the socket (peer credentials), which closes the window between
/// this check and the connect.
pub fn check_socket(socket: &Path) -> Result<(), Error> {
    let fail = |reason: String| Error::Untrusted {
        socket: socket.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotRunning {
                socket: socket.to_path_buf(),
                reason: "no socket".into(),
            })
        }
        Err(e) => {
            return Err(Error::Socket {
                socket: socket.to_path_buf(),
                reason: e.to_string(),
            })
        }
        Ok(_) => {}
    }
    let socket_error = |e: std::io::Error| match e.kind() {
        // A dangling symlink: nothing listens there.
        std::io::ErrorKind::NotFound => Error::NotRunning {
            socket: socket.to_path_buf(),
            reason: "no socket".into(),
        },
        _ => Error::Socket {
            socket: socket.to_path_buf(),
            reason: e.to_string(),
        },
    };
    let real = std::fs::canonicalize(socket).map_err(socket_error)?;
    let file = std::fs::metadata(&real).map_err(socket_error)?;
    let dir = real.parent().unwrap_or(Path::new("/"));
    let folder = std::fs::metadata(dir).map_err(socket_error)?;
    let me = current_uid()
        .ok_or_else(|| fail("cannot tell which user this is (no /proc/self)".into()))?;
    let found = Found {
        socket_uid: file.uid(),
        folder_uid: folder.uid(),
        folder_mode: folder.mode(),
    };
    judge(&found, dir, me).map_err(|why| fail(why.to_string()))
}

/// The owner and mode of the socket and of its folder, as [`judge`] sees them.
#[derive(Debug, Clone, Copy)]
struct Found {
    socket_uid: u32,
    folder_uid: u32,
    folder_mode: u32,
}

/// The rules of [`check_socket`] on what was found; `Err` says why in a sentence.
fn judge(found: &Found, dir: &Path, me: u32) -> Result<(), Distrust> {
    let trusted = |uid: u32| uid == me || uid == 0;
    if !trusted(found.folder_uid) {
        return Err(Distrust::FolderOwner {
            dir: dir.to_path_buf(),
            owner: user_name(found.folder_uid),
            you: you(me),
        });
    }
    let writable = match found.folder_mode & 0o022 {
        0 => None,
        0o020 => Some("its group"),
        0o002 => Some("every user"),
        _ => Some("its group and every user"),
    };
    if let Some(who) = writable {
        return Err(Distrust::FolderWritable {
            dir: dir.to_path_buf(),
            who,
            mode: found.folder_mode & 0o7777,
        });
    }
    if !trusted(found.socket_uid) {
        return Err(Distrust::SocketOwner {
            owner: user_name(found.socket_uid),
            you: you(me),
        });
    }
    Ok(())
}

/// Why [`judge`] refuses a socket: one variant per rule, so the tests name the rule
/// that refused; the message becomes the reason of [`Error::Untrusted`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Distrust {
    /// The folder belongs to another user (not root).
    #[error("its folder {} belongs to {owner}, not to {you}: whoever owns it can put a socket of their own there and read what you send", dir.display())]
    FolderOwner {
        /// The socket's folder.
        dir: PathBuf,
        /// Its owner, as [`user_name`] says it.
        owner: String,
        /// This user, as [`you`] says it.
        you: String,
    },
    /// The folder is writable by its group or by every user (sticky or not).
    #[error("its folder {} is writable by {who} (mode {mode:04o}): anyone who can write there can put a socket of their own in its place; keep it mode 0700", dir.display())]
    FolderWritable {
        /// The socket's folder.
        dir: PathBuf,
        /// `its group`, `every user` or both.
        who: &'static str,
        /// The folder's permission bits.
        mode: u32,
    },
    /// The socket belongs to another user (not root).
    #[error("it belongs to {owner}, not to {you}: another user's program may be listening there to read what you send; point --socket or NES_SOCKET at your own daemon's socket")]
    SocketOwner {
        /// Its owner, as [`user_name`] says it.
        owner: String,
        /// This user, as [`you`] says it.
        you: String,
    },
}

/// `name (uid N)` from /etc/passwd, or `uid N` when the name is not known.
pub fn user_name(uid: u32) -> String {
    match login_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// `you (name, uid N)`, or `you (uid N)`, for messages about this user.
pub(crate) fn you(uid: u32) -> String {
    match login_name(uid) {
        Some(name) => format!("you ({name}, uid {uid})"),
        None => format!("you (uid {uid})"),
    }
}

/// The login name of `uid` in /etc/passwd.
fn login_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?.parse::<u32>().ok()?;
                (id == uid).then(|| name.to_string())
            })
        })
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
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn flag_wins_over_everything() {
        let got = resolve_socket(
            Some(Path::new("/flag.sock")),
            Some("/config.sock".into()),
            env(&[
                ("NES_SOCKET", "/env.sock"),
                ("XDG_RUNTIME_DIR", "/run/user/7"),
            ]),
            Some(7),
        );
        assert_eq!(got, PathBuf::from("/flag.sock"));
    }

    #[test]
    fn env_wins_over_config_and_xdg() {
        let got = resolve_socket(
            None,
            Some("/config.sock".into()),
            env(&[
                ("NES_SOCKET", "/env.sock"),
                ("XDG_RUNTIME_DIR", "/run/user/7"),
            ]),
            Some(7),
        );
        assert_eq!(got, PathBuf::from("/env.sock"));
    }

    #[test]
    fn config_wins_over_xdg() {
        let got = resolve_socket(
            None,
            Some("/config.sock".into()),
            env(&[("XDG_RUNTIME_DIR", "/r")]),
            Some(7),
        );
        assert_eq!(got, PathBuf::from("/config.sock"));
    }

    #[test]
    fn xdg_runtime_dir_default() {
        let got = resolve_socket(
            None,
            None,
            env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]),
            Some(1000),
        );
        assert_eq!(got, PathBuf::from("/run/user/1000/nes/nesd.sock"));
    }

    #[test]
    fn empty_values_are_unset() {
        let got = resolve_socket(
            None,
            None,
            env(&[("NES_SOCKET", ""), ("XDG_RUNTIME_DIR", "/x")]),
            Some(1),
        );
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

    const ME: u32 = 4_242_001;
    const OTHER: u32 = 4_242_002;

    fn found(socket_uid: u32, folder_uid: u32, folder_mode: u32) -> Found {
        Found {
            socket_uid,
            folder_uid,
            folder_mode: 0o40000 | folder_mode,
        }
    }

    #[test]
    fn own_socket_in_own_private_folder_is_fine() {
        let dir = Path::new("/run/user/4242001/nes");
        assert_eq!(judge(&found(ME, ME, 0o700), dir, ME), Ok(()));
        assert_eq!(
            judge(&found(ME, ME, 0o755), dir, ME),
            Ok(()),
            "readable by others is fine"
        );
        assert_eq!(
            judge(&found(0, 0, 0o755), dir, ME),
            Ok(()),
            "root is trusted"
        );
        assert_eq!(judge(&found(ME, 0, 0o700), dir, ME), Ok(()));
    }

    #[test]
    fn another_users_socket_or_folder_is_refused() {
        let dir = Path::new("/tmp/nes-4242001");
        let why = judge(&found(OTHER, ME, 0o700), dir, ME).unwrap_err();
        assert!(matches!(why, Distrust::SocketOwner { .. }), "{why}");
        let why = why.to_string();
        assert!(
            why.contains("belongs to uid 4242002") && why.contains("not to you (uid 4242001)"),
            "{why}"
        );
        let why = judge(&found(ME, OTHER, 0o700), dir, ME).unwrap_err();
        assert!(matches!(why, Distrust::FolderOwner { .. }), "{why}");
        assert!(
            why.to_string()
                .contains("its folder /tmp/nes-4242001 belongs to uid 4242002"),
            "{why}"
        );
        let why = judge(&found(OTHER, OTHER, 0o700), dir, ME).unwrap_err();
        assert!(
            matches!(why, Distrust::FolderOwner { .. }),
            "the folder is named first: {why}"
        );
    }

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let dir = Path::new("/tmp");
        let why = judge(&found(ME, 0, 0o1777), dir, ME)
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("writable by its group and every user (mode 1777)"),
            "even sticky: {why}"
        );
        let why = judge(&found(ME, ME, 0o770), dir, ME)
            .unwrap_err()
            .to_string();
        assert!(why.contains("writable by its group (mode 0770)"), "{why}");
        let why = judge(&found(ME, ME, 0o702), dir, ME).unwrap_err();
        assert!(
            matches!(
                why,
                Distrust::FolderWritable {
                    who: "every user",
                    ..
                }
            ),
            "{why}"
        );
        assert!(why.to_string().contains("writable by every user"), "{why}");
    }

    #[test]
    fn check_socket_on_real_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nesd.sock");
        assert!(
            matches!(check_socket(&path), Err(Error::NotRunning { .. })),
            "missing: not running"
        );
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        check_socket(&path).unwrap();
        // Through a symlink, the real folder is judged.
        let link_dir = tempfile::tempdir().unwrap();
        let link = link_dir.path().join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        check_socket(&link).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for p in [&path, &link] {
            let err = check_socket(p).unwrap_err();
            assert!(matches!(err, Error::Untrusted { .. }), "{err:?}");
            assert_eq!(err.exit_code(), 1);
            let text = err.to_string();
            assert!(
                text.contains(&p.display().to_string()) && text.contains("writable by"),
                "{text}"
            );
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A dangling symlink: no daemon.
        drop(_listener);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(check_socket(&link), Err(Error::NotRunning { .. })));
    }

    #[test]
    fn user_names_come_from_passwd() {
        assert_eq!(user_name(0), "root (uid 0)");
        assert_eq!(user_name(4_242_003), "uid 4242003");
        assert_eq!(you(0), "you (root, uid 0)");
    }

    #[test]
    fn current_uid_is_known_on_linux() {
        assert!(current_uid().is_some());
    }
}
