//! # nesd: the NES daemon
//!
//! nesd is the only process that touches this identity's private keys, the MQTT broker
//! and the message store. Frontends (`nes`, `nes chat`, `nes-notify`, scripts) are
//! stateless clients of its API.
//!
//! ## How a request flows
//!
//! ```text
//! frontend ──gRPC/Unix socket──▶ grpc.rs ─┐
//! frontend ──D-Bus──────────────▶ dbus.rs ─┴─▶ service.rs ─┬─▶ store.rs     (sled)
//!                                                          ├─▶ keycache.rs ─▶ keyserver.rs (HTTP)
//!                                                          └─▶ outbox.rs ──▶ mqtt.rs ──▶ broker
//! broker ──▶ mqtt.rs ──▶ receive.rs ──▶ keycache.rs, store.rs ──▶ events ──▶ every client
//! ```
//!
//! Inside the adapters everything speaks the domain types of [`model`]: the gRPC adapter
//! converts them to the API's generated types at its edge (`grpc/convert.rs`, the only
//! place in nesd that knows both), the D-Bus adapter reads them directly, and the store
//! converts them to records of its own (`store/records.rs`).
//!
//! | module | holds |
//! |---|---|
//! | [`config`] | flags, `NES_*` env vars, the TOML file, XDG defaults |
//! | [`daemon`] | startup checks, wiring, sd_notify, shutdown on SIGTERM/SIGINT |
//! | [`socket`] | the API socket: live/stale detection, modes, systemd activation |
//! | [`identity`] | this identity's private keys and the stable device id |
//! | [`model`] | the domain types: message and its kind (content), event, contact, presence, conversation, status |
//! | [`grpc`] | the `nes.v1.Messenger` adapter (tonic); `grpc/convert.rs`: domain types to the API's generated types, the only place they meet |
//! | [`dbus`] | the D-Bus adapter: `org.nes.Messenger1` on zbus's object server, reading the domain types |
//! | [`service`] | what the daemon can do: one cloneable handle, async methods over the domain types |
//! | [`store`] | messages, conversations, outbox, held messages, the event log; `store/records.rs`: domain types to its records |
//! | [`keycache`] | contacts' keys, TTL, TOFU pinning and key changes |
//! | [`keyserver`] | HTTP client of the key server, signed answers verified |
//! | [`receive`] | the receive pipeline: every receiving rule, then store, ack, event |
//! | [`prekeys`] | v3: our prekeys (made, published, rotated, deleted) and contacts' (cached) |
//! | [`outbox`] | publishes queued frames in order (texts, receipts, presence), records SENT |
//! | [`receipts`] | seals and queues the delivery and read receipts this daemon owes |
//! | [`files`] | files in chunks: uploads, the sender's pump, the receiver's partial files |
//! | [`presence`] | tells contacts this identity's presence; notices theirs running out |
//! | [`retention`] | prunes the event log past `event_retention` |
//! | [`mqtt`] | the persistent MQTT session (rumqttc; MQTT 5, or 3.1.1 where the broker speaks only that), manual acks, reconnects |
//! | [`sync`] | the one lock helper for in-memory maps |
//!
//! A send: the adapter calls [`service::Service::send`], which finds the recipient's keys
//! (key cache, else key server), seals the frame on the blocking pool, stores the message
//! QUEUED with its frame, flushes, and returns; the outbox publishes it when the broker is
//! reachable, the broker's acknowledgement makes it SENT, and the recipient's receipts
//! make it DELIVERED and READ. Each step is an event in the store's log, which every
//! connected client receives, and which a client can replay from a cursor after
//! reconnecting.
//!
//! Arrival: the MQTT session hands the publish to the pipeline, which decrypts it,
//! verifies it under the sender's keys, applies the receiving rules, stores it, flushes,
//! and only then acknowledges it to the broker. A crash at any point loses nothing: the
//! broker delivers unacknowledged messages again and the store drops duplicates. What
//! arrived is dispatched on its kind ([`nes_proto::inner::Kind`]): a text is stored, a
//! receipt moves outgoing messages on, a presence is kept per contact, an unknown kind is
//! refused (`unknown_kind`). docs/ARCHITECTURE.md lists what a new kind touches.
//!
//! Errors of this library are `thiserror` enums; the binary (`main.rs`) turns them into
//! one-line messages and exit codes.

#![deny(unsafe_code)]
#![deny(unused_must_use)]
#![warn(missing_docs)]

pub mod config;
pub mod daemon;
pub mod dbus;
pub mod error;
pub mod files;
pub mod grpc;
pub mod identity;
pub mod keycache;
pub mod keyserver;
pub mod model;
pub mod mqtt;
pub mod outbox;
pub mod prekeys;
pub mod presence;
pub mod receipts;
pub mod receive;
pub mod retention;
pub mod service;
pub mod socket;
pub mod store;
pub mod sync;

pub use config::Config;

/// Waits until the daemon's shutdown flag turns true (or its sender is gone).
pub(crate) async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it right here.
    let _ = flag.wait_for(|s| *s).await;
}
pub use error::ServiceError;
pub use service::Service;
