//! Compatibility with the original NES: its answers verify with our verifier, our
//! answers verify with its algorithm (RSA-PSS, any salt length, over the raw bytes of
//! "response"), and its client's registration works unchanged.

use crate::common::*;
use base64::Engine;
use nes_proto::{verify_answer, AnswerError, Username, UsernameRule};
use std::path::Path;
use std::process::Command;

crate::on_both_backends!(original_client_registers_and_its_check_passes);

/// Splits a signed answer into the raw "response" bytes and the signature, the way the
/// original client does (json.RawMessage: the bytes as they stand in the body).
fn split_answer(body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let prefix = b"{\"response\":";
    assert!(body.starts_with(prefix));
    let marker = b",\"signature\":\"";
    let at = body
        .windows(marker.len())
        .rposition(|w| w == marker)
        .expect("signature field");
    let response = body[prefix.len()..at].to_vec();
    let rest = &body[at + marker.len()..];
    let end = rest
        .iter()
        .position(|&b| b == b'"')
        .expect("end of signature");
    let signature = base64::engine::general_purpose::URL_SAFE
        .decode(&rest[..end])
        .expect("base64url with padding");
    (response, signature)
}

/// RSA-PSS-SHA-256 verification by OpenSSL with the salt length recovered from the
/// signature ("auto"), which is what Go's PSSSaltLengthAuto does: an implementation
/// independent of ours.
fn openssl_verifies(public_key: &Path, data: &[u8], signature: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let (data_file, sig_file) = (dir.path().join("data"), dir.path().join("sig"));
    std::fs::write(&data_file, data).unwrap();
    std::fs::write(&sig_file, signature).unwrap();
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:auto",
            "-verify",
        ])
        .arg(public_key)
        .arg("-signature")
        .arg(&sig_file)
        .arg(&data_file)
        .output()
        .expect("openssl");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

#[test]
fn the_original_servers_answers_verify_with_the_proto_verifier() {
    let server_key = server_public();
    for user in ["alice", "bob"] {
        let body = std::fs::read(vectors().join(format!("http/get-{user}.body"))).unwrap();
        let name = Username::parse(user).unwrap();
        let answer = verify_answer(&body, &server_key, &name, UsernameRule::IfPresent)
            .expect("original answer");
        assert_eq!(
            answer.username, None,
            "the original has no username in its answers"
        );
        assert_eq!(
            answer.public_key_sign,
            vector_key(&format!("{user}-rsa-sign.pub"))
        );
        assert!(matches!(
            verify_answer(&body, &server_key, &name, UsernameRule::Require),
            Err(AnswerError::MissingUsername)
        ));
        let (response, signature) = split_answer(&body);
        assert_eq!(
            response,
            std::fs::read(vectors().join(format!("http/get-{user}.signed"))).unwrap()
        );
        assert!(openssl_verifies(
            &vectors().join("provider-public-key.pem"),
            &response,
            &signature
        ));
    }
}

async fn original_client_registers_and_its_check_passes(backend: Backend) {
    let server = Server::start(backend).await;
    // Byte for byte what the original client's json.Marshal sends: the four fields, in
    // this order, compact.
    let (m, s) = alice_keys();
    let json = |v: &str| serde_json::to_string(v).unwrap();
    let body = format!(
        "{{\"username\":{},\"email\":{},\"public_key_message\":{},\"public_key_sign\":{}}}",
        json("alice"),
        json("alice@example.org"),
        json(&m),
        json(&s)
    );
    let r = server.post_users(body).await;
    assert_eq!(r.status(), 201);
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["username"], "alice");
    assert_eq!(
        server
            .follow(&server.links("alice").activate)
            .await
            .status(),
        200
    );

    let r = server.get("/users/alice").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "as the original"
    );
    let body = r.bytes().await.unwrap().to_vec();

    // The original client's check: any-salt PSS over the raw "response" bytes.
    let alice = Username::parse("alice").unwrap();
    let key = server_public();
    let lenient =
        verify_answer(&body, &key, &alice, UsernameRule::IfPresent).expect("original rule");
    let strict = verify_answer(&body, &key, &alice, UsernameRule::Require).expect("NES rule");
    assert_eq!(lenient, strict);
    assert_eq!(
        strict.public_key_message, m,
        "the PEM comes back byte for byte"
    );
    assert_eq!(strict.public_key_sign, s);
    let (response, signature) = split_answer(&body);
    assert!(openssl_verifies(
        &vectors().join("provider-public-key.pem"),
        &response,
        &signature
    ));
    // The original client decodes "response" into its two fields; ours has one more,
    // which Go's json.Unmarshal ignores.
    let fields: serde_json::Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(fields["public_key_message"], m.as_str());

    // Bound to the name: replayed as bob's answer, it is refused.
    let bob = Username::parse("bob").unwrap();
    assert!(matches!(
        verify_answer(&body, &key, &bob, UsernameRule::IfPresent),
        Err(AnswerError::WrongUsername { .. })
    ));
    // And a flipped byte breaks the signature.
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'M').unwrap();
    tampered[at] = b'N';
    assert!(matches!(
        verify_answer(&tampered, &key, &alice, UsernameRule::IfPresent),
        Err(AnswerError::Signature)
    ));
}
