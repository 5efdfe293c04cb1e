//! v3 frames round-trip, and every v3 refusal class (docs/PROTOCOL.md "v3") is fed a
//! frame that triggers it. `raw_v3` below builds frames from DESIGN's steps with
//! aws-lc-rs directly, not through `nes_proto::v3::seal`, so the two implementations of
//! the combiner, the plaintext layout and the associated data are held to each other.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use aws_lc_rs::{agreement, digest, kem};
use nes_proto::frame::{
    decrypt, decrypt_with, open_with, Draft, FrameError, Version, MAX_FRAME_BYTES,
};
use nes_proto::inner::Inner;
use nes_proto::v3::{
    self, CertificateSecret, KeyDir, NoPrekeys, PrekeySecret, Prekeys, SignedPrekey, V3Error,
};
use nes_proto::{b64, PrivateKey, PublicKey, Username};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const NOW: i64 = 1_765_000_000_000;
const DAY: i64 = 24 * 3600 * 1000;

fn key_text(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors/legacy-v1/keys")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn user(name: &str) -> Username {
    Username::parse(name).unwrap()
}

struct World {
    alice_sign: PrivateKey,
    alice_sign_pub: PublicKey,
    bob_sign: PrivateKey,
    bob_message: PrivateKey,
    /// Bob's prekey, valid around NOW.
    bob_prekey: Arc<PrekeySecret>,
    /// Alice's certificate, valid around NOW.
    alice_cert: CertificateSecret,
}

impl World {
    fn prekeys(&self) -> HashMap<v3::KeyId, Arc<PrekeySecret>> {
        HashMap::from([(self.bob_prekey.id(), self.bob_prekey.clone())])
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let alice_sign = PrivateKey::from_pem(&key_text("alice-rsa-sign")).unwrap();
        let bob_sign = PrivateKey::from_pem(&key_text("bob-rsa-sign")).unwrap();
        let bob_prekey = Arc::new(
            PrekeySecret::generate(&user("bob"), NOW - DAY, NOW + 13 * DAY, &bob_sign).unwrap(),
        );
        let alice_cert =
            CertificateSecret::generate(&user("alice"), NOW - DAY, NOW + 13 * DAY, &alice_sign)
                .unwrap();
        World {
            alice_sign_pub: PublicKey::from_pem(&key_text("alice-rsa-sign.pub")).unwrap(),
            bob_message: PrivateKey::from_pem(&key_text("bob-rsa-message")).unwrap(),
            alice_sign,
            bob_sign,
            bob_prekey,
            alice_cert,
        }
    })
}

fn sealed(w: &World, text: &str, ts: i64) -> Vec<u8> {
    let (alice, bob) = (user("alice"), user("bob"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text,
        timestamp_ms: ts,
    };
    v3::seal(&draft, w.bob_prekey.signed(), &w.alice_cert, NOW)
        .unwrap()
        .frame
}

fn open_bob(w: &World, frame: &[u8]) -> Result<nes_proto::Opened, FrameError> {
    open_with(frame, Some(&w.bob_message), &w.prekeys(), &w.alice_sign_pub)
}

/// What `raw_v3` may get wrong on purpose.
#[derive(Default, Clone, Copy)]
struct Twist {
    aad_label: Option<&'static [u8]>,
    flip_s: bool,
    skip_static_in_kdf: bool,
}

/// A v3 frame from DESIGN's steps, with a plaintext layout we choose: C ‖ S(over `NES/3`
/// ‖ inner, by `signer`) ‖ inner.
fn raw_v3(
    prekey: &SignedPrekey,
    c: &[u8],
    signer: &CertificateSecret,
    inner: &[u8],
    twist: Twist,
) -> Vec<u8> {
    let p = prekey.prekey();
    let ek_key = kem::EncapsulationKey::new(&kem::ML_KEM_768, &p.mlkem768).unwrap();
    let (kem_ct, ss_m) = ek_key.encapsulate().unwrap();
    let e = agreement::PrivateKey::generate(&agreement::X25519).unwrap();
    let ek = e.compute_public_key().unwrap();
    let k = agreement::agree(
        &e,
        agreement::UnparsedPublicKey::new(&agreement::X25519, &p.x25519),
        (),
        |ss_x| {
            let mut ctx = digest::Context::new(&digest::SHA3_256);
            ctx.update(&[0x5c, 0x2e, 0x2f, 0x2f, 0x5e, 0x5c]);
            ctx.update(ss_m.as_ref());
            ctx.update(ss_x);
            ctx.update(ek.as_ref());
            if !twist.skip_static_in_kdf {
                ctx.update(&p.x25519);
            }
            Ok(ctx.finish().as_ref().to_vec())
        },
    )
    .unwrap();
    let mut signed = b"NES/3".to_vec();
    signed.extend_from_slice(inner);
    let mut s = signer.sign(&signed);
    if twist.flip_s {
        s[0] ^= 1;
    }
    let mut plaintext = (c.len() as u16).to_be_bytes().to_vec();
    plaintext.extend_from_slice(c);
    plaintext.extend_from_slice(&s);
    plaintext.extend_from_slice(inner);
    let mut aad = twist.aad_label.unwrap_or(b"NES/3").to_vec();
    aad.extend_from_slice(&p.id);
    aad.extend_from_slice(ek.as_ref());
    aad.extend_from_slice(kem_ct.as_ref());
    let nonce = [3u8; 12];
    let ct = Aes256Gcm::new_from_slice(&k)
        .unwrap()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    format!(
        r#"{{"v":3,"prekey":"{}","ek":"{}","kem":"{}","nonce":"{}","ciphertext":"{}"}}"#,
        b64::encode(&p.id),
        b64::encode(ek.as_ref()),
        b64::encode(kem_ct.as_ref()),
        b64::encode(&nonce),
        b64::encode(&ct)
    )
    .into_bytes()
}

fn inner(from: &str, to: &str, ts: i64, text: &str) -> Vec<u8> {
    Inner {
        kind: None,
        receipt: None,
        presence: None,
        file: None,
        chunk: None,
        file_ack: None,
        file_cancel: None,
        receipts: false,
        from: from.into(),
        to: to.into(),
        timestamp: ts,
        message: text.into(),
        id: Some(b64::encode(&[4u8; 16])),
    }
    .to_go_json()
}

fn fields(frame: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_slice(frame).unwrap() {
        serde_json::Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn with_field(frame: &[u8], name: &str, value: serde_json::Value) -> Vec<u8> {
    let mut m = fields(frame);
    m.insert(name.into(), value);
    serde_json::to_vec(&m).unwrap()
}

fn field_bytes(frame: &[u8], name: &str) -> Vec<u8> {
    b64::decode(fields(frame)[name].as_str().unwrap()).unwrap()
}

#[test]
fn v3_round_trips() {
    let w = world();
    for text in ["", "hi", "zażółć 🙂 <&> \"\\\n", &"x".repeat(10_000)] {
        let frame = sealed(w, text, NOW);
        let opened = open_bob(w, &frame).unwrap();
        assert_eq!(opened.version, Version::V3);
        assert_eq!(opened.inner.message, text);
        assert_eq!(opened.inner.from, "alice");
        opened.check_recipient(&user("bob")).unwrap();
        opened.check_time(NOW).unwrap();
        let m = fields(&frame);
        let keys: Vec<_> = m.keys().cloned().collect();
        assert_eq!(keys.len(), 6);
        assert!(std::str::from_utf8(&frame)
            .unwrap()
            .starts_with("{\"v\":3,\"prekey\":\""));
        assert_eq!(field_bytes(&frame, "prekey"), w.bob_prekey.id());
        assert_eq!(field_bytes(&frame, "ek").len(), 32);
        assert_eq!(field_bytes(&frame, "kem").len(), 1088);
        assert_eq!(field_bytes(&frame, "nonce").len(), 12);
    }
    // The independent construction opens too: the combiner, P and AD agree byte for byte.
    let m = inner("alice", "bob", NOW, "built by the test");
    let frame = raw_v3(
        w.bob_prekey.signed(),
        w.alice_cert.signed().as_bytes(),
        &w.alice_cert,
        &m,
        Twist::default(),
    );
    let opened = open_bob(w, &frame).unwrap();
    assert_eq!(opened.inner_bytes, m);
    assert_eq!(opened.id, b64::encode(&[4u8; 16]));
}

#[test]
fn v1_and_v2_still_open_through_the_same_entry() {
    let w = world();
    let (alice, bob) = (user("alice"), user("bob"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "old",
        timestamp_ms: NOW,
    };
    for version in [Version::V1, Version::V2] {
        let bob_pub = PublicKey::from_pem(&key_text("bob-rsa-message.pub")).unwrap();
        let frame = nes_proto::frame::seal(version, &draft, &bob_pub, &w.alice_sign)
            .unwrap()
            .frame;
        assert_eq!(open_bob(w, &frame).unwrap().version, version);
        // Without the message key they are refused as not unwrapping.
        assert!(matches!(
            open_with(&frame, None, &w.prekeys(), &w.alice_sign_pub),
            Err(FrameError::Unwrap)
        ));
    }
    assert!(matches!(
        nes_proto::frame::seal(
            Version::V3,
            &draft,
            w.bob_message.public_key(),
            &w.alice_sign
        ),
        Err(FrameError::Key(_))
    ));
}

#[test]
fn unknown_or_deleted_prekeys_are_refused() {
    let w = world();
    let frame = sealed(w, "for a prekey", NOW);
    let err = decrypt_with(&frame, Some(&w.bob_message), &NoPrekeys).unwrap_err();
    assert!(matches!(err, FrameError::UnknownPrekey));
    assert_eq!(err.reason(), "unknown_prekey");
    // The RSA-only entry point holds no prekeys.
    assert!(matches!(
        decrypt(&frame, &w.bob_message),
        Err(FrameError::UnknownPrekey)
    ));
    // Another id than the one held.
    let other = with_field(&frame, "prekey", b64::encode(&[0u8; 16]).into());
    assert!(matches!(
        open_bob(w, &other),
        Err(FrameError::UnknownPrekey)
    ));
}

#[test]
fn after_the_prekey_file_is_deleted_the_frame_no_longer_opens_from_the_directory() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyDir::new(dir.path());
    let (prekey, _) = keys
        .create(
            &user("bob"),
            &w.bob_sign,
            Duration::from_secs(7 * 24 * 3600),
            NOW - 1000,
        )
        .unwrap();
    let (alice, bob) = (user("alice"), user("bob"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "captured",
        timestamp_ms: NOW,
    };
    let frame = v3::seal(&draft, prekey.signed(), &w.alice_cert, NOW)
        .unwrap()
        .frame;
    drop(prekey);
    let opened = open_with(&frame, None, &keys, &w.alice_sign_pub).unwrap();
    assert_eq!(opened.inner.message, "captured");

    let id: [u8; 16] = field_bytes(&frame, "prekey").try_into().unwrap();
    std::fs::remove_file(keys.prekey_path(&id)).unwrap();
    // A fresh view of the same directory, with everything still in it.
    let again = KeyDir::new(dir.path());
    assert!(again.prekey(&id).is_none());
    assert!(matches!(
        open_with(&frame, Some(&w.bob_message), &again, &w.alice_sign_pub),
        Err(FrameError::UnknownPrekey)
    ));
    // A new prekey in the same directory does not help either.
    again
        .create(&bob, &w.bob_sign, Duration::from_secs(3600), NOW)
        .unwrap();
    assert!(matches!(
        open_with(&frame, None, &again, &w.alice_sign_pub),
        Err(FrameError::UnknownPrekey)
    ));
}

#[test]
fn tampering_with_any_authenticated_part_fails_the_tag() {
    let w = world();
    let frame = sealed(w, "tamper", NOW);
    for name in ["ek", "kem", "nonce", "ciphertext"] {
        let mut bytes = field_bytes(&frame, name);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let bad = with_field(&frame, name, b64::encode(&bytes).into());
        let err = open_bob(w, &bad).unwrap_err();
        assert!(matches!(err, FrameError::Decrypt), "{name}: {err:?}");
        assert_eq!(err.reason(), "decrypt");
    }
    // The frame's prekey id is in the AD: a prekey held under another id does not open it.
    let mut moved = w.prekeys();
    moved.insert([9u8; 16], w.bob_prekey.clone());
    let renamed = with_field(&frame, "prekey", b64::encode(&[9u8; 16]).into());
    assert!(matches!(
        open_with(&renamed, None, &moved, &w.alice_sign_pub),
        Err(FrameError::Decrypt)
    ));
    // Wrong AD label, and a combiner that leaves out the static key.
    let m = inner("alice", "bob", NOW, "x");
    let c = w.alice_cert.signed().as_bytes();
    for twist in [
        Twist {
            aad_label: Some(b"NES/2"),
            ..Twist::default()
        },
        Twist {
            skip_static_in_kdf: true,
            ..Twist::default()
        },
    ] {
        let bad = raw_v3(w.bob_prekey.signed(), c, &w.alice_cert, &m, twist);
        assert!(matches!(open_bob(w, &bad), Err(FrameError::Decrypt)));
    }
    // Sealed to another prekey of bob's that we hold under this one's id: the keys differ.
    let other =
        Arc::new(PrekeySecret::generate(&user("bob"), NOW - DAY, NOW + DAY, &w.bob_sign).unwrap());
    let swapped: HashMap<_, _> = HashMap::from([(w.bob_prekey.id(), other)]);
    assert!(matches!(
        open_with(&frame, None, &swapped, &w.alice_sign_pub),
        Err(FrameError::Decrypt)
    ));
}

#[test]
fn certificate_and_signature_refusals() {
    let w = world();
    let c = w.alice_cert.signed().as_bytes();
    let prekey = w.bob_prekey.signed();

    // Bad S.
    let bad_s = raw_v3(
        prekey,
        c,
        &w.alice_cert,
        &inner("alice", "bob", NOW, "x"),
        Twist {
            flip_s: true,
            ..Twist::default()
        },
    );
    let err = open_bob(w, &bad_s).unwrap_err();
    assert!(matches!(err, FrameError::Signature));
    assert_eq!(err.reason(), "signature");

    // A certificate signed by another RSA key than alice's pinned one.
    let forged =
        CertificateSecret::generate(&user("alice"), NOW - DAY, NOW + DAY, &w.bob_sign).unwrap();
    let (alice, bob) = (user("alice"), user("bob"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "forged",
        timestamp_ms: NOW,
    };
    let frame = v3::seal(&draft, prekey, &forged, NOW).unwrap().frame;
    let err = open_bob(w, &frame).unwrap_err();
    assert!(matches!(err, FrameError::Certificate(_)), "{err:?}");
    assert_eq!(err.reason(), "signature");

    // A certificate for another user (signed by alice's key, so only the name is wrong).
    let carol =
        CertificateSecret::generate(&user("carol"), NOW - DAY, NOW + DAY, &w.alice_sign).unwrap();
    let frame = raw_v3(
        prekey,
        carol.signed().as_bytes(),
        &carol,
        &inner("alice", "bob", NOW, "x"),
        Twist::default(),
    );
    let err = open_bob(w, &frame).unwrap_err();
    assert!(
        matches!(&err, FrameError::Certificate(m) if m.contains("carol")),
        "{err:?}"
    );

    // A certificate that does not cover the timestamp: before created - 5 min, after expires.
    let cert = w.alice_cert.certificate();
    for (ts, ok) in [
        (cert.created - 5 * 60 * 1000 - 1, false),
        (cert.created - 5 * 60 * 1000, true),
        (cert.expires, true),
        (cert.expires + 1, false),
    ] {
        let frame = raw_v3(
            prekey,
            c,
            &w.alice_cert,
            &inner("alice", "bob", ts, "x"),
            Twist::default(),
        );
        let result = open_bob(w, &frame);
        assert_eq!(result.is_ok(), ok, "{ts}: {result:?}");
        if !ok {
            assert_eq!(result.unwrap_err().reason(), "signature");
        }
    }

    // S by another Ed25519 key than the certificate's.
    let frame = raw_v3(
        prekey,
        c,
        &forged,
        &inner("alice", "bob", NOW, "x"),
        Twist::default(),
    );
    assert!(matches!(open_bob(w, &frame), Err(FrameError::Signature)));

    // A certificate that is not a certificate, and lengths past the end.
    let frame = raw_v3(
        prekey,
        b"{\"certificate\":1}",
        &w.alice_cert,
        &inner("alice", "bob", NOW, "x"),
        Twist::default(),
    );
    assert_eq!(open_bob(w, &frame).unwrap_err().reason(), "signature");
    // An inner message without id.
    let no_id = Inner {
        kind: None,
        receipt: None,
        presence: None,
        file: None,
        chunk: None,
        file_ack: None,
        file_cancel: None,
        receipts: false,
        from: "alice".into(),
        to: "bob".into(),
        timestamp: NOW,
        message: "m".into(),
        id: None,
    }
    .to_go_json();
    let frame = raw_v3(prekey, c, &w.alice_cert, &no_id, Twist::default());
    assert!(matches!(open_bob(w, &frame), Err(FrameError::Inner(_))));
}

#[test]
fn the_existing_receiving_rules_apply_to_v3() {
    let w = world();
    let (alice, carol) = (user("alice"), user("carol"));
    // Misaddressed: an inner `to` that is not bob (the frame sealed to bob's prekey anyway).
    let frame = raw_v3(
        w.bob_prekey.signed(),
        w.alice_cert.signed().as_bytes(),
        &w.alice_cert,
        &inner("alice", "carol", NOW, "x"),
        Twist::default(),
    );
    let opened = open_bob(w, &frame).unwrap();
    assert!(matches!(
        opened.check_recipient(&user("bob")),
        Err(FrameError::Misaddressed { .. })
    ));
    opened.check_recipient(&carol).unwrap();
    // From the future (still inside the certificate).
    let ts = NOW + 6 * 60 * 1000;
    let frame = sealed(w, "later", ts);
    assert!(matches!(
        open_bob(w, &frame).unwrap().check_time(NOW),
        Err(FrameError::FromTheFuture { .. })
    ));
    // Too large, at open and at seal.
    let huge = vec![b' '; MAX_FRAME_BYTES + 1];
    assert!(matches!(
        open_bob(w, &huge),
        Err(FrameError::TooLarge { .. })
    ));
    let text = "x".repeat(MAX_FRAME_BYTES);
    let bob = user("bob");
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: &text,
        timestamp_ms: NOW,
    };
    assert!(matches!(
        v3::seal(&draft, w.bob_prekey.signed(), &w.alice_cert, NOW),
        Err(V3Error::Frame(FrameError::TooLarge { .. }))
    ));
}

#[test]
fn sealing_checks_the_prekey_and_the_certificate() {
    let w = world();
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "x",
        timestamp_ms: NOW,
    };
    let prekey = w.bob_prekey.prekey();
    // Expired, and not yet valid.
    for now in [prekey.expires, prekey.expires + 1, prekey.created - 1] {
        assert!(matches!(
            v3::seal(&draft, w.bob_prekey.signed(), &w.alice_cert, now),
            Err(V3Error::NotValid { what: "prekey", .. })
        ));
    }
    v3::seal(&draft, w.bob_prekey.signed(), &w.alice_cert, prekey.created).unwrap();
    // Bob's prekey is not carol's.
    let to_carol = Draft {
        control: None,
        wants_receipts: false,
        to: &carol,
        ..draft
    };
    assert!(matches!(
        v3::seal(&to_carol, w.bob_prekey.signed(), &w.alice_cert, NOW),
        Err(V3Error::WrongUser { what: "prekey", .. })
    ));
    // Our certificate must be ours, valid now and cover the timestamp.
    let from_carol = Draft {
        control: None,
        wants_receipts: false,
        from: &carol,
        ..draft
    };
    assert!(matches!(
        v3::seal(&from_carol, w.bob_prekey.signed(), &w.alice_cert, NOW),
        Err(V3Error::WrongUser {
            what: "certificate",
            ..
        })
    ));
    let old = CertificateSecret::generate(&alice, NOW - 3 * DAY, NOW - DAY, &w.alice_sign).unwrap();
    assert!(matches!(
        v3::seal(&draft, w.bob_prekey.signed(), &old, NOW),
        Err(V3Error::NotValid {
            what: "certificate",
            ..
        })
    ));
    let backdated = Draft {
        control: None,
        wants_receipts: false,
        timestamp_ms: NOW - 2 * DAY,
        ..draft
    };
    assert!(matches!(
        v3::seal(&backdated, w.bob_prekey.signed(), &w.alice_cert, NOW),
        Err(V3Error::NotValid {
            what: "certificate",
            ..
        })
    ));
    // The sender verifies the prekey with the pinned key before sealing to it.
    w.bob_prekey
        .signed()
        .verify_for(&bob, w.bob_sign.public_key())
        .unwrap();
    assert!(w.bob_prekey.signed().verify(&w.alice_sign_pub).is_err());
}

#[test]
fn malformed_frames_and_wrong_sizes_are_refused() {
    let w = world();
    let frame = sealed(w, "shape", NOW);
    let cases: Vec<(&str, usize, &str)> = vec![
        ("prekey", 15, "bad_length"),
        ("prekey", 17, "bad_length"),
        ("ek", 31, "bad_length"),
        ("ek", 33, "bad_length"),
        ("kem", 1087, "bad_length"),
        ("kem", 1089, "bad_length"),
        ("nonce", 11, "bad_length"),
        ("nonce", 13, "bad_length"),
        ("ciphertext", 15, "bad_length"),
    ];
    for (name, len, reason) in cases {
        let bad = with_field(&frame, name, b64::encode(&vec![1u8; len]).into());
        let err = open_bob(w, &bad).unwrap_err();
        assert_eq!(err.reason(), reason, "{name} {len}: {err:?}");
    }
    for name in ["prekey", "ek", "kem", "nonce", "ciphertext"] {
        let mut m = fields(&frame);
        m.remove(name);
        let err = open_bob(w, &serde_json::to_vec(&m).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "bad_json", "missing {name}");
        let value = fields(&frame)[name].as_str().unwrap().to_owned();
        let unpadded = with_field(&frame, name, value.trim_end_matches('=').to_owned().into());
        if value.ends_with('=') {
            assert_eq!(
                open_bob(w, &unpadded).unwrap_err().reason(),
                "bad_base64",
                "{name}"
            );
        }
        let standard = with_field(&frame, name, "+/+/".into());
        assert_eq!(
            open_bob(w, &standard).unwrap_err().reason(),
            "bad_base64",
            "{name}"
        );
        let number = with_field(&frame, name, 5.into());
        assert_eq!(
            open_bob(w, &number).unwrap_err().reason(),
            "bad_json",
            "{name}"
        );
    }
    assert_eq!(
        open_bob(w, &with_field(&frame, "v", 4.into()))
            .unwrap_err()
            .reason(),
        "bad_version"
    );
    for bad in ["", "{", "[]", "{\"v\":3}", "{\"v\":\"3\"}"] {
        assert!(open_bob(w, bad.as_bytes()).is_err(), "{bad:?}");
    }
    // A short plaintext: no room for the certificate length, or C and S past the end.
    let short = short_plaintext_frame(w, &[0u8]);
    assert_eq!(open_bob(w, &short).unwrap_err().reason(), "bad_inner");
    let past_end = short_plaintext_frame(w, &[0xff, 0xff, 1, 2, 3]);
    assert_eq!(open_bob(w, &past_end).unwrap_err().reason(), "bad_inner");
}

/// A v3 frame around an arbitrary plaintext P.
fn short_plaintext_frame(w: &World, plaintext: &[u8]) -> Vec<u8> {
    let p = w.bob_prekey.prekey();
    let (kem_ct, ss_m) = kem::EncapsulationKey::new(&kem::ML_KEM_768, &p.mlkem768)
        .unwrap()
        .encapsulate()
        .unwrap();
    let e = agreement::PrivateKey::generate(&agreement::X25519).unwrap();
    let ek = e.compute_public_key().unwrap();
    let k = agreement::agree(
        &e,
        agreement::UnparsedPublicKey::new(&agreement::X25519, &p.x25519),
        (),
        |ss_x| {
            let mut ctx = digest::Context::new(&digest::SHA3_256);
            for part in [
                &[0x5c, 0x2e, 0x2f, 0x2f, 0x5e, 0x5c][..],
                ss_m.as_ref(),
                ss_x,
                ek.as_ref(),
                &p.x25519[..],
            ] {
                ctx.update(part);
            }
            Ok(ctx.finish().as_ref().to_vec())
        },
    )
    .unwrap();
    let mut aad = b"NES/3".to_vec();
    aad.extend_from_slice(&p.id);
    aad.extend_from_slice(ek.as_ref());
    aad.extend_from_slice(kem_ct.as_ref());
    let ct = Aes256Gcm::new_from_slice(&k)
        .unwrap()
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    format!(
        r#"{{"v":3,"prekey":"{}","ek":"{}","kem":"{}","nonce":"{}","ciphertext":"{}"}}"#,
        b64::encode(&p.id),
        b64::encode(ek.as_ref()),
        b64::encode(kem_ct.as_ref()),
        b64::encode(&[0u8; 12]),
        b64::encode(&ct)
    )
    .into_bytes()
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn valid_frame() -> &'static Vec<u8> {
        static FRAME: OnceLock<Vec<u8>> = OnceLock::new();
        FRAME.get_or_init(|| sealed(world(), "mutate me", NOW))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn random_messages_round_trip(text in ".{0,300}", ts in (NOW - DAY)..(NOW + 13 * DAY)) {
            let w = world();
            let frame = sealed(w, &text, ts);
            let opened = open_bob(w, &frame).unwrap();
            prop_assert_eq!(opened.inner.message, text);
            prop_assert_eq!(opened.inner.timestamp, ts);
            prop_assert_eq!(opened.version, Version::V3);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn mutated_frames_never_open(flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4), cut in any::<Option<usize>>()) {
            let w = world();
            let mut bytes = valid_frame().clone();
            for (i, x) in &flips {
                let i = i % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(n) = cut {
                bytes.truncate(n % bytes.len());
            }
            prop_assume!(&bytes != valid_frame());
            prop_assert!(open_bob(w, &bytes).is_err());
        }

        #[test]
        fn arbitrary_v3_json_never_panics(
            prekey in "[A-Za-z0-9_=-]{0,40}",
            ek in "[A-Za-z0-9_=-]{0,60}",
            kem in "[A-Za-z0-9_=-]{0,1500}",
            nonce in "[A-Za-z0-9_=-]{0,20}",
            ct in "[A-Za-z0-9_=-]{0,100}",
        ) {
            let w = world();
            let frame = format!(r#"{{"v":3,"prekey":"{prekey}","ek":"{ek}","kem":"{kem}","nonce":"{nonce}","ciphertext":"{ct}"}}"#);
            prop_assert!(open_bob(w, frame.as_bytes()).is_err());
        }
    }
}

#[test]
fn only_v1_and_v2_frames_need_a_private_rsa_operation() {
    use nes_proto::frame::needs_private_rsa;
    let w = world();
    let (alice, bob) = (user("alice"), user("bob"));
    let draft = Draft {
        control: None,
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "lane",
        timestamp_ms: NOW,
    };
    let bob_pub = PublicKey::from_pem(&key_text("bob-rsa-message.pub")).unwrap();
    for version in [Version::V1, Version::V2] {
        let frame = nes_proto::frame::seal(version, &draft, &bob_pub, &w.alice_sign)
            .unwrap()
            .frame;
        assert!(needs_private_rsa(&frame), "{version:?}");
    }
    assert!(!needs_private_rsa(&sealed(w, "cheap", NOW)), "v3");
    // Refused before any decryption: cheap too.
    assert!(!needs_private_rsa(b"not json"));
    assert!(!needs_private_rsa(br#"{"v":9,"ciphertext":"AA=="}"#));
    assert!(!needs_private_rsa(br#"{"v":"2"}"#));
    let mut huge = br#"{"v":2,"ciphertext":""#.to_vec();
    huge.resize(nes_proto::frame::MAX_FRAME_BYTES + 1, b'A');
    huge.extend_from_slice(br#""}"#);
    assert!(!needs_private_rsa(&huge), "over the frame limit");
    // Fields in another order, and unknown ones, do not change the answer.
    assert!(needs_private_rsa(
        br#"{"x":[1,2],"ciphertext":"AA==","v":2}"#
    ));
}

#[test]
fn the_fuzz_seeds_still_open_with_the_fuzz_prekey() {
    // proto/fuzz/keys/README.md: seeds made with the offline CLI, so the fuzzer starts from
    // frames that reach the deepest checks.
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let prekey =
        PrekeySecret::from_file(&std::fs::read(fuzz.join("keys/bob-prekey-secret.json")).unwrap())
            .unwrap();
    let prekeys = HashMap::from([(prekey.id(), Arc::new(prekey))]);
    let bob_message = PrivateKey::from_pem(&key_text("bob-rsa-message")).unwrap();
    let alice_sign = PublicKey::from_pem(&key_text("alice-rsa-sign.pub")).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(fuzz.join("seeds/frame_open")).unwrap() {
        let frame = std::fs::read(entry.unwrap().path()).unwrap();
        let opened = open_with(&frame, Some(&bob_message), &prekeys, &alice_sign).unwrap();
        assert_eq!(opened.version, Version::V3);
        assert_eq!(opened.inner.from, "alice");
        // And nothing else opens them.
        assert!(matches!(
            open_with(&frame, Some(&bob_message), &NoPrekeys, &alice_sign),
            Err(FrameError::UnknownPrekey)
        ));
        seen += 1;
    }
    assert!(seen >= 3, "{seen} seeds");
}

/// The largest chunk of a file fits a frame, in v3 (the larger: certificate and
/// signature inside) and in v2, and opens to the same bytes.
#[test]
fn a_full_file_chunk_fits_the_frame_limit_in_v3_and_v2() {
    use nes_proto::files::{FileChunk, MAX_CHUNK_BYTES};
    use nes_proto::inner::{Control, Kind};
    let w = world();
    let (alice, bob) = (user("alice"), user("bob"));
    let chunk = FileChunk {
        file: b64::encode(&[7u8; 16]),
        index: 12,
        data: (0..MAX_CHUNK_BYTES).map(|i| (i % 251) as u8).collect(),
    };
    let draft = Draft {
        control: Some(Control::Chunk(&chunk)),
        wants_receipts: false,
        from: &alice,
        to: &bob,
        text: "",
        timestamp_ms: NOW,
    };
    let v3 = v3::seal(&draft, w.bob_prekey.signed(), &w.alice_cert, NOW)
        .unwrap()
        .frame;
    assert!(
        v3.len() <= nes_proto::frame::MAX_FRAME_BYTES,
        "{}",
        v3.len()
    );
    let opened = open_bob(w, &v3).unwrap();
    assert!(matches!(opened.inner.kind(), Kind::Chunk(c) if *c == chunk));
    let v2 = nes_proto::frame::seal(
        nes_proto::frame::Version::V2,
        &draft,
        w.bob_message.public_key(),
        &w.alice_sign,
    )
    .unwrap()
    .frame;
    assert!(v2.len() < v3.len());
    let opened = open_bob(w, &v2).unwrap();
    assert!(matches!(opened.inner.kind(), Kind::Chunk(c) if c.data == chunk.data));
    eprintln!(
        "full chunk: v3 frame {} bytes, v2 {} bytes",
        v3.len(),
        v2.len()
    );
}
