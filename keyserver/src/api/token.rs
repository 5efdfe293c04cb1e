//! `GET /users/{username}/{token}`: the links in the activation mail.
//!
//! | token | user | answer |
//! |---|---|---|
//! | activation | pending, in time | 200 `{"username","status":"activated"}`: the answer is signed and stored |
//! | activation | pending, expired | 410 `token_expired` (until the cleanup task removes the row; then 404) |
//! | delete | active | 200 `{"username","status":"deleted"}` |
//! | anything else | | 404 `not_found` |
//! | | | 429 `rate_limited` (the lookup limit, with `Retry-After`) |
//!
//! The presented token is hashed and compared with the stored hash in constant time
//! ([`crate::tokens::TokenHash::matches`]). The store's update is conditional on the
//! state read here, so two clicks racing each other do one thing once.

use super::{reply, ApiError, AppState, ClientIp};
use crate::ratelimit::Limit;
use crate::store::UserState;
use crate::tokens::TokenHash;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nes_proto::{build_answer, Username};

/// The handler of `GET /users/{username}/{token}`.
pub async fn token(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let result = handle(&state, client, path).await;
    reply(&state, result)
}

async fn handle(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    state
        .limits
        .check(Limit::Lookup, client)
        .map_err(ApiError::rate_limited)?;
    let no_such = || ApiError::not_found("no such user or token");
    let Ok(Path((name, token))) = path else {
        return Err(no_such());
    };
    let username = Username::parse(&name).map_err(|_| no_such())?;
    let presented = TokenHash::of(&token);
    let user = state
        .store
        .user(&username)
        .await
        .map_err(|e| ApiError::internal("user read failed in the store", &e))?;
    match user {
        None => Err(no_such()),
        Some(UserState::Pending {
            activation_hash,
            expires_ms,
            public_key_message,
            public_key_sign,
        }) => {
            if !presented.matches(&activation_hash) {
                return Err(no_such());
            }
            let now = crate::now_ms();
            if now >= expires_ms {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "token_expired",
                    format!("the activation link of {username} has expired; register again"),
                ));
            }
            // The one RSA private operation of the server, off the async workers.
            let key = state.key.clone();
            let name = username.clone();
            let answer = tokio::task::spawn_blocking(move || {
                build_answer(&key, &name, &public_key_message, &public_key_sign)
            })
            .await
            .map_err(|e| ApiError::internal("signing task failed", &e))?
            .map_err(|e| ApiError::internal("signing the answer failed", &e))?;
            let activated = state
                .store
                .activate(&username, &activation_hash, &answer, now)
                .await
                .map_err(|e| ApiError::internal("activation failed in the store", &e))?;
            if !activated {
                return Err(no_such());
            }
            state.cache.remove(username.as_str());
            state.metrics.activated();
            tracing::info!(%username, "activated");
            Ok(done(&username, "activated"))
        }
        Some(UserState::Active { delete_hash }) => {
            if !presented.matches(&delete_hash) {
                return Err(no_such());
            }
            let deleted = state
                .store
                .delete(&username, &delete_hash)
                .await
                .map_err(|e| ApiError::internal("deletion failed in the store", &e))?;
            if !deleted {
                return Err(no_such());
            }
            state.cache.remove(username.as_str());
            state.metrics.deleted();
            tracing::info!(%username, "deleted");
            Ok(done(&username, "deleted"))
        }
    }
}

fn done(username: &Username, status: &str) -> Response {
    (
        StatusCode::OK,
        Json(serde_json::json!({ "username": username.as_str(), "status": status })),
    )
        .into_response()
}
