//! # nes-proto: what every side of NES agrees on
//!
//! The daemon (`nesd`), the frontends and the key server all compile against this crate,
//! so there is one definition of each thing that crosses a boundary:
//!
//! | module | holds | crosses |
//! |---|---|---|
//! | [`frame`] | sealing and opening frames, v1 and v2 (and dispatching v3) | MQTT, between users |
//! | [`v3`] | v3: prekeys, signing certificates, their private files, v3 sealing | MQTT, key server, disk |
//! | [`inner`] | the signed inner message and its Go-compatible JSON | inside frames |
//! | [`keys`] | RSA key files, generation, the RSA operations | disk, key server |
//! | [`answer`] | the key server's signed answers: build and verify | HTTP |
//! | [`username`] | valid usernames and their topics | everywhere |
//! | [`b64`] | Go's `base64.URLEncoding` | every binary field |
//! | [`rpc`] | the gRPC API (`proto/nes/v1/messenger.proto`) | the daemon's Unix socket |
//! | [`model`] | the values of the message model (direction, states, presence, trust), their names and API values | the API, `--json`, D-Bus |
//! | [`names`] | API enum values as text (`queued`, `incoming`, ...) | `--json`, D-Bus |
//!
//! A frame flows: sender `frame::seal` → broker → recipient `frame::decrypt` (its own
//! message key) → look up the inner `from` at the key server, `answer::verify_answer` →
//! `Decrypted::verify` (the sender's signing key) → `Opened::check_recipient` and
//! `Opened::check_time` → store and show.
//!
//! Nothing here panics on bytes from outside; every refusal is a typed error.

#![forbid(unsafe_code)]
#![deny(unused_must_use)]
#![warn(missing_docs)]

pub mod answer;
pub mod b64;
pub mod files;
pub mod frame;
pub mod inner;
pub mod keys;
pub mod model;
pub mod registration;
pub mod username;
pub mod v3;

pub use answer::{build_answer, verify_answer, AnswerError, KeyAnswer, UsernameRule};
pub use frame::{Draft, FrameError, Opened, Sealed, Version};
pub use inner::Inner;
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use username::{Username, UsernameError};

/// The gRPC API between nesd and its frontends, generated from
/// `proto/nes/v1/messenger.proto` (see that file for every message and field).
#[allow(missing_docs, clippy::all)]
pub mod rpc {
    tonic::include_proto!("nes.v1");
}

/// The order of an outgoing message's states, for an API number (see
/// [`model::MessageState::progress`]).
pub mod states {
    use crate::model::MessageState;

    /// How far an outgoing message got: queued 1, sent to the broker 2, delivered 3,
    /// read 4; 0 for every other state (failed, incoming ones, unknown numbers).
    pub fn progress(state: i32) -> u8 {
        MessageState::from_api(state).map_or(0, MessageState::progress)
    }

    /// Whether the broker has acknowledged an outgoing message (sent, delivered or read).
    pub fn reached_broker(state: i32) -> bool {
        MessageState::from_api(state).is_some_and(MessageState::reached_broker)
    }
}

/// The names of API enum values as people and scripts see them (`--json`, D-Bus, text),
/// for the numbers API messages carry: one definition (the [`model`] values' names) for
/// the CLI, nes-notify and nesd's D-Bus adapter.
pub mod names {
    use crate::model::{Direction, FileState, MessageState, PresenceStatus};

    /// What a number no value of this build stands for (or unspecified) is called.
    const UNKNOWN: &str = "unknown";

    /// `incoming` / `outgoing` (`unknown` for a value this build does not know).
    pub fn direction_name(direction: i32) -> &'static str {
        Direction::from_api(direction).map_or(UNKNOWN, Direction::name)
    }

    /// `queued`, `sent`, `delivered`, `read`, `failed`, `received`, `held` (`unknown`
    /// otherwise).
    pub fn state_name(state: i32) -> &'static str {
        MessageState::from_api(state).map_or(UNKNOWN, MessageState::name)
    }

    /// `online`, `away`, `busy`, `invisible`, `offline` (`unknown` when never heard of).
    pub fn presence_name(status: i32) -> &'static str {
        PresenceStatus::from_api(status).map_or(UNKNOWN, PresenceStatus::name)
    }

    /// `sending`, `receiving`, `complete`, `cancelled`, `failed` (`unknown` otherwise).
    pub fn file_state_name(state: i32) -> &'static str {
        FileState::from_api(state).map_or(UNKNOWN, FileState::name)
    }

    /// The status a user can set by name: online, away, busy, invisible.
    pub fn presence_of_name(name: &str) -> Option<crate::rpc::PresenceStatus> {
        PresenceStatus::settable_of_name(name).map(Into::into)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::rpc;

        #[test]
        fn every_value_has_its_name() {
            assert_eq!(state_name(rpc::MessageState::Held as i32), "held");
            assert_eq!(state_name(99), "unknown");
            assert_eq!(direction_name(rpc::Direction::Outgoing as i32), "outgoing");
            assert_eq!(direction_name(-1), "unknown");
        }
    }
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
