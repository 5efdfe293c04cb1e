//! Any bytes as a frame received by bob: decrypt (v1 and v2 with bob's RSA message key, v3
//! with bob's prekey), and verify when that succeeds. Must never panic; must never open
//! anything not sealed by alice for bob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_proto::frame;
use nes_proto::v3::{KeyId, PrekeySecret};
use nes_proto::{PrivateKey, PublicKey};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

struct Keys {
    bob: PrivateKey,
    bob_prekeys: HashMap<KeyId, Arc<PrekeySecret>>,
    alice_sign: PublicKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let prekey = PrekeySecret::from_file(include_bytes!("../keys/bob-prekey-secret.json"))
            .expect("bob's prekey");
        Keys {
            bob: PrivateKey::from_pem(include_str!("../../tests/vectors/legacy-v1/keys/bob-rsa-message")).expect("bob key"),
            bob_prekeys: HashMap::from([(prekey.id(), Arc::new(prekey))]),
            alice_sign: PublicKey::from_pem(include_str!("../../tests/vectors/legacy-v1/keys/alice-rsa-sign.pub")).expect("alice key"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    if let Ok(decrypted) = frame::decrypt_with(data, Some(&k.bob), &k.bob_prekeys) {
        let _ = decrypted.verify(&k.alice_sign);
    }
});
