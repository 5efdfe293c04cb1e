//! The API's Unix socket: binding it safely, or taking the one systemd passes.
//!
//! - A socket file where a live daemon answers is refused (two daemons for one user would
//!   fight over the MQTT session); one where nobody answers is left over from a crash and
//!   is taken over; anything that is not a socket is left alone.
//! - The socket is mode 0600 and its directory, when nesd creates it, 0700: only the
//!   owning user can talk to the daemon that holds their private keys.
//! - With systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`), the first passed fd is
//!   the listening socket and the path is systemd's business.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What is at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    /// Nothing.
    Free,
    /// A socket that a process accepts connections on.
    Live,
    /// A socket file that nobody listens on (left over by a dead daemon).
    Stale,
    /// Something that is not a socket.
    NotASocket,
}

/// Why the socket could not be set up. One line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Another daemon answers on the path.
    #[error("another nesd is already running on {0}; stop it first, or pass a different --socket")]
    InUse(String),
    /// The path holds something else.
    #[error("{0} exists and is not a socket; remove it or pass a different --socket")]
    NotASocket(String),
    /// An I/O error at the path.
    #[error("cannot set up the socket {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        source: io::Error,
    },
    /// systemd passed something unusable.
    #[error("the socket passed by systemd is unusable: {0}")]
    Activation(String),
}

/// Looks at `path` without changing anything.
pub fn probe(path: &Path) -> io::Result<SocketState> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketState::Free),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Ok(SocketState::NotASocket);
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(SocketState::Live),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(SocketState::Stale),
        Err(e) => Err(e),
    }
}

/// A listening socket nesd bound itself; the file is removed when this is dropped.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    path: Option<PathBuf>,
}

impl BoundSocket {
    /// Takes the listener (for tokio); the file stays owned by this guard.
    pub fn take_listener(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.listener.take()
    }

    /// The path, when nesd bound it (not with socket activation).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the API socket at `path`: creates the parent directory (0700) when missing,
/// refuses a live socket, takes over a stale one, and sets mode 0600.
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    let shown = path.display().to_string();
    let io_err = |source| SocketError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err)?;
            // The mode of DirBuilder is filtered by the umask; make sure.
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err)?;
        } else {
            // A directory someone else owns (say a planted /tmp/nes-<uid>) could let them
            // swap the socket: refuse it.
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(parent).map_err(io_err)?.uid();
            if crate::config::current_uid().is_some_and(|me| me != owner && owner != 0) {
                return Err(SocketError::Io {
                    path: shown.clone(),
                    source: io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{} belongs to another user", parent.display()),
                    ),
                });
            }
        }
    }
    match probe(path).map_err(io_err)? {
        SocketState::Free => {}
        SocketState::Live => return Err(SocketError::InUse(shown)),
        SocketState::NotASocket => return Err(SocketError::NotASocket(shown)),
        SocketState::Stale => {
            tracing::info!(path = %shown, "taking over a stale socket left by a daemon that is gone");
            std::fs::remove_file(path).map_err(io_err)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            // Lost a race with another daemon starting at the same moment.
            SocketError::InUse(shown.clone())
        } else {
            io_err(e)
        }
    })?;
    let guard = BoundSocket {
        listener: Some(listener),
        path: Some(path.to_owned()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    if let Some(l) = &guard.listener {
        l.set_nonblocking(true).map_err(io_err)?;
    }
    Ok(guard)
}

/// The listening socket passed by systemd socket activation, if any.
pub fn inherited() -> Result<Option<BoundSocket>, SocketError> {
    let mut fds = sd_notify::listen_fds().map_err(|e| SocketError::Activation(e.to_string()))?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    let listener = listener_from_fd(fd);
    listener
        .local_addr()
        .map_err(|e| SocketError::Activation(format!("fd {fd} is not a Unix socket: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| SocketError::Activation(e.to_string()))?;
    Ok(Some(BoundSocket {
        listener: Some(listener),
        path: None,
    }))
}

/// Wraps the fd systemd passed us.
#[allow(unsafe_code)]
fn listener_from_fd(fd: std::os::unix::io::RawFd) -> std::os::unix::net::UnixListener {
    use std::os::unix::io::FromRawFd;
    // SAFETY: `fd` comes from `sd_notify::listen_fds`, which only yields fds when
    // LISTEN_PID names this process, i.e. systemd opened them for us and nothing else in
    // this process owns them; it unsets the variables, so this runs at most once per fd
    // and the new UnixListener is the fd's only owner.
    unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_tells_free_live_stale_and_other() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.sock");
        assert_eq!(probe(&path).unwrap(), SocketState::Free);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(probe(&path).unwrap(), SocketState::Live);
        drop(listener); // the file stays: a daemon killed with -9 leaves it like this
        assert_eq!(probe(&path).unwrap(), SocketState::Stale);
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(probe(&file).unwrap(), SocketState::NotASocket);
    }

    #[test]
    fn bind_refuses_a_live_socket_and_takes_over_a_stale_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/nes/nesd.sock");
        let first = bind(&path).unwrap();
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse(_)), "{err}");

        // Simulate a crash: close the listener but keep the file.
        let mut first = first;
        drop(first.take_listener());
        std::mem::forget(first);
        assert_eq!(probe(&path).unwrap(), SocketState::Stale);
        let second = bind(&path).unwrap();
        assert_eq!(probe(&path).unwrap(), SocketState::Live);
        drop(second);
        assert_eq!(probe(&path).unwrap(), SocketState::Free);
    }

    #[test]
    fn bind_leaves_other_files_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notasocket");
        std::fs::write(&path, "data").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn no_activation_without_listen_pid() {
        // LISTEN_PID is not set for the test process.
        assert!(inherited().unwrap().is_none());
    }
}
