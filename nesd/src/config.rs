//! Settings: command-line flags, `NES_*` environment variables, the TOML config file, and
//! XDG defaults, in that order of precedence.
//!
//! clap merges a flag with its env var (the flag wins); [`Config::resolve`] then fills what
//! is still missing from the config file (`--config`, `NES_CONFIG`, or
//! `~/.config/nes/config.toml`), then from the defaults of the README ("Configuration"). The config
//! file is shared with the frontends, so fields nesd does not know are ignored; a file that
//! is not valid TOML, or a known field of the wrong type, is an error.
//!
//! ```toml
//! user = "alice"
//! broker = "mqtt://127.0.0.1:1883"
//! keyserver = "https://keys.example.org"
//! keyserver_key = "~/.config/nes/keyserver.pub"
//! data_dir = "~/.local/share/nes"
//! socket = "/run/user/1000/nes/nesd.sock"
//! keyserver_legacy = false   # true: accept answers of an original PubKey server (no username)
//! key_policy = "tofu"        # or "always": accept key changes automatically (bots)
//! key_ttl_secs = 3600        # re-fetch contacts' keys after this long
//! lookup_rate = 50           # key server lookups per second for senders not yet known
//! prekey_rotation = "7d"         # v3: a new prekey and certificate this often (or seconds)
//! prekey_grace = "14d"           # v3: keep a prekey's private parts this long after it expires
//! event_retention = "30d"        # the event log keeps this long for clients to resume from
//! send_v3 = true                 # false: v2 at most (v3 frames are still received)
//! presence_interval = "30m"     # presence is told again this often; lasts 1.5x this
//! read_receipts = true           # false: contacts are not told when you read (delivery receipts still go)
//! max_file_size = "100MiB"       # larger files are refused, sent or received (or a number of bytes)
//! # A private broker over TLS with credentials (see docs/BROKER.md):
//! # broker = "mqtts://mqtt.example.org:8883"
//! # broker_ca = "~/.config/nes/broker-ca.pem"     # trust only this CA (default: system roots)
//! # broker_cert = "~/.config/nes/client.pem"      # optional client certificate ...
//! # broker_key = "~/.config/nes/client.key"       # ... and its key
//! # broker_user = "alice"
//! # broker_password_file = "~/.config/nes/broker-password"   # mode 600; or NES_BROKER_PASSWORD
//! # broker_protocol = "auto"          # the default: MQTT 5 where the broker speaks it, else 3.1.1; or "5", "3.1.1"
//! # broker_session_expiry_secs = 2592000   # MQTT 5: the broker keeps the session 30 days
//! ```
//!
//! The broker password never comes from a flag (flags are visible in `ps`): it is read from
//! `broker_password_file` (refused when group or others may read it) or from the
//! `NES_BROKER_PASSWORD` environment variable, which wins over the file.

use clap::Parser;
use nes_proto::Username;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default MQTT broker when none is configured.
pub const DEFAULT_BROKER: &str = "mqtt://localhost:1883";
/// Default time after which a contact's keys are fetched again.
pub const DEFAULT_KEY_TTL: Duration = Duration::from_secs(3600);
/// Default `prekey_rotation`: 7 days (DESIGN.md "v3").
pub const DEFAULT_PREKEY_ROTATION: Duration = Duration::from_secs(7 * 86_400);
/// Default `prekey_grace`: 14 days.
pub const DEFAULT_PREKEY_GRACE: Duration = Duration::from_secs(14 * 86_400);
/// Default `event_retention`: 30 days (see "Retention" in [`crate::store`]).
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Default `broker_session_expiry_secs`: 30 days, as `persistent_client_expiration` in
/// docs/BROKER.md. MQTT 5 ends a session at disconnect unless told otherwise.
pub const DEFAULT_SESSION_EXPIRY_SECS: u32 = 30 * 86_400;
/// Default budget of background key server lookups per second (senders of received
/// frames whose keys are not cached, and refreshes of expired contacts).
pub const DEFAULT_LOOKUP_RATE: u32 = 50;

/// nesd's command line. Every flag may also come from its `NES_*` environment variable
/// and from the config file.
#[derive(Debug, Default, Clone, Parser)]
#[command(
    name = "nesd",
    version,
    about = "The NES daemon: holds the keys, the MQTT session, the key cache and the message store",
    long_about = "The NES daemon: holds this identity's private keys, the MQTT session, the key \
                  cache and the message store, and serves the frontends (nes, nes chat, \
                  nes-notify) over gRPC on a Unix socket. Runs in the foreground; logs to stderr."
)]
pub struct Cli {
    /// This identity's username (keys are read from DATA_DIR/keys/<user>-rsa-*).
    #[arg(long, env = "NES_USER", value_name = "USER")]
    pub user: Option<String>,
    /// MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS) [default: mqtt://localhost:1883].
    #[arg(long, env = "NES_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// With mqtts://: trust only this CA (PEM) for the broker's certificate, instead of the
    /// system's roots.
    #[arg(long = "broker-ca", env = "NES_BROKER_CA", value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// With mqtts://: a client certificate (PEM chain) to present to the broker.
    #[arg(long = "broker-cert", env = "NES_BROKER_CERT", value_name = "FILE")]
    pub broker_cert: Option<PathBuf>,
    /// With --broker-cert: its private key (PEM).
    #[arg(long = "broker-key", env = "NES_BROKER_KEY", value_name = "FILE")]
    pub broker_key: Option<PathBuf>,
    /// The user name to log in to the broker with.
    #[arg(long = "broker-user", env = "NES_BROKER_USER", value_name = "USER")]
    pub broker_user: Option<String>,
    /// A file holding the broker password (mode 600; the first line is the password).
    /// NES_BROKER_PASSWORD, when set, wins; there is no flag for the password itself.
    #[arg(
        long = "broker-password-file",
        env = "NES_BROKER_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub broker_password_file: Option<PathBuf>,
    /// The broker password from `NES_BROKER_PASSWORD` (never a flag: flags show in `ps`).
    #[arg(skip = std::env::var("NES_BROKER_PASSWORD").ok().filter(|p| !p.is_empty()).map(Secret))]
    pub broker_password: Option<Secret>,
    /// The MQTT version to speak: auto (MQTT 5, falling back to 3.1.1 when the broker does
    /// not answer an MQTT 5 CONNECT), 5 or 3.1.1 [default: auto].
    #[arg(
        long = "broker-protocol",
        env = "NES_BROKER_PROTOCOL",
        value_name = "VERSION"
    )]
    pub broker_protocol: Option<BrokerProtocol>,
    /// MQTT 5: seconds the broker keeps the session (and what arrives for it) after nesd
    /// disconnects; 4294967295 is never [default: 2592000, 30 days].
    #[arg(
        long = "broker-session-expiry",
        env = "NES_BROKER_SESSION_EXPIRY",
        value_name = "SECONDS"
    )]
    pub broker_session_expiry_secs: Option<u32>,
    /// Key server base URL, e.g. https://keys.example.org.
    #[arg(long, env = "NES_KEYSERVER", value_name = "URL")]
    pub keyserver: Option<String>,
    /// The key server's public key (PEM), used to verify its answers
    /// [default: ~/.config/nes/keyserver.pub].
    #[arg(long = "keyserver-key", env = "NES_KEYSERVER_KEY", value_name = "FILE")]
    pub keyserver_key: Option<PathBuf>,
    /// Data directory: keys/ and the message store [default: ~/.local/share/nes].
    #[arg(long = "data-dir", env = "NES_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The Unix socket to serve the API on [default: $XDG_RUNTIME_DIR/nes/nesd.sock].
    #[arg(long, env = "NES_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Config file [default: ~/.config/nes/config.toml].
    #[arg(long, env = "NES_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Accept key server answers without a `username` (an original PubKey server).
    #[arg(
        long = "keyserver-legacy",
        env = "NES_KEYSERVER_LEGACY",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub keyserver_legacy: Option<bool>,
    /// What to do when a contact's keys change: hold its messages until trusted (tofu), or
    /// accept the new keys at once (always; for bots) [default: tofu].
    #[arg(long = "key-policy", env = "NES_KEY_POLICY", value_name = "POLICY")]
    pub key_policy: Option<KeyPolicy>,
    /// Seconds after which a contact's cached keys are fetched again [default: 3600].
    #[arg(long = "key-ttl", env = "NES_KEY_TTL", value_name = "SECONDS")]
    pub key_ttl_secs: Option<u64>,
    /// Background key server lookups per second at most (senders of received frames not
    /// yet known; bursts of five times this) [default: 50].
    #[arg(
        long = "lookup-rate",
        env = "NES_LOOKUP_RATE",
        value_name = "PER_SECOND"
    )]
    pub lookup_rate: Option<u32>,
    /// v3: how often a new prekey and certificate are made (90s, 30m, 12h, 7d; a bare
    /// number is seconds); each expires after twice this [default: 7d].
    #[arg(
        long = "prekey-rotation",
        env = "NES_PREKEY_ROTATION",
        value_name = "DURATION",
        value_parser = nes_proto::v3::parse_duration
    )]
    pub prekey_rotation: Option<Duration>,
    /// v3: how long a prekey's private parts are kept after it expires, for frames that
    /// waited in the broker (as --prekey-rotation) [default: 14d].
    #[arg(
        long = "prekey-grace",
        env = "NES_PREKEY_GRACE",
        value_name = "DURATION",
        value_parser = nes_proto::v3::parse_duration
    )]
    pub prekey_grace: Option<Duration>,
    /// How long the event log keeps events, for clients that resume from a cursor (as
    /// --prekey-rotation) [default: 30d]; messages stay in the history regardless.
    #[arg(
        long = "event-retention",
        env = "NES_EVENT_RETENTION",
        value_name = "DURATION",
        value_parser = nes_proto::v3::parse_duration
    )]
    pub event_retention: Option<Duration>,
    /// Send v3 to contacts with a valid prekey; false: v2 at most (to compare, or to stay
    /// on RSA while a problem with v3 is looked into). v3 frames are received either way
    /// [default: true].
    #[arg(long = "send-v3", env = "NES_SEND_V3", value_name = "BOOL")]
    pub send_v3: Option<bool>,
    /// Tell contacts when their messages are read (read receipts); false: only that they
    /// were delivered (delivery receipts always go) [default: true].
    #[arg(long = "read-receipts", env = "NES_READ_RECEIPTS", value_name = "BOOL")]
    pub read_receipts: Option<bool>,
    /// How often contacts are told this identity's presence again (90s, 30m, 2h; a bare
    /// number is seconds); each presence lasts 1.5 times this, so an unclean exit shows
    /// as offline after that [default: 30m].
    #[arg(
        long = "presence-interval",
        env = "NES_PRESENCE_INTERVAL",
        value_name = "DURATION",
        value_parser = nes_proto::v3::parse_duration
    )]
    pub presence_interval: Option<Duration>,
    /// Largest file sent or received (100MiB, 512K, or bytes); a larger offer is refused
    /// and nothing of it kept [default: 100MiB].
    #[arg(
        long = "max-file-size",
        env = "NES_MAX_FILE_SIZE",
        value_name = "SIZE",
        value_parser = nes_proto::files::parse_size
    )]
    pub max_file_size: Option<u64>,
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "nesd=debug") [default: info].
    #[arg(long = "log", env = "NES_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

/// How a change of a pinned contact's keys is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyPolicy {
    /// Trust on first use: a change holds the contact's messages and blocks sending to it
    /// until the user accepts the new keys (`TrustContact`).
    #[default]
    Tofu,
    /// Accept whatever the key server answers (for bots that cannot ask a human).
    Always,
}

/// Which MQTT version nesd speaks with the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BrokerProtocol {
    /// MQTT 5 where the broker speaks it, else 3.1.1 (decided at the first connection that
    /// gets an answer, then kept for the run). The default.
    #[default]
    Auto,
    /// MQTT 5 only.
    #[value(name = "5")]
    V5,
    /// MQTT 3.1.1 only.
    #[value(name = "3.1.1")]
    V311,
}

impl BrokerProtocol {
    /// The setting as written: `auto`, `5`, `3.1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerProtocol::Auto => "auto",
            BrokerProtocol::V5 => "5",
            BrokerProtocol::V311 => "3.1.1",
        }
    }
}

impl std::str::FromStr for BrokerProtocol {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim() {
            "auto" => Ok(BrokerProtocol::Auto),
            "5" | "5.0" => Ok(BrokerProtocol::V5),
            "3.1.1" => Ok(BrokerProtocol::V311),
            other => Err(ConfigError::Invalid(format!(
                "broker_protocol {other:?}: use \"auto\", \"5\" or \"3.1.1\""
            ))),
        }
    }
}

/// `broker_protocol` in the config file: a string, or the number 5 (an easy slip for "5").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ProtocolSetting {
    /// `broker_protocol = 5`
    Number(i64),
    /// `broker_protocol = "3.1.1"` and the like.
    Text(String),
}

impl ProtocolSetting {
    fn read(value: Option<&Self>) -> Result<Option<BrokerProtocol>, ConfigError> {
        match value {
            None => Ok(None),
            Some(ProtocolSetting::Number(n)) => n.to_string().parse().map(Some),
            Some(ProtocolSetting::Text(t)) => t.parse().map(Some),
        }
    }
}

/// A duration in the config file: `"7d"`, `"12h"`, `"30m"`, `"90s"`, or a number of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationSetting {
    /// A number of seconds.
    Seconds(u64),
    /// A number with a unit.
    Text(String),
}

impl DurationSetting {
    fn read(value: Option<&Self>, key: &str) -> Result<Option<Duration>, ConfigError> {
        let text = match value {
            None => return Ok(None),
            Some(DurationSetting::Seconds(n)) => n.to_string(),
            Some(DurationSetting::Text(t)) => t.clone(),
        };
        nes_proto::v3::parse_duration(&text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))
    }
}

/// A size in the config file: a number of bytes, or text with a unit (`"100MiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSetting {
    /// A number of bytes.
    Bytes(u64),
    /// A number with a unit.
    Text(String),
}

/// The fields of the config file that nesd reads, exactly the keys the shared table
/// `nes_client::settings` says nesd reads (a test keeps them so). Others are ignored: the
/// frontends share the file.
#[derive(Debug, Default, Deserialize)]
pub struct FileConfig {
    /// `user`
    pub user: Option<String>,
    /// `broker`
    pub broker: Option<String>,
    /// `broker_ca`
    pub broker_ca: Option<PathBuf>,
    /// `broker_cert`
    pub broker_cert: Option<PathBuf>,
    /// `broker_key`
    pub broker_key: Option<PathBuf>,
    /// `broker_user`
    pub broker_user: Option<String>,
    /// `broker_password_file`
    pub broker_password_file: Option<PathBuf>,
    /// `broker_protocol`: `"auto"`, `"5"` or `"3.1.1"`
    pub broker_protocol: Option<ProtocolSetting>,
    /// `broker_session_expiry_secs`
    pub broker_session_expiry_secs: Option<u32>,
    /// `keyserver`
    pub keyserver: Option<String>,
    /// `keyserver_key`
    pub keyserver_key: Option<PathBuf>,
    /// `data_dir`
    pub data_dir: Option<PathBuf>,
    /// `socket`
    pub socket: Option<PathBuf>,
    /// `keyserver_legacy`
    pub keyserver_legacy: Option<bool>,
    /// `key_policy`
    pub key_policy: Option<KeyPolicy>,
    /// `key_ttl_secs`
    pub key_ttl_secs: Option<u64>,
    /// `lookup_rate`
    pub lookup_rate: Option<u32>,
    /// `prekey_rotation`: `"7d"` and the like, or a number of seconds
    pub prekey_rotation: Option<DurationSetting>,
    /// `prekey_grace`: as `prekey_rotation`
    pub prekey_grace: Option<DurationSetting>,
    /// `event_retention`: as `prekey_rotation`
    pub event_retention: Option<DurationSetting>,
    /// `send_v3`
    pub send_v3: Option<bool>,
    /// `read_receipts`
    pub read_receipts: Option<bool>,
    /// `presence_interval`: as `prekey_rotation`
    pub presence_interval: Option<DurationSetting>,
    /// `max_file_size`: `"100MiB"` and the like, or a number of bytes
    pub max_file_size: Option<SizeSetting>,
    /// `log`
    pub log: Option<String>,
}

/// Where the XDG defaults point (injected so tests do not depend on the environment).
#[derive(Debug, Clone)]
pub struct Dirs {
    /// `$HOME`, for `~/` in paths.
    pub home: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME` or `~/.config`.
    pub config: Option<PathBuf>,
    /// `$XDG_DATA_HOME` or `~/.local/share`.
    pub data: Option<PathBuf>,
    /// The default API socket: `nes_client::paths::default_socket`, the frontends' rule.
    pub socket: Option<PathBuf>,
}

impl Dirs {
    /// The directories of the current user, from the environment. The socket is
    /// `$XDG_RUNTIME_DIR/nes/nesd.sock`; without `XDG_RUNTIME_DIR`,
    /// `/run/user/<uid>/nes/nesd.sock` when that directory exists, else
    /// `$TMPDIR/nes-<uid>/nesd.sock`: the rule of `nes_client::paths`, so that both sides
    /// find the same socket.
    pub fn from_env() -> Self {
        let socket = Some(nes_client::paths::default_socket(
            |name| std::env::var_os(name),
            current_uid(),
        ));
        match directories::BaseDirs::new() {
            Some(b) => Dirs {
                home: Some(b.home_dir().to_owned()),
                config: Some(b.config_dir().to_owned()),
                data: Some(b.data_dir().to_owned()),
                socket,
            },
            None => Dirs {
                home: None,
                config: None,
                data: None,
                socket,
            },
        }
    }
}

/// A broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or IP.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS (`mqtts://`).
    pub tls: bool,
}

impl Broker {
    /// Parses `mqtt://HOST[:PORT]`, `tcp://HOST[:PORT]` or `HOST[:PORT]` (port 1883 by
    /// default), and `mqtts://HOST[:PORT]` (also `ssl://`, `tls://`; TLS, port 8883 by
    /// default).
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("broker {url:?}: {why}"));
        let (rest, tls) = if let Some((scheme, rest)) = url.split_once("://") {
            match scheme {
                "mqtt" | "tcp" => (rest, false),
                "mqtts" | "ssl" | "tls" => (rest, true),
                _ => return Err(bad("use mqtt://HOST:PORT or mqtts://HOST:PORT")),
            }
        } else {
            (url, false)
        };
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(bad("use mqtt://HOST:PORT"));
        }
        let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
            // [v6]:port
            let (host, after) = stripped
                .split_once(']')
                .ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("use mqtt://HOST:PORT")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("use mqtt://HOST:PORT"));
        }
        Ok(Broker { host, port, tls })
    }

    /// `mqtt://host:port` or `mqtts://host:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A secret string (the broker password): its `Debug` does not show it, so a logged
/// `Config` cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How nesd proves itself to the broker and checks the broker: TLS files and login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerAuth {
    /// With TLS: the only CA to trust (PEM); `None` trusts the system's roots.
    pub ca: Option<PathBuf>,
    /// With TLS: a client certificate chain and its key (PEM files).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The MQTT user name.
    pub user: Option<String>,
    /// The MQTT password (needs `user`).
    pub password: Option<Secret>,
}

/// Everything nesd needs to start, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// This identity.
    pub user: Username,
    /// The MQTT broker.
    pub broker: Broker,
    /// TLS files and login for the broker.
    pub broker_auth: BrokerAuth,
    /// The MQTT version to speak.
    pub broker_protocol: BrokerProtocol,
    /// MQTT 5: how long the broker keeps the session after a disconnect, in seconds.
    pub broker_session_expiry_secs: u32,
    /// Key server base URL, without a trailing slash.
    pub keyserver: String,
    /// The key server's public key file.
    pub keyserver_key: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The API socket path (unused when systemd passes a listening socket).
    pub socket: PathBuf,
    /// Accept key server answers without `username`.
    pub keyserver_legacy: bool,
    /// Key change policy.
    pub key_policy: KeyPolicy,
    /// Cached keys are fetched again after this long.
    pub key_ttl: Duration,
    /// Background key server lookups per second at most.
    pub lookup_rate: u32,
    /// v3: a new prekey and certificate this often (each expires after twice this).
    pub prekey_rotation: Duration,
    /// v3: private parts are kept this long after their `expires`.
    pub prekey_grace: Duration,
    /// Events older than this are removed from the log (see "Retention" in
    /// [`crate::store`]).
    pub event_retention: Duration,
    /// v3 to contacts with a valid prekey (else v2 at most).
    pub send_v3: bool,
    /// Send read receipts.
    pub read_receipts: bool,
    /// Presence is told again this often.
    pub presence_interval: Duration,
    /// Largest file sent or received, in bytes.
    pub max_file_size: u64,
    /// Log filter, when configured.
    pub log: Option<String>,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// A configuration that cannot be used. The message is one line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("bad config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// A required setting is absent.
    #[error("{0}")]
    Missing(String),
    /// A setting has a bad value.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Resolves the settings: flags and env (already merged in `cli`), then the config
    /// file, then the defaults under `dirs`.
    pub fn resolve(cli: Cli, dirs: &Dirs) -> Result<Config, ConfigError> {
        let (file, config_file) = load_file(cli.config.as_deref(), dirs)?;
        let shown = config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the config file".into());
        let home = dirs.home.as_deref();

        let user = cli.user.or(file.user).ok_or_else(|| {
            ConfigError::Missing(format!(
                "no username: pass --user USER, set NES_USER, or set `user` in {shown}"
            ))
        })?;
        let user = Username::parse(&user).map_err(|e| ConfigError::Invalid(e.to_string()))?;

        let broker = cli
            .broker
            .or(file.broker)
            .unwrap_or_else(|| DEFAULT_BROKER.to_owned());
        let broker = Broker::parse(&broker)?;
        let broker_auth = resolve_broker_auth(
            &broker,
            BrokerAuthSources {
                ca: cli.broker_ca.or(file.broker_ca),
                cert: cli.broker_cert.or(file.broker_cert),
                key: cli.broker_key.or(file.broker_key),
                user: cli.broker_user.or(file.broker_user),
                password_file: cli.broker_password_file.or(file.broker_password_file),
                password: cli.broker_password,
            },
            home,
        )?;

        let broker_protocol = match cli.broker_protocol {
            Some(p) => p,
            None => ProtocolSetting::read(file.broker_protocol.as_ref())?.unwrap_or_default(),
        };
        let broker_session_expiry_secs = match cli
            .broker_session_expiry_secs
            .or(file.broker_session_expiry_secs)
        {
            // Zero ends the session at every disconnect: what arrives while nesd is down,
            // and what it received but had not stored yet, would be lost.
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "broker_session_expiry_secs must be at least 1 (0 would lose what arrives while nesd is down)"
                        .into(),
                ))
            }
            Some(s) => s,
            None => DEFAULT_SESSION_EXPIRY_SECS,
        };

        let keyserver = cli.keyserver.or(file.keyserver).ok_or_else(|| {
            ConfigError::Missing(format!(
                "no key server: pass --keyserver URL, set NES_KEYSERVER, or set `keyserver` in {shown}"
            ))
        })?;
        let keyserver = check_keyserver_url(&keyserver)?;

        let keyserver_key = match cli.keyserver_key.or(file.keyserver_key) {
            Some(p) => expand(&p, home),
            None => dirs
                .config
                .as_ref()
                .map(|c| c.join("nes").join("keyserver.pub"))
                .ok_or_else(|| {
                    ConfigError::Missing(
                        "no key server public key: pass --keyserver-key FILE".into(),
                    )
                })?,
        };

        let data_dir = match cli.data_dir.or(file.data_dir) {
            Some(p) => expand(&p, home),
            None => dirs.data.as_ref().map(|d| d.join("nes")).ok_or_else(|| {
                ConfigError::Missing(
                    "no data directory: pass --data-dir DIR (HOME is not set)".into(),
                )
            })?,
        };

        let socket = match cli.socket.or(file.socket) {
            Some(p) => expand(&p, home),
            None => match &dirs.socket {
                Some(p) => p.clone(),
                None => {
                    return Err(ConfigError::Missing(
                        "no socket path: XDG_RUNTIME_DIR is not set; pass --socket PATH".into(),
                    ))
                }
            },
        };

        let key_ttl_secs = cli.key_ttl_secs.or(file.key_ttl_secs);
        let key_ttl = match key_ttl_secs {
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "key TTL must be at least 1 second".into(),
                ))
            }
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_KEY_TTL,
        };

        let prekey_rotation = match cli.prekey_rotation {
            Some(d) => d,
            None => DurationSetting::read(file.prekey_rotation.as_ref(), "prekey_rotation")?
                .unwrap_or(DEFAULT_PREKEY_ROTATION),
        };
        let presence_interval = match cli.presence_interval {
            Some(d) => d,
            None => DurationSetting::read(file.presence_interval.as_ref(), "presence_interval")?
                .unwrap_or(crate::presence::DEFAULT_INTERVAL),
        };
        if presence_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "presence_interval: at least 1s".into(),
            ));
        }
        let prekey_grace = match cli.prekey_grace {
            Some(d) => d,
            None => DurationSetting::read(file.prekey_grace.as_ref(), "prekey_grace")?
                .unwrap_or(DEFAULT_PREKEY_GRACE),
        };

        let event_retention = match cli.event_retention {
            Some(d) => d,
            None => DurationSetting::read(file.event_retention.as_ref(), "event_retention")?
                .unwrap_or(DEFAULT_EVENT_RETENTION),
        };
        if event_retention < Duration::from_secs(1) {
            return Err(ConfigError::Invalid("event_retention: at least 1s".into()));
        }

        Ok(Config {
            user,
            broker,
            broker_auth,
            broker_protocol,
            broker_session_expiry_secs,
            keyserver,
            keyserver_key,
            data_dir,
            socket,
            keyserver_legacy: cli
                .keyserver_legacy
                .or(file.keyserver_legacy)
                .unwrap_or(false),
            key_policy: cli.key_policy.or(file.key_policy).unwrap_or_default(),
            key_ttl,
            lookup_rate: match cli.lookup_rate.or(file.lookup_rate) {
                Some(0) => {
                    return Err(ConfigError::Invalid(
                        "lookup rate must be at least 1 per second".into(),
                    ))
                }
                Some(n) => n,
                None => DEFAULT_LOOKUP_RATE,
            },
            prekey_rotation,
            prekey_grace,
            event_retention,
            send_v3: cli.send_v3.or(file.send_v3).unwrap_or(true),
            read_receipts: cli.read_receipts.or(file.read_receipts).unwrap_or(true),
            presence_interval,
            max_file_size: match cli.max_file_size {
                Some(n) => n,
                None => match &file.max_file_size {
                    None => nes_proto::files::DEFAULT_MAX_FILE_SIZE,
                    Some(SizeSetting::Bytes(n)) => *n,
                    Some(SizeSetting::Text(t)) => nes_proto::files::parse_size(t)
                        .map_err(|e| ConfigError::Invalid(format!("max_file_size: {e}")))?,
                },
            },
            log: cli.log.or(file.log),
            config_file,
        })
    }
}

/// Reads the config file: the one named (which must exist), else the default one (which
/// may be absent).
fn load_file(
    named: Option<&Path>,
    dirs: &Dirs,
) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    let (path, must_exist) = match named {
        Some(p) => (expand(p, dirs.home.as_deref()), true),
        None => match &dirs.config {
            Some(c) => (c.join("nes").join("config.toml"), false),
            None => return Ok((FileConfig::default(), None)),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            return Ok((FileConfig::default(), None))
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        message: one_line(&e.to_string()),
    })?;
    Ok((file, Some(path)))
}

/// The broker settings as given, before checking.
struct BrokerAuthSources {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    password: Option<Secret>,
}

/// Checks the broker's TLS and login settings together and reads the password.
fn resolve_broker_auth(
    broker: &Broker,
    s: BrokerAuthSources,
    home: Option<&Path>,
) -> Result<BrokerAuth, ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    if !broker.tls {
        // TLS files with a plain broker would give a false sense of protection.
        for (name, set) in [
            ("broker_ca", s.ca.is_some()),
            ("broker_cert", s.cert.is_some()),
            ("broker_key", s.key.is_some()),
        ] {
            if set {
                return invalid(format!(
                    "{name} is set but the broker {} is not TLS: use mqtts://",
                    broker.url()
                ));
            }
        }
    }
    let client_cert = match (s.cert, s.key) {
        (Some(c), Some(k)) => Some((expand(&c, home), expand(&k, home))),
        (None, None) => None,
        (Some(_), None) => {
            return invalid("broker_cert needs broker_key (the certificate's private key)".into())
        }
        (None, Some(_)) => return invalid("broker_key needs broker_cert".into()),
    };
    let password = match (s.password, s.password_file) {
        (Some(p), _) => Some(p),
        (None, Some(file)) => Some(read_password_file(&expand(&file, home))?),
        (None, None) => None,
    };
    let user = s.user.filter(|u| !u.is_empty());
    if password.is_some() && user.is_none() {
        return invalid(
            "a broker password is set but no broker_user (NES_BROKER_USER, --broker-user)".into(),
        );
    }
    Ok(BrokerAuth {
        ca: s.ca.map(|p| expand(&p, home)),
        client_cert,
        user,
        password,
    })
}

/// Reads the broker password: the file's first line. A file that group or others may
/// read is refused, as ssh refuses such keys: the password would not be a secret.
fn read_password_file(path: &Path) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Invalid(format!(
            "broker password file {} may be read by group or others (mode {mode:o}): chmod 600 it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "broker password file {} is empty",
            path.display()
        )));
    }
    Ok(Secret(password))
}

fn check_keyserver_url(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "key server {url:?}: use http://HOST[:PORT] or https://HOST"
            ))
        })?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(ConfigError::Invalid(format!("key server {url:?}: no host")));
    }
    Ok(trimmed.to_owned())
}

// The one definition of the current user's id, shared with the frontends.
pub use nes_client::paths::current_uid;

/// Expands a leading `~/`.
fn expand(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

/// Joins a multi-line parser message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c.is_whitespace()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> Dirs {
        Dirs {
            home: Some(root.to_owned()),
            config: Some(root.join(".config")),
            data: Some(root.join(".local/share")),
            socket: Some(root.join("run/nes/nesd.sock")),
        }
    }

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["nesd"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn write_config(root: &Path, text: &str) {
        std::fs::create_dir_all(root.join(".config/nes")).unwrap();
        std::fs::write(root.join(".config/nes/config.toml"), text).unwrap();
    }

    /// The field names serde's derive gives a struct: what it asks a deserializer for.
    fn field_names<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
        struct Names<'a>(&'a mut Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for Names<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(serde::de::Error::custom("names taken"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut names = Vec::new();
        let _ = T::deserialize(Names(&mut names));
        names
    }

    #[test]
    fn the_file_fields_are_the_settings_the_shared_table_says_nesd_reads() {
        use nes_client::settings::{self, Reader};
        let mut fields = field_names::<FileConfig>();
        fields.sort_unstable();
        let mut table: Vec<&str> = settings::read_by(Reader::Nesd).collect();
        table.sort_unstable();
        assert!(!fields.is_empty());
        assert_eq!(
            fields, table,
            "FileConfig and nes_client::settings disagree"
        );
    }

    #[test]
    fn defaults_follow_xdg() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Config::resolve(
            cli(&["--user", "Alice", "--keyserver", "http://k:8080/"]),
            &dirs(tmp.path()),
        )
        .unwrap();
        assert_eq!(c.user.as_str(), "alice");
        assert_eq!(
            c.broker,
            Broker {
                host: "localhost".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(c.broker_auth, BrokerAuth::default());
        assert_eq!(c.keyserver, "http://k:8080");
        assert_eq!(c.data_dir, tmp.path().join(".local/share/nes"));
        assert_eq!(c.socket, tmp.path().join("run/nes/nesd.sock"));
        assert_eq!(
            c.keyserver_key,
            tmp.path().join(".config/nes/keyserver.pub")
        );
        assert_eq!(c.key_policy, KeyPolicy::Tofu);
        assert_eq!(c.key_ttl, DEFAULT_KEY_TTL);
        assert!(!c.keyserver_legacy);
        assert_eq!(c.config_file, None);
    }

    #[test]
    fn prekey_periods_take_units_or_seconds_in_the_file_and_on_the_command_line() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(
            tmp.path(),
            "user = \"bob\"\nkeyserver = \"https://ks\"\nprekey_rotation = \"12h\"\nprekey_grace = 90\n",
        );
        let d = dirs(tmp.path());
        let c = Config::resolve(cli(&[]), &d).unwrap();
        assert_eq!(c.prekey_rotation, Duration::from_secs(12 * 3600));
        assert_eq!(c.prekey_grace, Duration::from_secs(90));
        let c =
            Config::resolve(cli(&["--prekey-rotation", "4", "--prekey-grace", "2d"]), &d).unwrap();
        assert_eq!(c.prekey_rotation, Duration::from_secs(4));
        assert_eq!(c.prekey_grace, Duration::from_secs(2 * 86_400));
        write_config(
            tmp.path(),
            "user = \"bob\"\nkeyserver = \"https://ks\"\nprekey_rotation = \"a week\"\n",
        );
        let err = Config::resolve(cli(&[]), &d).unwrap_err().to_string();
        assert!(err.contains("prekey_rotation"), "{err}");
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(
            tmp.path(),
            "user = \"bob\"\nbroker = \"mqtt://filehost:1999\"\nkeyserver = \"https://ks\"\n\
             data_dir = \"~/nesdata\"\nkey_policy = \"always\"\nkey_ttl_secs = 60\n\
             keyserver_legacy = true\nsome_frontend_field = 3\n",
        );
        let d = dirs(tmp.path());
        let c = Config::resolve(cli(&[]), &d).unwrap();
        assert_eq!(c.user.as_str(), "bob");
        assert_eq!(
            c.broker,
            Broker {
                host: "filehost".into(),
                port: 1999,
                tls: false
            }
        );
        assert_eq!(c.data_dir, tmp.path().join("nesdata"));
        assert_eq!(c.key_policy, KeyPolicy::Always);
        assert_eq!(c.key_ttl, Duration::from_secs(60));
        assert!(c.keyserver_legacy);
        assert_eq!(
            c.config_file,
            Some(tmp.path().join(".config/nes/config.toml"))
        );

        let c = Config::resolve(
            cli(&[
                "--user",
                "carol",
                "--broker",
                "mqtt://flag:1",
                "--key-policy",
                "tofu",
                "--keyserver-legacy=false",
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(c.user.as_str(), "carol");
        assert_eq!(c.broker.port, 1);
        assert_eq!(c.key_policy, KeyPolicy::Tofu);
        assert!(!c.keyserver_legacy);
        assert_eq!(c.keyserver, "https://ks");
    }

    #[test]
    fn env_values_beat_the_file() {
        // clap puts NES_* values into the same fields as the flags (a flag wins over its
        // env var, clap's own rule); here a field set that way must beat the file.
        let tmp = tempfile::tempdir().unwrap();
        write_config(
            tmp.path(),
            "user = \"fromfile\"\nkeyserver = \"http://ks\"\n",
        );
        let from_env = Cli {
            user: Some("fromenv".into()),
            ..Cli::default()
        };
        let c = Config::resolve(from_env, &dirs(tmp.path())).unwrap();
        assert_eq!(c.user.as_str(), "fromenv");
        assert_eq!(c.keyserver, "http://ks");
    }

    #[test]
    fn named_config_must_exist_and_parse() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.toml");
        let err = Config::resolve(
            cli(&["--config", missing.to_str().unwrap()]),
            &dirs(tmp.path()),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");

        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "user = [1, 2\n").unwrap();
        let err = Config::resolve(cli(&["--config", bad.to_str().unwrap()]), &dirs(tmp.path()))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");

        std::fs::write(&bad, "user = 5\n").unwrap();
        let err = Config::resolve(cli(&["--config", bad.to_str().unwrap()]), &dirs(tmp.path()))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn missing_and_invalid_settings_are_one_line_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dirs(tmp.path());
        let err = Config::resolve(cli(&["--keyserver", "http://k"]), &d).unwrap_err();
        assert!(err.to_string().contains("--user"), "{err}");
        let err = Config::resolve(cli(&["--user", "al"]), &d).unwrap_err();
        assert!(err.to_string().contains("username"), "{err}");
        let err = Config::resolve(cli(&["--user", "alice"]), &d).unwrap_err();
        assert!(err.to_string().contains("--keyserver"), "{err}");
        let err =
            Config::resolve(cli(&["--user", "alice", "--keyserver", "ftp://x"]), &d).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let err = Config::resolve(
            cli(&[
                "--user",
                "alice",
                "--keyserver",
                "http://k",
                "--broker",
                "mqtt://h:port",
            ]),
            &d,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let no_runtime = Dirs { socket: None, ..d };
        let err = Config::resolve(
            cli(&["--user", "alice", "--keyserver", "http://k"]),
            &no_runtime,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--socket"), "{err}");
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            Broker::parse("mqtt://h:1").unwrap(),
            Broker {
                host: "h".into(),
                port: 1,
                tls: false
            }
        );
        assert_eq!(Broker::parse("tcp://h").unwrap().port, 1883);
        assert_eq!(Broker::parse("127.0.0.1:7").unwrap().port, 7);
        assert_eq!(
            Broker::parse("mqtt://[::1]:9").unwrap(),
            Broker {
                host: "::1".into(),
                port: 9,
                tls: false
            }
        );
        assert_eq!(
            Broker::parse("mqtt://[::1]:9").unwrap().url(),
            "mqtt://[::1]:9"
        );
        assert_eq!(
            Broker::parse("mqtts://h:8884").unwrap(),
            Broker {
                host: "h".into(),
                port: 8884,
                tls: true
            }
        );
        assert_eq!(Broker::parse("mqtts://h").unwrap().port, 8883);
        assert_eq!(
            Broker::parse("ssl://[::1]").unwrap().url(),
            "mqtts://[::1]:8883"
        );
        for bad in [
            "http://h:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://u@h:1",
            "mqtt://h:1/x",
            "mqtts://u:pw@h:8883",
        ] {
            assert!(Broker::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bool_flag_forms() {
        assert_eq!(cli(&["--keyserver-legacy"]).keyserver_legacy, Some(true));
        assert_eq!(
            cli(&["--keyserver-legacy=no"]).keyserver_legacy,
            Some(false)
        );
        assert_eq!(cli(&[]).keyserver_legacy, None);
    }

    #[test]
    fn broker_tls_and_login_settings() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = dirs(tmp.path());
        let pw = tmp.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_config(
            tmp.path(),
            &format!(
                "user = \"alice\"\nkeyserver = \"http://k\"\nbroker = \"mqtts://b\"\nbroker_ca = \"~/ca.pem\"\n\
                 broker_user = \"alice\"\nbroker_password_file = \"{}\"\n",
                pw.display()
            ),
        );
        let c = Config::resolve(cli(&[]), &d).unwrap();
        assert!(c.broker.tls);
        assert_eq!(c.broker_auth.ca, Some(tmp.path().join("ca.pem")));
        assert_eq!(c.broker_auth.user.as_deref(), Some("alice"));
        assert_eq!(c.broker_auth.password, Some(Secret("s3cret".into())));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug shows the password"
        );

        // NES_BROKER_PASSWORD (filled by clap from the environment) wins over the file.
        let from_env = Cli {
            broker_password: Some(Secret("fromenv".into())),
            ..Cli::default()
        };
        let c = Config::resolve(from_env, &d).unwrap();
        assert_eq!(c.broker_auth.password, Some(Secret("fromenv".into())));

        // A password file others can read is refused, saying how to fix it.
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::resolve(cli(&[]), &d).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();

        // The flags and env vars exist for each setting.
        let c = Config::resolve(
            cli(&[
                "--broker-cert",
                "/c.pem",
                "--broker-key",
                "/k.pem",
                "--broker-user",
                "bob",
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(
            c.broker_auth.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert_eq!(c.broker_auth.user.as_deref(), Some("bob"));

        let err = Config::resolve(cli(&["--broker-cert", "/c.pem"]), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker_key"), "{err}");
        let err = Config::resolve(cli(&["--broker", "mqtt://b:1"]), &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broker_ca") && err.contains("mqtts://"),
            "{err}"
        );

        let plain = Cli {
            user: Some("alice".into()),
            keyserver: Some("http://k".into()),
            config: Some(tmp.path().join("none.toml")),
            broker_password: Some(Secret("x".into())),
            ..Cli::default()
        };
        std::fs::write(tmp.path().join("none.toml"), "").unwrap();
        let err = Config::resolve(plain, &d).unwrap_err().to_string();
        assert!(err.contains("broker_user"), "{err}");
    }

    #[test]
    fn broker_protocol_and_session_expiry() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dirs(tmp.path());
        let base = "user = \"bob\"\nkeyserver = \"https://ks\"\n";
        write_config(tmp.path(), base);
        let c = Config::resolve(cli(&[]), &d).unwrap();
        assert_eq!(c.broker_protocol, BrokerProtocol::Auto);
        assert_eq!(c.broker_session_expiry_secs, DEFAULT_SESSION_EXPIRY_SECS);
        for (text, want) in [
            ("\"3.1.1\"", BrokerProtocol::V311),
            ("\"5\"", BrokerProtocol::V5),
            ("5", BrokerProtocol::V5),
            ("\"auto\"", BrokerProtocol::Auto),
        ] {
            write_config(
                tmp.path(),
                &format!("{base}broker_protocol = {text}\nbroker_session_expiry_secs = 60\n"),
            );
            let c = Config::resolve(cli(&[]), &d).unwrap();
            assert_eq!(c.broker_protocol, want, "{text}");
            assert_eq!(c.broker_session_expiry_secs, 60);
        }
        for bad in ["\"4\"", "3", "\"mqtt5\""] {
            write_config(tmp.path(), &format!("{base}broker_protocol = {bad}\n"));
            let err = Config::resolve(cli(&[]), &d).unwrap_err().to_string();
            assert!(err.contains("broker_protocol"), "{bad}: {err}");
        }
        // The flag wins over the file.
        let c = Config::resolve(
            cli(&[
                "--broker-protocol",
                "3.1.1",
                "--broker-session-expiry",
                "4294967295",
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(c.broker_protocol, BrokerProtocol::V311);
        assert_eq!(c.broker_session_expiry_secs, u32::MAX);
        assert!(Cli::try_parse_from(["nesd", "--broker-protocol", "4"]).is_err());
        write_config(tmp.path(), base);
        let err = Config::resolve(cli(&["--broker-session-expiry", "0"]), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker_session_expiry_secs"), "{err}");
    }

    #[test]
    fn the_password_is_no_flag() {
        assert!(Cli::try_parse_from(["nesd", "--broker-password", "x"]).is_err());
    }
}
