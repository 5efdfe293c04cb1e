//! Any bytes as the inner JSON of a frame that decrypted and verified (what a contact,
//! or a stolen key, can put there): parsing must never panic, whatever kind it claims;
//! what parses writes back (as nesd writes it) to JSON that parses to the same message;
//! a file offer's chunk arithmetic stays in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nes_proto::inner::{Inner, Kind};

fuzz_target!(|data: &[u8]| {
    let Ok(inner) = Inner::parse(data) else {
        return;
    };
    let again = Inner::parse(&inner.to_go_json()).expect("what we write parses");
    assert_eq!(again, inner);
    if let Kind::File(offer) = inner.kind() {
        let chunks = offer.chunks();
        let last = offer.chunk_len(chunks.saturating_sub(1));
        assert!(last <= u64::from(offer.chunk_size));
        assert_eq!(offer.chunk_len(chunks), 0);
    }
});
