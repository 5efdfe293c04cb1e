//! The two signed v3 documents: the **prekey** (the receiving half a sender seals to) and
//! the **signing certificate** (the sending half every frame carries).
//!
//! ```text
//! {"prekey":{"username":..,"id":..,"created":..,"expires":..,"x25519":..,"mlkem768":..},"signature":..}
//! {"certificate":{"username":..,"id":..,"created":..,"expires":..,"ed25519":..},"signature":..}
//! ```
//!
//! We write both as compact JSON in exactly that key order, binary fields in padded
//! base64url. `signature` is RSA-PSS-SHA-256 (salt 32) with the identity's RSA sign key
//! over the exact bytes of the inner object as they stand in the document, so a verifier
//! takes that byte range (serde_json's `RawValue`, as for the key server's answers) and
//! never re-serialises. Reading accepts any valid JSON with those fields (unknown fields
//! are ignored, duplicates refused) and insists on the exact size of every binary field.
//! A parsed document keeps its bytes: [`SignedPrekey::as_bytes`] is what was published.

use super::{
    fixed, KeyId, V3Error, ED25519_BYTES, MAX_DOCUMENT_BYTES, MLKEM768_PUBLIC_BYTES, X25519_BYTES,
};
use crate::b64;
use crate::inner::push_go_string;
use crate::keys::{PrivateKey, PublicKey};
use crate::username::Username;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::ops::Range;

/// A prekey: what a sender needs to seal a v3 frame to `username`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prekey {
    /// Whose prekey it is.
    pub username: Username,
    /// 16 random bytes; frames name the prekey they are sealed to by it.
    pub id: KeyId,
    /// Unix ms.
    pub created: i64,
    /// Unix ms; senders stop using it from then on.
    pub expires: i64,
    /// The X25519 public key.
    pub x25519: [u8; X25519_BYTES],
    /// The ML-KEM-768 encapsulation key (1184 bytes).
    pub mlkem768: Vec<u8>,
}

/// A signing certificate: the short-lived Ed25519 key that signs `username`'s frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Whose certificate it is.
    pub username: Username,
    /// 16 random bytes.
    pub id: KeyId,
    /// Unix ms.
    pub created: i64,
    /// Unix ms.
    pub expires: i64,
    /// The Ed25519 public key.
    pub ed25519: [u8; ED25519_BYTES],
}

/// A signed prekey document, with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPrekey {
    doc: Document,
    prekey: Prekey,
}

/// A signed certificate document, with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCertificate {
    doc: Document,
    certificate: Certificate,
}

/// What both signed documents are: the bytes as they stand, where the signed object lies
/// in them, and the raw RSA signature.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Document {
    bytes: Vec<u8>,
    body: Range<usize>,
    signature: Vec<u8>,
}

impl Document {
    /// The document `bytes`, whose signed object `what` serde found as `body` and whose
    /// signature field holds `signature`.
    fn parsed(
        bytes: &[u8],
        body: &RawValue,
        signature: &str,
        what: &'static str,
    ) -> Result<Self, V3Error> {
        let body = range_in(bytes, body.get())
            .ok_or_else(|| V3Error::Json(format!("{what} out of range")))?;
        let signature = b64::decode(signature).ok_or(V3Error::Base64 { field: "signature" })?;
        Ok(Self {
            bytes: bytes.to_vec(),
            body,
            signature,
        })
    }

    /// `{"<name>":<body>,"signature":..}`, signed with the identity's RSA sign key.
    fn signed(name: &str, body: &str, sign_key: &PrivateKey) -> Result<Self, V3Error> {
        let signature = sign_key.sign_pss(body.as_bytes())?;
        let head = format!("{{\"{name}\":");
        let start = head.len();
        let text = format!(
            "{head}{body},\"signature\":\"{}\"}}",
            b64::encode(&signature)
        );
        Ok(Self {
            bytes: text.into_bytes(),
            body: start..start + body.len(),
            signature,
        })
    }

    fn body(&self) -> &[u8] {
        &self.bytes[self.body.clone()]
    }
}

#[derive(Deserialize)]
struct PrekeyEnvelope<'a> {
    #[serde(borrow)]
    prekey: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
struct CertificateEnvelope<'a> {
    #[serde(borrow)]
    certificate: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
struct PrekeyFields {
    username: String,
    id: String,
    created: i64,
    expires: i64,
    x25519: String,
    mlkem768: String,
}

#[derive(Deserialize)]
struct CertificateFields {
    username: String,
    id: String,
    created: i64,
    expires: i64,
    ed25519: String,
}

/// Where `inner` (a slice of `outer`) starts and ends in `outer`.
fn range_in(outer: &[u8], inner: &str) -> Option<Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len()).then_some(start..end)
}

fn json(e: serde_json::Error) -> V3Error {
    V3Error::Json(e.to_string())
}

fn check_size(bytes: &[u8]) -> Result<(), V3Error> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(V3Error::TooLarge { size: bytes.len() });
    }
    Ok(())
}

fn check_valid(what: &'static str, created: i64, expires: i64, now: i64) -> Result<(), V3Error> {
    if created <= now && now < expires {
        Ok(())
    } else {
        Err(V3Error::NotValid {
            what,
            created,
            expires,
            now,
        })
    }
}

pub(crate) fn check_user(
    what: &'static str,
    got: &Username,
    expected: &Username,
) -> Result<(), V3Error> {
    if got == expected {
        Ok(())
    } else {
        Err(V3Error::WrongUser {
            what,
            expected: expected.to_string(),
            got: got.to_string(),
        })
    }
}

fn push_common(out: &mut String, username: &Username, id: &KeyId, created: i64, expires: i64) {
    out.push_str("{\"username\":");
    push_go_string(out, username.as_str());
    out.push_str(",\"id\":\"");
    out.push_str(&b64::encode(id));
    out.push_str("\",\"created\":");
    out.push_str(&created.to_string());
    out.push_str(",\"expires\":");
    out.push_str(&expires.to_string());
}

impl Prekey {
    /// The compact JSON the signature covers, keys in DESIGN's order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(1700);
        push_common(
            &mut out,
            &self.username,
            &self.id,
            self.created,
            self.expires,
        );
        out.push_str(",\"x25519\":\"");
        out.push_str(&b64::encode(&self.x25519));
        out.push_str("\",\"mlkem768\":\"");
        out.push_str(&b64::encode(&self.mlkem768));
        out.push_str("\"}");
        out
    }

    /// Refuses unless `created <= now_ms < expires`.
    pub fn check_valid(&self, now_ms: i64) -> Result<(), V3Error> {
        check_valid("prekey", self.created, self.expires, now_ms)
    }

    fn from_json(bytes: &[u8]) -> Result<Self, V3Error> {
        let f: PrekeyFields = serde_json::from_slice(bytes).map_err(json)?;
        let mlkem768 = b64::decode(&f.mlkem768).ok_or(V3Error::Base64 { field: "mlkem768" })?;
        if mlkem768.len() != MLKEM768_PUBLIC_BYTES {
            return Err(V3Error::Length { field: "mlkem768" });
        }
        Ok(Self {
            username: Username::parse(&f.username)?,
            id: fixed(&f.id, "id")?,
            created: f.created,
            expires: f.expires,
            x25519: fixed(&f.x25519, "x25519")?,
            mlkem768,
        })
    }
}

impl Certificate {
    /// The compact JSON the signature covers, keys in DESIGN's order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        push_common(
            &mut out,
            &self.username,
            &self.id,
            self.created,
            self.expires,
        );
        out.push_str(",\"ed25519\":\"");
        out.push_str(&b64::encode(&self.ed25519));
        out.push_str("\"}");
        out
    }

    /// Refuses unless `created <= now_ms < expires`.
    pub fn check_valid(&self, now_ms: i64) -> Result<(), V3Error> {
        check_valid("certificate", self.created, self.expires, now_ms)
    }

    /// Whether it covers a frame's inner timestamp: `created - 5 min <= t <= expires`.
    pub fn covers(&self, timestamp_ms: i64) -> bool {
        self.created.saturating_sub(super::CERTIFICATE_SKEW_MS) <= timestamp_ms
            && timestamp_ms <= self.expires
    }

    fn from_json(bytes: &[u8]) -> Result<Self, V3Error> {
        let f: CertificateFields = serde_json::from_slice(bytes).map_err(json)?;
        Ok(Self {
            username: Username::parse(&f.username)?,
            id: fixed(&f.id, "id")?,
            created: f.created,
            expires: f.expires,
            ed25519: fixed(&f.ed25519, "ed25519")?,
        })
    }
}

impl SignedPrekey {
    /// Parses a signed prekey document (does not verify it: see [`Self::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, V3Error> {
        check_size(bytes)?;
        let env: PrekeyEnvelope<'_> = serde_json::from_slice(bytes).map_err(json)?;
        let doc = Document::parsed(bytes, env.prekey, &env.signature, "prekey")?;
        let prekey = Prekey::from_json(doc.body())?;
        Ok(Self { doc, prekey })
    }

    /// Signs `prekey` with the identity's RSA sign key and builds the document.
    pub fn sign(prekey: Prekey, sign_key: &PrivateKey) -> Result<Self, V3Error> {
        let doc = Document::signed("prekey", &prekey.to_json(), sign_key)?;
        Ok(Self { doc, prekey })
    }

    /// Checks the RSA-PSS-SHA-256 (salt 32) signature over the `"prekey"` bytes as they
    /// stand, with the owner's (pinned) sign key.
    pub fn verify(&self, sign_key: &PublicKey) -> Result<(), V3Error> {
        if sign_key.verify_pss_digest_salt(self.doc.body(), &self.doc.signature) {
            Ok(())
        } else {
            Err(V3Error::Signature { what: "prekey" })
        }
    }

    /// [`Self::verify`], then that it names `user`: what a sender checks on a prekey it
    /// fetched for `user` (validity in time is checked when sealing).
    pub fn verify_for(&self, user: &Username, sign_key: &PublicKey) -> Result<(), V3Error> {
        self.verify(sign_key)?;
        check_user("prekey", &self.prekey.username, user)
    }

    /// The parsed prekey.
    pub fn prekey(&self) -> &Prekey {
        &self.prekey
    }

    /// The whole document exactly as parsed or built.
    pub fn as_bytes(&self) -> &[u8] {
        &self.doc.bytes
    }

    /// The signed `"prekey"` object's bytes.
    pub fn body_bytes(&self) -> &[u8] {
        self.doc.body()
    }

    /// The raw RSA signature.
    pub fn signature(&self) -> &[u8] {
        &self.doc.signature
    }
}

impl SignedCertificate {
    /// Parses a signed certificate document (does not verify it: see [`Self::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, V3Error> {
        check_size(bytes)?;
        let env: CertificateEnvelope<'_> = serde_json::from_slice(bytes).map_err(json)?;
        let doc = Document::parsed(bytes, env.certificate, &env.signature, "certificate")?;
        let certificate = Certificate::from_json(doc.body())?;
        Ok(Self { doc, certificate })
    }

    /// Signs `certificate` with the identity's RSA sign key and builds the document.
    pub fn sign(certificate: Certificate, sign_key: &PrivateKey) -> Result<Self, V3Error> {
        let doc = Document::signed("certificate", &certificate.to_json(), sign_key)?;
        Ok(Self { doc, certificate })
    }

    /// Checks the RSA-PSS-SHA-256 (salt 32) signature over the `"certificate"` bytes as
    /// they stand, with the owner's (pinned) sign key.
    pub fn verify(&self, sign_key: &PublicKey) -> Result<(), V3Error> {
        // Once per certificate and key: the same certificate rides in every frame.
        if sign_key.verify_pss_digest_salt_once(self.doc.body(), &self.doc.signature) {
            Ok(())
        } else {
            Err(V3Error::Signature {
                what: "certificate",
            })
        }
    }

    /// [`Self::verify`], then that it names `user`.
    pub fn verify_for(&self, user: &Username, sign_key: &PublicKey) -> Result<(), V3Error> {
        self.verify(sign_key)?;
        check_user("certificate", &self.certificate.username, user)
    }

    /// The parsed certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// The whole document exactly as parsed or built (a frame's `C`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.doc.bytes
    }

    /// The signed `"certificate"` object's bytes.
    pub fn body_bytes(&self) -> &[u8] {
        self.doc.body()
    }

    /// The raw RSA signature.
    pub fn signature(&self) -> &[u8] {
        &self.doc.signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_key() -> PrivateKey {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/legacy-v1/keys/alice-rsa-sign"
        ))
        .expect("vector");
        PrivateKey::from_pem(&pem).expect("key")
    }

    fn prekey() -> Prekey {
        Prekey {
            username: Username::parse("alice").unwrap(),
            id: [7; 16],
            created: 1000,
            expires: 2000,
            x25519: [9; 32],
            mlkem768: vec![3; MLKEM768_PUBLIC_BYTES],
        }
    }

    #[test]
    fn signed_prekeys_are_compact_in_design_order_and_verify() {
        let key = sign_key();
        let signed = SignedPrekey::sign(prekey(), &key).unwrap();
        let text = std::str::from_utf8(signed.as_bytes()).unwrap();
        assert!(text.starts_with(
            "{\"prekey\":{\"username\":\"alice\",\"id\":\"BwcHBwcHBwcHBwcHBwcHBw==\",\"created\":1000,\"expires\":2000,\"x25519\":\"CQkJ"
        ));
        assert!(text.contains("\"},\"signature\":\""));
        assert!(text.ends_with("\"}"));
        signed.verify(key.public_key()).unwrap();
        let again = SignedPrekey::parse(signed.as_bytes()).unwrap();
        assert_eq!(again, signed);
        assert_eq!(again.prekey(), &prekey());
        again
            .verify_for(&Username::parse("alice").unwrap(), key.public_key())
            .unwrap();
        assert!(matches!(
            again.verify_for(&Username::parse("bob").unwrap(), key.public_key()),
            Err(V3Error::WrongUser { .. })
        ));
    }

    #[test]
    fn the_signature_covers_the_bytes_as_they_stand() {
        let key = sign_key();
        let signed = SignedPrekey::sign(prekey(), &key).unwrap();
        let text = String::from_utf8(signed.as_bytes().to_vec()).unwrap();
        // Same fields, other spelling: parses, but no longer verifies.
        let spaced = text.replacen("{\"username\"", "{ \"username\"", 1);
        let parsed = SignedPrekey::parse(spaced.as_bytes()).unwrap();
        assert_eq!(parsed.prekey(), signed.prekey());
        assert!(matches!(
            parsed.verify(key.public_key()),
            Err(V3Error::Signature { .. })
        ));
        // Whitespace around the signed object is outside the range: still verifies.
        let outer = text.replacen("{\"prekey\":", "{ \"prekey\" : ", 1);
        SignedPrekey::parse(outer.as_bytes())
            .unwrap()
            .verify(key.public_key())
            .unwrap();
        let changed = text.replacen("\"expires\":2000", "\"expires\":2001", 1);
        assert!(SignedPrekey::parse(changed.as_bytes())
            .unwrap()
            .verify(key.public_key())
            .is_err());
    }

    #[test]
    fn certificates_round_trip_and_cover_with_skew() {
        let key = sign_key();
        let cert = Certificate {
            username: Username::parse("alice").unwrap(),
            id: [1; 16],
            created: 10 * 60 * 1000,
            expires: 20 * 60 * 1000,
            ed25519: [2; 32],
        };
        let signed = SignedCertificate::sign(cert.clone(), &key).unwrap();
        assert!(std::str::from_utf8(signed.as_bytes())
            .unwrap()
            .starts_with("{\"certificate\":{\"username\":\"alice\",\"id\":\"AQEBAQEBAQEBAQEBAQEBAQ==\",\"created\":600000,\"expires\":1200000,\"ed25519\":\"AgIC"));
        let parsed = SignedCertificate::parse(signed.as_bytes()).unwrap();
        parsed.verify(key.public_key()).unwrap();
        assert_eq!(parsed.certificate(), &cert);
        assert!(cert.covers(5 * 60 * 1000));
        assert!(!cert.covers(5 * 60 * 1000 - 1));
        assert!(cert.covers(20 * 60 * 1000));
        assert!(!cert.covers(20 * 60 * 1000 + 1));
        assert!(cert.check_valid(10 * 60 * 1000).is_ok());
        assert!(cert.check_valid(20 * 60 * 1000).is_err());
    }

    #[test]
    fn wrong_sizes_and_garbage_are_refused() {
        let key = sign_key();
        let good = String::from_utf8(
            SignedPrekey::sign(prekey(), &key)
                .unwrap()
                .as_bytes()
                .to_vec(),
        )
        .unwrap();
        let short_x = good.replacen(&b64::encode(&[9u8; 32]), &b64::encode(&[9u8; 31]), 1);
        assert!(matches!(
            SignedPrekey::parse(short_x.as_bytes()),
            Err(V3Error::Length { field: "x25519" })
        ));
        let short_id = good.replacen(&b64::encode(&[7u8; 16]), &b64::encode(&[7u8; 15]), 1);
        assert!(matches!(
            SignedPrekey::parse(short_id.as_bytes()),
            Err(V3Error::Length { field: "id" })
        ));
        let long_kem = good.replacen(
            &b64::encode(&[3u8; MLKEM768_PUBLIC_BYTES]),
            &b64::encode(&[3u8; MLKEM768_PUBLIC_BYTES + 1]),
            1,
        );
        assert!(matches!(
            SignedPrekey::parse(long_kem.as_bytes()),
            Err(V3Error::Length { field: "mlkem768" })
        ));
        let bad_user = good.replacen("\"alice\"", "\"Al ice\"", 1);
        assert!(matches!(
            SignedPrekey::parse(bad_user.as_bytes()),
            Err(V3Error::Username(_))
        ));
        let unpadded = good.replacen("BwcHBwcHBwcHBwcHBwcHBw==", "BwcHBwcHBwcHBwcHBwcHBw", 1);
        assert!(matches!(
            SignedPrekey::parse(unpadded.as_bytes()),
            Err(V3Error::Base64 { field: "id" })
        ));
        for bad in [
            "",
            "{}",
            "[]",
            "{\"prekey\":{},\"signature\":\"\"}",
            "{\"prekey\":1,\"signature\":\"\"}",
            "\u{0}",
        ] {
            assert!(SignedPrekey::parse(bad.as_bytes()).is_err(), "{bad:?}");
            assert!(SignedCertificate::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(
            SignedCertificate::parse(good.as_bytes()).is_err(),
            "a prekey is not a certificate"
        );
        let huge = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        assert!(matches!(
            SignedPrekey::parse(&huge),
            Err(V3Error::TooLarge { .. })
        ));
    }
}
