//! Integration tests of `nes-keyserver`: the real binary, on a loopback port, against
//! SQLite and PostgreSQL (127.0.0.1:5432), with real SMTP (python3-aiosmtpd).

mod api;
// The broker's tests need a binary built with it (`--features embedded-broker`, as
// scripts/test builds); without the feature, the refusal is tested instead.
#[cfg(feature = "embedded-broker")]
mod broker;
#[cfg(not(feature = "embedded-broker"))]
mod broker_absent;
mod cli;
mod cluster;
mod common;
mod compat;
mod delete_link;
mod fuzz;
mod mail;
mod ops;
mod prekey;
