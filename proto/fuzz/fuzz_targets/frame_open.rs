//! Any bytes as a frame received by bob: decrypt, and verify when that succeeds.
//! Must never panic; must never open anything not sealed by alice for bob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_proto::frame;
use nes_proto::{PrivateKey, PublicKey};
use std::sync::OnceLock;

struct Keys {
    bob: PrivateKey,
    alice_sign: PublicKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        bob: PrivateKey::from_pem(include_str!("../../tests/vectors/legacy-v1/keys/bob-rsa-message")).expect("bob key"),
        alice_sign: PublicKey::from_pem(include_str!("../../tests/vectors/legacy-v1/keys/alice-rsa-sign.pub")).expect("alice key"),
    })
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    if let Ok(decrypted) = frame::decrypt(data, &k.bob) {
        let _ = decrypted.verify(&k.alice_sign);
    }
});
