//! The one error type of the `nes` commands and its mapping to exit codes.

use nes_client::error::exit;
use std::process::ExitCode;

/// Why a command failed, and so which exit code it ends with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Something the user can fix (exit 1). The text says what and how.
    #[error("{0}")]
    User(String),
    /// Bad usage clap could not catch (exit 2).
    #[error("{0}")]
    Usage(String),
    /// nesd is not running (exit 3).
    #[error("{0}")]
    NoDaemon(String),
    /// stdout was closed by the reader: a normal end (exit 0).
    #[error("broken pipe")]
    BrokenPipe,
}

impl CliError {
    /// The exit code of frontends/README.md "Exit codes".
    pub fn code(&self) -> u8 {
        match self {
            CliError::BrokenPipe => exit::OK,
            CliError::User(_) => exit::USER,
            CliError::Usage(_) => exit::USAGE,
            CliError::NoDaemon(_) => exit::NO_DAEMON,
        }
    }

    /// Prints the message (when there is one) and gives the exit code.
    pub fn report(self) -> ExitCode {
        if !matches!(self, CliError::BrokenPipe) {
            eprintln!("nes: {self}");
        }
        ExitCode::from(self.code())
    }
}

impl From<std::io::Error> for CliError {
    fn from(err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::User(err.to_string())
        }
    }
}

impl From<nes_client::Error> for CliError {
    fn from(err: nes_client::Error) -> Self {
        // nes_client decides which exit code a failed call means.
        if err.exit_code() == exit::NO_DAEMON {
            CliError::NoDaemon(err.to_string())
        } else {
            CliError::User(err.to_string())
        }
    }
}

/// Shorthand for bad usage (exit 2), for combinations clap cannot express.
pub fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// Shorthand for a user-fixable error.
pub fn user(msg: impl Into<String>) -> CliError {
    CliError::User(msg.into())
}
