//! The domain types: what the daemon's store, service and receive pipeline work with.
//!
//! They are nesd's own, not the API's: the gRPC adapter converts them to the generated
//! types of `messenger.proto` (`crate::grpc`'s `convert`), the D-Bus adapter reads them
//! directly ([`crate::dbus`]), and the store converts them to and from its records
//! (`store/records.rs`). Those three places are the only ones that know both sides, and
//! each destructures every field, so a field added here (or to the API, or to a record)
//! does not compile until someone decides what it is on the other side.
//!
//! | type | file | what |
//! |---|---|---|
//! | [`Message`], [`Content`], [`NewText`] | `message.rs` | a stored message in either direction; what it carries (its kind); a text to send |
//! | [`FileInfo`] | `file.rs` | what a file message carries, with its transfer's progress |
//! | [`Event`], [`EventKind`] and what each says | `event.rs` | one entry of the event log |
//! | [`Contact`] | `contact.rs` | a contact as shown: fingerprints, trust, the version it gets, presence |
//! | [`Presence`], [`OwnPresence`] | `presence.rs` | a contact's presence as shown; this identity's as set |
//! | [`Conversation`] | `conversation.rs` | a conversation's counters and newest message |
//! | [`Status`] | `status.rs` | how the daemon is doing |
//!
//! The enumerations ([`Direction`], [`MessageState`], [`FileState`], [`PresenceStatus`],
//! [`TrustState`]) are [`nes_proto::model`]'s, re-exported: the frontends name them too
//! (`--json`, D-Bus), so their names and API values are defined once, in the crate both
//! sides compile against.
//!
//! A message's kind is [`Content`]: a text, or a file. Kinds that are not stored as
//! messages (receipts, presence, a file's chunks and reports) never become a [`Message`]:
//! the pipeline dispatches them on [`nes_proto::inner::Kind`] (docs/ARCHITECTURE.md,
//! "Kinds of message").

mod contact;
mod conversation;
mod event;
mod file;
mod message;
mod presence;
mod status;

pub use contact::Contact;
pub use conversation::Conversation;
pub(crate) use event::each_event_kind;
pub use event::{ConnectionChanged, Event, EventKind, KeyChanged, MarkedRead, StateChanged};
pub use file::FileInfo;
pub use message::{Content, Message, NewText};
pub use nes_proto::model::{Direction, FileState, MessageState, PresenceStatus, TrustState};
pub use presence::{OwnPresence, Presence};
pub use status::Status;
