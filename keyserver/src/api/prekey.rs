//! `PUT /users/{username}/prekey` and `GET /users/{username}/prekey`: each active user's
//! newest signed v3 prekey (docs/PROTOCOL.md "Key server API").
//!
//! The body of a PUT is a signed prekey,
//! `{"prekey":{"username","id","created","expires","x25519","mlkem768"},"signature"}`,
//! whose `signature` is RSA-PSS-SHA-256 (salt 32) with the user's registered **sign** key
//! over the exact bytes of the `"prekey"` value as they stand in the body
//! ([`nes_proto::v3::SignedPrekey`] parses and verifies it). The server stores the body
//! verbatim and a GET answers exactly those bytes: clients verify them with the sign key
//! they pinned, so the key server vouches for nothing here and cannot forge a prekey.
//!
//! | request | answer | when |
//! |---|---|---|
//! | PUT | 204 | stored; or the very same bytes were already stored (a retry) |
//! | PUT | 400 `invalid_prekey` | not a signed prekey (JSON, fields, base64, lengths) |
//! | PUT | 400 `wrong_username` | `prekey.username` is not the name in the path |
//! | PUT | 400 `prekey_expired` | `expires <= now` |
//! | PUT | 400 `invalid_lifetime` | `expires <= created`, `expires - created` over 30 days, or `created` more than 5 minutes ahead of the server's clock |
//! | PUT | 403 `bad_signature` | the signature does not verify under the user's registered sign key |
//! | PUT | 404 `not_found` | no active user of that name |
//! | PUT | 408 `body_timeout`, 413 `body_too_large` | the body is slow, or over 16 KiB |
//! | PUT | 409 `prekey_outdated` | the stored prekey is newer (later `created`), or as new with other bytes |
//! | PUT | 429 `rate_limited` | `--prekey-rate` per client per minute (with `Retry-After`) |
//! | GET | 200 | the stored bytes, `Content-Type: application/json` |
//! | GET | 404 `not_found` | no active user, no prekey, or the stored one has expired |
//! | GET | 429 `rate_limited` | the lookup limit (with `Retry-After`) |
//!
//! Checks that need only the body (shape, name, times) come first and answer 400; then
//! the user's sign key is read (404) and the signature checked (403), one RSA public
//! operation; then the store keeps the upload if it is newer (409 otherwise), in one
//! conditional statement, so concurrent uploads end with the newest whatever their order.

use super::register::read_body_capped;
use super::{reply, ApiError, AppState, ClientIp};
use crate::ratelimit::Limit;
use crate::store::{NewPrekey, PrekeyOutcome};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nes_proto::v3::{SignedPrekey, V3Error};
use nes_proto::{PublicKey, Username};

/// Largest PUT body accepted: a signed prekey is about 2.5 KB with a 4096-bit sign key.
pub const MAX_PREKEY_BODY: usize = 16 * 1024;
/// Longest lifetime (`expires - created`) accepted: 30 days.
pub const MAX_LIFETIME_MS: i64 = 30 * 24 * 3600 * 1000;
/// How far ahead of the server's clock `created` may be (clock skew).
pub const MAX_CREATED_AHEAD_MS: i64 = 5 * 60 * 1000;

/// The handler of `PUT /users/{username}/prekey`.
pub async fn put(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = handle_put(&state, client, path, &headers, body).await;
    reply(&state, result)
}

/// The handler of `GET /users/{username}/prekey`.
pub async fn get(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let result = handle_get(&state, client, path).await;
    reply(&state, result)
}

fn no_user(name: &str) -> ApiError {
    ApiError::not_found(format!("no such user: {name} (unknown or not activated)"))
}

fn path_user(path: Result<Path<String>, PathRejection>) -> Result<Username, ApiError> {
    path.ok()
        .and_then(|Path(name)| Username::parse(&name).ok())
        .ok_or_else(|| ApiError::not_found("no such user"))
}

async fn handle_put(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state
        .limits
        .check(Limit::Prekey, client)
        .map_err(ApiError::rate_limited)?;
    let username = path_user(path)?;
    let body = read_body_capped(headers, body, MAX_PREKEY_BODY).await?;
    let now = crate::now_ms();
    let signed = check_document(&body, &username, now)?;
    let sign_key = state
        .store
        .active_sign_key(&username)
        .await
        .map_err(|e| ApiError::internal("sign key read failed in the store", &e))?
        .ok_or_else(|| no_user(username.as_str()))?;
    // Registration checked the PEM; failing here means the row was damaged.
    let sign_key = PublicKey::from_pem(&sign_key)
        .map_err(|e| ApiError::internal("a registered sign key does not parse", &e))?;
    signed.verify(&sign_key).map_err(|e| match e {
        V3Error::Signature { .. } => ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_signature",
            format!(
                "the prekey's signature does not verify under the sign key {username} registered"
            ),
        ),
        other => ApiError::bad_request("invalid_prekey", other.to_string()),
    })?;
    let prekey = signed.prekey();
    let outcome = state
        .store
        .put_prekey(&NewPrekey {
            username: &username,
            created_ms: prekey.created,
            expires_ms: prekey.expires,
            body: &body,
            now_ms: now,
        })
        .await
        .map_err(|e| ApiError::internal("prekey upload failed in the store", &e))?;
    match outcome {
        PrekeyOutcome::Stored => {
            state.metrics.prekey_uploaded(true);
            tracing::info!(%username, expires = prekey.expires, "prekey stored");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        PrekeyOutcome::Unchanged => {
            state.metrics.prekey_uploaded(false);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        PrekeyOutcome::Outdated { stored_created_ms } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "prekey_outdated",
            format!(
                "the stored prekey of {username} is newer or as new (created {stored_created_ms} Unix ms, \
                 this one {}); upload a newer one",
                prekey.created
            ),
        )),
        PrekeyOutcome::NoUser => Err(no_user(username.as_str())),
    }
}

/// Parses `body` as a signed prekey of `username` and checks its times at `now`; the
/// signature is left to the caller (it needs the store).
pub fn check_document(
    body: &[u8],
    username: &Username,
    now: i64,
) -> Result<SignedPrekey, ApiError> {
    let signed = SignedPrekey::parse(body).map_err(|e| {
        ApiError::bad_request("invalid_prekey", format!("not a signed prekey: {e}"))
    })?;
    let prekey = signed.prekey();
    if !prekey
        .username
        .as_str()
        .eq_ignore_ascii_case(username.as_str())
    {
        return Err(ApiError::bad_request(
            "wrong_username",
            format!(
                "the prekey is {}'s, not {username}'s",
                prekey.username.as_str()
            ),
        ));
    }
    let (created, expires) = (prekey.created, prekey.expires);
    if expires <= now {
        return Err(ApiError::bad_request(
            "prekey_expired",
            format!("the prekey expired at {expires} (Unix ms); it is {now} now"),
        ));
    }
    if expires <= created
        || expires.saturating_sub(created) > MAX_LIFETIME_MS
        || created > now.saturating_add(MAX_CREATED_AHEAD_MS)
    {
        return Err(ApiError::bad_request(
            "invalid_lifetime",
            format!(
                "created {created} to expires {expires} (Unix ms): a prekey must expire after it is \
                 created, live at most 30 days, and be created at most 5 minutes ahead of {now}"
            ),
        ));
    }
    Ok(signed)
}

async fn handle_get(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    state
        .limits
        .check(Limit::Lookup, client)
        .map_err(ApiError::rate_limited)?;
    let username = path_user(path)?;
    let stored = state
        .store
        .prekey(&username, crate::now_ms())
        .await
        .map_err(|e| ApiError::internal("prekey read failed in the store", &e))?;
    state.metrics.prekey_lookup(stored.is_some());
    match stored {
        Some(body) => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Bytes::from(body),
        )
            .into_response()),
        None => Err(ApiError::not_found(format!(
            "no prekey for {username} (unknown or inactive user, none uploaded, or expired)"
        ))),
    }
}
