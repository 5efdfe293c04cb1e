//! # nes-client: what every NES frontend shares
//!
//! `nes`, `nes chat` and `nes-notify` are stateless clients of `nesd`'s gRPC API
//! (`nes_proto::rpc`, served on a Unix socket). This crate is the one place where they
//! find that socket, connect to it and turn failures into errors a user can act on:
//!
//! | module | holds |
//! |---|---|
//! | [`paths`] | where the socket and the config file are (`--socket` > `NES_SOCKET` > config > XDG) |
//! | [`settings`] | the config file's settings, defined once: keys, help, types, who reads them |
//! | [`error`] | [`Error`]: "daemon not running" (exit 3) vs. an error the user can fix (exit 1) |
//! | [`client`] | [`Client`]: connect over the Unix socket, one method per RPC |
//! | [`feed`] | [`Feed`]: the event stream that survives a daemon restart, resuming by cursor |
//! | [`display`] | text from the network made safe to show: controls, bidi and invisible characters escaped, one line per message |
//!
//! A frontend's flow: resolve the socket path ([`paths::socket_path`]), [`Client::connect`],
//! call RPCs; for live events open a [`Feed`], which reconnects by itself and never
//! shows an event twice or skips one (the daemon's event log cursor makes that exact).
//! Whatever a frontend shows a person from a message goes through [`display`] first.
//!
//! [`Client::connect`] connects only to a socket that is the user's own: the socket and
//! the daemon listening on it must belong to the user (or root), and its folder must be
//! the user's (or root's) and writable by no one else; anything else is refused
//! ([`Error::Untrusted`], exit 1) before a byte is sent.

#![forbid(unsafe_code)]
#![deny(unused_must_use)]
#![warn(missing_docs)]

pub mod client;
pub mod display;
pub mod error;
pub mod feed;
pub mod paths;
pub mod settings;

pub use client::Client;
pub use error::Error;
pub use feed::{Feed, FeedItem};
pub use nes_proto::rpc;
