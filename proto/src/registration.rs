//! The body of the key server's `POST /users`: a username, an e-mail address and two RSA
//! public keys, as original clients send it.
//!
//! `{"username": .., "email": .., "public_key_message": "<PEM>", "public_key_sign": "<PEM>"}`
//! (unknown fields are ignored, as the original server did).
//!
//! It lives here, beside the answer format, and not in the key server, because it is the
//! wire format of one side of the key-server API and because it is where untrusted bytes
//! become checked types: keeping it free of the server's dependencies lets the fuzzer
//! (`proto/fuzz`, target `register_parse`) build and run it cheaply in CI.

use crate::keys::PublicKey;
use crate::username::{Username, UsernameError};
use email_address::{EmailAddress, Options};
use serde::{Deserialize, Serialize};

/// Longest e-mail address accepted (RFC 5321's path limit less the brackets).
pub const MAX_EMAIL: usize = 254;

/// A registration request, checked: the untrusted JSON becomes these types once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// `username`, lower-cased.
    pub username: Username,
    /// `email`, an addr-spec of at most [`MAX_EMAIL`] bytes with a dotted domain.
    pub email: String,
    /// `public_key_message`, verbatim (it parsed as an RSA key of 2048..=4096 bits).
    pub public_key_message: String,
    /// `public_key_sign`, verbatim (likewise, and a different key).
    pub public_key_sign: String,
}

/// Why a registration body was refused. Each maps to one key-server error code.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// Not a JSON object with the four string fields.
    #[error("{0}; send a JSON object {{\"username\", \"email\", \"public_key_message\", \"public_key_sign\"}} of strings")]
    Json(String),
    /// The username breaks the username rule.
    #[error("{0}")]
    Username(#[from] UsernameError),
    /// The e-mail address is not one mail can be sent to.
    #[error("{preview:?} is not an e-mail address: {why}")]
    Email {
        /// The start of what was sent.
        preview: String,
        /// What is wrong with it.
        why: EmailError,
    },
    /// A key is not an RSA public key of 2048..=4096 bits in PEM.
    #[error("{field}: {why}; send an RSA public key of 2048 to 4096 bits as PEM \"PUBLIC KEY\"")]
    Key {
        /// `public_key_message` or `public_key_sign`.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Both keys are the same key.
    #[error("public_key_message and public_key_sign are the same key: use two key pairs")]
    SameKeys,
}

impl RegistrationError {
    /// The key server's `error` code for this refusal (always answered as 400).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Json(_) => "invalid_json",
            Self::Username(_) => "invalid_username",
            Self::Email { .. } => "invalid_email",
            Self::Key { .. } => "invalid_key",
            Self::SameKeys => "same_keys",
        }
    }
}

/// What is wrong with a registration's e-mail address ([`RegistrationError::Email`]):
/// its own type so that the length limit, which is ours, stays apart from what the
/// address parser refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EmailError {
    /// Over [`MAX_EMAIL`] bytes.
    #[error("longer than {MAX_EMAIL} characters")]
    TooLong,
    /// Not an addr-spec with a dotted domain (the parser's message).
    #[error(transparent)]
    Invalid(#[from] email_address::Error),
}

#[derive(Deserialize, Serialize)]
struct Wire<'a> {
    username: std::borrow::Cow<'a, str>,
    email: std::borrow::Cow<'a, str>,
    public_key_message: std::borrow::Cow<'a, str>,
    public_key_sign: std::borrow::Cow<'a, str>,
}

impl Registration {
    /// Parses and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Self, RegistrationError> {
        let wire: Wire<'_> =
            serde_json::from_slice(body).map_err(|e| RegistrationError::Json(e.to_string()))?;
        let username = Username::parse(&wire.username)?;
        check_email(&wire.email).map_err(|why| RegistrationError::Email {
            preview: preview(&wire.email),
            why,
        })?;
        let message = parse_key("public_key_message", &wire.public_key_message)?;
        let sign = parse_key("public_key_sign", &wire.public_key_sign)?;
        if message == sign {
            return Err(RegistrationError::SameKeys);
        }
        Ok(Self {
            username,
            email: wire.email.into_owned(),
            public_key_message: wire.public_key_message.into_owned(),
            public_key_sign: wire.public_key_sign.into_owned(),
        })
    }

    /// The request body that [`Registration::parse`] reads back as `self`.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = Wire {
            username: self.username.as_str().into(),
            email: self.email.as_str().into(),
            public_key_message: self.public_key_message.as_str().into(),
            public_key_sign: self.public_key_sign.as_str().into(),
        };
        // A struct of four strings always serialises.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// An addr-spec (RFC 5322: no display name, no IP-literal domain, a domain with a dot).
fn check_email(text: &str) -> Result<(), EmailError> {
    if text.len() > MAX_EMAIL {
        return Err(EmailError::TooLong);
    }
    let options = Options::default()
        .with_required_tld()
        .without_domain_literal()
        .without_display_text();
    EmailAddress::parse_with_options(text, options)?;
    Ok(())
}

fn parse_key(field: &'static str, pem: &str) -> Result<PublicKey, RegistrationError> {
    // Stored and served verbatim: printable ASCII and line ends only (PostgreSQL text
    // cannot even hold a NUL).
    if !pem
        .bytes()
        .all(|b| b == b'\n' || b == b'\r' || b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(RegistrationError::Key {
            field,
            why: "a PEM key is printable ASCII text".into(),
        });
    }
    PublicKey::from_pem(pem).map_err(|e| RegistrationError::Key {
        field,
        why: e.to_string(),
    })
}

/// The start of an untrusted string, for messages.
fn preview(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if out.len() < text.len() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/legacy-v1/keys");

    fn key(name: &str) -> String {
        std::fs::read_to_string(format!("{VECTORS}/{name}")).unwrap()
    }

    fn body(username: &str, email: &str, m: &str, s: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "username": username, "email": email, "public_key_message": m, "public_key_sign": s
        }))
        .unwrap()
    }

    fn code(result: Result<Registration, RegistrationError>) -> &'static str {
        result.map(|_| "ok").unwrap_or_else(|e| e.code())
    }

    #[test]
    fn accepts_a_good_registration_and_lower_cases_the_name() {
        let (m, s) = (key("alice-rsa-message.pub"), key("alice-rsa-sign.pub"));
        let r = Registration::parse(&body("Alice_1", "alice@example.org", &m, &s)).unwrap();
        assert_eq!(r.username.as_str(), "alice_1");
        assert_eq!(r.public_key_message, m, "kept verbatim");
        assert_eq!(
            Registration::parse(&r.to_json()).unwrap(),
            r,
            "to_json round-trips"
        );
    }

    #[test]
    fn ignores_unknown_fields_and_reads_escaped_strings() {
        let (m, s) = (key("alice-rsa-message.pub"), key("alice-rsa-sign.pub"));
        let mut v: serde_json::Value =
            serde_json::from_slice(&body("alice", "alice@example.org", &m, &s)).unwrap();
        v["extra"] = serde_json::json!(1);
        v["username"] = serde_json::json!("\u{0061}lice");
        assert!(Registration::parse(&serde_json::to_vec(&v).unwrap()).is_ok());
    }

    #[test]
    fn refuses_each_kind_of_bad_input() {
        let (m, s) = (key("alice-rsa-message.pub"), key("alice-rsa-sign.pub"));
        assert_eq!(code(Registration::parse(b"not json")), "invalid_json");
        assert_eq!(code(Registration::parse(b"[]")), "invalid_json");
        assert_eq!(
            code(Registration::parse(br#"{"username":"alice"}"#)),
            "invalid_json"
        );
        assert_eq!(
            code(Registration::parse(&body("al", "a@example.org", &m, &s))),
            "invalid_username"
        );
        assert_eq!(
            code(Registration::parse(&body(
                "al ice",
                "a@example.org",
                &m,
                &s
            ))),
            "invalid_username"
        );
        for email in [
            "",
            "alice",
            "alice@",
            "@example.org",
            "alice@localhost",
            "a b@example.org",
            "Alice <alice@example.org>",
            "alice@[127.0.0.1]",
            "alice@@example.org",
            "alice@example..org",
            &format!("{}@example.org", "a".repeat(250)),
        ] {
            assert_eq!(
                code(Registration::parse(&body("alice", email, &m, &s))),
                "invalid_email",
                "{email:?}"
            );
        }
        assert_eq!(
            code(Registration::parse(&body(
                "alice",
                "a@example.org",
                "junk",
                &s
            ))),
            "invalid_key"
        );
        assert_eq!(
            code(Registration::parse(&body(
                "alice",
                "a@example.org",
                "k\u{0}",
                &s
            ))),
            "invalid_key"
        );
        assert_eq!(
            code(Registration::parse(&body(
                "alice",
                "a@example.org",
                &m,
                &key("alice-rsa-sign")
            ))),
            "invalid_key",
            "a private key is not a public key"
        );
        assert_eq!(
            code(Registration::parse(&body("alice", "a@example.org", &m, &m))),
            "same_keys"
        );
    }

    #[test]
    fn previews_are_short() {
        assert_eq!(preview("abc"), "abc");
        assert_eq!(preview(&"x".repeat(100)).len(), 67);
    }
}
