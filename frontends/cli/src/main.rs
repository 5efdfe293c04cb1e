//! `nes`: the NES command line.
//!
//! Two kinds of commands live here:
//! - offline tools that need no daemon (`generate`, `prekey new`, `frame seal`, `frame open`,
//!   `import-legacy`, `config`, `completions`, `man`), which work on files directly;
//! - thin clients of `nesd` over its gRPC socket (`status`, `register`, `send`, `history`,
//!   `listen`, `chat`, `contacts`, `files`, `file`), which hold no state and no keys. They connect through
//!   the `nes-client` crate, which finds the socket and sorts failures.
//!
//! Each command is one module under `cmd/`; `output` formats messages for people and
//! for scripts (JSON lines); `username` is the one parser of username arguments, so
//! commands receive a checked `nes_proto::Username`. `main` parses flags, runs the
//! command and turns its error into the exit code of frontends/README.md in one place:
//! 0 success, 1 an error the user can fix (also a bad username, though clap found it),
//! 2 bad usage (clap), 3 the daemon is not running. A closed stdout (`nes listen | head`)
//! is a normal exit.

#![forbid(unsafe_code)]

mod cmd;
mod error;
mod output;
mod progress;
mod username;

use clap::{Parser, Subcommand};
use error::CliError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// NES: end-to-end encrypted messages over MQTT.
#[derive(Parser, Debug)]
#[command(name = "nes", version, about, propagate_version = true)]
pub struct Cli {
    /// nesd's gRPC socket (default: $XDG_RUNTIME_DIR/nes/nesd.sock).
    #[arg(long, global = true, env = "NES_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Config file (default: ~/.config/nes/config.toml).
    #[arg(
        short = 'c',
        long,
        global = true,
        env = "NES_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make a new identity's two RSA key pairs (offline).
    Generate(cmd::generate::Args),
    /// Seal or open single frames without a daemon (offline; for tests and debugging).
    #[command(subcommand)]
    Frame(cmd::frame::FrameCommand),
    /// Make v3 prekeys and signing certificates (offline).
    #[command(subcommand)]
    Prekey(cmd::prekey::PrekeyCommand),
    /// Show the daemon's state: identity, connection, queue, counters (exit 3: no daemon).
    Status(cmd::status::Args),
    /// Register this identity's public keys with the key server.
    Register(cmd::register::Args),
    /// Show or set this identity's presence (online, away, busy, invisible).
    Presence(cmd::presence::Args),
    /// Send a message: `nes send PEER TEXT`, `... | nes send PEER`, `--file PATH`, or `--batch`.
    Send(cmd::send::Args),
    /// Show a conversation (or, without PEER, the list of conversations).
    History(cmd::history::Args),
    /// Print incoming messages as they arrive (JSON lines with --json), or run a command.
    Listen(cmd::listen::Args),
    /// Interactive terminal chat with one peer.
    Chat(cmd::chat::Args),
    /// List the files sent and received (one peer's, or everyone's).
    Files(cmd::files::Args),
    /// Save a received file to disk, or cancel a transfer: `nes file save|cancel ID`.
    #[command(subcommand)]
    File(cmd::file::FileCommand),
    /// List contacts, show their key fingerprints, trust changed keys, mark legacy.
    Contacts(cmd::contacts::Args),
    /// Show or change the config file (~/.config/nes/config.toml).
    Config(cmd::config::Args),
    /// Print the versions of nes and of the running nesd.
    Version,
    /// Bring an identity of the original client (~/.nes) over: keys and config.
    ImportLegacy(cmd::import_legacy::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cmd::completions::Args),
    /// Write man pages for nes and each of its commands.
    Man(cmd::man::Args),
}

/// What every daemon command needs: where the socket and the config are.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The resolved socket path (flag > env > config > XDG).
    pub socket: PathBuf,
    /// The `--config` flag, if given.
    pub config: Option<PathBuf>,
}

impl Ctx {
    fn new(socket: Option<&Path>, config: Option<PathBuf>) -> Self {
        let socket = nes_client::paths::socket_path(socket, config.as_deref());
        Ctx { socket, config }
    }

    /// Connects to nesd.
    pub async fn client(&self) -> Result<nes_client::Client, CliError> {
        Ok(nes_client::Client::connect(&self.socket).await?)
    }

    /// The config file in use.
    pub fn config_path(&self) -> PathBuf {
        nes_client::paths::config_path(self.config.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A bad username is a mistake in a value, fixable (exit 1), not bad usage (2).
        Err(err) => match username::refused(&err) {
            Some(message) => return error::user(message).report(),
            None => err.exit(),
        },
    };
    let ctx = Ctx::new(cli.socket.as_deref(), cli.config.clone());
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Frame(command) => cmd::frame::run(command),
        Command::Prekey(command) => cmd::prekey::run(command),
        Command::Config(args) => cmd::config::run(&ctx, args),
        Command::ImportLegacy(args) => cmd::import_legacy::run(&ctx, args),
        Command::Completions(args) => cmd::completions::run(args),
        Command::Man(args) => cmd::man::run(args),
        Command::Status(args) => block_on(cmd::status::run(&ctx, args)),
        Command::Register(args) => block_on(cmd::register::run(&ctx, args)),
        Command::Presence(args) => block_on(cmd::presence::run(&ctx, args)),
        Command::Send(args) => block_on(cmd::send::run(&ctx, args)),
        Command::History(args) => block_on(cmd::history::run(&ctx, args)),
        Command::Listen(args) => block_on(cmd::listen::run(&ctx, args)),
        Command::Chat(args) => block_on(cmd::chat::run(&ctx, args)),
        Command::Contacts(args) => block_on(cmd::contacts::run(&ctx, args)),
        Command::Files(args) => block_on(cmd::files::run(&ctx, args)),
        Command::File(command) => block_on(cmd::file::run(&ctx, command)),
        Command::Version => block_on(cmd::version::run(&ctx)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => err.report(),
    }
}

/// Runs one daemon command on a small runtime: a thin client needs no thread pool.
fn block_on(
    future: impl std::future::Future<Output = Result<(), CliError>>,
) -> Result<(), CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error::user(format!("cannot start the async runtime: {e}")))?
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usernames_are_parsed_by_clap_in_any_case() {
        let cli = Cli::try_parse_from(["nes", "send", "-t", " Bob", "hi"]).unwrap();
        let Command::Send(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.to.unwrap().as_str(), "bob");
        let cli = Cli::try_parse_from(["nes", "history", "Bob"]).unwrap();
        let Command::History(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.peer.unwrap().as_str(), "bob");
        // Other clap errors stay clap's: bad usage (exit 2), --help and --version (0).
        for (line, code) in [
            (&["nes", "send", "--bogus"][..], 2),
            (&["nes", "send", "-t"], 2),
            (&["nes", "send", "--help"], 0),
            (&["nes", "--version"], 0),
        ] {
            let err = Cli::try_parse_from(line).unwrap_err();
            assert!(username::refused(&err).is_none(), "{line:?}");
            assert_eq!(err.exit_code(), code, "{line:?}");
        }
    }

    #[test]
    fn bad_usernames_are_refused_with_the_commands_messages() {
        let why = "invalid username \"B@d!\": use 3 to 32 characters";
        for (line, message) in [
            (
                &["nes", "send", "-t", "B@d!", "hi"][..],
                "cannot send to \"B@d!\": ",
            ),
            (
                &["nes", "chat", "-t", "B@d!"],
                "cannot chat with \"B@d!\": ",
            ),
            (
                &["nes", "history", "B@d!"],
                "no conversation with \"B@d!\": ",
            ),
            (&["nes", "files", "B@d!"], "no files with \"B@d!\": "),
            (&["nes", "listen", "--from", "B@d!"], "--from \"B@d!\": "),
            (&["nes", "contacts", "show", "B@d!"], "\"B@d!\": "),
            (&["nes", "contacts", "trust", "B@d!"], "\"B@d!\": "),
            (&["nes", "contacts", "legacy", "B@d!", "on"], "\"B@d!\": "),
            (
                &["nes", "import-legacy", "-u", "B@d!"],
                "cannot import \"B@d!\": ",
            ),
            (&["nes", "generate", "--user", "B@d!"], ""),
            (&["nes", "prekey", "new", "--user", "B@d!"], ""),
            (
                &["nes", "frame", "seal", "--from", "B@d!", "--to", "bob"],
                "--from: ",
            ),
            (
                &["nes", "frame", "seal", "--from", "bob", "--to", "B@d!"],
                "--to: ",
            ),
            (
                &["nes", "frame", "open", "--sender-key", "s", "--me", "B@d!"],
                "--me: ",
            ),
        ] {
            let err = Cli::try_parse_from(line).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{line:?}"
            );
            let source = std::error::Error::source(&err).expect("a source");
            assert!(source.is::<nes_proto::UsernameError>(), "{line:?}");
            // main says this after `nes: ` and exits 1 (error::user).
            let said = username::refused(&err).unwrap_or_else(|| panic!("{line:?}: {err}"));
            assert!(
                said.starts_with(&format!("{message}{why}")),
                "{line:?}: {said}"
            );
        }
    }
}
