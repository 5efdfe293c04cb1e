//! Sealing v3 frames, and the v3 half of opening them (which [`crate::frame`] calls).
//!
//! `{"v":3,"prekey":..,"ek":..,"kem":..,"nonce":..,"ciphertext":..}` (docs/PROTOCOL.md "v3"):
//!
//! 1. M = the inner JSON, as v2 (with `id`).
//! 2. (kem, ss_M) = ML-KEM-768.Encaps(prekey.mlkem768); e = a fresh X25519 key, ek its
//!    public key, ss_X = X25519(e, prekey.x25519).
//! 3. K = SHA3-256(0x5c2e2f2f5e5c ‖ ss_M ‖ ss_X ‖ ek ‖ prekey.x25519).
//! 4. C = the sender's signed certificate bytes; S = Ed25519 over `NES/3` ‖ M.
//! 5. P = len(C) as u16 big-endian ‖ C ‖ S ‖ M.
//! 6. ciphertext = AES-256-GCM(K, nonce) of P, AD = `NES/3` ‖ raw prekey id ‖ ek ‖ kem.
//!
//! The frame's `prekey` is the base64url of the 16 raw id bytes.

use super::doc::SignedCertificate;
use super::store::{CertificateSecret, Prekeys};
use super::{
    fixed, KeyId, V3Error, COMBINER_LABEL, ED25519_SIGNATURE_BYTES, ID_BYTES,
    MLKEM768_CIPHERTEXT_BYTES, V3_LABEL, X25519_BYTES,
};
use crate::b64;
use crate::frame::{
    new_message_id, Decrypted, Draft, FrameError, Sealed, Version, MAX_FRAME_BYTES,
};
use crate::inner::{Inner, ID_BYTES as MESSAGE_ID_BYTES};
use crate::keys::PublicKey;
use crate::username::Username;
use crate::v3::doc::SignedPrekey;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use aws_lc_rs::agreement;
use aws_lc_rs::digest;
use aws_lc_rs::kem::{Ciphertext, EncapsulationKey, ML_KEM_768};
use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use rand::RngCore;
use zeroize::Zeroizing;

/// K = SHA3-256(label ‖ ss_M ‖ ss_X ‖ ek ‖ static X25519 public key).
fn combine(ss_m: &[u8], ss_x: &[u8], ek: &[u8], static_x25519: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut ctx = digest::Context::new(&digest::SHA3_256);
    ctx.update(&COMBINER_LABEL);
    ctx.update(ss_m);
    ctx.update(ss_x);
    ctx.update(ek);
    ctx.update(static_x25519);
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(ctx.finish().as_ref());
    k
}

fn aad(prekey_id: &KeyId, ek: &[u8], kem: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(V3_LABEL.len() + ID_BYTES + ek.len() + kem.len());
    aad.extend_from_slice(V3_LABEL);
    aad.extend_from_slice(prekey_id);
    aad.extend_from_slice(ek);
    aad.extend_from_slice(kem);
    aad
}

fn signed_message(inner: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(V3_LABEL.len() + inner.len());
    m.extend_from_slice(V3_LABEL);
    m.extend_from_slice(inner);
    m
}

/// Seals `draft` to the recipient's signed prekey `to`, signed with our certificate.
///
/// `to` must already be verified with the recipient's pinned sign key
/// ([`SignedPrekey::verify_for`]); this checks that it names `draft.to` and that
/// `created <= now_ms < expires`, that the certificate names `draft.from`, is valid at
/// `now_ms` and covers `draft.timestamp_ms` (else the recipient would refuse the frame).
pub fn seal(
    draft: &Draft<'_>,
    to: &SignedPrekey,
    certificate: &CertificateSecret,
    now_ms: i64,
) -> Result<Sealed, V3Error> {
    let prekey = to.prekey();
    super::doc::check_user("prekey", &prekey.username, draft.to)?;
    prekey.check_valid(now_ms)?;
    let cert = certificate.certificate();
    super::doc::check_user("certificate", &cert.username, draft.from)?;
    cert.check_valid(now_ms)?;
    if !cert.covers(draft.timestamp_ms) {
        return Err(V3Error::NotValid {
            what: "certificate",
            created: cert.created,
            expires: cert.expires,
            now: draft.timestamp_ms,
        });
    }

    // 1. M
    let id = new_message_id();
    let inner = draft.inner_json(Some(id.clone()));

    // 2. both shared secrets
    let encaps = EncapsulationKey::new(&ML_KEM_768, &prekey.mlkem768)
        .map_err(|_| V3Error::Crypto("the prekey's ML-KEM-768 key is refused"))?;
    let (kem, ss_m) = encaps
        .encapsulate()
        .map_err(|_| V3Error::Crypto("ML-KEM-768 encapsulation"))?;
    let mut e = Zeroizing::new([0u8; X25519_BYTES]);
    rand::rngs::OsRng.fill_bytes(e.as_mut());
    let e = agreement::PrivateKey::from_private_key(&agreement::X25519, e.as_ref())
        .map_err(|_| V3Error::Crypto("X25519 key"))?;
    let ek = e
        .compute_public_key()
        .map_err(|_| V3Error::Crypto("X25519 public key"))?;
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, &prekey.x25519);
    // 3. K (an all-zero shared secret, from a low-order prekey key, is refused by AWS-LC)
    let k = agreement::agree(
        &e,
        peer,
        V3Error::Crypto("X25519 with the prekey's key"),
        |ss_x| Ok(combine(ss_m.as_ref(), ss_x, ek.as_ref(), &prekey.x25519)),
    )?;

    // 4. and 5. P = len(C) ‖ C ‖ S ‖ M
    let c = certificate.signed().as_bytes();
    let c_len = u16::try_from(c.len())
        .map_err(|_| V3Error::Crypto("certificate longer than 65535 bytes"))?;
    let s = certificate.sign(&signed_message(&inner));
    let mut plaintext = Zeroizing::new(Vec::with_capacity(2 + c.len() + s.len() + inner.len()));
    plaintext.extend_from_slice(&c_len.to_be_bytes());
    plaintext.extend_from_slice(c);
    plaintext.extend_from_slice(&s);
    plaintext.extend_from_slice(&inner);

    // 6.
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipher =
        Aes256Gcm::new_from_slice(k.as_ref()).map_err(|_| V3Error::Crypto("AES-GCM key setup"))?;
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &aad(&prekey.id, ek.as_ref(), kem.as_ref()),
            },
        )
        .map_err(|_| V3Error::Crypto("AES-GCM encryption"))?;
    let frame = format!(
        "{{\"v\":3,\"prekey\":\"{}\",\"ek\":\"{}\",\"kem\":\"{}\",\"nonce\":\"{}\",\"ciphertext\":\"{}\"}}",
        b64::encode(&prekey.id),
        b64::encode(ek.as_ref()),
        b64::encode(kem.as_ref()),
        b64::encode(&nonce),
        b64::encode(&ciphertext)
    )
    .into_bytes();
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { size: frame.len() }.into());
    }
    Ok(Sealed {
        frame,
        inner,
        id,
        version: Version::V3,
    })
}

/// The v3 fields of a frame, as [`crate::frame`] read them.
pub(crate) struct Outer {
    pub prekey: Option<String>,
    pub ek: Option<String>,
    pub kem: Option<String>,
    pub nonce: Option<String>,
    pub ciphertext: Option<String>,
}

fn field<const N: usize>(value: Option<String>, name: &'static str) -> Result<[u8; N], FrameError> {
    let text = value.ok_or_else(|| FrameError::Json(format!("missing field `{name}`")))?;
    fixed::<N>(&text, name).map_err(|e| match e {
        V3Error::Length { field } => FrameError::Length { field },
        _ => FrameError::Base64 { field: name },
    })
}

fn kem_field(value: Option<String>) -> Result<Vec<u8>, FrameError> {
    let text = value.ok_or_else(|| FrameError::Json("missing field `kem`".into()))?;
    let kem = b64::decode(&text).ok_or(FrameError::Base64 { field: "kem" })?;
    if kem.len() != MLKEM768_CIPHERTEXT_BYTES {
        return Err(FrameError::Length { field: "kem" });
    }
    Ok(kem)
}

/// Steps 6 to 1 backwards with the prekey the frame names. What comes out still has to
/// be verified ([`verify`]).
pub(crate) fn decrypt(outer: Outer, prekeys: &dyn Prekeys) -> Result<Decrypted, FrameError> {
    // Decode and size every field before any key work.
    let prekey_id: KeyId = field(outer.prekey, "prekey")?;
    let ek: [u8; X25519_BYTES] = field(outer.ek, "ek")?;
    let kem = kem_field(outer.kem)?;
    let nonce: [u8; 12] = field(outer.nonce, "nonce")?;
    let text = outer
        .ciphertext
        .ok_or_else(|| FrameError::Json("missing field `ciphertext`".into()))?;
    let ciphertext = b64::decode(&text).ok_or(FrameError::Base64 {
        field: "ciphertext",
    })?;
    if ciphertext.len() < 16 {
        return Err(FrameError::Length {
            field: "ciphertext",
        });
    }

    let secret = prekeys
        .prekey(&prekey_id)
        .ok_or(FrameError::UnknownPrekey)?;
    let keys = secret.opening_keys();
    // ML-KEM rejects implicitly: a tampered `kem` gives another secret, and the tag fails.
    let ss_m = keys
        .mlkem768
        .decapsulate(Ciphertext::from(kem.as_slice()))
        .map_err(|_| FrameError::Decrypt)?;
    let static_public = secret.prekey().x25519;
    let k = agreement::agree(
        &keys.x25519,
        agreement::UnparsedPublicKey::new(&agreement::X25519, &ek),
        FrameError::Decrypt,
        |ss_x| Ok(combine(ss_m.as_ref(), ss_x, &ek, &static_public)),
    )?;
    let cipher = Aes256Gcm::new_from_slice(k.as_ref()).map_err(|_| FrameError::Decrypt)?;
    let plaintext = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad(&prekey_id, &ek, &kem),
                },
            )
            .map_err(|_| FrameError::Decrypt)?,
    );

    // P = len(C) ‖ C ‖ S ‖ M
    if plaintext.len() < 2 {
        return Err(FrameError::Inner("no certificate length".into()));
    }
    let c_len = usize::from(u16::from_be_bytes([plaintext[0], plaintext[1]]));
    let rest = &plaintext[2..];
    if rest.len() < c_len + ED25519_SIGNATURE_BYTES {
        return Err(FrameError::Inner(
            "certificate or signature past the end".into(),
        ));
    }
    let (c, rest) = rest.split_at(c_len);
    let (s, inner_bytes) = rest.split_at(ED25519_SIGNATURE_BYTES);
    SignedCertificate::parse(c)
        .map_err(|e| FrameError::Certificate(format!("bad certificate: {e}")))?;
    let inner = Inner::parse(inner_bytes).map_err(|e| FrameError::Inner(e.to_string()))?;
    let id = inner
        .id
        .clone()
        .ok_or_else(|| FrameError::Inner("missing field `id`".into()))?;
    if b64::decode(&id).map(|b| b.len()) != Some(MESSAGE_ID_BYTES) {
        return Err(FrameError::Inner(
            "`id` is not 16 bytes of base64url".into(),
        ));
    }
    // `Decrypted` carries one signature field: for v3 it holds S ‖ C (see [`verify`]).
    let mut signature = Vec::with_capacity(s.len() + c.len());
    signature.extend_from_slice(s);
    signature.extend_from_slice(c);
    Ok(crate::frame::decrypted_v3(
        inner_bytes.to_vec(),
        inner,
        signature,
        id,
    ))
}

/// The v3 checks of [`Decrypted::verify`]: the certificate (`signature[64..]`) verifies
/// under the pinned RSA sign key of the inner `from`, names that user and covers the inner
/// timestamp; S (`signature[..64]`) verifies over `NES/3` ‖ M under its Ed25519 key.
pub(crate) fn verify(
    signature: &[u8],
    inner_bytes: &[u8],
    inner: &Inner,
    sender_sign_key: &PublicKey,
) -> Result<(), FrameError> {
    if signature.len() < ED25519_SIGNATURE_BYTES {
        return Err(FrameError::Signature);
    }
    let (s, c) = signature.split_at(ED25519_SIGNATURE_BYTES);
    let signed = SignedCertificate::parse(c)
        .map_err(|e| FrameError::Certificate(format!("bad certificate: {e}")))?;
    signed.verify(sender_sign_key).map_err(|_| {
        FrameError::Certificate(
            "the certificate does not verify under the sender's sign key".into(),
        )
    })?;
    let cert = signed.certificate();
    let from = Username::parse(&inner.from).map_err(|e| FrameError::Inner(e.to_string()))?;
    if cert.username != from {
        return Err(FrameError::Certificate(format!(
            "the certificate belongs to {:?}, not to the sender {:?}",
            cert.username.as_str(),
            from.as_str()
        )));
    }
    if !cert.covers(inner.timestamp) {
        return Err(FrameError::Certificate(format!(
            "the certificate (valid {} to {}) does not cover the message timestamp {}",
            cert.created, cert.expires, inner.timestamp
        )));
    }
    UnparsedPublicKey::new(&ED25519, &cert.ed25519)
        .verify(&signed_message(inner_bytes), s)
        .map_err(|_| FrameError::Signature)
}
