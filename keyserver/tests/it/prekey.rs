//! v3 prekeys: `PUT` and `GET /users/<name>/prekey` (docs/PROTOCOL.md "Key server API"),
//! every answer of both, on SQLite and on PostgreSQL.
//!
//! The signed prekeys are built here by hand, independently of `nes_proto::v3`: the
//! `"prekey"` object's bytes, signed RSA-PSS-SHA-256 (salt 32) with the vectors' sign key
//! of alice, which every test user registers with (`Server::register`).

use crate::common::*;
use nes_proto::{b64, PrivateKey};

crate::on_both_backends!(
    put_then_get_returns_the_exact_bytes,
    newest_is_kept_and_older_is_409,
    malformed_and_out_of_time_prekeys_are_400,
    signatures_by_other_keys_are_403,
    unknown_and_pending_users_are_404,
    deleting_the_user_deletes_its_prekey,
    body_cap_is_413,
    upload_rate_limit_is_429,
    fetches_count_against_the_lookup_limit,
    every_prekey_answer_is_documented_in_openapi,
);

const MINUTE: i64 = 60 * 1000;
const DAY: i64 = 24 * 60 * MINUTE;

/// Alice's RSA sign key from the vectors (the key every test user registers).
fn sign_key() -> PrivateKey {
    PrivateKey::from_pem(&vector_key("alice-rsa-sign")).expect("alice's sign key")
}

/// Alice's RSA message key: registered too, but not the one that signs prekeys.
fn message_key() -> PrivateKey {
    PrivateKey::from_pem(&vector_key("alice-rsa-message")).expect("alice's message key")
}

/// A `"prekey"` object as compact JSON in DESIGN's key order, random key bytes.
fn prekey_object(username: &str, created: i64, expires: i64) -> String {
    let id: [u8; 16] = rand::random();
    let x25519: [u8; 32] = rand::random();
    let mlkem768: Vec<u8> = (0..1184).map(|_| rand::random::<u8>()).collect();
    format!(
        "{{\"username\":\"{username}\",\"id\":\"{}\",\"created\":{created},\"expires\":{expires},\"x25519\":\"{}\",\"mlkem768\":\"{}\"}}",
        b64::encode(&id),
        b64::encode(&x25519),
        b64::encode(&mlkem768)
    )
}

/// `{"prekey":<object>,"signature":..}` with the signature by `key` over `object`.
fn sign_object(object: &str, key: &PrivateKey) -> Vec<u8> {
    let signature = key.sign_pss(object.as_bytes()).expect("sign");
    format!(
        "{{\"prekey\":{object},\"signature\":\"{}\"}}",
        b64::encode(&signature)
    )
    .into_bytes()
}

/// A valid signed prekey of `username`, created `created` with the usual 14-day life.
fn signed_prekey(username: &str, created: i64) -> Vec<u8> {
    sign_object(
        &prekey_object(username, created, created + 14 * DAY),
        &sign_key(),
    )
}

fn now() -> i64 {
    nes_proto::now_ms()
}

async fn put(server: &Server, name: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    server
        .http
        .put(server.url(&format!("/users/{name}/prekey")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("PUT prekey")
}

async fn get(server: &Server, name: &str) -> reqwest::Response {
    server.get(&format!("/users/{name}/prekey")).await
}

async fn assert_stored(server: &Server, name: &str, body: &[u8]) {
    let r = get(server, name).await;
    assert_eq!(r.status(), 200, "GET prekey of {name}");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.bytes().await.unwrap(), body, "served byte for byte");
}

async fn put_then_get_returns_the_exact_bytes(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("alice").await;
    assert_error(get(&server, "alice").await, 404, "not_found").await;

    // An odd but valid spelling: spaces outside the signed object, a trailing newline,
    // an unknown field. Stored and served as sent, not re-serialised.
    let object = prekey_object("alice", now(), now() + 14 * DAY);
    let signature = b64::encode(&sign_key().sign_pss(object.as_bytes()).unwrap());
    let body = format!(
        "{{ \"client\": \"test\",\n  \"prekey\" : {object},\n  \"signature\": \"{signature}\" }}\n"
    );
    let r = put(&server, "alice", body.clone()).await;
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    assert_stored(&server, "alice", body.as_bytes()).await;
    // The name is case-insensitive, as for lookups.
    assert_stored(&server, "ALICE", body.as_bytes()).await;
    // What a client then does with it: parse and verify with the pinned sign key.
    let fetched = get(&server, "alice").await.bytes().await.unwrap();
    let parsed = nes_proto::v3::SignedPrekey::parse(&fetched).expect("parses");
    parsed
        .verify(&nes_proto::PublicKey::from_pem(&alice_keys().1).unwrap())
        .expect("verifies under the registered sign key");

    // The same bytes again (a retry): 204, nothing changes.
    let r = put(&server, "alice", body.clone()).await;
    assert_eq!(r.status(), 204);
    assert_stored(&server, "alice", body.as_bytes()).await;

    // The signed user's answer is untouched by all this.
    server.lookup_verified("alice").await;
    assert_eq!(
        server
            .metric("nes_keyserver_prekey_uploads_total{result=\"stored\"}")
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric("nes_keyserver_prekey_uploads_total{result=\"unchanged\"}")
            .await,
        1.0
    );
    assert!(
        server
            .metric("nes_keyserver_prekey_lookups_total{result=\"found\"}")
            .await
            >= 3.0
    );
    assert_eq!(
        server
            .metric("nes_keyserver_prekey_lookups_total{result=\"not_found\"}")
            .await,
        1.0
    );
}

async fn newest_is_kept_and_older_is_409(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("bob").await;
    let t = now();
    let first = signed_prekey("bob", t - 2 * DAY);
    assert_eq!(put(&server, "bob", first.clone()).await.status(), 204);
    let newer = signed_prekey("bob", t - DAY);
    assert_eq!(put(&server, "bob", newer.clone()).await.status(), 204);
    assert_stored(&server, "bob", &newer).await;

    // The first one again: older than the stored one.
    let body = assert_error(put(&server, "bob", first).await, 409, "prekey_outdated").await;
    assert!(body["reason"].as_str().unwrap().contains("newer"), "{body}");
    // Another prekey created at the same millisecond as the stored one, other bytes.
    let twin = signed_prekey("bob", t - DAY);
    assert_ne!(twin, newer);
    assert_error(put(&server, "bob", twin).await, 409, "prekey_outdated").await;
    assert_stored(&server, "bob", &newer).await;

    // Newer again replaces it; only the newest is kept.
    let newest = signed_prekey("bob", t);
    assert_eq!(put(&server, "bob", newest.clone()).await.status(), 204);
    assert_stored(&server, "bob", &newest).await;
    assert_error(put(&server, "bob", newer).await, 409, "prekey_outdated").await;
}

async fn malformed_and_out_of_time_prekeys_are_400(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("carol").await;
    let t = now();
    let good = String::from_utf8(signed_prekey("carol", t)).unwrap();
    let key = sign_key();
    let signed = |username: &str, created: i64, expires: i64| {
        sign_object(&prekey_object(username, created, expires), &key)
    };
    let id_b64 = good
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"".to_vec(), "invalid_prekey", "empty"),
        (b"not json".to_vec(), "invalid_prekey", "not JSON"),
        (b"[]".to_vec(), "invalid_prekey", "an array"),
        (
            good.as_bytes()[..good.len() - 1].to_vec(),
            "invalid_prekey",
            "truncated",
        ),
        (
            b"{\"signature\":\"AA==\"}".to_vec(),
            "invalid_prekey",
            "no prekey",
        ),
        (
            good.replacen("\"signature\"", "\"sig\"", 1).into_bytes(),
            "invalid_prekey",
            "no signature",
        ),
        (
            good.replacen(&id_b64, "AAAA", 1).into_bytes(),
            "invalid_prekey",
            "a 3-byte id",
        ),
        (
            good.replacen(&id_b64, id_b64.trim_end_matches('='), 1)
                .into_bytes(),
            "invalid_prekey",
            "unpadded base64",
        ),
        (
            good.replacen("\"x25519\":\"", "\"x25519\":\"AAAA", 1)
                .into_bytes(),
            "invalid_prekey",
            "a 35-byte x25519 key",
        ),
        (
            good.replacen("\"mlkem768\":\"", "\"mlkem768\":\"AAAA", 1)
                .into_bytes(),
            "invalid_prekey",
            "a 1187-byte ML-KEM key",
        ),
        (
            good.replacen(&format!("\"created\":{t}"), "\"created\":\"now\"", 1)
                .into_bytes(),
            "invalid_prekey",
            "a string for created",
        ),
        (
            good.replacen("\"signature\":\"", "\"signature\":\"!", 1)
                .into_bytes(),
            "invalid_prekey",
            "a signature not in base64",
        ),
        (
            signed("Car ol", t, t + DAY),
            "invalid_prekey",
            "not a username",
        ),
        (
            signed("dave", t, t + DAY),
            "wrong_username",
            "another user's name",
        ),
        (
            signed("carol", t - 15 * DAY, t - DAY),
            "prekey_expired",
            "expired",
        ),
        (
            signed("carol", t - 2 * DAY, t),
            "prekey_expired",
            "expires now",
        ),
        (
            signed("carol", t, t + 30 * DAY + 1),
            "invalid_lifetime",
            "a lifetime over 30 days",
        ),
        (
            signed("carol", t + 2 * DAY, t + DAY),
            "invalid_lifetime",
            "expires before created",
        ),
        (
            signed("carol", t + DAY, t + 2 * DAY),
            "invalid_lifetime",
            "created a day from now",
        ),
    ];
    for (body, code, what) in cases {
        let r = put(&server, "carol", body).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{what}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert_eq!(v["error"], code, "{what}: {text}");
        assert!(
            v["reason"].as_str().is_some_and(|r| r.len() > 10),
            "{what}: {text}"
        );
    }
    assert_error(get(&server, "carol").await, 404, "not_found").await;
    // The edges that are fine: exactly 30 days, created a minute ahead (clock skew),
    // uppercase in the prekey's username.
    assert_eq!(
        put(&server, "carol", signed("carol", t, t + 30 * DAY))
            .await
            .status(),
        204
    );
    assert_eq!(
        put(&server, "carol", signed("carol", t + MINUTE, t + DAY))
            .await
            .status(),
        204
    );
    let upper = signed("CAROL", t + 2 * MINUTE, t + DAY);
    assert_eq!(put(&server, "carol", upper.clone()).await.status(), 204);
    assert_stored(&server, "carol", &upper).await;
    assert_eq!(
        server
            .metric("nes_keyserver_rejections_total{reason=\"invalid_prekey\"}")
            .await,
        13.0
    );
}

async fn signatures_by_other_keys_are_403(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("erin").await;
    let object = prekey_object("erin", now(), now() + 14 * DAY);
    // Signed with the registered *message* key: the wrong one of the two.
    let by_message_key = sign_object(&object, &message_key());
    assert_error(
        put(&server, "erin", by_message_key).await,
        403,
        "bad_signature",
    )
    .await;
    // Signed with bob's sign key.
    let bob = PrivateKey::from_pem(&vector_key("bob-rsa-sign")).unwrap();
    assert_error(
        put(&server, "erin", sign_object(&object, &bob)).await,
        403,
        "bad_signature",
    )
    .await;
    // Signed correctly, then one byte of the object changed (the signature covers the
    // bytes as they stand, so even re-spacing breaks it).
    let good = String::from_utf8(sign_object(&object, &sign_key())).unwrap();
    let respaced = good.replacen("{\"username\"", "{ \"username\"", 1);
    assert_error(put(&server, "erin", respaced).await, 403, "bad_signature").await;
    // A signature of the wrong length.
    let short = format!("{{\"prekey\":{object},\"signature\":\"AAAA\"}}");
    assert_error(put(&server, "erin", short).await, 403, "bad_signature").await;
    assert_error(get(&server, "erin").await, 404, "not_found").await;
    // And the right key works.
    assert_eq!(put(&server, "erin", good.clone()).await.status(), 204);
    assert_stored(&server, "erin", good.as_bytes()).await;
    // A prekey signed by erin's key is erin's: another user (same keys here) cannot
    // take it, since it names erin.
    server.register_and_activate("frank").await;
    assert_error(put(&server, "frank", good).await, 400, "wrong_username").await;
    assert_error(get(&server, "frank").await, 404, "not_found").await;
}

async fn unknown_and_pending_users_are_404(backend: Backend) {
    let server = Server::start(backend).await;
    // Unknown.
    assert_error(
        put(&server, "nobody", signed_prekey("nobody", now())).await,
        404,
        "not_found",
    )
    .await;
    assert_error(get(&server, "nobody").await, 404, "not_found").await;
    // Not a valid name.
    assert_error(
        put(&server, "x", signed_prekey("x", now())).await,
        404,
        "not_found",
    )
    .await;
    assert_error(get(&server, "x").await, 404, "not_found").await;
    // Registered, not yet activated: 404 until the link is followed.
    server.register("grace").await;
    let prekey = signed_prekey("grace", now());
    assert_error(
        put(&server, "grace", prekey.clone()).await,
        404,
        "not_found",
    )
    .await;
    assert_error(get(&server, "grace").await, 404, "not_found").await;
    let links = server.links("grace");
    assert_eq!(server.follow(&links.activate).await.status(), 200);
    assert_eq!(put(&server, "grace", prekey.clone()).await.status(), 204);
    assert_stored(&server, "grace", &prekey).await;
    // Wrong methods on the route.
    let r = server
        .http
        .post(server.url("/users/grace/prekey"))
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    let r = server
        .http
        .delete(server.url("/users/grace/prekey"))
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
}

async fn deleting_the_user_deletes_its_prekey(backend: Backend) {
    let server = Server::start(backend).await;
    let links = server.register_and_activate("heidi").await;
    let prekey = signed_prekey("heidi", now());
    assert_eq!(put(&server, "heidi", prekey.clone()).await.status(), 204);
    assert_stored(&server, "heidi", &prekey).await;
    assert_eq!(server.confirm_delete(&links.delete).await.status(), 200);
    assert_error(get(&server, "heidi").await, 404, "not_found").await;
    assert_error(
        put(&server, "heidi", prekey.clone()).await,
        404,
        "not_found",
    )
    .await;
    // Someone registers the free name again: the old prekey is not theirs, and theirs
    // is not refused as older than it.
    let links = server.register_and_activate("heidi").await;
    assert_error(get(&server, "heidi").await, 404, "not_found").await;
    let earlier = signed_prekey("heidi", now() - DAY);
    assert_eq!(put(&server, "heidi", earlier.clone()).await.status(), 204);
    assert_stored(&server, "heidi", &earlier).await;
    // The row itself is gone, not only hidden.
    assert_eq!(server.confirm_delete(&links.delete).await.status(), 200);
    let rows = count_prekey_rows(&server).await;
    assert_eq!(rows, 0, "prekey rows left after the user was deleted");
}

/// Rows in the `prekeys` table, read straight from the database.
async fn count_prekey_rows(server: &Server) -> i64 {
    let url = &server.database_url;
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("open sqlite");
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM prekeys")
            .fetch_one(&pool)
            .await
            .expect("count");
        pool.close().await;
        n
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("open postgres");
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM prekeys")
            .fetch_one(&pool)
            .await
            .expect("count");
        pool.close().await;
        n
    }
}

async fn body_cap_is_413(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("ivan").await;
    let padded = format!(
        "{{\"pad\":\"{}\",\"prekey\":{{}},\"signature\":\"\"}}",
        "x".repeat(16 * 1024)
    );
    assert_error(put(&server, "ivan", padded).await, 413, "body_too_large").await;
    // Just under the cap is read (and checked for what it is).
    let object = prekey_object("ivan", now(), now() + DAY);
    let signature = b64::encode(&sign_key().sign_pss(object.as_bytes()).unwrap());
    let mut body = format!("{{\"prekey\":{object},\"signature\":\"{signature}\"}}");
    let room = 16 * 1024 - body.len() - 1;
    body.push_str(&" ".repeat(room));
    assert_eq!(body.len(), 16 * 1024 - 1);
    assert_eq!(put(&server, "ivan", body.clone()).await.status(), 204);
    assert_stored(&server, "ivan", body.as_bytes()).await;
}

async fn upload_rate_limit_is_429(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&["--prekey-rate", "2"])).await;
    server.register_and_activate("judy").await;
    assert_eq!(
        put(&server, "judy", signed_prekey("judy", now() - 1000))
            .await
            .status(),
        204
    );
    // Refused uploads count too.
    assert_eq!(put(&server, "judy", "junk").await.status(), 400);
    let r = put(&server, "judy", signed_prekey("judy", now())).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_error(r, 429, "rate_limited").await;
    // Fetches and lookups have their own limit (off here).
    for _ in 0..20 {
        assert_eq!(get(&server, "judy").await.status(), 200);
    }
    server.lookup_verified("judy").await;
}

async fn fetches_count_against_the_lookup_limit(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&["--lookup-rate", "1"])).await;
    let mut refused = None;
    for _ in 0..50 {
        let r = get(&server, "nobody").await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 404);
    }
    let r = refused.expect("a 429 among 50 fetches at 1/s");
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, 429, "rate_limited").await;
    // Uploads are another limit: still answered (404, no such user) rather than 429.
    assert_error(
        put(&server, "nobody", signed_prekey("nobody", now())).await,
        404,
        "not_found",
    )
    .await;
}

async fn every_prekey_answer_is_documented_in_openapi(backend: Backend) {
    use serde_json::Value;
    let server = Server::start_with(Options::new(backend).args(&["--prekey-rate", "12"])).await;
    let doc: Value = server.get("/openapi.json").await.json().await.unwrap();
    server.register_and_activate("kate").await;
    let t = now();
    let newer = signed_prekey("kate", t);
    let older = signed_prekey("kate", t - DAY);
    let by_message_key = sign_object(&prekey_object("kate", t, t + DAY), &message_key());
    let mut observed: Vec<(&str, reqwest::Response)> = vec![
        ("get", get(&server, "kate").await),                 // 404
        ("put", put(&server, "kate", newer).await),          // 204
        ("get", get(&server, "kate").await),                 // 200
        ("put", put(&server, "kate", older).await),          // 409
        ("put", put(&server, "kate", "{}").await),           // 400
        ("put", put(&server, "kate", by_message_key).await), // 403
        (
            "put",
            put(&server, "nobody", signed_prekey("nobody", t)).await,
        ), // 404
        ("put", put(&server, "kate", vec![b' '; 20_000]).await), // 413
    ];
    for _ in 0..12 {
        observed.push(("put", put(&server, "kate", "{}").await)); // 429 by now
    }
    let mut statuses = Vec::new();
    for (method, response) in observed {
        let status = response.status().as_u16().to_string();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let has_retry_after = response.headers().contains_key("retry-after");
        let body = response.bytes().await.unwrap();
        let documented = &doc["paths"]["/users/{username}/prekey"][method]["responses"][&status];
        assert!(
            !documented.is_null(),
            "{method} prekey answered {status}, which openapi.json does not document"
        );
        let documented = crate::ops::resolve(&doc, documented);
        if documented.pointer("/headers/Retry-After").is_some() {
            assert!(
                has_retry_after,
                "{method} {status}: Retry-After documented but absent"
            );
        }
        if status == "204" {
            assert!(body.is_empty(), "204 with a body");
        } else {
            let content_type = content_type.expect("a content type");
            let media = content_type.split(';').next().unwrap().trim();
            let schema = &documented["content"][media]["schema"];
            assert!(
                !schema.is_null(),
                "{method} {status}: {media} not documented"
            );
            let value: Value = serde_json::from_slice(&body).expect("JSON");
            crate::ops::conforms(&doc, schema, &value, &format!("{method} prekey {status}"))
                .unwrap();
        }
        statuses.push(format!("{method} {status}"));
    }
    for code in [
        "get 404", "put 204", "get 200", "put 409", "put 400", "put 403", "put 404", "put 413",
        "put 429",
    ] {
        assert!(
            statuses.iter().any(|s| s == code),
            "{code} not exercised: {statuses:?}"
        );
    }
}
