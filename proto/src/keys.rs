//! RSA keys: the original's file formats, generation, and the operations the wire needs.
//!
//! Files are what the original `nes generate` wrote: private keys as PEM
//! `RSA PRIVATE KEY` (PKCS#1), public keys as PEM `PUBLIC KEY` (PKIX / SPKI), 64-character
//! lines, a final newline. An identity has two pairs: the *message* pair unwraps message
//! keys, the *sign* pair signs.
//!
//! # Backends
//! Private-key operations (unwrap, sign) and public encryption run on aws-lc-rs, the
//! fastest RSA on the machine (it matches OpenSSL's assembly; the pure-Rust `rsa` crate is
//! several times slower and not constant-time, see RUSTSEC-2023-0071). The `rsa` crate
//! stays for what it is good at and where timing does not matter: reading and writing the
//! PEM/DER formats, and the public-key half of v1's any-salt PSS verification (aws-lc-rs
//! can only verify a salt length it is told; the original signs with the maximum and
//! accepts any, so we must too). No private-key arithmetic runs in the `rsa` crate.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::hmac;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, Pkcs1PrivateDecryptingKey,
    Pkcs1PublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{self, RsaKeyPair, RsaPssSaltLength};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

/// Smallest RSA modulus accepted, ours or a peer's.
pub const MIN_BITS: usize = 2048;
/// Largest RSA modulus accepted (bounds the cost of a verification an attacker can ask for).
pub const MAX_BITS: usize = 4096;
/// Size `nes generate` uses unless told otherwise (the original's).
pub const DEFAULT_BITS: usize = 2048;
/// Sizes `generate` can make.
pub const GENERATE_BITS: [usize; 3] = [2048, 3072, 4096];

/// Why a key could not be read, written, made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not a PEM key of the expected kind.
    #[error("not a {expected} PEM key")]
    Format {
        /// What was expected, e.g. "RSA PRIVATE KEY (PKCS#1)".
        expected: &'static str,
    },
    /// The modulus is outside [`MIN_BITS`]..=[`MAX_BITS`].
    #[error("RSA key of {bits} bits refused: keys must have {MIN_BITS} to {MAX_BITS} bits")]
    Size {
        /// The key's modulus size.
        bits: usize,
    },
    /// `generate` was asked for a size it does not make.
    #[error("cannot generate {bits}-bit keys: choose one of 2048, 3072, 4096")]
    GenerateSize {
        /// The size asked for.
        bits: usize,
    },
    /// The crypto backend refused the key or failed an operation on it.
    #[error("RSA backend refused the key: {0}")]
    Backend(String),
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// An RSA public key (a `public_key_message` or `public_key_sign` of the key server, or a
/// `*.pub` file).
#[derive(Clone)]
pub struct PublicKey {
    rsa: RsaPublicKey,
    spki_der: Vec<u8>,
    encrypting: PublicEncryptingKey,
    /// The key parsed once for each PSS check (AWS-LC keeps its Montgomery context with
    /// it): parsing it for every signature cost more than the check's own arithmetic.
    pss_salt_32: signature::ParsedPublicKey,
    pss_salt_max: signature::ParsedPublicKey,
    /// Documents this key has verified ([`PublicKey::verify_pss_digest_salt_once`]),
    /// shared by clones.
    verified: Arc<Mutex<VecDeque<[u8; 32]>>>,
}

/// Documents remembered per key as verified: a sender has one or two signing certificates
/// live at a time.
const VERIFIED_KEPT: usize = 16;

/// v1's signatures (the original's): PSS with the largest salt that fits.
const RSA_PSS_MAX_SALT: signature::RsaParameters =
    signature::RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

/// An RSA private key (a `<user>-rsa-message` or `<user>-rsa-sign` file). Never leaves
/// nesd; `Debug` does not print it.
pub struct PrivateKey {
    pkcs1_pem: Zeroizing<String>,
    signing: RsaKeyPair,
    oaep: OaepPrivateDecryptingKey,
    pkcs1: Pkcs1PrivateDecryptingKey,
    /// Keys the stand-in for a v1 cipherkey that does not unwrap ([`PrivateKey::unwrap_v1_key`]).
    rejection: hmac::Key,
    public: PublicKey,
}

/// Size of a v1 message key: AES-256 key (32) then CBC IV (16).
pub(crate) const V1_KEY_BYTES: usize = 48;

/// Domain of the implicit-rejection secret, so that it is no other use of the private key.
const REJECTION_DOMAIN: &[u8] = b"NES v1 implicit rejection\0";

/// What [`PrivateKey::unwrap_v1_key`] gives: always 48 bytes to decrypt with, and whether
/// they are the real message key.
pub(crate) struct V1Key {
    /// The unwrapped key, or the stand-in.
    pub(crate) key: Zeroizing<[u8; V1_KEY_BYTES]>,
    /// 1 when `key` is what the cipherkey carried, 0 when it is the stand-in. A `u8`, not a
    /// `bool`, so that computing it needs no branch; look at it only after the work that
    /// uses `key` is done.
    pub(crate) unwrapped: u8,
}

/// v1 (the original) signs with the largest PSS salt that fits.
const PSS_MAX_SALT: signature::RsaSignatureEncoding =
    signature::RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` (SPKI). A PEM `RSA PUBLIC KEY` (PKCS#1) is accepted too.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let rsa = RsaPublicKey::from_public_key_pem(pem.trim())
            .or_else(|_| {
                <RsaPublicKey as rsa::pkcs1::DecodeRsaPublicKey>::from_pkcs1_pem(pem.trim())
            })
            .map_err(|_| KeyError::Format {
                expected: "PUBLIC KEY",
            })?;
        Self::from_rsa(rsa)
    }

    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let rsa = RsaPublicKey::from_public_key_der(der).map_err(|_| KeyError::Format {
            expected: "PUBLIC KEY",
        })?;
        Self::from_rsa(rsa)
    }

    /// Reads a `*.pub` file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        Self::from_pem(&read_text(path)?)
    }

    fn from_rsa(rsa: RsaPublicKey) -> Result<Self, KeyError> {
        let bits = rsa.n().bits();
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(KeyError::Size { bits });
        }
        let spki_der = rsa
            .to_public_key_der()
            .map_err(|e| KeyError::Backend(e.to_string()))?
            .into_vec();
        let pkcs1_der = rsa
            .to_pkcs1_der()
            .map_err(|e| KeyError::Backend(e.to_string()))?
            .into_vec();
        let encrypting = PublicEncryptingKey::from_der(&spki_der)
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let parsed = |alg: &'static signature::RsaParameters| {
            signature::ParsedPublicKey::new(alg, &pkcs1_der)
                .map_err(|e| KeyError::Backend(e.to_string()))
        };
        let pss_salt_32 = parsed(&signature::RSA_PSS_2048_8192_SHA256)?;
        let pss_salt_max = parsed(&RSA_PSS_MAX_SALT)?;
        Ok(Self {
            rsa,
            spki_der,
            encrypting,
            pss_salt_32,
            pss_salt_max,
            verified: Arc::default(),
        })
    }

    /// The key as PEM `PUBLIC KEY`, 64-character lines and a final newline, as the original
    /// wrote and registered it.
    pub fn to_pem(&self) -> String {
        // Encoding a key we already hold as DER cannot fail.
        self.rsa
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_else(|_| String::new())
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.rsa.n().bits()
    }

    /// Modulus size in bytes (the size of a signature or a wrapped key).
    pub fn size(&self) -> usize {
        self.rsa.size()
    }

    /// SHA-256 of the SPKI DER, lower-case hex: what users compare out of band.
    pub fn fingerprint(&self) -> String {
        hex_lower(&Sha256::digest(&self.spki_der))
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, empty label): wraps a v2 message key.
    pub(crate) fn encrypt_oaep(&self, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let key = OaepPublicEncryptingKey::new(self.encrypting.clone())
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let mut out = vec![0u8; key.ciphertext_size()];
        let len = key
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|e| KeyError::Backend(e.to_string()))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// RSAES-PKCS1-v1_5: wraps a v1 message key, as the original does.
    pub(crate) fn encrypt_pkcs1(&self, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let key = Pkcs1PublicEncryptingKey::new(self.encrypting.clone())
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let mut out = vec![0u8; key.ciphertext_size()];
        let len = key
            .encrypt(plaintext, &mut out)
            .map_err(|e| KeyError::Backend(e.to_string()))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// RSA-PSS-SHA-256 with a 32-byte salt (v2 and our key server's answers).
    pub(crate) fn verify_pss_digest_salt(&self, message: &[u8], sig: &[u8]) -> bool {
        self.pss_salt_32.verify_sig(message, sig).is_ok()
    }

    /// [`Self::verify_pss_digest_salt`] for a document that comes again and again (a
    /// sender's signing certificate rides in every v3 frame): the check is a pure function
    /// of this key and the bytes, so a document it passed once (remembered by the SHA-256
    /// of its bytes and signature) passes again without the RSA arithmetic. Only passes
    /// are remembered, at most [`VERIFIED_KEPT`], the oldest forgotten first.
    pub(crate) fn verify_pss_digest_salt_once(&self, message: &[u8], sig: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::new()
            .chain_update((message.len() as u64).to_be_bytes())
            .chain_update(message)
            .chain_update(sig)
            .finalize()
            .into();
        // A poisoned lock holds a plain list of digests, still valid. Not held across
        // the RSA check, which other threads' frames need not wait for.
        let verified = || self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified().contains(&digest) {
            return true;
        }
        if !self.verify_pss_digest_salt(message, sig) {
            return false;
        }
        let mut verified = verified();
        if verified.len() >= VERIFIED_KEPT {
            verified.pop_front();
        }
        verified.push_back(digest);
        true
    }

    /// RSA-PSS-SHA-256 accepting any salt length, as Go's `PSSSaltLengthAuto` does: what
    /// the original's signatures (maximum salt) need. RFC 8017 §9.1.2 with the salt length
    /// recovered from the encoded message. Public-key arithmetic only, so the `rsa` crate's
    /// bignums are fine here.
    pub(crate) fn verify_pss_any_salt(&self, message: &[u8], sig: &[u8]) -> bool {
        // Fast path: the original always signs with the maximum salt, which AWS-LC can
        // check at its own speed; any other length takes the general (slower) path.
        if self.pss_salt_max.verify_sig(message, sig).is_ok() {
            return true;
        }
        self.verify_pss_recovered_salt(message, sig)
    }

    fn verify_pss_recovered_salt(&self, message: &[u8], sig: &[u8]) -> bool {
        const H_LEN: usize = 32;
        let k = self.rsa.size();
        if sig.len() != k {
            return false;
        }
        let s = BigUint::from_bytes_be(sig);
        if &s >= self.rsa.n() {
            return false;
        }
        let m = s.modpow(self.rsa.e(), self.rsa.n());
        let em_bits = self.rsa.n().bits() - 1;
        let em_len = em_bits.div_ceil(8);
        let m_bytes = m.to_bytes_be();
        if m_bytes.len() > em_len || em_len < H_LEN + 2 {
            return false;
        }
        let mut em = vec![0u8; em_len];
        em[em_len - m_bytes.len()..].copy_from_slice(&m_bytes);
        if em[em_len - 1] != 0xbc {
            return false;
        }
        let db_len = em_len - H_LEN - 1;
        let (masked_db, rest) = em.split_at(db_len);
        let h = &rest[..H_LEN];
        let unused_bits = 8 * em_len - em_bits;
        let top_mask = 0xffu8 >> unused_bits;
        if masked_db[0] & !top_mask != 0 {
            return false;
        }
        let mut db = mgf1_sha256(h, db_len);
        for (d, m) in db.iter_mut().zip(masked_db) {
            *d ^= m;
        }
        db[0] &= top_mask;
        let Some(one) = db.iter().position(|&b| b != 0) else {
            return false;
        };
        if db[one] != 0x01 {
            return false;
        }
        let salt = &db[one + 1..];
        let m_hash = Sha256::digest(message);
        let mut hasher = Sha256::new();
        hasher.update([0u8; 8]);
        hasher.update(m_hash);
        hasher.update(salt);
        let h2 = hasher.finalize();
        subtle_eq(&h2, h)
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}
impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey(rsa-{}, sha256:{})",
            self.bits(),
            self.fingerprint()
        )
    }
}

impl PrivateKey {
    /// Makes a new key from the OS RNG (through AWS-LC's DRBG, seeded by the OS).
    pub fn generate(bits: usize) -> Result<Self, KeyError> {
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            _ => return Err(KeyError::GenerateSize { bits }),
        };
        let pair = aws_lc_rs::rsa::KeyPair::generate(size)
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let der: Pkcs8V1Der<'static> =
            AsDer::as_der(&pair).map_err(|e| KeyError::Backend(e.to_string()))?;
        let rsa = RsaPrivateKey::from_pkcs8_der(der.as_ref())
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        Self::from_rsa(&rsa)
    }

    /// Reads a PEM `RSA PRIVATE KEY` (PKCS#1), the original's format. A PEM `PRIVATE KEY`
    /// (PKCS#8) is accepted too, since tools like openssl write that by default.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let rsa = RsaPrivateKey::from_pkcs1_pem(pem.trim())
            .or_else(|_| RsaPrivateKey::from_pkcs8_pem(pem.trim()))
            .map_err(|_| KeyError::Format {
                expected: "RSA PRIVATE KEY (PKCS#1)",
            })?;
        Self::from_rsa(&rsa)
    }

    /// Reads a private key file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = Zeroizing::new(read_text(path)?);
        Self::from_pem(&text)
    }

    fn from_rsa(rsa: &RsaPrivateKey) -> Result<Self, KeyError> {
        let public = PublicKey::from_rsa(rsa.to_public_key())?;
        let pkcs8 = rsa
            .to_pkcs8_der()
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let backend = |e: aws_lc_rs::error::KeyRejected| KeyError::Backend(e.to_string());
        let signing = RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).map_err(backend)?;
        let decrypting = || PrivateDecryptingKey::from_pkcs8(pkcs8.as_bytes()).map_err(backend);
        let unspecified = |e: aws_lc_rs::error::Unspecified| KeyError::Backend(e.to_string());
        let oaep = OaepPrivateDecryptingKey::new(decrypting()?).map_err(unspecified)?;
        let pkcs1 = Pkcs1PrivateDecryptingKey::new(decrypting()?).map_err(unspecified)?;
        let pkcs1_pem = rsa
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        // Derived from the private key (as the implicit-rejection drafts derive theirs from
        // d), so it is secret, the same across restarts, and needs no file of its own.
        let pkcs1_der = rsa
            .to_pkcs1_der()
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let mut kdk = Sha256::new();
        kdk.update(REJECTION_DOMAIN);
        kdk.update(pkcs1_der.as_bytes());
        let kdk = Zeroizing::new(<[u8; 32]>::from(kdk.finalize()));
        let rejection = hmac::Key::new(hmac::HMAC_SHA256, kdk.as_ref());
        Ok(Self {
            pkcs1_pem: Zeroizing::new(pkcs1_pem.to_string()),
            signing,
            oaep,
            pkcs1,
            rejection,
            public,
        })
    }

    /// The key as PEM `RSA PRIVATE KEY` (PKCS#1), for writing the key file.
    pub fn to_pkcs1_pem(&self) -> Zeroizing<String> {
        self.pkcs1_pem.clone()
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.public.bits()
    }

    /// RSA-PSS-SHA-256 with a 32-byte salt: v2 and the key server's answers.
    pub fn sign_pss(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.sign_with(&signature::RSA_PSS_SHA256, message)
    }

    /// RSA-PSS-SHA-256 with the maximum salt, exactly as the original signs v1 frames.
    pub fn sign_pss_max_salt(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.sign_with(&PSS_MAX_SALT, message)
    }

    fn sign_with(
        &self,
        alg: &'static signature::RsaSignatureEncoding,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let mut sig = vec![0u8; self.signing.public_modulus_len()];
        self.signing
            .sign(
                alg,
                &aws_lc_rs::rand::SystemRandom::new(),
                message,
                &mut sig,
            )
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        Ok(sig)
    }

    /// Unwraps a v2 message key (RSA-OAEP-SHA-256). `None` when it does not unwrap.
    pub(crate) fn decrypt_oaep(&self, ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(vec![0u8; self.oaep.min_output_size()]);
        let len = self
            .oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, None)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }

    /// Unwraps a v1 message key (RSAES-PKCS1-v1_5) with *implicit rejection*: when the
    /// cipherkey does not unwrap (bad padding, wrong size, not for this key) or unwraps to
    /// anything but 48 bytes, the answer is a stand-in key, HMAC-SHA-256 of the cipherkey
    /// under a secret derived from this private key, instead of an early error. The caller
    /// decrypts with whatever it gets, and the frame fails later (CBC padding, inner JSON,
    /// signature) exactly as a frame whose real key unwrapped but whose ciphertext was
    /// tampered with: a Bleichenbacher-style attacker sending modified cipherkeys sees the
    /// same work and the same outcome either way. Deterministic, not fresh random, so that
    /// sending one cipherkey twice cannot tell a stand-in (which would vary) from a real key.
    ///
    /// The stand-in is computed every time, before the RSA operation; the choice between
    /// the two is a mask, not a branch. The one branch left is on aws-lc-rs's `Result`,
    /// whose padding check itself runs in constant time.
    pub(crate) fn unwrap_v1_key(&self, ciphertext: &[u8]) -> V1Key {
        let stand_in = self.rejection_key(ciphertext);
        let mut out = Zeroizing::new(vec![0u8; self.pkcs1.min_output_size().max(V1_KEY_BYTES)]);
        let (ok, len) = match self.pkcs1.decrypt(ciphertext, &mut out) {
            Ok(plain) => (1u8, plain.len()),
            Err(_) => (0u8, 0usize),
        };
        let good = ok & ct_eq_usize(len, V1_KEY_BYTES);
        // 0xff keeps the unwrapped bytes, 0x00 the stand-in.
        let mask = std::hint::black_box(0u8.wrapping_sub(good));
        let mut key = Zeroizing::new([0u8; V1_KEY_BYTES]);
        for ((k, real), fake) in key.iter_mut().zip(out.iter()).zip(stand_in.iter()) {
            *k = (real & mask) | (fake & !mask);
        }
        V1Key {
            key,
            unwrapped: good,
        }
    }

    /// The stand-in v1 key for `ciphertext`: two HMAC-SHA-256 blocks, the first 48 bytes.
    fn rejection_key(&self, ciphertext: &[u8]) -> Zeroizing<[u8; V1_KEY_BYTES]> {
        let mut out = Zeroizing::new([0u8; V1_KEY_BYTES]);
        for (block, chunk) in out.chunks_mut(32).enumerate() {
            let mut ctx = hmac::Context::with_key(&self.rejection);
            ctx.update(&[block as u8]);
            ctx.update(ciphertext);
            let tag = ctx.sign();
            chunk.copy_from_slice(&tag.as_ref()[..chunk.len()]);
        }
        out
    }
}

/// 1 when `a == b`, else 0, without a data-dependent branch.
fn ct_eq_usize(a: usize, b: usize) -> u8 {
    let x = std::hint::black_box((a ^ b) as u64);
    // The top bit of x | -x is set exactly when x is not zero.
    1 ^ (((x | x.wrapping_neg()) >> 63) as u8)
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateKey(rsa-{}, public sha256:{})",
            self.bits(),
            self.public.fingerprint()
        )
    }
}

/// Writes `contents` to `path` with mode 0600, creating it (or truncating it only when
/// `overwrite`). The mode is set at creation, so the secret is never readable by others,
/// not even for a moment.
pub fn write_private_file(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(io)?;
    // An existing file keeps its old mode on truncate: force it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn mgf1_sha256(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(counter.to_be_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The folder of a data directory that holds the key files (`DATA_DIR/keys`).
pub const KEYS_DIR: &str = "keys";
/// `<user>-rsa-message`: the private message key file, as the original client names it.
pub const MESSAGE_KEY_SUFFIX: &str = "-rsa-message";
/// `<user>-rsa-sign`: the private signing key file.
pub const SIGN_KEY_SUFFIX: &str = "-rsa-sign";

/// The four key files of `user` in `keys_dir`, in the order message, message.pub, sign,
/// sign.pub: the one definition of their names, for nesd, `nes generate` and the
/// offline tools.
pub fn key_files(keys_dir: &std::path::Path, user: &crate::Username) -> [std::path::PathBuf; 4] {
    [
        keys_dir.join(format!("{user}{MESSAGE_KEY_SUFFIX}")),
        keys_dir.join(format!("{user}{MESSAGE_KEY_SUFFIX}.pub")),
        keys_dir.join(format!("{user}{SIGN_KEY_SUFFIX}")),
        keys_dir.join(format!("{user}{SIGN_KEY_SUFFIX}.pub")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/legacy-v1");

    fn vector(path: &str) -> String {
        std::fs::read_to_string(format!("{VECTORS}/{path}")).expect("vector file")
    }

    #[test]
    fn reads_original_key_files_and_writes_them_back_identically() {
        for user in ["alice", "bob"] {
            for kind in ["message", "sign"] {
                let pem = vector(&format!("keys/{user}-rsa-{kind}"));
                let key = PrivateKey::from_pem(&pem).expect("private key");
                assert_eq!(key.bits(), 2048);
                assert_eq!(key.to_pkcs1_pem().as_str(), pem, "PKCS#1 PEM round trip");
                let pub_pem = vector(&format!("keys/{user}-rsa-{kind}.pub"));
                let public = PublicKey::from_pem(&pub_pem).expect("public key");
                assert_eq!(&public, key.public_key());
                assert_eq!(public.to_pem(), pub_pem, "SPKI PEM round trip");
            }
        }
    }

    #[test]
    fn a_remembered_pass_is_only_for_the_same_bytes_and_key() {
        let key = PrivateKey::from_pem(&vector("keys/alice-rsa-sign")).unwrap();
        let other = PrivateKey::from_pem(&vector("keys/bob-rsa-sign")).unwrap();
        let public = key.public_key().clone();
        let doc = b"a certificate";
        let sig = key.sign_pss(doc).unwrap();
        assert!(public.verify_pss_digest_salt_once(doc, &sig));
        // Remembered: a clone shares it, and it still answers the same.
        assert!(public.clone().verify_pss_digest_salt_once(doc, &sig));
        // Not for other bytes, another signature, or another key.
        assert!(!public.verify_pss_digest_salt_once(b"a certificatf", &sig));
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(!public.verify_pss_digest_salt_once(doc, &bad));
        assert!(!other.public_key().verify_pss_digest_salt_once(doc, &sig));
        // Bounded: many passes keep at most VERIFIED_KEPT.
        for i in 0..VERIFIED_KEPT + 4 {
            let d = format!("doc {i}");
            let s = key.sign_pss(d.as_bytes()).unwrap();
            assert!(public.verify_pss_digest_salt_once(d.as_bytes(), &s));
        }
        assert_eq!(public.verified.lock().unwrap().len(), VERIFIED_KEPT);
    }

    #[test]
    fn generated_keys_have_the_asked_size_and_work() {
        let key = PrivateKey::generate(2048).unwrap();
        assert_eq!(key.bits(), 2048);
        let again = PrivateKey::from_pem(&key.to_pkcs1_pem()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert!(key
            .to_pkcs1_pem()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(key
            .public_key()
            .to_pem()
            .starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(matches!(
            PrivateKey::generate(1024),
            Err(KeyError::GenerateSize { bits: 1024 })
        ));
    }

    #[test]
    fn refuses_small_keys_with_a_clear_error() {
        // A 1024-bit key, made here with the rsa crate for this test.
        let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let pem = small.to_pkcs1_pem(LineEnding::LF).unwrap();
        let err = PrivateKey::from_pem(&pem).unwrap_err();
        assert!(matches!(err, KeyError::Size { bits: 1024 }));
        assert!(err.to_string().contains("2048"));
        let pub_pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert!(matches!(
            PublicKey::from_pem(&pub_pem),
            Err(KeyError::Size { bits: 1024 })
        ));
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(
            PublicKey::from_pem("hello"),
            Err(KeyError::Format { .. })
        ));
        assert!(matches!(
            PrivateKey::from_pem(""),
            Err(KeyError::Format { .. })
        ));
        let public = vector("keys/alice-rsa-sign.pub");
        assert!(
            PrivateKey::from_pem(&public).is_err(),
            "a public key is not a private key"
        );
    }

    #[test]
    fn pss_signatures_verify_with_the_right_rules() {
        let key = PrivateKey::from_pem(&vector("keys/alice-rsa-sign")).unwrap();
        let public = key.public_key();
        let msg = b"hello";
        let v2 = key.sign_pss(msg).unwrap();
        assert!(public.verify_pss_digest_salt(msg, &v2));
        assert!(public.verify_pss_any_salt(msg, &v2));
        let v1 = key.sign_pss_max_salt(msg).unwrap();
        assert!(public.verify_pss_any_salt(msg, &v1));
        // A verifier that insists on a 32-byte salt rejects the original's signatures.
        assert!(!public.verify_pss_digest_salt(msg, &v1));
        assert!(!public.verify_pss_any_salt(b"hellO", &v1));
        let mut bad = v1.clone();
        bad[10] ^= 1;
        assert!(!public.verify_pss_any_salt(msg, &bad));
        assert!(!public.verify_pss_any_salt(msg, &v1[1..]));
        // Any other salt length takes the recovered-salt path, as Go's "auto" does.
        const SALT_20: signature::RsaSignatureEncoding =
            signature::RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(20));
        let odd = key.sign_with(&SALT_20, msg).unwrap();
        assert!(public.verify_pss_any_salt(msg, &odd));
        assert!(public.verify_pss_recovered_salt(msg, &v1));
        assert!(!public.verify_pss_recovered_salt(b"other", &odd));
    }

    #[test]
    fn v1_unwrap_rejects_implicitly_with_a_deterministic_stand_in() {
        let bob = PrivateKey::from_pem(&vector("keys/bob-rsa-message")).unwrap();
        let alice = PrivateKey::from_pem(&vector("keys/alice-rsa-message")).unwrap();
        let real = [7u8; V1_KEY_BYTES];
        let cipherkey = bob.public_key().encrypt_pkcs1(&real).unwrap();
        let got = bob.unwrap_v1_key(&cipherkey);
        assert_eq!((got.unwrapped, *got.key), (1, real));
        // Not for this key, not PKCS#1, the wrong size: a stand-in, never an early error,
        // the same each time for the same cipherkey and key, other for another of either.
        let other_size = bob.public_key().encrypt_pkcs1(&[7u8; 47]).unwrap();
        for bad in [
            &cipherkey[..],
            &other_size[..],
            &[0u8; 256][..],
            &[1u8; 3][..],
        ] {
            let key = if bad == &cipherkey[..] { &alice } else { &bob };
            let (once, twice) = (key.unwrap_v1_key(bad), key.unwrap_v1_key(bad));
            assert_eq!((once.unwrapped, twice.unwrapped), (0, 0));
            assert_eq!(*once.key, *twice.key);
            assert_ne!(*once.key, real);
            assert_ne!(*once.key, [0u8; V1_KEY_BYTES]);
        }
        assert_ne!(
            *bob.unwrap_v1_key(&[0u8; 256]).key,
            *alice.unwrap_v1_key(&[0u8; 256]).key
        );
        assert_ne!(
            *bob.unwrap_v1_key(&[0u8; 256]).key,
            *bob.unwrap_v1_key(&[1u8; 256]).key
        );
        assert_eq!(
            (
                ct_eq_usize(48, 48),
                ct_eq_usize(47, 48),
                ct_eq_usize(0, 48),
                ct_eq_usize(usize::MAX, 48)
            ),
            (1, 0, 0, 0)
        );
    }

    #[test]
    fn private_key_files_are_created_0600_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private_file(&path, b"secret", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(write_private_file(&path, b"other", false).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        write_private_file(&path, b"other", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"other");
    }
}
