//! `nes config`: show and change `~/.config/nes/config.toml`, the file nesd and the
//! frontends read their settings from (every field is also a flag and an `NES_*` env var).
//!
//! - `nes config` / `nes config show [--json]` / `nes config -s`: the file's settings;
//! - `nes config get KEY`, `nes config set KEY VALUE`, `nes config unset KEY`;
//! - `nes config path`: where the file is (`--config` / `NES_CONFIG` choose another);
//! - `nes config -S [-u USER] [-b BROKER] [-p KEYSERVER]`: the original client's "store"
//!   form, setting those three at once.
//!
//! Keys are checked against the settings nesd and the frontends know, so a typo does
//! not silently do nothing; `--force` writes an unknown key anyway. The file is rewritten
//! whole through a temporary file and a rename, so a crash never leaves half a file.

use crate::error::{usage, user, CliError};
use crate::output::print_line;
use crate::Ctx;
use nes_client::settings::{self, Kind, SETTINGS};
use std::path::Path;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<ConfigCommand>,
    /// Show the settings (the original client's flag).
    #[arg(short = 's', long)]
    pub show: bool,
    /// Store -u/-b/-p in the config file (the original client's flag).
    #[arg(short = 'S', long)]
    pub store: bool,
    /// With -S: this identity's username.
    #[arg(short = 'u', long, requires = "store")]
    pub user: Option<String>,
    /// With -S: the MQTT broker (mqtt://HOST:PORT).
    #[arg(short = 'b', long, requires = "store")]
    pub broker: Option<String>,
    /// With -S: the key server URL.
    #[arg(short = 'p', long, requires = "store")]
    pub keyserver: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print every setting in the file.
    Show {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print one setting (exit 1 when it is not set).
    Get {
        /// The setting's name, e.g. broker.
        key: String,
    },
    /// Set one setting.
    Set {
        /// The setting's name, e.g. broker.
        key: String,
        /// Its value.
        value: String,
        /// Write the key even if no part of NES knows it.
        #[arg(long)]
        force: bool,
    },
    /// Remove one setting (back to its default).
    Unset {
        /// The setting's name.
        key: String,
    },
    /// Print the config file's path.
    Path,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let path = ctx.config_path();
    if args.store {
        let mut table = load(&path)?;
        let mut changed = Vec::new();
        for (key, value) in [
            ("user", &args.user),
            ("broker", &args.broker),
            ("keyserver", &args.keyserver),
        ] {
            if let Some(value) = value {
                table.insert(key.into(), typed_value(key, value)?);
                changed.push(key);
            }
        }
        if changed.is_empty() {
            return Err(usage(
                "-S stores -u USER, -b BROKER and/or -p KEYSERVER: give at least one",
            ));
        }
        save(&path, &table)?;
        return print_line(&format!(
            "stored {} in {}",
            changed.join(", "),
            path.display()
        ));
    }
    let command = args.command.unwrap_or(ConfigCommand::Show { json: false });
    match command {
        ConfigCommand::Show { json } => {
            let table = load(&path)?;
            if json {
                let value = serde_json::to_value(&table).map_err(|e| user(e.to_string()))?;
                return print_line(&value.to_string());
            }
            print_line(&format!("# {}", path.display()))?;
            if table.is_empty() {
                print_line("# (no settings: defaults apply)")?;
            }
            let text = toml::to_string(&table).map_err(|e| user(e.to_string()))?;
            for line in text.lines() {
                print_line(line)?;
            }
            Ok(())
        }
        ConfigCommand::Get { key } => {
            let table = load(&path)?;
            match table.get(&key) {
                Some(toml::Value::String(s)) => print_line(s),
                Some(toml::Value::Array(items)) => print_line(
                    &items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(String::from)
                                .unwrap_or_else(|| v.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                Some(other) => print_line(&other.to_string()),
                None => Err(user(format!("{key} is not set in {}", path.display()))),
            }
        }
        ConfigCommand::Set { key, value, force } => {
            if !force {
                check_key(&key)?;
            }
            let mut table = load(&path)?;
            table.insert(key.clone(), typed_value(&key, &value)?);
            save(&path, &table)?;
            print_line(&format!("{key} set in {}", path.display()))
        }
        ConfigCommand::Unset { key } => {
            let mut table = load(&path)?;
            if table.remove(&key).is_none() {
                return Err(user(format!("{key} is not set in {}", path.display())));
            }
            save(&path, &table)?;
            print_line(&format!("{key} removed from {}", path.display()))
        }
        ConfigCommand::Path => print_line(&path.display().to_string()),
    }
}

/// Refuses keys no part of NES reads, listing the ones it does.
pub fn check_key(key: &str) -> Result<(), CliError> {
    if settings::find(key).is_some() {
        return Ok(());
    }
    let known: Vec<String> = SETTINGS
        .iter()
        .map(|s| format!("  {:<20} {}", s.key, s.help))
        .collect();
    Err(user(format!(
        "unknown setting {key:?} (use --force to write it anyway); known settings:\n{}",
        known.join("\n")
    )))
}

/// The TOML value for a setting given on the command line.
pub fn typed_value(key: &str, value: &str) -> Result<toml::Value, CliError> {
    // A key no part of NES reads (written with --force) is a string.
    let kind = settings::find(key).map_or(Kind::Text, |s| s.kind);
    if kind == Kind::Number {
        return value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| user(format!("{key} takes a whole number, not {value:?}")));
    }
    if kind == Kind::Bool {
        return match value.trim().to_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "no" | "off" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(user(format!("{key} takes true or false, not {value:?}"))),
        };
    }
    if kind == Kind::List {
        let items = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.into()));
        return Ok(toml::Value::Array(items.collect()));
    }
    Ok(toml::Value::String(value.to_string()))
}

/// Reads the config file; a missing file is an empty table, a broken one an error that
/// says where.
pub fn load(path: &Path) -> Result<toml::Table, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse()
            .map_err(|e| user(format!("{} is not valid TOML: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
        Err(e) => Err(user(format!("{}: {e}", path.display()))),
    }
}

/// Writes the config file through a temporary file and a rename.
pub fn save(path: &Path, table: &toml::Table) -> Result<(), CliError> {
    let fail = |e: std::io::Error| user(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let text = toml::to_string(table).map_err(|e| user(e.to_string()))?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_get_their_types() {
        assert_eq!(
            typed_value("key_ttl_secs", "60").unwrap(),
            toml::Value::Integer(60)
        );
        assert!(typed_value("key_ttl_secs", "soon").is_err());
        // nes-notify reads it as a number; `nes config set` knows it.
        check_key("notify_body_max").unwrap();
        assert_eq!(
            typed_value("notify_body_max", "80").unwrap(),
            toml::Value::Integer(80)
        );
        assert_eq!(
            typed_value("send_v3", "false").unwrap(),
            toml::Value::Boolean(false)
        );
        assert_eq!(
            typed_value("broker_session_expiry_secs", "86400").unwrap(),
            toml::Value::Integer(86400)
        );
        // "3.1.1" is no number; nesd reads "5" as text too.
        assert_eq!(
            typed_value("broker_protocol", "3.1.1").unwrap(),
            toml::Value::String("3.1.1".into())
        );
        assert_eq!(
            typed_value("notify_dnd", "off").unwrap(),
            toml::Value::Boolean(false)
        );
        assert_eq!(
            typed_value("user", "123").unwrap(),
            toml::Value::String("123".into())
        );
        assert_eq!(
            typed_value("notify_mute", "alice, bob,").unwrap(),
            toml::Value::Array(vec!["alice".into(), "bob".into()])
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_the_list() {
        assert!(check_key("broker").is_ok());
        for key in [
            "broker_ca",
            "broker_cert",
            "broker_key",
            "broker_user",
            "broker_password_file",
            "broker_protocol",
            "broker_session_expiry_secs",
        ] {
            assert!(check_key(key).is_ok(), "{key}");
        }
        assert!(
            check_key("broker_password").is_err(),
            "the password itself is no setting"
        );
        let err = check_key("brokr").unwrap_err().to_string();
        assert!(
            err.contains("unknown setting") && err.contains("broker"),
            "{err}"
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        assert!(load(&path).unwrap().is_empty());
        let mut table = toml::Table::new();
        table.insert("broker".into(), "mqtt://h:1".into());
        save(&path, &table).unwrap();
        assert_eq!(load(&path).unwrap(), table);
        std::fs::write(&path, "broker = ").unwrap();
        assert!(load(&path)
            .unwrap_err()
            .to_string()
            .contains("not valid TOML"));
    }
}
