//! The values of the message model that every side names: a message's direction and
//! state, a file's state, a presence status, a contact's trust.
//!
//! They are defined here, once, rather than in nesd, because three parties name them:
//! nesd's domain (`nesd::model` re-exports them, its store and pipeline use them), the
//! API (each has a generated twin in [`crate::rpc`], with an `UNSPECIFIED` zero that the
//! model has no use for), and the frontends, which show them by name (`--json`, D-Bus,
//! notifications). So each value's name ([`MessageState::name`], ...), the order of the
//! outgoing states ([`MessageState::progress`]) and its API value are written down once,
//! here; [`crate::names`] and [`crate::states`] read API numbers through them.
//!
//! The API mapping at the end of this file matches both sides in full: a value added to
//! either side does not compile until someone decides what it is on the other.

use crate::{inner, rpc};

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received from the peer.
    Incoming,
    /// Sent by this identity.
    Outgoing,
}

impl Direction {
    /// `incoming` / `outgoing`: what `--json` and D-Bus say.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        }
    }
}

/// Where a message is: outgoing ones move forward along queued, sent, delivered, read (or
/// fail while queued); incoming ones are received, or held until their sender's new keys
/// are trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageState {
    /// Outgoing, in the outbox: not yet acknowledged by the broker.
    Queued,
    /// Outgoing, acknowledged by the broker.
    Sent,
    /// Outgoing, stored by the recipient's nesd (its delivery receipt came back).
    Delivered,
    /// Outgoing, could not be sent; the message's `error` says why.
    Failed,
    /// Incoming, verified and stored.
    Received,
    /// Incoming, held because the sender's keys changed; shown once they are trusted.
    Held,
    /// Outgoing, read by the recipient (its read receipt came back).
    Read,
}

impl MessageState {
    /// `queued`, `sent`, `delivered`, `read`, `failed`, `received`, `held`.
    pub fn name(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Sent => "sent",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
            MessageState::Failed => "failed",
            MessageState::Received => "received",
            MessageState::Held => "held",
        }
    }

    /// How far an outgoing message got: queued 1, sent to the broker 2, delivered 3,
    /// read 4; 0 for the others (failed, and the incoming states).
    pub fn progress(self) -> u8 {
        match self {
            MessageState::Queued => 1,
            MessageState::Sent => 2,
            MessageState::Delivered => 3,
            MessageState::Read => 4,
            MessageState::Failed | MessageState::Received | MessageState::Held => 0,
        }
    }

    /// Whether the broker has acknowledged an outgoing message (sent, delivered or read).
    pub fn reached_broker(self) -> bool {
        self.progress() >= 2
    }
}

/// Where a file transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileState {
    /// Outgoing: the recipient is receiving it.
    Sending,
    /// Incoming: chunks are arriving; not a file yet.
    Receiving,
    /// Every byte arrived and matches the signed hash (incoming), or the recipient has
    /// all of it, checked (outgoing).
    Complete,
    /// Cancelled by either side.
    Cancelled,
    /// Refused by the recipient, or the bytes did not match the hash.
    Failed,
}

impl FileState {
    /// `sending`, `receiving`, `complete`, `cancelled`, `failed`.
    pub fn name(self) -> &'static str {
        match self {
            FileState::Sending => "sending",
            FileState::Receiving => "receiving",
            FileState::Complete => "complete",
            FileState::Cancelled => "cancelled",
            FileState::Failed => "failed",
        }
    }
}

/// A presence status: a contact's as last heard, or this identity's as set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceStatus {
    /// Never heard of (a contact that never told one).
    Unknown,
    /// Online.
    Online,
    /// Away.
    Away,
    /// Busy.
    Busy,
    /// This identity's own only: contacts are told nothing (they see offline).
    Invisible,
    /// A contact that said so (a clean shutdown, or invisible), or whose presence ran out.
    Offline,
}

impl PresenceStatus {
    /// `online`, `away`, `busy`, `invisible`, `offline`; `unknown` when never heard of.
    pub fn name(self) -> &'static str {
        match self {
            PresenceStatus::Unknown => "unknown",
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Busy => "busy",
            PresenceStatus::Invisible => "invisible",
            PresenceStatus::Offline => "offline",
        }
    }

    /// The status a user can set, by name: online, away, busy, invisible (offline is not
    /// one: invisible is how to look offline).
    pub fn settable_of_name(name: &str) -> Option<PresenceStatus> {
        [
            PresenceStatus::Online,
            PresenceStatus::Away,
            PresenceStatus::Busy,
            PresenceStatus::Invisible,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// What a contact is told for this status set here: `None` for invisible (nothing is
    /// told) and for unknown.
    pub fn on_the_wire(self) -> Option<inner::PresenceStatus> {
        match self {
            PresenceStatus::Online => Some(inner::PresenceStatus::Online),
            PresenceStatus::Away => Some(inner::PresenceStatus::Away),
            PresenceStatus::Busy => Some(inner::PresenceStatus::Busy),
            PresenceStatus::Offline => Some(inner::PresenceStatus::Offline),
            PresenceStatus::Invisible | PresenceStatus::Unknown => None,
        }
    }
}

/// A presence status as the wire carries it.
impl From<inner::PresenceStatus> for PresenceStatus {
    fn from(s: inner::PresenceStatus) -> Self {
        match s {
            inner::PresenceStatus::Online => PresenceStatus::Online,
            inner::PresenceStatus::Away => PresenceStatus::Away,
            inner::PresenceStatus::Busy => PresenceStatus::Busy,
            inner::PresenceStatus::Offline => PresenceStatus::Offline,
        }
    }
}

/// Whether a contact's keys are the ones pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrustState {
    /// Keys pinned on first use and unchanged since (or accepted with a trust).
    Pinned,
    /// The key server answers keys that differ from the pinned ones, not accepted yet.
    KeyChanged,
}

/// The API value of each model value, both ways: `From<model value>` for the generated
/// enum, and `from_api` (the number an API message carries; `None` for unspecified or a
/// number this build does not know). Each side is matched in full.
macro_rules! api_values {
    ($model:ident <-> $api:ident { $($m:ident <-> $a:ident),* $(,)? } $(unspecified $none:ident)?) => {
        impl From<$model> for rpc::$api {
            fn from(value: $model) -> Self {
                match value {
                    $($model::$m => rpc::$api::$a,)*
                }
            }
        }

        impl $model {
            /// The value an API number stands for: `None` for unspecified, or for a
            /// number this build does not know.
            pub fn from_api(number: i32) -> Option<$model> {
                match rpc::$api::try_from(number).ok()? {
                    $(rpc::$api::$a => Some($model::$m),)*
                    $(rpc::$api::$none => None,)?
                }
            }

            /// This value's API number.
            pub fn api_number(self) -> i32 {
                rpc::$api::from(self) as i32
            }
        }
    };
}

api_values!(Direction <-> Direction {
    Incoming <-> Incoming,
    Outgoing <-> Outgoing,
} unspecified Unspecified);
api_values!(MessageState <-> MessageState {
    Queued <-> Queued,
    Sent <-> Sent,
    Delivered <-> Delivered,
    Failed <-> Failed,
    Received <-> Received,
    Held <-> Held,
    Read <-> Read,
} unspecified Unspecified);
api_values!(FileState <-> FileState {
    Sending <-> Sending,
    Receiving <-> Receiving,
    Complete <-> Complete,
    Cancelled <-> Cancelled,
    Failed <-> Failed,
} unspecified Unspecified);
api_values!(PresenceStatus <-> PresenceStatus {
    Unknown <-> Unspecified,
    Online <-> Online,
    Away <-> Away,
    Busy <-> Busy,
    Invisible <-> Invisible,
    Offline <-> Offline,
});
api_values!(TrustState <-> TrustState {
    Pinned <-> Pinned,
    KeyChanged <-> KeyChanged,
} unspecified Unspecified);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_goes_to_the_api_and_back() {
        use MessageState as S;
        for s in [
            S::Queued,
            S::Sent,
            S::Delivered,
            S::Failed,
            S::Received,
            S::Held,
            S::Read,
        ] {
            assert_eq!(S::from_api(s.api_number()), Some(s));
        }
        assert_eq!(S::from_api(0), None, "unspecified");
        assert_eq!(S::from_api(99), None);
        assert_eq!(PresenceStatus::from_api(0), Some(PresenceStatus::Unknown));
        assert_eq!(TrustState::KeyChanged.api_number(), 2);
        assert_eq!(FileState::from_api(3), Some(FileState::Complete));
        assert_eq!(Direction::from_api(2), Some(Direction::Outgoing));
    }

    #[test]
    fn states_go_forward_in_order() {
        use MessageState as S;
        assert!(S::Queued.progress() < S::Sent.progress());
        assert!(S::Sent.progress() < S::Delivered.progress());
        assert!(S::Delivered.progress() < S::Read.progress());
        assert!(!S::Queued.reached_broker() && S::Sent.reached_broker());
        assert_eq!(S::Failed.progress(), 0);
    }

    #[test]
    fn a_user_sets_four_statuses_by_name() {
        assert_eq!(
            PresenceStatus::settable_of_name("away"),
            Some(PresenceStatus::Away)
        );
        assert_eq!(PresenceStatus::settable_of_name("offline"), None);
        assert_eq!(PresenceStatus::settable_of_name("unknown"), None);
        assert_eq!(PresenceStatus::Invisible.on_the_wire(), None);
    }
}
