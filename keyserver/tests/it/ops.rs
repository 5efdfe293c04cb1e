//! Operations: /healthz, /metrics, /openapi.json, and that the OpenAPI document
//! describes what the server really answers.

use crate::common::*;
use serde_json::Value;

crate::on_both_backends!(health_and_metrics, every_answer_is_documented_in_openapi);

async fn health_and_metrics(backend: Backend) {
    let server = Server::start(backend).await;
    let r = server.get("/healthz").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let expected = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!(
        body,
        serde_json::json!({"status": "ok", "database": expected})
    );

    server.register_and_activate("amy").await;
    server.lookup_verified("amy").await;
    server.lookup_verified("amy").await;
    assert_eq!(server.get("/users/nobody").await.status(), 404);
    assert_eq!(server.post_users("{").await.status(), 400);

    let r = server.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    for (series, value) in [
        ("nes_keyserver_registrations_total", 1.0),
        ("nes_keyserver_activations_total", 1.0),
        ("nes_keyserver_deletions_total", 0.0),
        ("nes_keyserver_lookups_total{result=\"found\"}", 2.0),
        ("nes_keyserver_lookups_total{result=\"not_found\"}", 1.0),
        (
            "nes_keyserver_rejections_total{reason=\"invalid_json\"}",
            1.0,
        ),
        ("nes_keyserver_rejections_total{reason=\"not_found\"}", 1.0),
        ("nes_keyserver_mails_total{result=\"sent\"}", 1.0),
    ] {
        assert_eq!(server.metric(series).await, value, "{series} in\n{text}");
    }
    assert!(
        text.contains("# TYPE nes_keyserver_lookups counter"),
        "{text}"
    );
    // The second lookup came from the cache.
    assert!(server.metric("nes_keyserver_answer_cache_hits_total").await >= 1.0);
}

/// Follows a local `$ref`.
pub(crate) fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut at = doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            resolve(doc, at)
        }
        None => v,
    }
}

/// Checks a JSON value against a schema: types, required properties and enums, into
/// properties and one level of items (enough for this API's flat documents).
pub(crate) fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "array" => value.is_array(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            return Err(format!("{at}: {value} is not {ty}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} not in {options:?}"));
        }
    }
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap_or_default();
        if value.get(name).is_none() {
            return Err(format!("{at}: required {name} missing in {value}"));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            if let Some(v) = value.get(name) {
                conforms(doc, sub, v, &format!("{at}.{name}"))?;
            }
        }
    }
    Ok(())
}

async fn every_answer_is_documented_in_openapi(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&[
        "--register-rate",
        "3",
        "--pending-ttl",
        "2s",
        "--cleanup-interval",
        "1h",
    ]))
    .await;
    let r = server.get("/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    let (m, s) = alice_keys();
    let mut observed: Vec<(&str, &str, reqwest::Response)> = Vec::new();
    observed.push((
        "post",
        "/users",
        server
            .post_users(registration("beth", "beth@example.org", &m, &s))
            .await,
    ));
    observed.push((
        "post",
        "/users",
        server
            .post_users(registration("beth", "beth@example.org", &m, &s))
            .await,
    ));
    observed.push((
        "post",
        "/users",
        server.post_users(vec![b'x'; 70_000]).await,
    ));
    observed.push(("post", "/users", server.post_users("nope").await)); // 429 by now (3 per minute)
    let links = server.links("beth");
    observed.push(("get", "/users/{username}", server.get("/users/beth").await));
    observed.push((
        "get",
        "/users/{username}/{token}",
        server.follow(&links.activate).await,
    ));
    observed.push(("get", "/users/{username}", server.get("/users/beth").await));
    observed.push((
        "get",
        "/users/{username}/{token}",
        server.get("/users/beth/nope").await,
    ));
    observed.push(("get", "/healthz", server.get("/healthz").await));
    observed.push(("get", "/metrics", server.get("/metrics").await));
    observed.push((
        "get",
        "/users/{username}/{token}",
        server.follow(&links.delete).await,
    ));
    observed.push((
        "post",
        "/users/{username}/{token}",
        server.confirm_delete(&links.delete).await,
    ));
    observed.push((
        "post",
        "/users/{username}/{token}",
        server.confirm_delete(&links.delete).await,
    ));

    let mut statuses = Vec::new();
    for (method, path, response) in observed {
        let status = response.status().as_u16().to_string();
        statuses.push(status.clone());
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let has_retry_after = response.headers().contains_key("retry-after");
        let body = response.bytes().await.unwrap();
        let documented = &doc["paths"][path][method]["responses"][&status];
        assert!(
            !documented.is_null(),
            "{method} {path} answered {status}, which openapi.json does not document"
        );
        let documented = resolve(&doc, documented);
        if documented.pointer("/headers/Retry-After").is_some() {
            assert!(
                has_retry_after,
                "{method} {path} {status}: Retry-After documented but absent"
            );
        }
        let content_type = content_type.expect("a content type");
        let media = content_type.split(';').next().unwrap().trim();
        let schema = &documented["content"][media]["schema"];
        assert!(
            !schema.is_null(),
            "{method} {path} {status}: {media} not documented"
        );
        if media == "application/json" {
            let value: Value = serde_json::from_slice(&body).expect("JSON");
            conforms(&doc, schema, &value, &format!("{method} {path} {status}")).unwrap();
        }
    }
    // The set covered the interesting codes.
    for code in ["201", "409", "413", "429", "404", "200"] {
        assert!(
            statuses.iter().any(|s| s == code),
            "{code} not exercised: {statuses:?}"
        );
    }

    // 410 and 400 too.
    let server = Server::start_with(Options::new(backend).args(&[
        "--pending-ttl",
        "1s",
        "--cleanup-interval",
        "1h",
    ]))
    .await;
    server.register("cody").await;
    let links = server.links("cody");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for (method, path, response) in [
        (
            "get",
            "/users/{username}/{token}",
            server.follow(&links.activate).await,
        ),
        ("post", "/users", server.post_users("{}").await),
    ] {
        let status = response.status().as_u16().to_string();
        assert!(["410", "400"].contains(&status.as_str()));
        let documented = resolve(&doc, &doc["paths"][path][method]["responses"][&status]);
        let value: Value = response.json().await.unwrap();
        conforms(
            &doc,
            &documented["content"]["application/json"]["schema"],
            &value,
            path,
        )
        .unwrap();
    }
}
