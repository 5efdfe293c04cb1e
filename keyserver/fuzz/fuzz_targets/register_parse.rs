//! Any bytes as a `POST /users` body: `Registration::parse` must never panic; what it
//! refuses is a 400 with an error code; what it accepts keeps the promises its type
//! documents (a valid lower-case username, a bounded e-mail, two different RSA keys of
//! 2048..=4096 bits, kept verbatim).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_keyserver::api::register::{Registration, MAX_EMAIL};
use nes_proto::{PublicKey, Username};

fuzz_target!(|data: &[u8]| {
    match Registration::parse(data) {
        Err(e) => {
            assert_eq!(e.status().as_u16(), 400, "a refusal that is not a 400");
            assert!(!e.code().is_empty());
        }
        Ok(r) => {
            let name = r.username.as_str();
            assert_eq!(Username::parse(name).map(|u| u.as_str().to_owned()).ok().as_deref(), Some(name));
            assert!(!name.chars().any(|c| c.is_ascii_uppercase()));
            assert!(r.email.len() <= MAX_EMAIL && r.email.contains('@'));
            let message = PublicKey::from_pem(&r.public_key_message).expect("accepted message key parses");
            let sign = PublicKey::from_pem(&r.public_key_sign).expect("accepted sign key parses");
            assert!(message != sign, "accepted two equal keys");
        }
    }
});
