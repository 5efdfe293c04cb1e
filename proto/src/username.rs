//! Usernames: the names the key server hands out and the MQTT topics are built from.
//!
//! `^[a-z0-9_-]{3,32}$`, compared lower-case. Parsing lower-cases first, so `Bob` and
//! `bob` are one user, as they were for the original (it lower-cased on registration).

use std::fmt;
use std::str::FromStr;

/// A valid, lower-cased username (the inner `from`/`to`, the topic's `<user>`, the key
/// server's `username`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(String);

/// Why a string is not a username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid username {0:?}: use 3 to 32 characters from a-z, 0-9, '_' and '-'")]
pub struct UsernameError(pub String);

impl Username {
    /// Shortest allowed name.
    pub const MIN_LEN: usize = 3;
    /// Longest allowed name.
    pub const MAX_LEN: usize = 32;

    /// Parses and lower-cases `name`.
    pub fn parse(name: &str) -> Result<Self, UsernameError> {
        let lower = name.to_ascii_lowercase();
        let ok = (Self::MIN_LEN..=Self::MAX_LEN).contains(&lower.len())
            && lower
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(lower))
        } else {
            Err(UsernameError(name.chars().take(64).collect()))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The MQTT topic this user receives on: `nes/<user>/message`.
    pub fn topic(&self) -> String {
        topic_of(&self.0)
    }
}

/// The MQTT topic of a name that was a valid [`Username`] when it was stored (an outbox
/// record keeps the name as text): the one definition of the topic's form.
pub fn topic_of(name: &str) -> String {
    format!("nes/{name}/message")
}

impl FromStr for Username {
    type Err = UsernameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_lowercases() {
        assert_eq!(Username::parse("Bob_1-x").unwrap().as_str(), "bob_1-x");
        assert_eq!(Username::parse("abc").unwrap().topic(), "nes/abc/message");
        assert!(Username::parse(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "ab",
            "a b",
            "al/ice",
            "al+ce",
            "ałice",
            &"a".repeat(33),
            "#",
            "a/#",
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
