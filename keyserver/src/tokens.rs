//! Activation and delete tokens.
//!
//! A token is 32 bytes (256 bits) from the OS RNG, written base64url without padding
//! (43 characters, safe in a URL path). It exists in clear only in the mail; the store
//! keeps its SHA-256. A presented token is hashed and compared with the stored hash in
//! constant time (`subtle`), so neither a database dump nor response timing helps
//! anyone guess one. (A plain hash, not a slow KDF: the token has 256 bits of entropy,
//! nothing to brute-force.)

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// A fresh secret token, to be mailed. `Debug` does not print it.
pub struct Token(String);

/// The SHA-256 of a token: what the store keeps and what presented tokens are compared
/// against.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl Token {
    /// Draws a token from the OS RNG.
    pub fn generate() -> Result<Self, rand::Error> {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.try_fill_bytes(&mut bytes)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The token as it goes into the link.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its hash, for the store.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl TokenHash {
    /// The hash of a presented token (any text from a URL).
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }

    /// The 32 hash bytes, for the store.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether this hash equals `stored` (as read from the store), in constant time.
    /// A stored value of the wrong length never matches.
    pub fn matches(&self, stored: &[u8]) -> bool {
        stored.len() == self.0.len() && bool::from(self.0.as_slice().ct_eq(stored))
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_eq!(
            a.as_str().len(),
            43,
            "256 bits in base64url without padding"
        );
        assert_ne!(a.as_str(), b.as_str());
        assert!(a
            .as_str()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(
            URL_SAFE_NO_PAD.decode(a.as_str()).unwrap().len(),
            TOKEN_BYTES
        );
        assert!(
            !format!("{a:?}").contains(a.as_str()),
            "Debug hides the secret"
        );
    }

    #[test]
    fn hashes_match_only_their_token() {
        let t = Token::generate().unwrap();
        let stored = t.hash();
        assert_eq!(
            stored.as_bytes(),
            Sha256::digest(t.as_str().as_bytes()).as_slice()
        );
        assert!(TokenHash::of(t.as_str()).matches(stored.as_bytes()));
        let mut other = t.as_str().to_string();
        other.pop();
        assert!(!TokenHash::of(&other).matches(stored.as_bytes()));
        assert!(!TokenHash::of("").matches(stored.as_bytes()));
        assert!(!TokenHash::of(t.as_str()).matches(&stored.as_bytes()[..31]));
        assert!(!TokenHash::of(t.as_str()).matches(&[]));
    }
}
