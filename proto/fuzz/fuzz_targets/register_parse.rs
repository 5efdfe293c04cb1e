//! Any bytes as the key server's `POST /users` body: `Registration::parse` must never
//! panic; what it refuses carries a known error code; what it accepts keeps the promises
//! its type documents (a valid lower-case username, a bounded e-mail, two different RSA
//! keys of 2048..=4096 bits, kept verbatim) and survives a round trip through `to_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_proto::registration::{Registration, MAX_EMAIL};
use nes_proto::{PublicKey, Username};

const CODES: [&str; 5] = ["invalid_json", "invalid_username", "invalid_email", "invalid_key", "same_keys"];

fuzz_target!(|data: &[u8]| {
    match Registration::parse(data) {
        Err(e) => {
            assert!(CODES.contains(&e.code()), "unknown code {}", e.code());
            assert!(!e.to_string().is_empty());
        }
        Ok(r) => {
            let name = r.username.as_str();
            assert_eq!(Username::parse(name).map(|u| u.as_str().to_owned()).ok().as_deref(), Some(name));
            assert!(!name.chars().any(|c| c.is_ascii_uppercase()));
            assert!(r.email.len() <= MAX_EMAIL && r.email.contains('@'));
            let message = PublicKey::from_pem(&r.public_key_message).expect("accepted message key parses");
            let sign = PublicKey::from_pem(&r.public_key_sign).expect("accepted sign key parses");
            assert!(message != sign, "accepted two equal keys");
            assert_eq!(Registration::parse(&r.to_json()).ok().as_ref(), Some(&r), "to_json round-trips");
        }
    }
});
