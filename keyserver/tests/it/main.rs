//! Integration tests of `nes-keyserver`: the real binary, on a loopback port, against
//! SQLite and PostgreSQL (127.0.0.1:5432), with real SMTP (python3-aiosmtpd).

mod api;
mod broker;
mod cli;
mod cluster;
mod common;
mod compat;
mod fuzz;
mod mail;
mod ops;
mod prekey;
