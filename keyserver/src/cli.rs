//! The command line, defined once: every flag with its help text, its env var
//! (`NES_KEYSERVER_<FLAG>`) and, for `serve`, its key in the TOML config file.
//!
//! ```text
//! nes-keyserver keygen --out FILE [--force] [--bits 2048|3072|4096]
//! nes-keyserver serve --listen ADDR --database URL --key FILE --public-url URL
//!                     (--smtp URL | --mail-dir DIR | --dev) [--config FILE] [...]
//! ```
//!
//! Flags on `serve` are all optional here because they may come from the config file;
//! [`crate::config::ServeConfig::resolve`] merges the layers (flag > env > file >
//! default) and says which setting is missing. clap's own errors exit 2.

use clap::builder::TypedValueParser;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// `nes-keyserver`: the NES public-key directory.
#[derive(Debug, Parser)]
#[command(
    name = "nes-keyserver",
    version,
    about = "The NES key server: e-mail-verified registration of public keys, signed answers",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the server's signing key: FILE (private, mode 0600) and FILE.pub (public);
    /// prints the public key PEM, which clients configure as the key server's key.
    Keygen(KeygenArgs),
    /// Run the key server.
    Serve(Box<ServeArgs>),
}

/// Flags of `nes-keyserver keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (PEM "RSA PRIVATE KEY", mode 0600); the public key
    /// goes to FILE.pub (PEM "PUBLIC KEY").
    #[arg(long, value_name = "FILE", env = "NES_KEYSERVER_OUT")]
    pub out: PathBuf,
    /// Overwrite FILE and FILE.pub if they exist.
    #[arg(long, env = "NES_KEYSERVER_FORCE")]
    pub force: bool,
    /// Key size in bits.
    #[arg(long, value_name = "BITS", default_value_t = 2048, env = "NES_KEYSERVER_BITS",
          value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"])
              .map(|s| s.parse::<usize>().unwrap_or(2048)))]
    // (The possible values all parse; the fallback is never taken.)
    pub bits: usize,
}

/// Flags of `nes-keyserver serve`. Each is also `NES_KEYSERVER_<FLAG>` in the
/// environment and `<flag>` in the config file; see [`crate::config`] for defaults.
#[derive(Debug, Default, Args)]
#[command(group(ArgGroup::new("mail").args(["smtp", "mail_dir", "dev"]).multiple(false)))]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names (`public-url = "https://..."`).
    /// Flags and env vars override it.
    #[arg(long, value_name = "FILE", env = "NES_KEYSERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on for HTTP [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", env = "NES_KEYSERVER_LISTEN")]
    pub listen: Option<String>,
    /// sqlite://PATH (created if missing) or postgres://USER@HOST/DB
    /// [default: sqlite://$XDG_DATA_HOME/nes/keyserver.db].
    #[arg(long, value_name = "URL", env = "NES_KEYSERVER_DATABASE")]
    pub database: Option<String>,
    /// The server's private signing key (make one with `nes-keyserver keygen`).
    #[arg(long, value_name = "FILE", env = "NES_KEYSERVER_PRIVATE_KEY")]
    pub key: Option<PathBuf>,
    /// The URL clients and mail links reach this server at, e.g. `https://keys.example.org`
    /// [default with --dev: http://LISTEN].
    #[arg(long, value_name = "URL", env = "NES_KEYSERVER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Send activation mail through this SMTP server: smtp://HOST:PORT (plain),
    /// smtp://HOST:PORT?tls=required (STARTTLS) or smtps://HOST:PORT; user:password@ may
    /// precede HOST.
    #[arg(long, value_name = "URL", env = "NES_KEYSERVER_SMTP")]
    pub smtp: Option<String>,
    /// Write each activation mail as an .eml file into DIR instead of sending it.
    #[arg(long, value_name = "DIR", env = "NES_KEYSERVER_MAIL_DIR")]
    pub mail_dir: Option<PathBuf>,
    /// Development: send no mail, log the activation and delete links instead.
    #[arg(long, env = "NES_KEYSERVER_DEV")]
    pub dev: bool,
    /// The From: of activation mail, e.g. "Keys <keys@example.org>" (default: NES key server,
    /// noreply@ the host of --public-url).
    #[arg(long, value_name = "MAILBOX", env = "NES_KEYSERVER_MAIL_FROM")]
    pub mail_from: Option<String>,
    /// How long an activation link works; unactivated registrations are removed after
    /// it (e.g. 24h, 30m, 90s) [default: 24h].
    #[arg(long, value_name = "DURATION", env = "NES_KEYSERVER_PENDING_TTL",
          value_parser = crate::config::parse_duration)]
    pub pending_ttl: Option<Duration>,
    /// How often expired registrations are removed [default: 10m].
    #[arg(long, value_name = "DURATION", env = "NES_KEYSERVER_CLEANUP_INTERVAL",
          value_parser = crate::config::parse_duration)]
    pub cleanup_interval: Option<Duration>,
    /// How long a signed answer is served from memory before the database is asked
    /// again; with several servers on one database, a deletion shows everywhere within
    /// this time; 0 turns the cache off [default: 2s].
    #[arg(long, value_name = "DURATION", env = "NES_KEYSERVER_CACHE_TTL",
          value_parser = crate::config::parse_duration)]
    pub cache_ttl: Option<Duration>,
    /// Registrations allowed per client IP per minute; 0 = unlimited [default: 10].
    #[arg(long, value_name = "N", env = "NES_KEYSERVER_REGISTER_RATE")]
    pub register_rate: Option<u32>,
    /// Lookups (and link clicks) allowed per client IP per second; 0 = unlimited
    /// [default: 100].
    #[arg(long, value_name = "N", env = "NES_KEYSERVER_LOOKUP_RATE")]
    pub lookup_rate: Option<u32>,
    /// Prekey uploads (`PUT /users/<name>/prekey`) allowed per client IP per minute;
    /// 0 = unlimited [default: 30].
    #[arg(long, value_name = "N", env = "NES_KEYSERVER_PREKEY_RATE")]
    pub prekey_rate: Option<u32>,
    /// Pending (not yet activated) registrations allowed per e-mail address; 0 =
    /// unlimited [default: 3].
    #[arg(long, value_name = "N", env = "NES_KEYSERVER_MAX_PENDING_PER_EMAIL")]
    pub max_pending_per_email: Option<u32>,
    /// Log format on stderr [default: text]. RUST_LOG filters (default: info).
    #[arg(long, value_name = "FORMAT", env = "NES_KEYSERVER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Also run an MQTT broker (MQTT 3.1.1, persistent sessions in memory) on ADDR, so
    /// one machine can run the whole system. Only in builds with the `embedded-broker`
    /// cargo feature.
    #[arg(long, value_name = "ADDR", env = "NES_KEYSERVER_EMBEDDED_BROKER")]
    pub embedded_broker: Option<String>,
    /// Trust the last address of X-Forwarded-For as the client's (only behind a reverse
    /// proxy that sets it; otherwise clients could pick their own rate-limit key).
    #[arg(long, env = "NES_KEYSERVER_BEHIND_PROXY")]
    pub behind_proxy: bool,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_documented_forms_parse() {
        let cli = Cli::try_parse_from(["nes-keyserver", "keygen", "--out", "k"]).unwrap();
        let Command::Keygen(args) = cli.command else {
            panic!("not keygen")
        };
        assert_eq!(args.out, PathBuf::from("k"));
        assert_eq!(args.bits, 2048);
        assert!(!args.force);

        let cli = Cli::try_parse_from([
            "nes-keyserver",
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--database",
            "sqlite://x.db",
            "--key",
            "k",
            "--public-url",
            "http://h",
            "--mail-dir",
            "m",
            "--register-rate",
            "0",
            "--lookup-rate",
            "0",
            "--pending-ttl",
            "2s",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(args.mail_dir, Some(PathBuf::from("m")));
        assert_eq!(args.register_rate, Some(0));
        assert_eq!(args.pending_ttl, Some(Duration::from_secs(2)));
    }

    #[test]
    fn mail_transports_exclude_each_other() {
        let err = Cli::try_parse_from(["nes-keyserver", "serve", "--dev", "--mail-dir", "m"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn keygen_refuses_odd_sizes() {
        assert!(
            Cli::try_parse_from(["nes-keyserver", "keygen", "--out", "k", "--bits", "1024"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["nes-keyserver", "keygen", "--out", "k", "--bits", "4096"])
            .unwrap();
        let Command::Keygen(args) = cli.command else {
            panic!("not keygen")
        };
        assert_eq!(args.bits, 4096);
    }
}
