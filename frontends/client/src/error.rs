//! Errors of talking to nesd, sorted by what the user should do about them.

use std::path::{Path, PathBuf};

/// The exit codes of every frontend (DESIGN.md "Exit codes"), defined once.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An error the user can fix; the message on stderr says what and how.
    pub const USER: u8 = 1;
    /// Bad usage (clap's own exit code for it, too).
    pub const USAGE: u8 = 2;
    /// The daemon is not running; the message says how to start it.
    pub const NO_DAEMON: u8 = 3;
}

/// Why a call to nesd failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No daemon answers on the socket (missing socket, connection refused, or the
    /// daemon went away mid-call). Frontends exit 3 on this.
    #[error("nesd is not running: {reason} ({socket}). Start it with `systemctl --user start nesd`, or `nesd --user USER --broker mqtt://HOST:PORT --keyserver URL --keyserver-key FILE`; or point --socket / NES_SOCKET at a running daemon's socket")]
    NotRunning {
        /// The socket that was tried.
        socket: PathBuf,
        /// What happened, in a few words ("no socket", "connection refused", ...).
        reason: String,
    },
    /// The daemon refused the request; `message` is the one-line reason it gave
    /// (meant for the user). Frontends exit 1 on this.
    #[error("{message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The daemon's message.
        message: String,
    },
    /// The socket, its folder, or the program listening on it belongs to another user
    /// (see [`crate::paths::check_socket`]): refused before anything is sent. Exit 1.
    #[error("refusing nesd's socket {socket}: {reason}")]
    Untrusted {
        /// The socket that was tried.
        socket: PathBuf,
        /// Whose it is and why that is refused.
        reason: String,
    },
    /// The socket exists but may not be opened (another user's daemon, wrong mode).
    #[error("cannot open nesd's socket {socket}: {reason}")]
    Socket {
        /// The socket that was tried.
        socket: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// Reading a file to send failed (`Client::send_file`); the upload was abandoned,
    /// so nesd kept nothing of it. Exit 1.
    #[error("cannot read the file to send: {0}")]
    Read(#[source] std::io::Error),
}

impl Error {
    /// Maps a gRPC status from a call on `socket`. Statuses the daemon sent carry its
    /// message; statuses made locally by the transport (they have a `source`: the
    /// connection broke) mean the daemon went away.
    pub fn from_status(status: tonic::Status, socket: &Path) -> Self {
        let local = std::error::Error::source(&status).is_some();
        if local
            && matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            )
        {
            return Error::NotRunning {
                socket: socket.to_path_buf(),
                reason: format!("the connection broke: {}", status.message()),
            };
        }
        let message = if status.message().is_empty() {
            format!("nesd answered {:?}", status.code())
        } else {
            status.message().to_string()
        };
        Error::Rpc {
            code: status.code(),
            message,
        }
    }

    /// Whether this is "the daemon is not there" (exit 3).
    pub fn is_not_running(&self) -> bool {
        matches!(self, Error::NotRunning { .. })
    }

    /// The gRPC code of a refusal by the daemon.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            // Every variant by name: a new one must say whether it carries a code.
            Error::NotRunning { .. }
            | Error::Untrusted { .. }
            | Error::Socket { .. }
            | Error::Read(_) => None,
        }
    }

    /// The exit code of frontends/README.md: 3 for "not running", 1 otherwise. Every
    /// frontend maps a failed call through this.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotRunning { .. } => exit::NO_DAEMON,
            // Every variant by name: a new one must choose its exit code here.
            Error::Rpc { .. } | Error::Untrusted { .. } | Error::Socket { .. } | Error::Read(_) => {
                exit::USER
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_statuses_keep_their_message() {
        let err = Error::from_status(
            tonic::Status::not_found("unknown user: zed"),
            Path::new("/s"),
        );
        assert_eq!(err.to_string(), "unknown user: zed");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert_eq!(err.exit_code(), 1);
        // UNAVAILABLE sent by the daemon means "key server unreachable": fixable, not exit 3.
        let err = Error::from_status(
            tonic::Status::unavailable("key server down"),
            Path::new("/s"),
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn transport_failures_mean_not_running() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone");
        let status = tonic::Status::from_error(Box::new(io));
        let err = Error::from_status(status, Path::new("/run/nes/nesd.sock"));
        assert!(err.is_not_running(), "{err:?}");
        assert_eq!(err.exit_code(), 3);
        let text = err.to_string();
        assert!(text.contains("systemctl --user start nesd"), "{text}");
        assert!(text.contains("nesd --user"), "{text}");
        assert!(text.contains("/run/nes/nesd.sock"), "{text}");
    }

    #[test]
    fn empty_status_message_still_says_something() {
        let err = Error::from_status(
            tonic::Status::new(tonic::Code::Internal, ""),
            Path::new("/s"),
        );
        assert!(err.to_string().contains("Internal"));
    }
}
