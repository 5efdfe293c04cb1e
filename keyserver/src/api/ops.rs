//! Operations: `GET /healthz` (200 when the database answers, else 503),
//! `GET /metrics` (Prometheus / OpenMetrics text), `GET /openapi.json`.

use super::{reply, ApiError, AppState};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::Duration;

/// How long the health check waits for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /healthz`.
pub async fn healthz(State(state): State<AppState>) -> Response {
    let result = match tokio::time::timeout(HEALTH_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(
            serde_json::json!({ "status": "ok", "database": state.store.backend() }),
        )
        .into_response()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: the database failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database does not answer",
            ))
        }
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database does not answer in time",
        )),
    };
    reply(&state, result)
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        crate::openapi::OPENAPI_JSON,
    )
        .into_response()
}
