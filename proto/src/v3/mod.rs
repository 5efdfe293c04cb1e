//! v3 frames: forward secrecy and post-quantum confidentiality (docs/PROTOCOL.md "v3").
//!
//! v1 and v2 wrap every message key with the recipient's long-term RSA key; v3 seals to a
//! short-lived **prekey** (X25519 + ML-KEM-768, combined X-Wing style), signs with a
//! short-lived Ed25519 **certificate** key, and keeps RSA for identity only: the
//! identity's RSA sign key signs each prekey and certificate once per rotation.
//!
//! | module | holds |
//! |---|---|
//! | [`doc`] | the prekey and certificate documents, signed and verified byte for byte |
//! | [`store`] | the private halves and their files under `DIR/keys/{prekeys,certificates}/` |
//! | [`seal`] | sealing a v3 frame and the v3 half of opening (used by [`crate::frame`]) |
//!
//! Opening goes through [`crate::frame::decrypt_with`] (which recognises `"v":3` beside
//! v1 and v2 and looks the frame's prekey up in a [`Prekeys`]) and then
//! [`crate::frame::Decrypted::verify`] with the pinned RSA sign key of the inner `from`,
//! which checks the certificate and the Ed25519 signature. Sealing is [`seal::seal`].

pub mod doc;
pub mod seal;
pub mod store;

pub use doc::{Certificate, Prekey, SignedCertificate, SignedPrekey};
pub use seal::seal;
pub use store::{CertificateSecret, KeyDir, NoPrekeys, PrekeySecret, Prekeys};

use crate::keys::KeyError;

/// Bytes of a prekey or certificate id.
pub const ID_BYTES: usize = 16;
/// A prekey or certificate id: 16 random bytes.
pub type KeyId = [u8; ID_BYTES];
/// Bytes of an ML-KEM-768 encapsulation key (FIPS 203).
pub const MLKEM768_PUBLIC_BYTES: usize = 1184;
/// Bytes of an ML-KEM-768 decapsulation key (FIPS 203, the full 2400-byte form).
pub const MLKEM768_PRIVATE_BYTES: usize = 2400;
/// Bytes of an ML-KEM-768 ciphertext (the frame's `kem`).
pub const MLKEM768_CIPHERTEXT_BYTES: usize = 1088;
/// Bytes of an X25519 key, public or private.
pub const X25519_BYTES: usize = 32;
/// Bytes of an Ed25519 public key or seed.
pub const ED25519_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const ED25519_SIGNATURE_BYTES: usize = 64;
/// The label that starts the key combiner's input (DESIGN "v3" step 3).
pub const COMBINER_LABEL: [u8; 6] = [0x5c, 0x2e, 0x2f, 0x2f, 0x5e, 0x5c];
/// The prefix of the Ed25519-signed bytes and of the AES-GCM associated data.
pub const V3_LABEL: &[u8] = b"NES/3";
/// Signed documents larger than this are refused unread (a 4096-bit signature and a
/// 1184-byte key fit many times over).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024;
/// How far before its `created` a certificate still covers a timestamp (clock skew).
pub const CERTIFICATE_SKEW_MS: i64 = 5 * 60 * 1000;

/// Why a v3 document or private file was refused, or a v3 frame could not be sealed.
/// (Refusals of received frames are [`crate::FrameError`]s, whose `reason()` names the
/// counters.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum V3Error {
    /// Larger than [`MAX_DOCUMENT_BYTES`].
    #[error("document of {size} bytes is larger than the {MAX_DOCUMENT_BYTES}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not JSON of the expected shape.
    #[error("bad JSON: {0}")]
    Json(String),
    /// A binary field is not padded base64url.
    #[error("field {field:?} is not base64url")]
    Base64 {
        /// The JSON field.
        field: &'static str,
    },
    /// A binary field has the wrong length.
    #[error("field {field:?} has the wrong length")]
    Length {
        /// The JSON field.
        field: &'static str,
    },
    /// `username` is not a valid username.
    #[error(transparent)]
    Username(#[from] crate::username::UsernameError),
    /// The RSA signature does not verify under the given sign key.
    #[error("the {what}'s signature does not verify under the given sign key")]
    Signature {
        /// "prekey" or "certificate".
        what: &'static str,
    },
    /// The document names another user.
    #[error("the {what} belongs to {got:?}, not {expected:?}")]
    WrongUser {
        /// "prekey" or "certificate".
        what: &'static str,
        /// Who it should belong to.
        expected: String,
        /// Who it names.
        got: String,
    },
    /// Not valid at the given time (`created <= now < expires` fails).
    #[error("the {what} is valid from {created} to {expires} (Unix ms), not at {now}")]
    NotValid {
        /// "prekey" or "certificate".
        what: &'static str,
        /// Its `created`.
        created: i64,
        /// Its `expires`.
        expires: i64,
        /// The time asked about.
        now: i64,
    },
    /// A private file's secret does not match its published half.
    #[error("{0}")]
    Mismatch(String),
    /// No valid key of that kind is held.
    #[error("{0}")]
    Missing(String),
    /// An RSA key failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The crypto backend failed or refused a key.
    #[error("crypto backend: {0}")]
    Crypto(&'static str),
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Sealing made a frame the receiving rules would refuse (too large).
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
}

/// An id as the file names spell it: lower-case hex.
pub fn id_hex(id: &KeyId) -> String {
    crate::keys::hex_lower(id)
}

/// Reads a file name's lower-case hex back into an id.
pub fn parse_id_hex(text: &str) -> Option<KeyId> {
    if text.len() != 2 * ID_BYTES
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut id = [0u8; ID_BYTES];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// A fresh id from the OS RNG.
pub fn new_id() -> KeyId {
    use rand::RngCore;
    let mut id = [0u8; ID_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}

/// Decodes a base64url field that must hold exactly `N` bytes.
pub(crate) fn fixed<const N: usize>(text: &str, field: &'static str) -> Result<[u8; N], V3Error> {
    let bytes = zeroize::Zeroizing::new(crate::b64::decode(text).ok_or(V3Error::Base64 { field })?);
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| V3Error::Length { field })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let id = new_id();
        let hex = id_hex(&id);
        assert_eq!(hex.len(), 32);
        assert_eq!(parse_id_hex(&hex), Some(id));
        assert_eq!(
            parse_id_hex(&id_hex(&[0xab; 16]).to_ascii_uppercase()),
            None
        );
        assert_eq!(parse_id_hex("00"), None);
        assert_eq!(parse_id_hex(&"g".repeat(32)), None);
    }
}

/// Parses a rotation or grace period as `90s`, `30m`, `12h`, `7d` (a bare number is
/// seconds), for `nes prekey new --rotation` and nesd's `prekey_rotation`/`prekey_grace`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, DurationError> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let not_a_duration = || DurationError::NotADuration {
        text: text.to_owned(),
    };
    let n: u64 = number.parse().map_err(|_| not_a_duration())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(not_a_duration)?;
    if secs == 0 {
        return Err(DurationError::Zero);
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Why [`parse_duration`] refused a period (a flag or a setting, never wire data): a
/// type of its own so that clap and the config readers get an error, not a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not a number with one of the units `s`, `m`, `h`, `d` (or it overflows).
    #[error("{text:?} is not a duration like 7d, 12h, 30m or 90s")]
    NotADuration {
        /// The text, trimmed.
        text: String,
    },
    /// A period of zero.
    #[error("a duration must be longer than zero")]
    Zero,
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        for bad in ["", "0", "7w", "d", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_duration(" 7w ").unwrap_err().to_string(),
            r#""7w" is not a duration like 7d, 12h, 30m or 90s"#
        );
        assert_eq!(parse_duration("0d"), Err(super::DurationError::Zero));
    }
}
