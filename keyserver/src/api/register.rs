//! `POST /users`: register a username with two public keys and an e-mail address.
//!
//! Request (exactly what original clients send; unknown fields are ignored):
//! `{"username": .., "email": .., "public_key_message": "<PEM>", "public_key_sign": "<PEM>"}`
//!
//! | answer | when |
//! |---|---|
//! | 201 `{"username", "public_key_message", "public_key_sign"}` | pending; mail sent |
//! | 400 `invalid_json`, `invalid_username`, `invalid_email`, `invalid_key`, `same_keys` | bad input |
//! | 408 `body_timeout` | the body did not arrive in time |
//! | 409 `username_taken` | an active user or a live pending registration has the name |
//! | 413 `body_too_large` | body over 64 KiB |
//! | 429 `rate_limited`, `too_many_pending` | per-IP limit; per-address cap (with `Retry-After`) |
//! | 503 `mail_failed` | the activation mail could not be sent (nothing is kept) |

use super::{reply, ApiError, AppState, ClientIp};
use crate::mail::ActivationMail;
use crate::ratelimit::Limit;
use crate::store::{NewUser, RegisterOutcome};
use crate::tokens::Token;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, Limited};
use nes_proto::registration::Registration;
use std::time::Duration;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long the body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a body over the cap is read and thrown away before answering 413.
const MAX_DRAIN: usize = 1024 * 1024;
/// How long that may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a request body into a checked [`Registration`] (see `nes_proto::registration`),
/// and checks too that lettre can send to the address.
pub fn parse_registration(body: &[u8]) -> Result<Registration, ApiError> {
    let registration =
        Registration::parse(body).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    if let Err(e) = registration.email.parse::<lettre::Address>() {
        return Err(ApiError::bad_request(
            "invalid_email",
            format!(
                "{:?} is not an address mail can be sent to: {e}",
                registration.email
            ),
        ));
    }
    Ok(registration)
}

/// The handler of `POST /users`.
pub async fn register(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = handle(&state, client, &headers, body).await;
    reply(&state, result)
}

async fn handle(
    state: &AppState,
    client: std::net::IpAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state
        .limits
        .check(Limit::Register, client)
        .map_err(ApiError::rate_limited)?;
    let bytes = read_body(headers, body).await?;
    let registration = parse_registration(&bytes)?;
    let token = |what| Token::generate().map_err(|e| ApiError::internal(what, &e));
    let activation = token("OS RNG failed for the activation token")?;
    let delete = token("OS RNG failed for the delete token")?;
    let (activation_hash, delete_hash) = (activation.hash(), delete.hash());
    let now = crate::now_ms();
    let ttl_ms = i64::try_from(state.pending_ttl.as_millis()).unwrap_or(i64::MAX);
    let email_key = registration.email.to_lowercase();
    let user = NewUser {
        username: &registration.username,
        email: &registration.email,
        email_key: &email_key,
        public_key_message: &registration.public_key_message,
        public_key_sign: &registration.public_key_sign,
        activation_hash: &activation_hash,
        delete_hash: &delete_hash,
        created_ms: now,
        expires_ms: now.saturating_add(ttl_ms),
    };
    let outcome = state
        .store
        .register(&user, state.max_pending_per_email)
        .await
        .map_err(|e| ApiError::internal("registration failed in the store", &e))?;
    match outcome {
        RegisterOutcome::Created => {}
        RegisterOutcome::NameTaken => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "username_taken",
                format!(
                    "the username {} is taken; choose another",
                    registration.username
                ),
            ))
        }
        RegisterOutcome::TooManyPending { first_expiry_ms } => {
            let wait_ms = u64::try_from(first_expiry_ms.saturating_sub(now)).unwrap_or(0);
            let secs = crate::ratelimit::retry_after_secs(Duration::from_millis(wait_ms));
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_pending",
                format!(
                    "this e-mail address has {} registrations waiting for activation: activate one, \
                     or retry in {secs} s when the oldest expires",
                    state.max_pending_per_email
                ),
            )
            .retry_after(secs));
        }
    }

    let api_url = format!("{}/users/{}", state.public_url, registration.username);
    let activate_url = format!("{api_url}/{}", activation.as_str());
    let delete_url = format!("{api_url}/{}", delete.as_str());
    let mail = ActivationMail {
        to: &registration.email,
        username: registration.username.as_str(),
        activate_url: &activate_url,
        delete_url: &delete_url,
        api_url: &api_url,
        ttl: state.pending_ttl,
    };
    if let Err(e) = state.mailer.send_activation(&mail).await {
        state.metrics.mail(false);
        tracing::warn!(username = %registration.username, error = %e, "activation mail failed; registration dropped");
        if let Err(e) = state
            .store
            .unregister(&registration.username, &activation_hash)
            .await
        {
            tracing::error!(username = %registration.username, error = %e, "cannot drop the registration");
        }
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "mail_failed",
            "the activation mail could not be sent; nothing was registered, try again later",
        ));
    }
    state.metrics.mail(true);
    state.metrics.registered();
    tracing::info!(username = %registration.username, "registered; activation mail sent");
    let echo = serde_json::json!({
        "username": registration.username.as_str(),
        "public_key_message": registration.public_key_message,
        "public_key_sign": registration.public_key_sign,
    });
    Ok((StatusCode::CREATED, Json(echo)).into_response())
}

/// Reads the body, at most [`MAX_BODY`] bytes, within [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    read_body_capped(headers, body, MAX_BODY).await
}

/// Reads the body, at most `max` bytes, within [`BODY_TIMEOUT`].
///
/// A body over the cap is answered 413, but first read on (and thrown away) up to
/// [`MAX_DRAIN`]: a server that answers and closes while the client is still sending
/// makes the client see a reset instead of the 413. Beyond that, we close anyway.
pub(crate) async fn read_body_capped(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        if declared.is_some_and(|len| len <= MAX_DRAIN as u64) {
            drain(body).await;
        }
        return Err(too_large());
    }
    let mut body = body;
    let mut collected: Vec<u8> = Vec::new();
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if collected.len() + data.len() > max {
                    return Ok(false);
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok::<bool, axum::Error>(true)
    })
    .await;
    match read {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(ApiError::bad_request(
            "invalid_json",
            format!("the request body could not be read: {e}"),
        )),
        Ok(Ok(false)) => {
            drain(body).await;
            Err(too_large())
        }
        Ok(Ok(true)) => Ok(Bytes::from(collected)),
    }
}

/// Reads and discards the rest of a body, at most [`MAX_DRAIN`] bytes, for at most a
/// few seconds.
async fn drain(body: Body) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, Limited::new(body, MAX_DRAIN).collect()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/tests/vectors/legacy-v1/keys"
    );

    fn body(email: &str) -> Vec<u8> {
        let key = |name| std::fs::read_to_string(format!("{VECTORS}/{name}")).unwrap();
        serde_json::to_vec(&serde_json::json!({
            "username": "Alice", "email": email,
            "public_key_message": key("alice-rsa-message.pub"),
            "public_key_sign": key("alice-rsa-sign.pub"),
        }))
        .unwrap()
    }

    #[test]
    fn refusals_keep_their_code_and_answer_400() {
        let ok = parse_registration(&body("alice@example.org")).unwrap();
        assert_eq!(ok.username.as_str(), "alice");
        let e = parse_registration(&body("alice@localhost")).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (400, "invalid_email"));
        let e = parse_registration(b"{}").unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (400, "invalid_json"));
    }
}
