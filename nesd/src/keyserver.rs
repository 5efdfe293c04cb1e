//! The key server client: `GET /users/<name>` (signed answers, verified here with the
//! configured server key), `POST /users` (registration), and v3's `PUT`/`GET
//! /users/<name>/prekey` (signed by the user, not the server: verified by the caller
//! with the pinned sign key).
//!
//! The server's public key comes from the configuration, never from the server. Answers
//! are read with a size cap before they are parsed.

use futures::future::BoxFuture;
use nes_proto::answer::MAX_ANSWER_BYTES;
use nes_proto::registration::Registration;
use nes_proto::{verify_answer, KeyAnswer, PublicKey, Username, UsernameRule};
use std::time::Duration;

/// A verified answer and the bytes it came in (kept in the key cache as evidence).
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The verified content.
    pub answer: KeyAnswer,
    /// The parsed `public_key_message`.
    pub message_key: PublicKey,
    /// The parsed `public_key_sign`.
    pub sign_key: PublicKey,
    /// The answer body as received.
    pub body: Vec<u8>,
}

/// Why keys could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The key server does not know the user (or it is not activated).
    #[error("the key server does not know {0}")]
    NotFound(String),
    /// The key server cannot be reached or failed.
    #[error("the key server is unavailable: {0}")]
    Unavailable(String),
    /// The answer is not a valid signed answer about that user.
    #[error("the key server's answer was refused: {0}")]
    BadAnswer(String),
    /// 429: the key server asks us to slow down, for `Retry-After` when it said.
    #[error("the key server is rate limiting lookups")]
    RateLimited(Option<Duration>),
}

/// Longest `Retry-After` honoured: a key server asking for more is asked again after this
/// (a lying or broken value must not stop every lookup for a day).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Somewhere keys come from: the key server, or a fake in tests.
pub trait KeySource: Send + Sync {
    /// Fetches and verifies `user`'s keys.
    fn fetch<'a>(&'a self, user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>>;
}

/// Why a registration failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// 409: the name is taken.
    #[error("the name {0} is already registered at the key server")]
    Taken(String),
    /// 400: the key server refused the input.
    #[error("the key server refused the registration: {0}")]
    Refused(String),
    /// The key server cannot be reached or failed.
    #[error("the key server is unavailable: {0}")]
    Unavailable(String),
}

/// Why publishing our signed prekey failed (the publisher retries with backoff).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// 404: the key server has no active user of that name (the activation link has not
    /// been followed yet, or the account is not registered).
    #[error("the key server has no active account {0} yet (follow the activation link sent by mail, or `nes register`)")]
    NoUser(String),
    /// 400/403/409 and other refusals, with the server's message.
    #[error("the key server refused the prekey: {0}")]
    Refused(String),
    /// Unreachable or failing (also a 404/405 of a server without the endpoint).
    #[error("the key server is unavailable: {0}")]
    Unavailable(String),
    /// 429, with `Retry-After` when given.
    #[error("the key server is rate limiting")]
    RateLimited(Option<Duration>),
}

/// Largest signed prekey document read back from `GET /users/<name>/prekey`.
pub const MAX_PREKEY_BYTES: usize = nes_proto::v3::MAX_DOCUMENT_BYTES;

/// The HTTP client of one key server.
#[derive(Clone)]
pub struct KeyServer {
    http: reqwest::Client,
    base: String,
    server_key: PublicKey,
    rule: UsernameRule,
}

impl KeyServer {
    /// A client for the key server at `base` (no trailing slash) whose answers are signed
    /// with `server_key`. `legacy` accepts answers without `username` (original servers).
    pub fn new(base: &str, server_key: PublicKey, legacy: bool) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("nesd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(KeyServer {
            http,
            base: base.trim_end_matches('/').to_owned(),
            server_key,
            rule: if legacy {
                UsernameRule::IfPresent
            } else {
                UsernameRule::Require
            },
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /users/<user>`, verified.
    pub async fn fetch_keys(&self, user: &Username) -> Result<Fetched, FetchError> {
        let url = format!("{}/users/{}", self.base, user);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(short(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::NotFound(user.to_string()));
        }
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            return Err(FetchError::RateLimited(after));
        }
        if !status.is_success() {
            return Err(FetchError::Unavailable(format!(
                "GET /users/{user} answered {status}"
            )));
        }
        let body = read_capped(response, MAX_ANSWER_BYTES).await?;
        let answer = verify_answer(&body, &self.server_key, user, self.rule)
            .map_err(|e| FetchError::BadAnswer(e.to_string()))?;
        let message_key = answer
            .message_key()
            .map_err(|e| FetchError::BadAnswer(format!("public_key_message: {e}")))?;
        let sign_key = answer
            .sign_key()
            .map_err(|e| FetchError::BadAnswer(format!("public_key_sign: {e}")))?;
        Ok(Fetched {
            answer,
            message_key,
            sign_key,
            body,
        })
    }

    /// `POST /users`: registers `user` with these public keys; the server mails an
    /// activation link to `email`. Returns a line for the user.
    pub async fn register(
        &self,
        user: &Username,
        email: &str,
        public_key_message: &str,
        public_key_sign: &str,
    ) -> Result<String, RegisterError> {
        let url = format!("{}/users", self.base);
        // The one definition of the body (nes_proto::registration), checked here by the
        // same rules the key server applies, so a bad address is refused before any request.
        let body = Registration {
            username: user.clone(),
            email: email.to_owned(),
            public_key_message: public_key_message.to_owned(),
            public_key_sign: public_key_sign.to_owned(),
        }
        .to_json();
        Registration::parse(&body).map_err(|e| RegisterError::Refused(e.to_string()))?;
        let response = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| RegisterError::Unavailable(short(&e)))?;
        let status = response.status();
        let text = match read_capped(response, 16 * 1024).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        };
        match status.as_u16() {
            200..=299 => Ok(format!(
                "registered {user}; the key server mailed an activation link to {email}: follow it to publish the keys"
            )),
            409 => Err(RegisterError::Taken(user.to_string())),
            400..=499 => Err(RegisterError::Refused(server_message(&text, status))),
            _ => Err(RegisterError::Unavailable(server_message(&text, status))),
        }
    }
}

impl KeyServer {
    /// `PUT /users/<user>/prekey` with our signed prekey document.
    pub async fn put_prekey(&self, user: &Username, signed: &[u8]) -> Result<(), PublishError> {
        let url = format!("{}/users/{}/prekey", self.base, user);
        let response = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(signed.to_vec())
            .send()
            .await
            .map_err(|e| PublishError::Unavailable(short(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(PublishError::RateLimited(retry_after(&response)));
        }
        let text = match read_capped(response, 16 * 1024).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        };
        match status.as_u16() {
            200..=299 => Ok(()),
            404 if text.contains("user") || text.is_empty() => {
                Err(PublishError::NoUser(user.to_string()))
            }
            404 | 405 => Err(PublishError::Unavailable(format!(
                "{} (a key server without v3 prekeys?)",
                server_message(&text, status)
            ))),
            400..=499 => Err(PublishError::Refused(server_message(&text, status))),
            _ => Err(PublishError::Unavailable(server_message(&text, status))),
        }
    }

    /// `GET /users/<user>/prekey`: the signed prekey document as stored, `None` when the
    /// server has none (404; also 405, an original server without the endpoint). Not
    /// verified here: the caller checks it with the contact's pinned sign key.
    pub async fn fetch_prekey(&self, user: &Username) -> Result<Option<Vec<u8>>, FetchError> {
        let url = format!("{}/users/{}/prekey", self.base, user);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(short(&e)))?;
        let status = response.status();
        match status.as_u16() {
            404 | 405 => Ok(None),
            429 => Err(FetchError::RateLimited(retry_after(&response))),
            200 => Ok(Some(read_capped(response, MAX_PREKEY_BYTES).await?)),
            _ => Err(FetchError::Unavailable(format!(
                "GET /users/{user}/prekey answered {status}"
            ))),
        }
    }
}

/// A 429's `Retry-After` in seconds, capped at [`MAX_RETRY_AFTER`].
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

impl KeySource for KeyServer {
    fn fetch<'a>(&'a self, user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        Box::pin(self.fetch_keys(user))
    }
}

/// Reads a body of at most `cap` bytes.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, FetchError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(FetchError::BadAnswer(format!(
            "answer larger than {cap} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| FetchError::Unavailable(short(&e)))?
    {
        if body.len() + chunk.len() > cap {
            return Err(FetchError::BadAnswer(format!(
                "answer larger than {cap} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A one-line description of a reqwest error with its cause.
fn short(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.replace('\n', " ")
}

/// The server's error message: `{"error": ".."}` or the first line of the body.
fn server_message(body: &str, status: reqwest::StatusCode) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .or_else(|| v.get("message"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    let text = from_json.unwrap_or_else(|| body.lines().next().unwrap_or("").to_owned());
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {text}")
    }
}
