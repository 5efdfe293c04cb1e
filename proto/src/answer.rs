//! The key server's signed answers to `GET /users/<username>`.
//!
//! Body: `{"response":{...},"signature":"<base64url>"}` (plus the original's trailing
//! newline). `signature` is RSA-PSS-SHA-256 with the server's key over the *exact bytes*
//! of the `"response"` value as they stand in the body. So the verifier takes that raw
//! byte range out of the body (serde_json's `RawValue`) and never re-serialises: two
//! JSON encoders rarely agree byte for byte, and an attacker could otherwise play with
//! the difference.
//!
//! `response` holds `public_key_message`, `public_key_sign` and, from now on, `username`,
//! so one user's signed answer cannot be replayed as another's. Answers of the original
//! server have no `username`; [`UsernameRule`] says whether to accept that.

use crate::b64;
use crate::inner::push_go_string;
use crate::keys::{KeyError, PrivateKey, PublicKey};
use crate::username::Username;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Answers larger than this are refused unread.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The verified content of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAnswer {
    /// `response.username`, when the server sent one (ours always do).
    pub username: Option<String>,
    /// `response.public_key_message`: PEM of the key that wraps message keys.
    pub public_key_message: String,
    /// `response.public_key_sign`: PEM of the key that verifies signatures.
    pub public_key_sign: String,
}

impl KeyAnswer {
    /// Parses `public_key_message`.
    pub fn message_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_pem(&self.public_key_message)
    }

    /// Parses `public_key_sign`.
    pub fn sign_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_pem(&self.public_key_sign)
    }
}

/// Whether an answer must name the user it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameRule {
    /// `username` must be present and equal to the user asked for (NES key servers).
    Require,
    /// `username` must equal the user asked for when present; an answer without it is
    /// accepted (original key servers never send it).
    IfPresent,
}

/// Why an answer was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// Larger than [`MAX_ANSWER_BYTES`].
    #[error("key server answer of {0} bytes is too large")]
    TooLarge(usize),
    /// Not the expected JSON.
    #[error("bad key server answer: {0}")]
    Json(String),
    /// `signature` is not base64url.
    #[error("key server answer: signature is not base64url")]
    Base64,
    /// The signature does not verify under the key server's key.
    #[error("key server answer: the signature does not verify under the key server's key")]
    Signature,
    /// `response.username` is absent and [`UsernameRule::Require`] was asked.
    #[error("key server answer does not say which user it is about")]
    MissingUsername,
    /// `response.username` names someone else: an answer replayed for another user.
    #[error("key server answer is about {got:?}, not {expected:?}")]
    WrongUsername {
        /// Who was asked for.
        expected: String,
        /// Who the answer is about.
        got: String,
    },
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    response: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    username: Option<String>,
    public_key_message: String,
    public_key_sign: String,
}

/// Verifies `body` as the answer about `user`, signed by `server_key`.
pub fn verify_answer(
    body: &[u8],
    server_key: &PublicKey,
    user: &Username,
    rule: UsernameRule,
) -> Result<KeyAnswer, AnswerError> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(AnswerError::TooLarge(body.len()));
    }
    let parsed: Body<'_> =
        serde_json::from_slice(body).map_err(|e| AnswerError::Json(e.to_string()))?;
    let signature = b64::decode(&parsed.signature).ok_or(AnswerError::Base64)?;
    let signed = parsed.response.get().as_bytes();
    // Any salt length: the original server signs with the maximum, ours with 32.
    if !server_key.verify_pss_any_salt(signed, &signature) {
        return Err(AnswerError::Signature);
    }
    let response: Response =
        serde_json::from_slice(signed).map_err(|e| AnswerError::Json(e.to_string()))?;
    match (&response.username, rule) {
        (None, UsernameRule::Require) => return Err(AnswerError::MissingUsername),
        (None, UsernameRule::IfPresent) => {}
        (Some(got), _) => {
            if got.to_ascii_lowercase() != user.as_str() {
                return Err(AnswerError::WrongUsername {
                    expected: user.to_string(),
                    got: got.chars().take(64).collect(),
                });
            }
        }
    }
    Ok(KeyAnswer {
        username: response.username,
        public_key_message: response.public_key_message,
        public_key_sign: response.public_key_sign,
    })
}

/// Builds the signed answer about `user` (the body of `GET /users/<user>`, with the
/// original's trailing newline). The key server computes it once per activation and
/// serves the stored bytes, so lookups cost no RSA.
pub fn build_answer(
    server_key: &PrivateKey,
    user: &Username,
    public_key_message: &str,
    public_key_sign: &str,
) -> Result<Vec<u8>, KeyError> {
    let mut response = String::with_capacity(public_key_message.len() + public_key_sign.len() + 96);
    response.push_str("{\"username\":");
    push_go_string(&mut response, user.as_str());
    response.push_str(",\"public_key_message\":");
    push_go_string(&mut response, public_key_message);
    response.push_str(",\"public_key_sign\":");
    push_go_string(&mut response, public_key_sign);
    response.push('}');
    let signature = server_key.sign_pss(response.as_bytes())?;
    Ok(format!(
        "{{\"response\":{response},\"signature\":\"{}\"}}\n",
        b64::encode(&signature)
    )
    .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(path: &str) -> String {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/legacy-v1/");
        std::fs::read_to_string(format!("{dir}{path}")).expect("vector")
    }

    fn server() -> PrivateKey {
        PrivateKey::from_pem(&vector("provider-private-key.TEST-ONLY.pem")).expect("server key")
    }

    fn user(name: &str) -> Username {
        Username::parse(name).expect("name")
    }

    #[test]
    fn built_answers_verify_under_both_rules() {
        let key = server();
        let (m, s) = (
            vector("keys/bob-rsa-message.pub"),
            vector("keys/bob-rsa-sign.pub"),
        );
        let body = build_answer(&key, &user("bob"), &m, &s).unwrap();
        assert!(body.ends_with(b"}\n"));
        for rule in [UsernameRule::Require, UsernameRule::IfPresent] {
            let answer = verify_answer(&body, key.public_key(), &user("bob"), rule).unwrap();
            assert_eq!(answer.username.as_deref(), Some("bob"));
            assert_eq!(answer.public_key_message, m);
            assert_eq!(answer.public_key_sign, s);
        }
    }

    #[test]
    fn an_answer_about_someone_else_is_refused() {
        let key = server();
        let body = build_answer(&key, &user("carol"), "a", "b").unwrap();
        let err = verify_answer(
            &body,
            key.public_key(),
            &user("bob"),
            UsernameRule::IfPresent,
        )
        .unwrap_err();
        assert!(matches!(err, AnswerError::WrongUsername { .. }));
    }

    #[test]
    fn original_answers_need_the_lenient_rule() {
        let key = PublicKey::from_pem(&vector("provider-public-key.pem")).unwrap();
        let body = vector("http/get-bob.body");
        let err =
            verify_answer(body.as_bytes(), &key, &user("bob"), UsernameRule::Require).unwrap_err();
        assert!(matches!(err, AnswerError::MissingUsername));
    }

    #[test]
    fn tampering_is_refused() {
        let key = server();
        let body =
            String::from_utf8(build_answer(&key, &user("bob"), "KEY-A", "KEY-B").unwrap()).unwrap();
        let changed = body.replace("KEY-A", "KEY-C");
        let err = verify_answer(
            changed.as_bytes(),
            key.public_key(),
            &user("bob"),
            UsernameRule::Require,
        )
        .unwrap_err();
        assert!(matches!(err, AnswerError::Signature));
        // Re-serialising the response (here: a space) breaks the signature, by design.
        let spaced = body.replacen("{\"username\":", "{ \"username\":", 1);
        assert!(matches!(
            verify_answer(
                spaced.as_bytes(),
                key.public_key(),
                &user("bob"),
                UsernameRule::Require
            ),
            Err(AnswerError::Signature)
        ));
        let other = PrivateKey::from_pem(&vector("keys/alice-rsa-sign")).unwrap();
        assert!(matches!(
            verify_answer(
                body.as_bytes(),
                other.public_key(),
                &user("bob"),
                UsernameRule::Require
            ),
            Err(AnswerError::Signature)
        ));
        for bad in [
            "",
            "{}",
            "{\"response\":{}}",
            "[1]",
            "{\"response\":{},\"signature\":\"+\"}",
        ] {
            assert!(verify_answer(
                bad.as_bytes(),
                key.public_key(),
                &user("bob"),
                UsernameRule::Require
            )
            .is_err());
        }
        let huge = vec![b' '; MAX_ANSWER_BYTES + 1];
        assert!(matches!(
            verify_answer(&huge, key.public_key(), &user("bob"), UsernameRule::Require),
            Err(AnswerError::TooLarge(_))
        ));
    }
}
