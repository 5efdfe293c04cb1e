//! One module per command.

pub mod chat;
pub mod completions;
pub mod config;
pub mod contacts;
pub mod file;
pub mod files;
pub mod frame;
pub mod generate;
pub mod history;
pub mod import_legacy;
pub mod listen;
pub mod man;
pub mod prekey;
pub mod presence;
pub mod register;
pub mod send;
pub mod status;
pub mod version;
