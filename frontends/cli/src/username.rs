//! Username arguments: parsed once, by clap, into [`Username`].
//!
//! Every argument that names a user (`nes send -t PEER`, `nes history PEER`,
//! `nes listen --from U`, `nes generate --user U`, ...) takes
//! `value_parser = UsernameParser`, so a command receives a checked, lower-cased
//! [`Username`] and never parses one itself. A bad name is "an error the user can fix"
//! (exit 1), not bad usage: clap would exit 2, so `main` asks [`refused`] whether a
//! clap error is a refused username and, if so, prints what the command used to say
//! and exits 1. The one positional PEER clap cannot parse (`nes send PEER TEXT...`,
//! where with `-t` every word is text) goes through [`username`] and [`refusal`] in
//! `cmd::send`, so it reads the same.
//!
//! Names from data rather than the command line (`nes send --batch` lines, the
//! original client's config in `import-legacy`) are parsed where they are read.

use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use nes_proto::{Username, UsernameError};
use std::error::Error as _;
use std::ffi::OsStr;

/// Parses a typed name: surrounding blanks dropped, any case accepted (`Bob` is `bob`).
/// The error names the value as typed.
pub fn username(s: &str) -> Result<Username, UsernameError> {
    Username::parse(&s.trim().to_lowercase())
        .map_err(|_| UsernameError(s.chars().take(64).collect()))
}

/// The `value_parser` of every username argument: [`username`], and when it refuses,
/// the clap error (kind `ValueValidation`, source the [`UsernameError`]) also carries
/// the message [`refusal`] gives for this command's argument, for [`refused`].
#[derive(Clone, Copy, Debug, Default)]
pub struct UsernameParser;

impl TypedValueParser for UsernameParser {
    type Value = Username;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Username, clap::Error> {
        username.parse_ref(cmd, arg, value).map_err(|mut err| {
            let message = refused_name(&err).map(|source| {
                let arg = arg.map(|a| a.get_id().as_str()).unwrap_or("");
                refusal(cmd.get_name(), arg, &value.to_string_lossy(), source)
            });
            if let Some(message) = message {
                err.insert(ContextKind::Custom, ContextValue::String(message));
            }
            err
        })
    }
}

/// What to say (after `nes: `) when `err` is clap refusing a username; `None` for any
/// other clap error (bad usage, `--help`, `--version`), which clap reports itself.
pub fn refused(err: &clap::Error) -> Option<String> {
    let source = refused_name(err)?;
    match (
        err.get(ContextKind::Custom),
        err.get(ContextKind::InvalidArg),
    ) {
        (Some(ContextValue::String(message)), _) => Some(message.clone()),
        (_, Some(ContextValue::String(arg))) => Some(format!("{arg}: {source}")),
        _ => Some(source.to_string()),
    }
}

/// The message for `typed`, refused as argument `arg` (its clap id) of the (sub)command
/// `command`: what each command said when it checked names itself. (`main`'s tests
/// check the message of every username argument, so a renamed command is noticed.)
pub fn refusal(command: &str, arg: &str, typed: &str, err: &UsernameError) -> String {
    match command {
        "send" => format!("cannot send to {typed:?}: {err}"),
        "chat" => format!("cannot chat with {typed:?}: {err}"),
        "history" => format!("no conversation with {typed:?}: {err}"),
        "files" => format!("no files with {typed:?}: {err}"),
        "listen" => format!("--from {typed:?}: {err}"),
        "import-legacy" => format!("cannot import {typed:?}: {err}"),
        // contacts show|trust|legacy USER
        "show" | "trust" | "legacy" => format!("{typed:?}: {err}"),
        // frame seal --from/--to, frame open --me
        "seal" | "open" => format!("--{arg}: {err}"),
        // generate --user, prekey new --user: the error says it all.
        _ => err.to_string(),
    }
}

/// The [`UsernameError`] behind a clap value-validation error, if that is what it is.
fn refused_name(err: &clap::Error) -> Option<&UsernameError> {
    if err.kind() != ErrorKind::ValueValidation {
        return None;
    }
    err.source()?.downcast_ref::<UsernameError>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_lowercases() {
        assert_eq!(username("Bob").unwrap().as_str(), "bob");
        assert_eq!(username(" alice\n").unwrap().as_str(), "alice");
        // The error names what was typed, not what it became.
        assert_eq!(username("B@d!").unwrap_err(), UsernameError("B@d!".into()));
        assert!(username("ab").is_err());
    }
}
