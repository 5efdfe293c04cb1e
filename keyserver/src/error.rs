//! Why the server could not start or had to stop. Each message is one line that says
//! what went wrong and, where we know, how to fix it; `main` prints it and exits 1.
//!
//! Errors of single requests are not here: those are [`crate::api::ApiError`], answered
//! to the client, never fatal.

use crate::config::ConfigError;
use crate::keygen::KeygenError;
use crate::mail::MailError;
use crate::store::StoreError;

/// A fatal error of `nes-keyserver`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `keygen` failed.
    #[error(transparent)]
    Keygen(#[from] KeygenError),
    /// The server's signing key could not be read.
    #[error("cannot use the server key {path}: {source}; make one with `nes-keyserver keygen --out {path}`")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        source: nes_proto::KeyError,
    },
    /// The database could not be opened or migrated.
    #[error("database {url}: {source}")]
    Database {
        /// The URL, password removed.
        url: String,
        /// Why.
        source: StoreError,
    },
    /// The mail transport could not be set up.
    #[error(transparent)]
    Mail(#[from] MailError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick another --listen address")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded broker could not start.
    #[error("embedded broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    /// The HTTP server failed while running.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}
