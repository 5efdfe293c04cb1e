//! The settings of `serve`, from three layers: flags and `NES_KEYSERVER_*` env vars
//! (clap reads both), then the TOML file named by `--config`, then defaults.
//!
//! The config file's keys are the flag names without the dashes in front; `_` may stand
//! for `-`. Durations are strings like `"24h"`, `"10m"`, `"90s"`, `"500ms"` (or a
//! number of seconds). Relative paths are relative to the working directory.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! database = "postgres://nes@db/nes"
//! key = "/etc/nes/keyserver.key"
//! public-url = "https://keys.example.org"
//! smtp = "smtp://localhost:25"
//! pending-ttl = "24h"
//! ```
//!
//! The mail transport (`smtp`, `mail-dir` or `dev`) is one setting: the highest layer
//! that names one wins, and a layer that names two is refused.

use crate::cli::{LogFormat, ServeArgs};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default `--pending-ttl`: activation links work for a day, as the original's.
pub const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default `--cleanup-interval`.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(600);
/// Default `--cache-ttl`.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(2);
/// Default `--register-rate` (per IP per minute).
pub const DEFAULT_REGISTER_RATE: u32 = 10;
/// Default `--lookup-rate` (per IP per second).
pub const DEFAULT_LOOKUP_RATE: u32 = 100;
/// Default `--prekey-rate` (per IP per minute): a daemon uploads once per rotation, plus
/// its retries while its account waits for activation.
pub const DEFAULT_PREKEY_RATE: u32 = 30;
/// Default `--max-pending-per-email`.
pub const DEFAULT_MAX_PENDING_PER_EMAIL: u32 = 3;

/// A setting that is missing, malformed or contradicts another. The message says what
/// and how to fix it, on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, from the TOML parser.
        reason: String,
    },
    /// A required setting is absent from every layer.
    #[error("{0}")]
    Missing(String),
    /// A setting has a value that cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// Where activation mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailConfig {
    /// An SMTP server URL (`smtp://`, `smtps://`, `?tls=required`).
    Smtp(String),
    /// A directory that receives one `.eml` file per mail.
    Dir(PathBuf),
    /// No mail: the links are logged.
    Dev,
}

/// The checked settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTP listen address (`host:port`).
    pub listen: String,
    /// `sqlite://PATH` or `postgres://...`.
    pub database: String,
    /// The server's private key file.
    pub key: PathBuf,
    /// The base of every link we hand out, without a trailing `/`.
    pub public_url: String,
    /// Where activation mail goes.
    pub mail: MailConfig,
    /// The From: mailbox of activation mail, if set (else derived from `public_url`).
    pub mail_from: Option<String>,
    /// Lifetime of a pending registration.
    pub pending_ttl: Duration,
    /// Period of the cleanup task.
    pub cleanup_interval: Duration,
    /// Lifetime of a cached answer; zero disables the cache.
    pub cache_ttl: Duration,
    /// Registrations per IP per minute; 0 = unlimited.
    pub register_rate: u32,
    /// Lookups per IP per second; 0 = unlimited.
    pub lookup_rate: u32,
    /// Prekey uploads per IP per minute; 0 = unlimited.
    pub prekey_rate: u32,
    /// Pending registrations per e-mail address; 0 = unlimited.
    pub max_pending_per_email: u32,
    /// Log format.
    pub log_format: LogFormat,
    /// Address of the embedded MQTT broker, if any.
    pub embedded_broker: Option<String>,
    /// Take the client address from X-Forwarded-For.
    pub behind_proxy: bool,
}

/// The config file, as written. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<String>,
    database: Option<String>,
    key: Option<PathBuf>,
    public_url: Option<String>,
    smtp: Option<String>,
    mail_dir: Option<PathBuf>,
    dev: Option<bool>,
    mail_from: Option<String>,
    pending_ttl: Option<FileDuration>,
    cleanup_interval: Option<FileDuration>,
    cache_ttl: Option<FileDuration>,
    register_rate: Option<u32>,
    lookup_rate: Option<u32>,
    prekey_rate: Option<u32>,
    max_pending_per_email: Option<u32>,
    log_format: Option<LogFormat>,
    embedded_broker: Option<String>,
    behind_proxy: Option<bool>,
}

/// A duration in the config file: seconds, or text like the flags take.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileDuration {
    Seconds(u64),
    Text(String),
}

impl FileDuration {
    fn resolve(self, key: &str) -> Result<Duration, ConfigError> {
        match self {
            Self::Seconds(s) => Ok(Duration::from_secs(s)),
            Self::Text(t) => {
                parse_duration(&t).map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))
            }
        }
    }
}

impl ServeConfig {
    /// Merges flags/env (`args`), the config file (`args.config`) and defaults, and
    /// checks the result.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let dur =
            |flag: Option<Duration>, file: Option<FileDuration>, key: &str, default: Duration| {
                match (flag, file) {
                    (Some(d), _) => Ok(d),
                    (None, Some(f)) => f.resolve(key),
                    (None, None) => Ok(default),
                }
            };

        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let database = match args.database.or(file.database) {
            Some(url) => url,
            None => default_database()?,
        };
        check_database_url(&database)?;
        let key = args.key.or(file.key).ok_or_else(|| {
            ConfigError::Missing(
                "no server key: pass --key FILE (or NES_KEYSERVER_PRIVATE_KEY, or key in the config file); \
                 make one with `nes-keyserver keygen --out FILE`"
                    .into(),
            )
        })?;
        let mail = mail_layer(args.smtp, args.mail_dir, args.dev, "flags and environment")?
            .or(mail_layer(
                file.smtp,
                file.mail_dir,
                file.dev.unwrap_or(false),
                "the config file",
            )?)
            .ok_or_else(|| {
                ConfigError::Missing(
                    "no way to send activation mail: pass --smtp smtp://HOST:PORT, --mail-dir DIR, \
                     or --dev to only log the links"
                        .into(),
                )
            })?;
        let public_url =
            match args.public_url.or(file.public_url) {
                Some(url) => url,
                None if mail == MailConfig::Dev => format!("http://{listen}"),
                None => return Err(ConfigError::Missing(
                    "no public URL for the links in activation mail: pass --public-url URL, e.g. \
                     --public-url https://keys.example.org"
                        .into(),
                )),
            };
        let public_url = check_public_url(&public_url)?;
        let pending_ttl = dur(
            args.pending_ttl,
            file.pending_ttl,
            "pending-ttl",
            DEFAULT_PENDING_TTL,
        )?;
        let cleanup_interval = dur(
            args.cleanup_interval,
            file.cleanup_interval,
            "cleanup-interval",
            DEFAULT_CLEANUP_INTERVAL,
        )?;
        let cache_ttl = dur(
            args.cache_ttl,
            file.cache_ttl,
            "cache-ttl",
            DEFAULT_CACHE_TTL,
        )?;
        if pending_ttl.is_zero() || cleanup_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "--pending-ttl and --cleanup-interval must be longer than zero".into(),
            ));
        }
        if i64::try_from(pending_ttl.as_millis()).is_err() {
            return Err(ConfigError::Invalid("--pending-ttl is too long".into()));
        }
        if let Some(smtp) = match &mail {
            MailConfig::Smtp(url) => Some(url),
            _ => None,
        } {
            if !(smtp.starts_with("smtp://") || smtp.starts_with("smtps://")) {
                return Err(ConfigError::Invalid(format!(
                    "--smtp {smtp:?}: use smtp://HOST:PORT, smtp://HOST:PORT?tls=required or smtps://HOST:PORT"
                )));
            }
        }
        let embedded_broker = args.embedded_broker.or(file.embedded_broker);
        // Refused here, before the store is opened, so the one line comes at once.
        if embedded_broker.is_some() && !crate::broker::AVAILABLE {
            return Err(ConfigError::Invalid(crate::broker::NOT_BUILT.into()));
        }
        Ok(Self {
            listen,
            database,
            key,
            public_url,
            mail,
            mail_from: args.mail_from.or(file.mail_from),
            pending_ttl,
            cleanup_interval,
            cache_ttl,
            register_rate: args
                .register_rate
                .or(file.register_rate)
                .unwrap_or(DEFAULT_REGISTER_RATE),
            lookup_rate: args
                .lookup_rate
                .or(file.lookup_rate)
                .unwrap_or(DEFAULT_LOOKUP_RATE),
            prekey_rate: args
                .prekey_rate
                .or(file.prekey_rate)
                .unwrap_or(DEFAULT_PREKEY_RATE),
            max_pending_per_email: args
                .max_pending_per_email
                .or(file.max_pending_per_email)
                .unwrap_or(DEFAULT_MAX_PENDING_PER_EMAIL),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            embedded_broker,
            behind_proxy: args.behind_proxy || file.behind_proxy.unwrap_or(false),
        })
    }
}

/// Parses a duration: a sequence of `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`1h30m`, `24h`, `500ms`), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let text = text.trim();
    let bad = || BadDuration {
        text: text.to_owned(),
    };
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let ms = number.checked_mul(unit_ms).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

/// Why [`parse_duration`] refused a duration (a flag or a config value): one failure,
/// which the message explains with examples. A type rather than a string so that clap
/// and [`ConfigError`] take it as an error. Not nes-proto's `parse_duration`, which
/// reads a single unit, no `ms`, and refuses zero (prekey periods).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration: use e.g. 24h, 10m, 90s, 500ms")]
pub struct BadDuration {
    /// The text, trimmed.
    pub text: String,
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let file_err = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason: reason
            .split('\n')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_err(e.to_string()))?;
    // `public_url` and `public-url` both mean the flag `--public-url`.
    let table: toml::Table = table
        .into_iter()
        .map(|(k, v)| (k.replace('_', "-"), v))
        .collect();
    FileConfig::deserialize(toml::Value::Table(table)).map_err(|e| file_err(e.to_string()))
}

fn mail_layer(
    smtp: Option<String>,
    dir: Option<PathBuf>,
    dev: bool,
    layer: &str,
) -> Result<Option<MailConfig>, ConfigError> {
    match (smtp, dir, dev) {
        (None, None, false) => Ok(None),
        (Some(url), None, false) => Ok(Some(MailConfig::Smtp(url))),
        (None, Some(dir), false) => Ok(Some(MailConfig::Dir(dir))),
        (None, None, true) => Ok(Some(MailConfig::Dev)),
        _ => Err(ConfigError::Invalid(format!(
            "{layer} name more than one of smtp, mail-dir and dev: keep one"
        ))),
    }
}

fn default_database() -> Result<String, ConfigError> {
    let dirs = directories::BaseDirs::new().ok_or_else(|| {
        ConfigError::Missing(
            "no home directory for the default database: pass --database sqlite://PATH".into(),
        )
    })?;
    let path = dirs.data_dir().join("nes").join("keyserver.db");
    Ok(format!("sqlite://{}", path.display()))
}

fn check_database_url(url: &str) -> Result<(), ConfigError> {
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "--database {:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE",
            crate::store::redact(url)
        )))
    }
}

fn check_public_url(text: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        ConfigError::Invalid(format!(
            "--public-url {text:?} {why}: give the http(s) URL clients reach this server at, e.g. https://keys.example.org"
        ))
    };
    let url = url::Url::parse(text).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("is not http or https"));
    }
    if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("needs a host and no query or fragment"));
    }
    let base = url.as_str().trim_end_matches('/').to_string();
    // Links go into a 7bit mail body: keep them ASCII and well under the line limit.
    if !base.is_ascii() || base.len() > 400 {
        return Err(bad("is too long"));
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn base_args() -> ServeArgs {
        ServeArgs {
            key: Some("k".into()),
            database: Some("sqlite://x.db".into()),
            public_url: Some("http://keys.example.org/".into()),
            mail_dir: Some("m".into()),
            ..ServeArgs::default()
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("2d").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        for bad in ["", "h", "10x", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_apply() {
        let c = ServeConfig::resolve(base_args()).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.public_url, "http://keys.example.org");
        assert_eq!(c.pending_ttl, DEFAULT_PENDING_TTL);
        assert_eq!(c.register_rate, DEFAULT_REGISTER_RATE);
        assert_eq!(c.lookup_rate, DEFAULT_LOOKUP_RATE);
        assert_eq!(c.prekey_rate, DEFAULT_PREKEY_RATE);
        assert_eq!(c.max_pending_per_email, 3);
        assert_eq!(c.mail, MailConfig::Dir("m".into()));
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "listen = \"0.0.0.0:1\"\nlookup_rate = 7\nprekey-rate = 5\npending-ttl = \"2h\"\ncache-ttl = 0\nsmtp = \"smtp://h:25\"\nbehind-proxy = true"
        )
        .unwrap();
        let mut args = base_args();
        args.config = Some(file.path().to_path_buf());
        args.listen = Some("127.0.0.1:2".into());
        let c = ServeConfig::resolve(args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.lookup_rate, 7);
        assert_eq!(c.prekey_rate, 5);
        assert_eq!(c.pending_ttl, Duration::from_secs(7200));
        assert_eq!(c.cache_ttl, Duration::ZERO);
        assert!(c.behind_proxy);
        // The flag layer named a mail transport: it wins over the file's.
        assert_eq!(c.mail, MailConfig::Dir("m".into()));

        let mut args = base_args();
        args.mail_dir = None;
        args.config = Some(file.path().to_path_buf());
        assert_eq!(
            ServeConfig::resolve(args).unwrap().mail,
            MailConfig::Smtp("smtp://h:25".into())
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_in_the_file_are_refused() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "lissen = \"x\"").unwrap();
        let mut args = base_args();
        args.config = Some(file.path().to_path_buf());
        let err = ServeConfig::resolve(args).unwrap_err().to_string();
        assert!(err.contains("lissen"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "pending-ttl = \"soon\"").unwrap();
        let mut args = base_args();
        args.config = Some(file.path().to_path_buf());
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("pending-ttl"));
    }

    #[test]
    fn missing_and_conflicting_settings_say_how_to_fix_them() {
        let mut args = base_args();
        args.mail_dir = None;
        let err = ServeConfig::resolve(args).unwrap_err().to_string();
        assert!(
            err.contains("--dev") && err.contains("--smtp") && err.contains("--mail-dir"),
            "{err}"
        );

        let mut args = base_args();
        args.key = None;
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("keygen"));

        let mut args = base_args();
        args.dev = true;
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("more than one"));

        let mut args = base_args();
        args.public_url = None;
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("--public-url"));

        let mut args = base_args();
        args.public_url = None;
        args.mail_dir = None;
        args.dev = true;
        args.listen = Some("127.0.0.1:9".into());
        assert_eq!(
            ServeConfig::resolve(args).unwrap().public_url,
            "http://127.0.0.1:9"
        );

        for bad in ["ftp://x", "keys.example.org", "http://x/?q=1"] {
            let mut args = base_args();
            args.public_url = Some(bad.into());
            assert!(ServeConfig::resolve(args).is_err(), "{bad} accepted");
        }
        let mut args = base_args();
        args.database = Some("mysql://x".into());
        assert!(ServeConfig::resolve(args)
            .unwrap_err()
            .to_string()
            .contains("sqlite://"));
        let mut args = base_args();
        args.mail_dir = None;
        args.smtp = Some("localhost:25".into());
        assert!(ServeConfig::resolve(args).is_err());
    }
}
