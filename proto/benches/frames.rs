//! Seal and open, per wire version, with the original's 2048-bit keys.
//!
//! `cargo bench -p nes-proto --bench frames`. Each seal costs one RSA private operation
//! (sign) and one public (wrap); each open one private (unwrap) and one public (verify).
//! Compare with `openssl speed rsa2048` on the same machine: the private operations
//! dominate, so seal+open ≈ 2 private ops is the ceiling.
//!
//! v3 needs no RSA private operation per frame: seal is one ML-KEM-768 encapsulation, two
//! X25519 operations (key generation and agreement) and one Ed25519 signature; open is
//! one decapsulation, one X25519 agreement, one RSA *public* operation (the certificate's
//! signature) and one Ed25519 verification. `-- v3` runs only those rows.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nes_proto::frame::{open, open_with, seal, Draft, Version};
use nes_proto::v3::{self, CertificateSecret, PrekeySecret};
use nes_proto::{PrivateKey, PublicKey, Username};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

fn key(name: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/legacy-v1/keys/");
    std::fs::read_to_string(format!("{dir}{name}")).expect("vector key")
}

fn frames(c: &mut Criterion) {
    let alice_sign = PrivateKey::from_pem(&key("alice-rsa-sign")).expect("key");
    let alice_sign_pub = PublicKey::from_pem(&key("alice-rsa-sign.pub")).expect("key");
    let bob_message = PrivateKey::from_pem(&key("bob-rsa-message")).expect("key");
    let bob_message_pub = PublicKey::from_pem(&key("bob-rsa-message.pub")).expect("key");
    let (alice, bob) = (
        Username::parse("alice").expect("name"),
        Username::parse("bob").expect("name"),
    );
    let text = "Hello Bob! A message of a typical length, about one line of chat.";
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text,
        timestamp_ms: 1_735_689_601_000,
    };

    let mut group = c.benchmark_group("frame");
    for version in [Version::V1, Version::V2] {
        let name = format!("v{}", version.number());
        group.bench_function(BenchmarkId::new("seal", &name), |b| {
            b.iter(|| {
                seal(version, black_box(&draft), &bob_message_pub, &alice_sign).expect("seal")
            })
        });
        let sealed = seal(version, &draft, &bob_message_pub, &alice_sign).expect("seal");
        group.bench_function(BenchmarkId::new("open", &name), |b| {
            b.iter(|| open(black_box(&sealed.frame), &bob_message, &alice_sign_pub).expect("open"))
        });
    }

    // v3: bob's prekey and alice's certificate, made once (as once per rotation).
    let bob_sign = PrivateKey::from_pem(&key("bob-rsa-sign")).expect("key");
    let now = nes_proto::now_ms();
    let day = 24 * 3600 * 1000;
    let prekey = Arc::new(
        PrekeySecret::generate(&bob, now - day, now + 13 * day, &bob_sign).expect("prekey"),
    );
    let cert = CertificateSecret::generate(&alice, now - day, now + 13 * day, &alice_sign)
        .expect("certificate");
    let prekeys = HashMap::from([(prekey.id(), prekey.clone())]);
    let draft_v3 = Draft {
        control: None,
        wants_receipts: false,
        timestamp_ms: now,
        ..draft
    };
    group.bench_function(BenchmarkId::new("seal", "v3"), |b| {
        b.iter(|| v3::seal(black_box(&draft_v3), prekey.signed(), &cert, now).expect("seal"))
    });
    let sealed = v3::seal(&draft_v3, prekey.signed(), &cert, now).expect("seal");
    group.bench_function(BenchmarkId::new("open", "v3"), |b| {
        b.iter(|| {
            open_with(black_box(&sealed.frame), None, &prekeys, &alice_sign_pub).expect("open")
        })
    });
    println!(
        "frame size for this text: v3 {} bytes (v2 {} bytes)",
        sealed.frame.len(),
        seal(Version::V2, &draft, &bob_message_pub, &alice_sign)
            .expect("seal")
            .frame
            .len()
    );
    group.finish();

    // The backend choice: one RSA-2048 private operation in each library.
    let mut group = c.benchmark_group("rsa2048_private_op");
    group.bench_function("aws-lc-rs sign", |b| {
        b.iter(|| alice_sign.sign_pss(black_box(b"x")).expect("sign"))
    });
    let rsa_key = {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        rsa::RsaPrivateKey::from_pkcs1_pem(&key("alice-rsa-sign")).expect("key")
    };
    let signer = rsa::pss::BlindedSigningKey::<sha2::Sha256>::new(rsa_key);
    group.bench_function("rsa crate sign", |b| {
        use rsa::signature::RandomizedSigner;
        b.iter(|| signer.sign_with_rng(&mut rand::rngs::OsRng, black_box(b"x")))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(4));
    targets = frames
}
criterion_main!(benches);
