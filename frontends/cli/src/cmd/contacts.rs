//! `nes contacts`: the people the daemon knows keys for.
//!
//! - `nes contacts [list] [--json]`: every contact, its trust state and fingerprints;
//! - `nes contacts show USER [--refresh] [--pem] [--json]`: one contact (fetched from the
//!   key server when unknown), with full key fingerprints to compare out of band;
//! - `nes contacts trust USER [--message-key FP --sign-key FP]`: accept the keys a
//!   contact now has after a key change. Without fingerprints it accepts the pending
//!   keys it shows (and the daemon refuses if they changed again in between);
//! - `nes contacts legacy USER on|off`: send to USER as v1 frames (original client).

use crate::error::CliError;
use crate::output::{local_time, print_json, print_line};
use crate::username::UsernameParser;
use crate::Ctx;
use nes_proto::rpc::{Contact, TrustState};
use nes_proto::Username;
use serde_json::json;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<ContactsCommand>,
    /// JSON lines (for the list).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum ContactsCommand {
    /// List every contact (the default).
    List {
        /// JSON lines, one object per contact.
        #[arg(long)]
        json: bool,
    },
    /// Show one contact with its key fingerprints.
    Show {
        /// The contact's username.
        #[arg(value_parser = UsernameParser)]
        user: Username,
        /// Ask the key server again even if the cached keys are fresh.
        #[arg(long)]
        refresh: bool,
        /// Also print the public keys (PEM).
        #[arg(long)]
        pem: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Accept a contact's new keys after a key change.
    Trust {
        /// The contact's username.
        #[arg(value_parser = UsernameParser)]
        user: Username,
        /// Accept only if the new message key has this fingerprint (hex SHA-256).
        #[arg(long, value_name = "FP", requires = "sign_key")]
        message_key: Option<String>,
        /// Accept only if the new signing key has this fingerprint (hex SHA-256).
        #[arg(long, value_name = "FP", requires = "message_key")]
        sign_key: Option<String>,
    },
    /// Mark a contact as using the original client (messages go out as v1 frames).
    Legacy {
        /// The contact's username.
        #[arg(value_parser = UsernameParser)]
        user: Username,
        /// on: send v1 frames; off: send v2 (the default).
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let mut client = ctx.client().await?;
    match args
        .command
        .unwrap_or(ContactsCommand::List { json: args.json })
    {
        ContactsCommand::List { json } => {
            let mut contacts = client.contacts().await?;
            contacts.sort_by(|a, b| a.username.cmp(&b.username));
            for c in &contacts {
                if json {
                    print_json(&contact_json(c, false))?;
                } else {
                    print_line(&contact_line(c))?;
                }
            }
            if contacts.is_empty() && !json {
                eprintln!(
                    "nes: no contacts yet (they appear when you send to or hear from someone)"
                );
            }
            Ok(())
        }
        ContactsCommand::Show {
            user: name,
            refresh,
            pem,
            json,
        } => {
            let c = client.lookup_contact(name.as_str(), refresh).await?;
            if json {
                return print_json(&contact_json(&c, pem));
            }
            for line in contact_details(&c, pem) {
                print_line(&line)?;
            }
            Ok(())
        }
        ContactsCommand::Trust {
            user: name,
            message_key,
            sign_key,
        } => {
            let c = client.lookup_contact(name.as_str(), true).await?;
            if c.trust != TrustState::KeyChanged as i32 && message_key.is_none() {
                print_line(&format!("{name}'s keys have not changed; nothing to trust"))?;
                return Ok(());
            }
            let (m, s) = match (message_key, sign_key) {
                (Some(m), Some(s)) => (normalize_fp(&m), normalize_fp(&s)),
                _ => (
                    c.pending_message_key_fingerprint.clone(),
                    c.pending_sign_key_fingerprint.clone(),
                ),
            };
            print_line(&format!(
                "trusting {name}'s new keys: message sha256:{m}, sign sha256:{s}"
            ))?;
            let c = client.trust_contact(name.as_str(), &m, &s).await?;
            print_line(&contact_line(&c))
        }
        ContactsCommand::Legacy { user: name, state } => {
            let c = client
                .set_contact_legacy(name.as_str(), state == "on")
                .await?;
            print_line(&contact_line(&c))
        }
    }
}

/// Accepts `sha256:AB:CD...`, upper case or colons; the API wants plain lower hex.
fn normalize_fp(fp: &str) -> String {
    fp.trim()
        .trim_start_matches("sha256:")
        .replace(':', "")
        .to_lowercase()
}

/// `pinned` / `KEY CHANGED`.
fn trust_name(trust: i32) -> &'static str {
    match TrustState::try_from(trust) {
        Ok(TrustState::Pinned) => "pinned",
        Ok(TrustState::KeyChanged) => "key-changed",
        _ => "unknown",
    }
}

/// One line per contact: name, trust, short fingerprints, legacy. What came from the
/// network (names, fingerprints, keys) is shown through `nes_client::display`.
pub fn contact_line(c: &Contact) -> String {
    let short = |fp: &str| shown(&fp.chars().take(16).collect::<String>());
    let mut line = format!(
        "{:<12} {:<11} message {}  sign {}",
        shown(&c.username),
        trust_name(c.trust),
        short(&c.message_key_fingerprint),
        short(&c.sign_key_fingerprint)
    );
    if c.legacy {
        line.push_str("  legacy (v1)");
    } else if c.frame_version > 0 {
        line.push_str(&format!("  v{}", c.frame_version));
    }
    if c.prekey_lost {
        line.push_str("  PREKEY LOST (gets v2)");
    }
    if let Some(p) = &c.presence {
        line.push_str(&format!("  {}", crate::cmd::presence::presence_text(p)));
    }
    if c.trust == TrustState::KeyChanged as i32 {
        line.push_str(&format!(
            "  -> check and run `nes contacts trust {}`",
            shown(&c.username)
        ));
    }
    line
}

fn contact_details(c: &Contact, pem: bool) -> Vec<String> {
    let c = &Contact {
        username: shown(&c.username),
        message_key_fingerprint: shown(&c.message_key_fingerprint),
        sign_key_fingerprint: shown(&c.sign_key_fingerprint),
        pending_message_key_fingerprint: shown(&c.pending_message_key_fingerprint),
        pending_sign_key_fingerprint: shown(&c.pending_sign_key_fingerprint),
        ..c.clone()
    };
    let mut lines = vec![
        format!("user:        {}", c.username),
        format!("trust:       {}", trust_name(c.trust)),
        format!("message key: sha256:{}", c.message_key_fingerprint),
        format!("sign key:    sha256:{}", c.sign_key_fingerprint),
        format!(
            "legacy:      {}",
            if c.legacy {
                "yes (messages go out as v1 frames)"
            } else {
                "no"
            }
        ),
        format!("sends as:    {}", version_text(c)),
        format!(
            "presence:    {}",
            c.presence
                .as_ref()
                .map(crate::cmd::presence::presence_text)
                .unwrap_or_else(|| "not told (it tells contacts it has talked with)".into())
        ),
        format!(
            "fetched:     {}",
            if c.fetched_at_ms > 0 {
                local_time(c.fetched_at_ms)
            } else {
                "never".into()
            }
        ),
    ];
    if c.trust == TrustState::KeyChanged as i32 {
        lines.push(format!(
            "KEYS CHANGED: the key server now answers other keys for {}:",
            c.username
        ));
        lines.push(format!(
            "  new message key: sha256:{}",
            c.pending_message_key_fingerprint
        ));
        lines.push(format!(
            "  new sign key:    sha256:{}",
            c.pending_sign_key_fingerprint
        ));
        lines.push(format!(
            "  messages from {0} are held and sending to {0} is refused until you compare these with {0} and run `nes contacts trust {0}`",
            c.username
        ));
    }
    if pem {
        // A PEM is several lines: each is shown escaped on its own.
        for key in [&c.message_key_pem, &c.sign_key_pem] {
            lines.extend(key.trim_end().lines().map(shown));
        }
    }
    lines
}

/// The version the next message gets and why (the reason holds no network text but a
/// prekey id and numbers; it is shown escaped all the same).
fn version_text(c: &Contact) -> String {
    let mut text = shown(&c.frame_version_reason);
    if c.prekey_lost {
        text.push_str(" [PREKEY LOST]");
    }
    text
}

/// Text from the network as one safe line (`nes_client::display::line`).
fn shown(text: &str) -> String {
    nes_client::display::line(text)
}

fn contact_json(c: &Contact, pem: bool) -> serde_json::Value {
    let mut v = json!({
        "username": c.username,
        "trust": trust_name(c.trust),
        "message_key_fingerprint": c.message_key_fingerprint,
        "sign_key_fingerprint": c.sign_key_fingerprint,
        "legacy": c.legacy,
        "fetched_at": c.fetched_at_ms,
        "frame_version": c.frame_version,
        "frame_version_reason": c.frame_version_reason,
        "prekey_lost": c.prekey_lost,
    });
    if let Some(p) = &c.presence {
        v["presence"] = crate::cmd::presence::presence_json(p);
    }
    if c.trust == TrustState::KeyChanged as i32 {
        v["pending_message_key_fingerprint"] = json!(c.pending_message_key_fingerprint);
        v["pending_sign_key_fingerprint"] = json!(c.pending_sign_key_fingerprint);
    }
    if pem {
        v["message_key_pem"] = json!(c.message_key_pem);
        v["sign_key_pem"] = json!(c.sign_key_pem);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized() {
        assert_eq!(normalize_fp("sha256:AB:cd:EF"), "abcdef");
        assert_eq!(normalize_fp(" abc "), "abc");
    }

    #[test]
    fn changed_keys_say_what_to_do() {
        let c = Contact {
            username: "alice".into(),
            trust: TrustState::KeyChanged as i32,
            pending_message_key_fingerprint: "11".into(),
            ..Default::default()
        };
        assert!(contact_line(&c).contains("nes contacts trust alice"));
        assert!(contact_details(&c, false)
            .join("\n")
            .contains("new message key: sha256:11"));
        assert_eq!(contact_json(&c, false)["trust"], "key-changed");
    }

    #[test]
    fn network_text_is_escaped() {
        let c = Contact {
            username: "al\x1b[2Jice".into(),
            message_key_fingerprint: "ab\ncd".into(),
            message_key_pem: "-----BEGIN\x07-----\nAAAA\r\n-----END-----\n".into(),
            ..Default::default()
        };
        let all = format!(
            "{}\n{}",
            contact_line(&c),
            contact_details(&c, true).join("\n")
        );
        assert!(!all.contains(['\x1b', '\x07', '\r']), "{all:?}");
        assert!(
            all.contains("al\\u{1b}[2Jice") && all.contains("ab\\ncd"),
            "{all}"
        );
        assert!(contact_details(&c, true).contains(&"-----BEGIN\\u{7}-----".to_string()));
    }
}
