//! The OpenAPI 3 description of the API, served at `GET /openapi.json`.
//!
//! Hand-written (`openapi.json` beside this file) so it documents the wire as it is,
//! including every error body, `Retry-After` and the body caps (64 KiB, 16 KiB for prekeys); the integration
//! tests check that each status the server answers is documented for its route.

/// The document.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_openapi_3_json_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/users",
            "/users/{username}",
            "/users/{username}/{token}",
            "/users/{username}/prekey",
            "/healthz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        for reason in crate::metrics::REJECTION_REASONS {
            let codes = &doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"];
            assert!(
                codes.as_array().unwrap().iter().any(|c| c == reason),
                "{reason} not in Error.error enum"
            );
        }
    }
}
