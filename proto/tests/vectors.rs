//! The original Go code's own frames and key-server answers (`proto/tests/vectors/legacy-v1`)
//! must open and verify to the exact bytes it produced.

use nes_proto::answer::{verify_answer, UsernameRule};
use nes_proto::frame::{self, Version};
use nes_proto::{PrivateKey, PublicKey, Username};
use std::path::PathBuf;

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/legacy-v1")
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(vectors().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn private(path: &str) -> PrivateKey {
    PrivateKey::from_pem(std::str::from_utf8(&read(path)).unwrap()).unwrap()
}

fn public(path: &str) -> PublicKey {
    PublicKey::from_pem(std::str::from_utf8(&read(path)).unwrap()).unwrap()
}

#[test]
fn all_original_frames_open_to_the_exact_inner_bytes() {
    let bob = private("keys/bob-rsa-message");
    let alice_sign = public("keys/alice-rsa-sign.pub");
    let me = Username::parse("bob").unwrap();
    for n in 1..=5 {
        let frame_bytes = read(&format!("frames/frame-{n:02}.json"));
        let expected = read(&format!("frames/frame-{n:02}.expected.json"));
        let text = String::from_utf8(read(&format!("frames/frame-{n:02}.message.txt"))).unwrap();
        let opened = frame::open(&frame_bytes, &bob, &alice_sign)
            .unwrap_or_else(|e| panic!("frame {n}: {e}"));
        assert_eq!(opened.version, Version::V1);
        assert_eq!(opened.inner_bytes, expected, "frame {n}");
        assert_eq!(opened.inner.message, text, "frame {n}");
        assert_eq!(opened.inner.from, "alice");
        opened.check_recipient(&me).unwrap();
        // The wrong sender key refuses every one of them.
        let wrong = public("keys/bob-rsa-sign.pub");
        assert!(frame::open(&frame_bytes, &bob, &wrong).is_err());
    }
}

#[test]
fn both_original_key_server_answers_verify() {
    let server = public("provider-public-key.pem");
    for user in ["alice", "bob"] {
        let body = read(&format!("http/get-{user}.body"));
        let name = Username::parse(user).unwrap();
        let answer = verify_answer(&body, &server, &name, UsernameRule::IfPresent).unwrap();
        assert_eq!(answer.username, None);
        assert_eq!(
            answer.message_key().unwrap(),
            public(&format!("keys/{user}-rsa-message.pub"))
        );
        assert_eq!(
            answer.sign_key().unwrap(),
            public(&format!("keys/{user}-rsa-sign.pub"))
        );
        // The signed range is exactly what the original signed.
        let signed = read(&format!("http/get-{user}.signed"));
        let body_text = std::str::from_utf8(&body).unwrap();
        assert!(body_text.contains(std::str::from_utf8(&signed).unwrap()));
    }
}
