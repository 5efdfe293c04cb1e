//! The API of docs/PROTOCOL.md "Key server API", every path of it, on SQLite and on PostgreSQL.

use crate::common::*;
use std::time::Duration;

crate::on_both_backends!(
    register_activate_lookup_delete,
    registration_echo_and_unknown_fields,
    each_validation_is_a_400,
    accepted_key_sizes,
    taken_names_are_409,
    unknown_users_and_tokens_are_404,
    expired_activation_is_410_and_frees_the_name,
    cleanup_task_removes_expired_registrations,
    body_cap_is_413,
    registration_rate_limit_is_429,
    lookup_rate_limit_is_429,
    pending_registrations_per_email_are_capped,
);

async fn register_activate_lookup_delete(backend: Backend) {
    let server = Server::start(backend).await;
    let name = "alice";
    server.register(name).await;
    // Pending: not visible yet.
    assert_error(server.get("/users/alice").await, 404, "not_found").await;

    let links = server.links(name);
    assert_eq!(links.api, server.url("/users/alice"));
    assert!(links.activate.starts_with(&server.url("/users/alice/")));
    assert!(links.delete.starts_with(&server.url("/users/alice/")));
    assert_ne!(links.activate, links.delete);
    // 256-bit tokens, base64url.
    for link in [&links.activate, &links.delete] {
        let token = link.rsplit('/').next().unwrap();
        assert_eq!(token.len(), 43, "{token}");
        assert!(token
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
    // The delete link of a pending user does nothing.
    assert_error(server.follow(&links.delete).await, 404, "not_found").await;

    let r = server.follow(&links.activate).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"username": "alice", "status": "activated"})
    );

    let (raw, answer) = server.lookup_verified(name).await;
    let (m, s) = alice_keys();
    assert_eq!(answer.public_key_message, m, "served verbatim");
    assert_eq!(answer.public_key_sign, s);
    assert_eq!(answer.username.as_deref(), Some("alice"));
    assert!(
        raw.starts_with(b"{\"response\":{\"username\":\"alice\","),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(raw.ends_with(b"\"}\n"));
    // Served from the stored bytes: identical every time (a fresh PSS signature would differ).
    let (again, _) = server.lookup_verified("ALICE").await;
    assert_eq!(raw, again);

    // Activating twice does nothing more.
    assert_error(server.follow(&links.activate).await, 404, "not_found").await;

    // Opening the delete link asks; the form's POST deletes.
    let r = server.follow(&links.delete).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<form method=\"post\">"));
    server.lookup_verified(name).await;
    let r = server.confirm_delete(&links.delete).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "deleted"
    );
    // Gone at once, although the answer was in the cache.
    assert_error(server.get("/users/alice").await, 404, "not_found").await;
    assert_error(server.follow(&links.delete).await, 404, "not_found").await;
    assert_error(server.confirm_delete(&links.delete).await, 404, "not_found").await;
    // The name is free again.
    server.register(name).await;

    assert_eq!(server.metric("nes_keyserver_activations_total").await, 1.0);
    assert_eq!(server.metric("nes_keyserver_deletions_total").await, 1.0);
    assert_eq!(
        server.metric("nes_keyserver_registrations_total").await,
        2.0
    );
}

async fn registration_echo_and_unknown_fields(backend: Backend) {
    let server = Server::start(backend).await;
    let (m, s) = alice_keys();
    let body = serde_json::json!({
        "username": "Bob_Builder-1", "email": "Bob@Example.org", "public_key_message": m,
        "public_key_sign": s, "client": "nes 2.0", "extra": {"nested": [1, 2]}
    });
    let r = server.post_users(body.to_string()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-type"], "application/json");
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        echo,
        serde_json::json!({"username": "bob_builder-1", "public_key_message": m, "public_key_sign": s}),
        "echoes the lower-cased name and the keys, not the e-mail address"
    );
    let links = server.links("bob_builder-1");
    assert_eq!(server.follow(&links.activate).await.status(), 200);
    server.lookup_verified("bob_builder-1").await;
}

async fn each_validation_is_a_400(backend: Backend) {
    let server = Server::start(backend).await;
    let (m, s) = alice_keys();
    let ok_email = "carol@example.org";
    let cases: Vec<(String, &str, &str)> = vec![
        ("not json".into(), "invalid_json", "not JSON"),
        ("".into(), "invalid_json", "empty body"),
        ("[]".into(), "invalid_json", "an array"),
        ("{\"username\": \"carol\"".into(), "invalid_json", "truncated"),
        (serde_json::json!({"username": "carol", "public_key_message": m, "public_key_sign": s}).to_string(), "invalid_json", "no email"),
        (serde_json::json!({"email": ok_email, "public_key_message": m, "public_key_sign": s}).to_string(), "invalid_json", "no username"),
        (serde_json::json!({"username": "carol", "email": ok_email, "public_key_sign": s}).to_string(), "invalid_json", "no message key"),
        (serde_json::json!({"username": "carol", "email": ok_email, "public_key_message": m}).to_string(), "invalid_json", "no sign key"),
        (serde_json::json!({"username": 7, "email": ok_email, "public_key_message": m, "public_key_sign": s}).to_string(), "invalid_json", "number"),
        (serde_json::json!({"username": null, "email": ok_email, "public_key_message": m, "public_key_sign": s}).to_string(), "invalid_json", "null"),
        (registration("ca", ok_email, &m, &s), "invalid_username", "too short"),
        (registration(&"c".repeat(33), ok_email, &m, &s), "invalid_username", "too long"),
        (registration("car ol", ok_email, &m, &s), "invalid_username", "space"),
        (registration("car/ol", ok_email, &m, &s), "invalid_username", "slash"),
        (registration("carøl", ok_email, &m, &s), "invalid_username", "non-ASCII"),
        (registration("carol", "carol", &m, &s), "invalid_email", "no @"),
        (registration("carol", "carol@", &m, &s), "invalid_email", "no domain"),
        (registration("carol", "@example.org", &m, &s), "invalid_email", "no local part"),
        (registration("carol", "carol@localhost", &m, &s), "invalid_email", "no dot in the domain"),
        (registration("carol", "car ol@example.org", &m, &s), "invalid_email", "space"),
        (registration("carol", "Carol <carol@example.org>", &m, &s), "invalid_email", "display name"),
        (registration("carol", "carol@example..org", &m, &s), "invalid_email", "empty label"),
        (registration("carol", &format!("{}@example.org", "c".repeat(250)), &m, &s), "invalid_email", "too long"),
        (registration("carol", "carol@example.org\r\nBcc: x@example.org", &m, &s), "invalid_email", "header injection"),
        (registration("carol", ok_email, "hello", &s), "invalid_key", "not PEM"),
        (registration("carol", ok_email, &m, &vector_key("alice-rsa-sign")), "invalid_key", "a private key"),
        (registration("carol", ok_email, &fixture("rsa1024.pub"), &s), "invalid_key", "1024 bits"),
        (registration("carol", ok_email, &m, &fixture("rsa4608.pub")), "invalid_key", "4608 bits"),
        (registration("carol", ok_email, &fixture("ec-p256.pub"), &s), "invalid_key", "not RSA"),
        (registration("carol", ok_email, &m.replace('A', "B"), &s), "invalid_key", "corrupted"),
        (registration("carol", ok_email, &m, &m), "same_keys", "the same key twice"),
        (registration("carol", ok_email, &s, &s.replace('\n', "\r\n")), "same_keys", "the same key, other line ends"),
    ];
    for (body, code, what) in cases {
        let r = server.post_users(body).await;
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
    // Nothing was registered.
    assert_error(server.get("/users/carol").await, 404, "not_found").await;
    assert_eq!(
        server
            .metric("nes_keyserver_rejections_total{reason=\"invalid_email\"}")
            .await,
        9.0
    );
    assert!(
        crate::common::files_under(&server.mail_dir).is_empty(),
        "no mail for refused registrations"
    );
}

async fn accepted_key_sizes(backend: Backend) {
    let server = Server::start(backend).await;
    let (_, s) = alice_keys();
    let big = fixture("rsa4096.pub");
    let r = server
        .post_users(registration("dave", "dave@example.org", &big, &s))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        server.follow(&server.links("dave").activate).await.status(),
        200
    );
    let (_, answer) = server.lookup_verified("dave").await;
    assert_eq!(answer.message_key().unwrap().bits(), 4096);
}

async fn taken_names_are_409(backend: Backend) {
    let server = Server::start(backend).await;
    let (m, s) = alice_keys();
    server.register("erin").await;
    // Pending holds the name, whatever the case and the address.
    for name in ["erin", "ERIN", "Erin"] {
        let r = server
            .post_users(registration(name, "other@example.org", &m, &s))
            .await;
        assert_error(r, 409, "username_taken").await;
    }
    assert_eq!(
        server.follow(&server.links("erin").activate).await.status(),
        200
    );
    // Active holds it too.
    let r = server
        .post_users(registration("erin", "erin@example.org", &m, &s))
        .await;
    let body = assert_error(r, 409, "username_taken").await;
    assert!(body["reason"].as_str().unwrap().contains("erin"));
    // The first registration's keys are still the ones served.
    server.lookup_verified("erin").await;
}

async fn unknown_users_and_tokens_are_404(backend: Backend) {
    let server = Server::start(backend).await;
    let links = server.register_and_activate("frank").await;
    let token = links.delete.rsplit('/').next().unwrap().to_string();
    for path in [
        "/users/nobody".to_string(),
        "/users/x".to_string(),             // not a valid name
        "/users/%E2%98%83snow".to_string(), // not a valid name either
        "/users/nobody/abc".to_string(),    // unknown user
        format!("/users/nobody/{token}"),   // a real token, wrong user
        "/users/frank/wrong".to_string(),   // wrong token
        format!("/users/frank/{token}x"),   // almost the token
        "/users/frank/".to_string(),        // empty token
        "/users/frank/a/b".to_string(),     // no such route
        "/nothing".to_string(),
        "/".to_string(),
    ] {
        assert_error(server.get(&path).await, 404, "not_found").await;
    }
    // The activation link of an active user is not a delete link.
    assert_error(server.follow(&links.activate).await, 404, "not_found").await;
    server.lookup_verified("frank").await;
    // Wrong methods.
    let r = server
        .http
        .delete(server.url("/users/frank"))
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    let r = server.http.get(server.url("/users")).send().await.unwrap();
    assert_error(r, 405, "method_not_allowed").await;
}

async fn expired_activation_is_410_and_frees_the_name(backend: Backend) {
    // Cleanup far away: the expired row stays, so the link can say 410.
    let server = Server::start_with(Options::new(backend).args(&[
        "--pending-ttl",
        "2s",
        "--cleanup-interval",
        "1h",
    ]))
    .await;
    server.register("grace").await;
    let links = server.links("grace");
    // Let the 2 s pass (waiting for time itself; the assertions follow).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let body = assert_error(server.follow(&links.activate).await, 410, "token_expired").await;
    assert!(body["reason"].as_str().unwrap().contains("register again"));
    assert_error(server.follow(&links.activate).await, 410, "token_expired").await;
    assert_error(server.get("/users/grace").await, 404, "not_found").await;
    // The dead registration blocks neither the name nor the address.
    server.register("grace").await;
    let fresh = server.links("grace");
    assert_ne!(fresh.activate, links.activate);
    assert_error(server.follow(&links.activate).await, 404, "not_found").await;
    assert_eq!(server.follow(&fresh.activate).await.status(), 200);
    server.lookup_verified("grace").await;
}

async fn cleanup_task_removes_expired_registrations(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&[
        "--pending-ttl",
        "1s",
        "--cleanup-interval",
        "200ms",
    ]))
    .await;
    server.register_and_activate("heidi").await;
    server.register("ivan").await;
    let links = server.links("ivan");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // 410 while the row is there, 404 once the cleanup task removed it.
    eventually(
        "the cleanup task removes ivan",
        Duration::from_secs(60),
        || async { Ok((server.follow(&links.activate).await.status() == 404).then_some(())) },
    )
    .await
    .unwrap();
    assert!(server.metric("nes_keyserver_expired_removed_total").await >= 1.0);
    // Active users are not touched.
    server.lookup_verified("heidi").await;
}

async fn body_cap_is_413(backend: Backend) {
    let server = Server::start(backend).await;
    let (m, s) = alice_keys();
    // Declared length over the cap.
    let big = registration(
        "judy",
        "judy@example.org",
        &format!("{m}{}", " ".repeat(70_000)),
        &s,
    );
    assert_error(server.post_users(big).await, 413, "body_too_large").await;
    // (A chunked body with no declared length: see fuzz::chunked_body_over_the_cap.)
    // Just under the cap is read (and refused for what it is).
    let padded = format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024 - 20));
    assert!(padded.len() < 64 * 1024);
    assert_error(server.post_users(padded).await, 400, "invalid_json").await;
    // And a good registration still works.
    server.register("judy").await;
}

async fn registration_rate_limit_is_429(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&["--register-rate", "2"])).await;
    server.register("kim").await;
    // Refused requests count too.
    assert_eq!(server.post_users("junk").await.status(), 400);
    let r = server
        .post_users(registration(
            "leo",
            "leo@example.org",
            &alice_keys().0,
            &alice_keys().1,
        ))
        .await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_error(r, 429, "rate_limited").await;
    // Lookups have their own limit (off here).
    for _ in 0..20 {
        assert_eq!(server.get("/users/kim").await.status(), 404);
    }
    assert!(
        server
            .metric("nes_keyserver_rejections_total{reason=\"rate_limited\"}")
            .await
            >= 1.0
    );
}

async fn lookup_rate_limit_is_429(backend: Backend) {
    let server = Server::start_with(Options::new(backend).args(&["--lookup-rate", "1"])).await;
    // One per second with a burst of one: of 50 quick lookups, some must be refused.
    let mut refused = None;
    for _ in 0..50 {
        let r = server.get("/users/nobody").await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 404);
    }
    let r = refused.expect("a 429 among 50 lookups at 1/s");
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, 429, "rate_limited").await;
    // Registration is a different limit (off here).
    server.register("mallory").await;
}

async fn pending_registrations_per_email_are_capped(backend: Backend) {
    let server =
        Server::start_with(Options::new(backend).args(&["--max-pending-per-email", "2"])).await;
    let (m, s) = alice_keys();
    let reg = |name: &str, email: &str| registration(name, email, &m, &s);
    assert_eq!(
        server
            .post_users(reg("nina1", "nina@example.org"))
            .await
            .status(),
        201
    );
    assert_eq!(
        server
            .post_users(reg("nina2", "NINA@example.org"))
            .await
            .status(),
        201
    );
    let r = server.post_users(reg("nina3", "Nina@Example.org")).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 3600,
        "the oldest pending registration expires in about 24 h: {retry}"
    );
    assert_error(r, 429, "too_many_pending").await;
    // Another address is fine.
    assert_eq!(
        server
            .post_users(reg("nina3", "other@example.org"))
            .await
            .status(),
        201
    );
    // Activating one frees a slot.
    assert_eq!(
        server
            .follow(&server.links("nina1").activate)
            .await
            .status(),
        200
    );
    assert_eq!(
        server
            .post_users(reg("nina4", "nina@example.org"))
            .await
            .status(),
        201
    );
}
