//! `GET /users/{username}`: an active user's keys, as the signed answer stored at
//! activation.
//!
//! | answer | when |
//! |---|---|
//! | 200 `{"response":{"username","public_key_message","public_key_sign"},"signature"}` | active |
//! | 404 `not_found` | unknown, pending, or not a valid name |
//! | 429 `rate_limited` | per-IP limit (with `Retry-After`) |
//!
//! The hot path of the server: cache, else one indexed read; never RSA, never JSON
//! encoding. The body is served byte for byte as signed (clients verify the signature
//! over the raw bytes of `"response"`).

use super::{reply, ApiError, AppState, ClientIp};
use crate::ratelimit::Limit;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use nes_proto::Username;

/// The handler of `GET /users/{username}`.
pub async fn lookup(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let result = handle(&state, client, path).await;
    reply(&state, result)
}

async fn handle(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    state
        .limits
        .check(Limit::Lookup, client)
        .map_err(ApiError::rate_limited)?;
    let name = path.ok().and_then(|Path(name)| Username::parse(&name).ok());
    let Some(name) = name else {
        state.metrics.lookup_not_found();
        return Err(ApiError::not_found("no such user"));
    };
    if let Some(answer) = state.cache.get(name.as_str()) {
        state.metrics.lookup_found(true);
        return Ok(answer_response(answer));
    }
    let stored = state
        .store
        .answer(name.as_str())
        .await
        .map_err(|e| ApiError::internal("lookup failed in the store", &e))?;
    match stored {
        Some(answer) => {
            let answer = Bytes::from(answer);
            state.cache.put(name.as_str(), answer.clone());
            state.metrics.lookup_found(false);
            Ok(answer_response(answer))
        }
        None => {
            state.metrics.lookup_not_found();
            Err(ApiError::not_found(format!(
                "no such user: {name} (unknown or not activated)"
            )))
        }
    }
}

/// A 200 with the stored answer bytes, `Content-Type: application/json` as the original.
pub fn answer_response(answer: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        answer,
    )
        .into_response()
}
