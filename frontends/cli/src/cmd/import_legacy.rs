//! `nes import-legacy`: bring an identity of the original client over.
//!
//! The original kept `~/.nes/<user>-rsa-message{,.pub}` and `~/.nes/<user>-rsa-sign{,.pub}`
//! and a dotenv-style `~/.nes/config` (`NES_USERNAME` or `USERNAME`,
//! `MQTT_BROKER_ADDRESS`, `PUBKEY_ADDRESS`). This command:
//! 1. reads that config and finds the user (`-u`, else the config, else the only
//!    identity whose keys are in the folder);
//! 2. checks the four key files parse and that each public key belongs to its private
//!    key (a missing `.pub` is derived from the private key);
//! 3. copies them byte for byte to `DATA_DIR/keys/` (files 0600, folders 0700);
//! 4. writes `user`, `broker` (as `mqtt://HOST:PORT`) and `keyserver` into
//!    `config.toml`, keeping every other setting there.
//!
//! Nothing is overwritten without `--force`: not an existing key file (losing a private
//! key loses every message sealed to it), not a config setting with another value.
//! The original folder is left as it was.

use crate::cmd::generate::{default_data_dir, key_files, make_private_dir};
use crate::error::{user, CliError};
use crate::output::print_line;
use crate::username::{refusal, username, UsernameParser};
use crate::Ctx;
use nes_proto::keys::write_private_file;
use nes_proto::{PrivateKey, PublicKey, Username};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The original client's folder (default: ~/.nes).
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// The identity to import (default: from the original config, or the only one there).
    #[arg(short = 'u', long, value_parser = UsernameParser)]
    pub user: Option<Username>,
    /// Data directory to copy the keys into (default: ~/.local/share/nes).
    #[arg(short = 'd', long, env = "NES_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Replace existing keys and settings.
    #[arg(long)]
    pub force: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let from = match args.from {
        Some(dir) => dir,
        None => home()?.join(".nes"),
    };
    if !from.is_dir() {
        return Err(user(format!(
            "{} does not exist: nothing to import (use --from DIR for another folder)",
            from.display()
        )));
    }
    let legacy = match std::fs::read_to_string(from.join("config")) {
        Ok(text) => parse_dotenv(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(user(format!("{}: {e}", from.join("config").display()))),
    };
    // -u was parsed by clap; a name from the original's config or folder is parsed here,
    // with the same parser and message.
    let name = match args.user {
        Some(name) => name,
        None => {
            let name = match legacy_user(&legacy) {
                Some(name) => name,
                None => only_identity(&from)?,
            };
            username(&name).map_err(|e| user(refusal("import-legacy", "user", &name, &e)))?
        }
    };

    // Read and check everything before writing anything.
    let keys = read_legacy_keys(&from, &name)?;
    let config_path = ctx.config_path();
    let mut table = crate::cmd::config::load(&config_path)?;
    let data_dir = match args.data_dir.clone() {
        Some(dir) => dir,
        None => match table.get("data_dir").and_then(|v| v.as_str()) {
            Some(dir) => nes_client::paths::expand_home(dir),
            None => default_data_dir()?,
        },
    };
    let keys_dir = data_dir.join("keys");
    let targets = key_files(&keys_dir, &name);
    if !args.force {
        if let Some(existing) = targets.iter().find(|f| f.exists()) {
            return Err(user(format!(
                "{} already exists: an identity is already there; use --force to replace it (messages sealed to the replaced keys become unreadable)",
                existing.display()
            )));
        }
    }
    let mut settings: Vec<(&str, String)> = vec![("user", name.to_string())];
    if let Some(broker) = legacy.get("MQTT_BROKER_ADDRESS") {
        settings.push(("broker", broker_url(broker)?));
    }
    if let Some(keyserver) = legacy.get("PUBKEY_ADDRESS").filter(|s| !s.is_empty()) {
        settings.push(("keyserver", keyserver.trim_end_matches('/').to_string()));
    }
    if args.data_dir.is_some() {
        settings.push(("data_dir", data_dir.display().to_string()));
    }
    if !args.force {
        for (key, value) in &settings {
            if let Some(old) = table.get(*key).and_then(|v| v.as_str()) {
                if old != value {
                    return Err(user(format!(
                        "{} already sets {key} = {old:?} (the original config says {value:?}); use --force to replace it",
                        config_path.display()
                    )));
                }
            }
        }
    }

    make_private_dir(&data_dir)?;
    make_private_dir(&keys_dir)?;
    let [message, message_pub, sign, sign_pub] = &targets;
    for (path, bytes) in [
        (message, &keys.message),
        (message_pub, &keys.message_pub),
        (sign, &keys.sign),
        (sign_pub, &keys.sign_pub),
    ] {
        write_private_file(path, bytes, args.force)
            .map_err(|e| user(format!("{}: {e}", path.display())))?;
    }
    for (key, value) in &settings {
        table.insert(key.to_string(), toml::Value::String(value.clone()));
    }
    crate::cmd::config::save(&config_path, &table)?;

    print_line(&format!(
        "imported {name} from {} into {}",
        from.display(),
        keys_dir.display()
    ))?;
    print_line(&format!("message key sha256:{}", keys.message_fingerprint))?;
    print_line(&format!("sign key    sha256:{}", keys.sign_fingerprint))?;
    for (key, value) in &settings {
        print_line(&format!("{key} = {value:?}  ({})", config_path.display()))?;
    }
    if !table.contains_key("keyserver_key") {
        print_line("next: set the key server's public key (`nes config set keyserver_key FILE`), then start nesd")?;
    } else {
        print_line("next: start nesd (`systemctl --user start nesd` or `nesd --user ...`)")?;
    }
    Ok(())
}

/// The four files' bytes, checked.
struct LegacyKeys {
    message: Vec<u8>,
    message_pub: Vec<u8>,
    sign: Vec<u8>,
    sign_pub: Vec<u8>,
    message_fingerprint: String,
    sign_fingerprint: String,
}

fn read_legacy_keys(dir: &Path, name: &Username) -> Result<LegacyKeys, CliError> {
    let [message, message_pub, sign, sign_pub] = key_files(dir, name);
    let (message, message_pub, message_fingerprint) = read_pair(&message, &message_pub)?;
    let (sign, sign_pub, sign_fingerprint) = read_pair(&sign, &sign_pub)?;
    Ok(LegacyKeys {
        message,
        message_pub,
        sign,
        sign_pub,
        message_fingerprint,
        sign_fingerprint,
    })
}

/// One private key and its public key: both parsed, and checked to belong together.
fn read_pair(private: &Path, public: &Path) -> Result<(Vec<u8>, Vec<u8>, String), CliError> {
    let private_bytes = std::fs::read(private).map_err(|e| {
        user(format!(
            "{}: {e} (the original client keeps <user>-rsa-message and <user>-rsa-sign there)",
            private.display()
        ))
    })?;
    let key = PrivateKey::read(private).map_err(|e| user(format!("{}: {e}", private.display())))?;
    let public_bytes = match std::fs::read(public) {
        Ok(bytes) => {
            let pubkey =
                PublicKey::read(public).map_err(|e| user(format!("{}: {e}", public.display())))?;
            if pubkey.spki_der() != key.public_key().spki_der() {
                return Err(user(format!(
                    "{} does not belong to {}: the key pair is inconsistent; fix the folder before importing",
                    public.display(),
                    private.display()
                )));
            }
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            key.public_key().to_pem().into_bytes()
        }
        Err(e) => return Err(user(format!("{}: {e}", public.display()))),
    };
    Ok((private_bytes, public_bytes, key.public_key().fingerprint()))
}

/// The username the original config names.
fn legacy_user(config: &BTreeMap<String, String>) -> Option<String> {
    config
        .get("NES_USERNAME")
        .or_else(|| config.get("USERNAME"))
        .filter(|s| !s.is_empty())
        .cloned()
}

/// The one user with a `<user>-rsa-message` file in `dir`.
fn only_identity(dir: &Path) -> Result<String, CliError> {
    let mut users: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| user(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(nes_proto::keys::MESSAGE_KEY_SUFFIX)
                .map(String::from)
        })
        .collect();
    users.sort();
    match users.len() {
        1 => Ok(users.remove(0)),
        0 => Err(user(format!(
            "no identity in {}: no <user>-rsa-message file",
            dir.display()
        ))),
        _ => Err(user(format!(
            "{} holds several identities ({}): choose one with -u",
            dir.display(),
            users.join(", ")
        ))),
    }
}

/// Parses a dotenv file as the original's godotenv reads it: `KEY=value` or
/// `KEY = value`, optional `export`, quotes, `#` comments.
pub fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            inner.replace("\\n", "\n").replace("\\\"", "\"")
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.to_string()
        } else {
            // An unquoted value ends at " #".
            value.split(" #").next().unwrap_or("").trim().to_string()
        };
        if !key.is_empty() {
            out.insert(key.to_string(), value);
        }
    }
    out
}

/// The original's broker address as nesd wants it: `tcp://h:p` and bare `h[:p]` become
/// `mqtt://h:p` (port 1883 by default), `ssl://`/`tls://` become `mqtts://` (8883).
pub fn broker_url(address: &str) -> Result<String, CliError> {
    let address = address.trim();
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme, rest)) => (scheme.to_lowercase(), rest),
        None => ("tcp".to_string(), address),
    };
    let (scheme, port) = match scheme.as_str() {
        "tcp" | "mqtt" => ("mqtt", 1883),
        "ssl" | "tls" | "tcps" | "mqtts" => ("mqtts", 8883),
        other => {
            return Err(user(format!(
                "MQTT_BROKER_ADDRESS {address:?}: the {other}:// transport is not supported; set broker by hand (`nes config set broker mqtt://HOST:PORT`)"
            )))
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(user(format!(
            "MQTT_BROKER_ADDRESS {address:?} names no host"
        )));
    }
    let has_port = rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !rest.ends_with(']');
    Ok(if has_port {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://{rest}:{port}")
    })
}

fn home() -> Result<PathBuf, CliError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| user("HOME is not set: pass --from DIR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_forms() {
        let env = parse_dotenv(
            "# comment\nNES_USERNAME = alice\nexport MQTT_BROKER_ADDRESS=\"tcp://h:1883\"\nPUBKEY_ADDRESS='https://k/pubkey' \nX=1 # note\n\nbroken line\n",
        );
        assert_eq!(env["NES_USERNAME"], "alice");
        assert_eq!(env["MQTT_BROKER_ADDRESS"], "tcp://h:1883");
        assert_eq!(env["PUBKEY_ADDRESS"], "https://k/pubkey");
        assert_eq!(env["X"], "1");
        assert_eq!(env.len(), 4);
    }

    #[test]
    fn user_from_either_key() {
        let mut env = BTreeMap::new();
        env.insert("USERNAME".to_string(), "bob".to_string());
        assert_eq!(legacy_user(&env).as_deref(), Some("bob"));
        env.insert("NES_USERNAME".to_string(), "alice".to_string());
        assert_eq!(legacy_user(&env).as_deref(), Some("alice"));
    }

    #[test]
    fn broker_addresses() {
        assert_eq!(
            broker_url("tcp://test.mosquitto.org:1883").unwrap(),
            "mqtt://test.mosquitto.org:1883"
        );
        assert_eq!(
            broker_url("test.mosquitto.org").unwrap(),
            "mqtt://test.mosquitto.org:1883"
        );
        assert_eq!(
            broker_url("127.0.0.1:1999").unwrap(),
            "mqtt://127.0.0.1:1999"
        );
        assert_eq!(broker_url("ssl://h").unwrap(), "mqtts://h:8883");
        assert_eq!(broker_url("mqtt://h:1/").unwrap(), "mqtt://h:1");
        assert!(broker_url("ws://h:80").is_err());
        assert!(broker_url("tcp://").is_err());
    }
}
