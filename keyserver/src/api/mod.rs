//! The HTTP API (the original PubKey service's, plus operations):
//!
//! | route | module |
//! |---|---|
//! | `POST /users` | [`register`] |
//! | `GET /users/{username}` | [`lookup`] |
//! | `GET`, `POST /users/{username}/{token}` | [`token`] |
//! | `PUT`, `GET /users/{username}/prekey` | [`prekey`] (v3) |
//! | `GET /healthz`, `GET /metrics`, `GET /openapi.json` | [`ops`] |
//!
//! Handlers return `Result<Response, ApiError>` internally; [`reply`] turns an error
//! into its JSON body and counts it in `/metrics`, so every refusal is both answered
//! and counted in one place.

pub mod lookup;
pub mod ops;
pub mod prekey;
pub mod register;
pub mod token;

use crate::cache::AnswerCache;
use crate::mail::Mailer;
use crate::metrics::Metrics;
use crate::ratelimit::{retry_after_secs, Limits};
use crate::store::Store;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nes_proto::PrivateKey;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tower_http::trace::TraceLayer;

/// Everything a handler needs, shared by all requests.
#[derive(Debug)]
pub struct Shared {
    /// The database.
    pub store: Store,
    /// The server's signing key (used once per activation).
    pub key: Arc<PrivateKey>,
    /// Sends activation mail.
    pub mailer: Mailer,
    /// Signed answers in memory.
    pub cache: AnswerCache,
    /// Per-IP limits.
    pub limits: Limits,
    /// Counters.
    pub metrics: Metrics,
    /// Base of every link, no trailing `/`.
    pub public_url: String,
    /// Lifetime of a pending registration.
    pub pending_ttl: Duration,
    /// Pending registrations per e-mail address (0 = no cap).
    pub max_pending_per_email: u32,
    /// Take the client address from X-Forwarded-For.
    pub behind_proxy: bool,
}

/// The router's state.
pub type AppState = Arc<Shared>;

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users", post(register::register))
        .route("/users/{username}", get(lookup::lookup))
        .route(
            "/users/{username}/{token}",
            get(token::token).post(token::delete),
        )
        // A literal segment wins over `{token}` (tokens are 43 characters, never "prekey").
        .route(
            "/users/{username}/prekey",
            get(prekey::get).put(prekey::put),
        )
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Spans and request logs at DEBUG: `RUST_LOG=tower_http=debug` shows each request.
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A refused request: status, a stable machine-readable `error` code and a sentence for
/// humans (`reason`), answered as `{"error": .., "reason": ..}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// A refusal with `status`, `code` and `reason`.
    pub fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, reason)
    }

    /// 404 `not_found`.
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", reason)
    }

    /// 429 `rate_limited`, come back after `wait`.
    pub fn rate_limited(wait: Duration) -> Self {
        let secs = retry_after_secs(wait);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from this address; retry in {secs} s"),
        )
        .retry_after(secs)
    }

    /// 500 `internal`: logged in full, answered without detail.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; try again later",
        )
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `error` code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "reason": self.reason });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Answers `result`, counting a refusal in the metrics.
pub fn reply(state: &Shared, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => {
            state.metrics.rejected(error.code);
            error.into_response()
        }
    }
}

/// The client's address: the TCP peer, or with `--behind-proxy` the last address in
/// X-Forwarded-For (the one our proxy added; earlier ones are the client's to invent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.behind_proxy {
            if let Some(ip) = forwarded_for(&parts.headers) {
                return Ok(Self(ip));
            }
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
        Ok(Self(peer))
    }
}

fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

/// Answers an unknown route.
async fn not_found(State(state): State<AppState>, uri: Uri) -> Response {
    let path: String = uri.path().chars().take(100).collect();
    reply(
        &state,
        Err(ApiError::not_found(format!(
            "no such resource: {path}; see /openapi.json"
        ))),
    )
}

/// Answers a known route with the wrong method.
async fn method_not_allowed(State(state): State<AppState>, method: Method) -> Response {
    reply(
        &state,
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed here; see /openapi.json"),
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_takes_the_last_hop() {
        let mut headers = HeaderMap::new();
        assert_eq!(forwarded_for(&headers), None);
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 198.51.100.2"),
        );
        assert_eq!(
            forwarded_for(&headers),
            Some("198.51.100.2".parse().unwrap())
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(forwarded_for(&headers), None);
    }

    #[test]
    fn errors_have_a_json_body_and_retry_after() {
        let response = ApiError::rate_limited(Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
