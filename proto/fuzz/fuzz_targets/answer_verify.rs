//! Any bytes as a key server answer about alice: must never panic, and must never verify
//! unless signed by the provider key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_proto::answer::{verify_answer, UsernameRule};
use nes_proto::{PublicKey, Username};
use std::sync::OnceLock;

fn server() -> &'static (PublicKey, Username) {
    static KEY: OnceLock<(PublicKey, Username)> = OnceLock::new();
    KEY.get_or_init(|| {
        (
            PublicKey::from_pem(include_str!("../../tests/vectors/legacy-v1/provider-public-key.pem")).expect("provider key"),
            Username::parse("alice").expect("name"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, alice) = server();
    let _ = verify_answer(data, key, alice, UsernameRule::IfPresent);
    let _ = verify_answer(data, key, alice, UsernameRule::Require);
});
