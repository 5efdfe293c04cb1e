//! The settings of the config file (`~/.config/nes/config.toml`), defined once.
//!
//! nesd, the frontends and nes-notify share one file, and `nes config` writes it. This
//! table is the one list of what the file may hold: its keys, what each means, the type
//! of its value and which programs read it. `nes config` takes its keys, help and types
//! from here; nes-notify reads its keys through the constants below; nesd's tests check
//! that the fields of its `FileConfig` are exactly the keys this table says it reads, so
//! neither side can know a setting the other does not.

/// The type of a setting's value in the file (`nes config set` writes it so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A string.
    Text,
    /// A whole number.
    Number,
    /// `true` or `false`.
    Bool,
    /// A list of strings (comma-separated on the command line).
    List,
}

/// A program that reads the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reader {
    /// The daemon.
    Nesd,
    /// Every frontend, through [`crate::paths`] (`nes`, `nes chat`, `nes-notify`).
    Frontends,
    /// nes-notify's own settings.
    Notify,
}

/// One setting of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Its key in the file.
    pub key: &'static str,
    /// What it means, one line (shown by `nes config`).
    pub help: &'static str,
    /// The type of its value.
    pub kind: Kind,
    /// Who reads it.
    pub read_by: &'static [Reader],
}

impl Setting {
    /// Whether `reader` reads this setting.
    pub fn is_read_by(&self, reader: Reader) -> bool {
        self.read_by.contains(&reader)
    }
}

/// `notify_mute`: users whose messages nes-notify does not show.
pub const NOTIFY_MUTE: &str = "notify_mute";
/// `notify_dnd`: nes-notify shows nothing.
pub const NOTIFY_DND: &str = "notify_dnd";
/// `notify_body_max`: the longest body nes-notify shows.
pub const NOTIFY_BODY_MAX: &str = "notify_body_max";
/// `socket`: the daemon's API socket (nesd serves it, the frontends connect to it).
pub const SOCKET: &str = "socket";

const NESD: &[Reader] = &[Reader::Nesd];
const NESD_AND_FRONTENDS: &[Reader] = &[Reader::Nesd, Reader::Frontends];
const NOTIFY: &[Reader] = &[Reader::Notify];

const fn setting(
    key: &'static str,
    kind: Kind,
    read_by: &'static [Reader],
    help: &'static str,
) -> Setting {
    Setting {
        key,
        help,
        kind,
        read_by,
    }
}

/// Every setting the config file may hold.
pub const SETTINGS: &[Setting] = &[
    setting("user", Kind::Text, NESD, "this identity's username"),
    setting(
        "broker",
        Kind::Text,
        NESD,
        "MQTT broker, mqtt://HOST:PORT (mqtts://HOST:PORT for TLS)",
    ),
    setting(
        "broker_ca",
        Kind::Text,
        NESD,
        "with mqtts://: trust only this CA (PEM) instead of the system's roots",
    ),
    setting(
        "broker_cert",
        Kind::Text,
        NESD,
        "with mqtts://: a client certificate (PEM) for the broker",
    ),
    setting(
        "broker_key",
        Kind::Text,
        NESD,
        "the client certificate's private key (PEM)",
    ),
    setting("broker_user", Kind::Text, NESD, "user name for the broker"),
    setting(
        "broker_password_file",
        Kind::Text,
        NESD,
        "file with the broker password (mode 600; or NES_BROKER_PASSWORD)",
    ),
    setting(
        "broker_protocol",
        Kind::Text,
        NESD,
        "MQTT version: auto (the default: 5 where the broker speaks it, else 3.1.1), 5 or 3.1.1",
    ),
    setting(
        "broker_session_expiry_secs",
        Kind::Number,
        NESD,
        "MQTT 5: seconds the broker keeps the session after nesd disconnects (default 30 days)",
    ),
    setting("keyserver", Kind::Text, NESD, "key server base URL"),
    setting(
        "keyserver_key",
        Kind::Text,
        NESD,
        "the key server's public key file (PEM)",
    ),
    setting(
        "data_dir",
        Kind::Text,
        NESD,
        "data directory: keys/ and the message store",
    ),
    setting(SOCKET, Kind::Text, NESD_AND_FRONTENDS, "nesd's gRPC socket"),
    setting("key_policy", Kind::Text, NESD, "tofu (default) or always"),
    setting(
        "keyserver_legacy",
        Kind::Bool,
        NESD,
        "true: accept answers of an original PubKey server (no username)",
    ),
    setting(
        "log",
        Kind::Text,
        NESD,
        "nesd's log filter, e.g. info or nesd=debug",
    ),
    setting(
        "key_ttl_secs",
        Kind::Number,
        NESD,
        "seconds before cached contact keys are fetched again",
    ),
    setting(
        "lookup_rate",
        Kind::Number,
        NESD,
        "key server lookups per second at most for senders not yet known (default 50)",
    ),
    setting(
        "prekey_rotation",
        Kind::Text,
        NESD,
        "v3: how often a new prekey is made: 7d (default), 12h, 90s ...",
    ),
    setting(
        "prekey_grace",
        Kind::Text,
        NESD,
        "v3: how long an expired prekey is kept for frames still queued: 14d (default)",
    ),
    setting(
        "event_retention",
        Kind::Text,
        NESD,
        "how long the event log keeps events for clients to resume from: 30d (default)",
    ),
    setting(
        "send_v3",
        Kind::Bool,
        NESD,
        "v3 to contacts with a prekey: true (default); false: v2 at most",
    ),
    setting(
        "presence_interval",
        Kind::Text,
        NESD,
        "how often contacts are told your presence: 30m (default), 90s, 2h ...",
    ),
    setting(
        "read_receipts",
        Kind::Bool,
        NESD,
        "tell contacts when you read their messages: true (default); false: only delivery",
    ),
    setting(
        "max_file_size",
        Kind::Text,
        NESD,
        "largest file sent or received: 100MiB (default), 512K, or bytes",
    ),
    setting(
        NOTIFY_MUTE,
        Kind::List,
        NOTIFY,
        "nes-notify: users whose messages show no notification",
    ),
    setting(
        NOTIFY_DND,
        Kind::Bool,
        NOTIFY,
        "nes-notify: do not disturb (no notifications at all)",
    ),
    setting(
        NOTIFY_BODY_MAX,
        Kind::Number,
        NOTIFY,
        "nes-notify: longest body shown, in characters (default 200)",
    ),
];

/// The setting called `key`, if there is one.
pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The keys `reader` reads, in table order.
pub fn read_by(reader: Reader) -> impl Iterator<Item = &'static str> {
    SETTINGS
        .iter()
        .filter(move |s| s.is_read_by(reader))
        .map(|s| s.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_listed_once_and_read_by_someone() {
        let mut keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "a key listed twice");
        assert!(SETTINGS
            .iter()
            .all(|s| !s.read_by.is_empty() && !s.help.is_empty()));
        assert_eq!(find(NOTIFY_BODY_MAX).map(|s| s.kind), Some(Kind::Number));
        assert!(find("notify_body").is_none());
        assert!(read_by(Reader::Frontends).eq([SOCKET]));
    }
}
