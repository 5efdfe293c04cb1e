//! # nes-keyserver: the NES public-key directory
//!
//! A user registers a name with two RSA public keys and an e-mail address; the server
//! mails an activation link; once activated, anyone can fetch the keys as an answer
//! signed by the server's own key (clients hold that key's public half). The API is the
//! original PubKey service's (Table 1 of the seed), so original clients work unchanged.
//!
//! ## Layout
//!
//! | module | holds |
//! |---|---|
//! | [`cli`] | the command line (`keygen`, `serve`), defined once with clap |
//! | [`config`] | flags + `NES_KEYSERVER_*` env vars + TOML file → one checked [`config::ServeConfig`] |
//! | [`keygen`] | `nes-keyserver keygen`: the server's signing key pair |
//! | [`server`] | startup and shutdown: opens everything, runs the HTTP server and background tasks |
//! | [`api`] | the HTTP routes: [`api::register`], [`api::lookup`], [`api::token`], [`api::prekey`] (v3), [`api::ops`] |
//! | [`store`] | SQLite or PostgreSQL behind one type, with the migrations of each |
//! | [`cache`] | the in-memory cache of signed answers in front of the store |
//! | [`tokens`] | activation and delete tokens: OS RNG, SHA-256 at rest, constant-time compare |
//! | [`mail`] | the activation mail: SMTP, `.eml` files, or the log (`--dev`) |
//! | [`ratelimit`] | per-IP limits on registration, lookup and prekey uploads |
//! | [`metrics`] | the Prometheus counters behind `/metrics` |
//! | [`openapi`] | the OpenAPI 3 description served at `/openapi.json` |
//! | [`broker`] | the optional embedded MQTT broker (`--embedded-broker`, with the `embedded-broker` feature) |
//!
//! ## How a request flows
//!
//! `main` parses the command line ([`cli`]), resolves it with the environment and the
//! config file ([`config`]) and calls [`server::serve`]. That opens the [`store`] (and
//! runs its migrations), reads the server key, builds the [`mail::Mailer`], spawns the
//! cleanup task (expired registrations, rate-limiter state) and serves the [`api`]
//! router until SIGTERM or SIGINT.
//!
//! - `POST /users` ([`api::register`]): per-IP limit → body read with a 64 KiB cap →
//!   [`nes_proto::registration::Registration::parse`] (called by `api::register`) turns the untrusted JSON into checked types
//!   (username, e-mail, two distinct RSA keys) → two fresh [`tokens::Token`]s → the
//!   store inserts a *pending* row (409 when the name is taken, 429 when the e-mail has
//!   too many pending registrations) → the activation mail goes out → 201.
//! - `GET /users/<name>/<token>` ([`api::token`]): the presented token is hashed and
//!   compared in constant time with the stored hash. A pending user's activation token
//!   signs the answer **once** (`nes_proto::build_answer`, the only RSA private
//!   operation the server does) and stores it with the row, now *active*; an active
//!   user's delete token deletes the row.
//! - `GET /users/<name>` ([`api::lookup`]): [`cache`] hit → the stored bytes; miss →
//!   the store's stored bytes → cache. No RSA, no JSON encoding: a lookup is a hash map
//!   read and a copy of a reference-counted buffer.
//! - `PUT /users/<name>/prekey` ([`api::prekey`], v3): per-IP limit → body with a 16 KiB
//!   cap → [`nes_proto::v3::SignedPrekey::parse`], name and times (400) → the user's
//!   registered sign key (404 unless active) → the owner's RSA-PSS signature (403) →
//!   the store keeps it if newer (409 otherwise) → 204. `GET` answers the stored bytes.
//!
//! Every 4xx carries a JSON body `{"error": "<code>", "reason": "<sentence>"}`
//! ([`api::ApiError`]) and counts in `/metrics` as a rejection with that code.

#![forbid(unsafe_code)]
#![deny(unused_must_use)]
#![warn(missing_docs)]

pub mod api;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod keygen;
pub mod mail;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tokens;

pub use error::Error;

/// Current time in Unix milliseconds (what the store keeps).
pub fn now_ms() -> i64 {
    nes_proto::now_ms()
}
