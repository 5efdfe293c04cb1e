//! Frames: the sealed JSON objects that travel through the broker.
//!
//! Two versions, told apart by the frame itself (docs/PROTOCOL.md):
//!
//! - **v1**, the original NES frame, `{"cipherkey","ciphertext","signature"}`:
//!   AES-256-CBC under a 48-byte key+IV wrapped with RSA PKCS#1 v1.5; the signature
//!   (PSS, maximum salt) travels in clear beside the ciphertext.
//! - **v2**, the default, `{"v":2,"cipherkey","nonce","ciphertext"}`: AES-256-GCM under a
//!   32-byte key wrapped with RSA-OAEP-SHA-256; the signature is encrypted with the
//!   message, so only the recipient learns who signed, and nobody can test a guess of a
//!   short message against a clear signature.
//! - **v3**, `{"v":3,"prekey","ek","kem","nonce","ciphertext"}`: sealed to a short-lived
//!   prekey (X25519 + ML-KEM-768), signed with a short-lived Ed25519 certificate; built in
//!   [`crate::v3`], recognised here by [`decrypt_with`].
//!
//! Opening is two steps, because the key that verifies the signature belongs to the inner
//! `from`, which is only known after decryption: [`decrypt`] gives a [`Decrypted`], whose
//! [`Decrypted::verify`] with the sender's signing key gives an [`Opened`]. Nothing in a
//! `Decrypted` may be shown or stored before it is verified.
//!
//! Every refusal is a [`FrameError`]; bytes from the network never cause a panic.

use crate::b64;
use crate::inner::{Control, Inner, ID_BYTES};
use crate::keys::{KeyError, PrivateKey, PublicKey};
use crate::username::Username;
use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Frames larger than this are refused unread (docs/PROTOCOL.md "Receiving rules").
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// A timestamp further than this in the future is refused.
pub const MAX_FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;
/// Associated data prefix of v2's AES-GCM (followed by the raw cipherkey bytes).
pub const V2_AAD_PREFIX: &[u8] = b"NES/2";

/// The wire format version of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The original NES frame (no `"v"` field).
    V1,
    /// `"v": 2`.
    V2,
    /// `"v": 3` ([`crate::v3`]).
    V3,
}

impl Version {
    /// 1 or 2.
    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

/// Why a frame was refused (or could not be sealed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {size} bytes is larger than the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not a JSON object of the expected shape.
    #[error("bad frame JSON: {0}")]
    Json(String),
    /// A `"v"` we do not speak.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u64),
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
    /// `cipherkey` does not unwrap with our message key (not for us, or corrupted). v2
    /// only: v1 rejects implicitly, so its failed unwraps are [`FrameError::Decrypt`].
    #[error("the message key does not unwrap with this identity's key")]
    Unwrap,
    /// The AES-GCM tag (v2) or the CBC padding (v1) does not check out.
    #[error("the ciphertext does not decrypt (tag or padding check failed)")]
    Decrypt,
    /// The decrypted inner message is not valid.
    #[error("bad inner message: {0}")]
    Inner(String),
    /// The signature does not verify under the sender's signing key.
    #[error("the signature does not verify under the sender's signing key")]
    Signature,
    /// The inner `to` is someone else: a frame re-sent to the wrong person.
    #[error("the message is addressed to {to:?}, not to this identity")]
    Misaddressed {
        /// The inner `to`.
        to: String,
    },
    /// The inner `timestamp` is more than [`MAX_FUTURE_SKEW_MS`] ahead of our clock.
    #[error("the message timestamp {timestamp} is too far in the future")]
    FromTheFuture {
        /// The inner `timestamp`.
        timestamp: i64,
    },
    /// A key failed while sealing.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// v3: the frame names a prekey we do not hold (never made, or deleted).
    #[error("the frame is sealed to a prekey this identity does not hold")]
    UnknownPrekey,
    /// v3: the signing certificate is malformed, does not verify under the sender's sign
    /// key, names someone else or does not cover the timestamp (counted as `signature`).
    #[error("{0}")]
    Certificate(String),
}

impl FrameError {
    /// A short stable name for counters and logs ("bad_json", "signature", ...).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Json(_) => "bad_json",
            FrameError::UnsupportedVersion(_) => "bad_version",
            FrameError::Base64 { .. } => "bad_base64",
            FrameError::Length { .. } => "bad_length",
            FrameError::Unwrap => "unwrap",
            FrameError::Decrypt => "decrypt",
            FrameError::Inner(_) => "bad_inner",
            FrameError::Signature => "signature",
            FrameError::Misaddressed { .. } => "misaddressed",
            FrameError::FromTheFuture { .. } => "future",
            FrameError::Key(_) => "key",
            FrameError::UnknownPrekey => "unknown_prekey",
            FrameError::Certificate(_) => "signature",
        }
    }
}

/// What to seal.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    /// Inner `from`: the sender.
    pub from: &'a Username,
    /// Inner `to`: the recipient.
    pub to: &'a Username,
    /// Inner `message`.
    pub text: &'a str,
    /// Inner `timestamp`, Unix ms.
    pub timestamp_ms: i64,
    /// Makes it a receipt or a presence (`"kind"`; `text` should be empty): v2 and v3
    /// only.
    pub control: Option<Control<'a>>,
    /// Asks the recipient for receipts (`"receipts":true`): v2 and v3 only, never on v1.
    pub wants_receipts: bool,
}

impl<'a> Draft<'a> {
    /// A text from `from` to `to`, asking for nothing.
    pub fn text(from: &'a Username, to: &'a Username, text: &'a str, timestamp_ms: i64) -> Self {
        Draft {
            from,
            to,
            text,
            timestamp_ms,
            control: None,
            wants_receipts: false,
        }
    }
}

impl Draft<'_> {
    /// The inner JSON bytes that are signed and encrypted: `id` is `None` for v1 (the
    /// original has none), a fresh message id for v2 and v3.
    pub(crate) fn inner_json(&self, id: Option<String>) -> Vec<u8> {
        let control = self.control.filter(|_| id.is_some());
        Inner {
            from: self.from.to_string(),
            to: self.to.to_string(),
            timestamp: self.timestamp_ms,
            message: self.text.to_owned(),
            // The original (v1) knows no kinds: nothing of them goes into a v1 frame.
            kind: control.map(|c| c.kind().to_owned()),
            receipt: match control {
                Some(Control::Receipt(r)) => Some(r.clone()),
                _ => None,
            },
            presence: match control {
                Some(Control::Presence(p)) => Some(p.clone()),
                _ => None,
            },
            file: match control {
                Some(Control::File(f)) => Some(f.clone()),
                _ => None,
            },
            chunk: match control {
                Some(Control::Chunk(c)) => Some(c.clone()),
                _ => None,
            },
            file_ack: match control {
                Some(Control::FileAck(a)) => Some(a.clone()),
                _ => None,
            },
            file_cancel: match control {
                Some(Control::FileCancel(c)) => Some(c.clone()),
                _ => None,
            },
            receipts: self.wants_receipts && id.is_some(),
            id,
        }
        .to_go_json()
    }
}

/// A sealed frame, ready to publish on `nes/<to>/message`.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The frame's JSON bytes (the MQTT payload).
    pub frame: Vec<u8>,
    /// The inner JSON bytes that were signed.
    pub inner: Vec<u8>,
    /// The message id (v2: the inner `id`; v1: derived from the signature, see [`v1_id`]).
    pub id: String,
    /// Which version it is.
    pub version: Version,
}

/// Seals `draft` for the holder of `recipient_message_key`, signed with
/// `sender_sign_key`.
pub fn seal(
    version: Version,
    draft: &Draft<'_>,
    recipient_message_key: &PublicKey,
    sender_sign_key: &PrivateKey,
) -> Result<Sealed, FrameError> {
    let sealed = match version {
        Version::V1 => seal_v1(draft, recipient_message_key, sender_sign_key)?,
        Version::V2 => seal_v2(draft, recipient_message_key, sender_sign_key)?,
        Version::V3 => {
            return Err(FrameError::Key(KeyError::Backend(
                "v3 frames are sealed to a prekey: use nes_proto::v3::seal".into(),
            )))
        }
    };
    if sealed.frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            size: sealed.frame.len(),
        });
    }
    Ok(sealed)
}

fn seal_v1(
    draft: &Draft<'_>,
    to_key: &PublicKey,
    sign_key: &PrivateKey,
) -> Result<Sealed, FrameError> {
    let inner = draft.inner_json(None);
    let mut k = Zeroizing::new([0u8; 48]);
    rand::rngs::OsRng.fill_bytes(k.as_mut());
    let ciphertext = cbc::Encryptor::<aes::Aes256>::new_from_slices(&k[..32], &k[32..])
        .map_err(|_| FrameError::Key(KeyError::Backend("AES-CBC key setup".into())))?
        .encrypt_padded_vec_mut::<Pkcs7>(&inner);
    let cipherkey = to_key.encrypt_pkcs1(k.as_ref())?;
    let signature = sign_key.sign_pss_max_salt(&inner)?;
    // Go's json.Marshal of the original Frame struct: this key order, compact.
    let frame = format!(
        "{{\"cipherkey\":\"{}\",\"ciphertext\":\"{}\",\"signature\":\"{}\"}}",
        b64::encode(&cipherkey),
        b64::encode(&ciphertext),
        b64::encode(&signature)
    )
    .into_bytes();
    Ok(Sealed {
        id: v1_signature_id(&signature),
        frame,
        inner,
        version: Version::V1,
    })
}

fn seal_v2(
    draft: &Draft<'_>,
    to_key: &PublicKey,
    sign_key: &PrivateKey,
) -> Result<Sealed, FrameError> {
    let id = new_message_id();
    let inner = draft.inner_json(Some(id.clone()));
    let signature = sign_key.sign_pss(&inner)?;
    let sig_len = u16::try_from(signature.len())
        .map_err(|_| FrameError::Key(KeyError::Backend("signature too long".into())))?;
    let mut plaintext = Zeroizing::new(Vec::with_capacity(2 + signature.len() + inner.len()));
    plaintext.extend_from_slice(&sig_len.to_be_bytes());
    plaintext.extend_from_slice(&signature);
    plaintext.extend_from_slice(&inner);

    let mut k = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(k.as_mut());
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipherkey = to_key.encrypt_oaep(k.as_ref())?;
    let aad = v2_aad(&cipherkey);
    let cipher = Aes256Gcm::new_from_slice(k.as_ref())
        .map_err(|_| FrameError::Key(KeyError::Backend("AES-GCM key setup".into())))?;
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| FrameError::Key(KeyError::Backend("AES-GCM encryption".into())))?;
    let frame = format!(
        "{{\"v\":2,\"cipherkey\":\"{}\",\"nonce\":\"{}\",\"ciphertext\":\"{}\"}}",
        b64::encode(&cipherkey),
        b64::encode(&nonce),
        b64::encode(&ciphertext)
    )
    .into_bytes();
    Ok(Sealed {
        frame,
        inner,
        id,
        version: Version::V2,
    })
}

/// A decrypted frame whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct Decrypted {
    version: Version,
    inner_bytes: Vec<u8>,
    inner: Inner,
    signature: Vec<u8>,
    id: String,
}

/// A frame that decrypted and whose signature verified under the sender's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The frame's version.
    pub version: Version,
    /// The inner JSON bytes exactly as signed.
    pub inner_bytes: Vec<u8>,
    /// The parsed inner message.
    pub inner: Inner,
    /// The message id (v2: inner `id`; v1: [`v1_id`], from the signature).
    pub id: String,
}

#[derive(Deserialize)]
struct Outer {
    #[serde(default)]
    v: Option<u64>,
    cipherkey: Option<String>,
    ciphertext: Option<String>,
    signature: Option<String>,
    nonce: Option<String>,
    prekey: Option<String>,
    ek: Option<String>,
    kem: Option<String>,
}

/// Whether opening `frame` costs an RSA private-key operation: v1 and v2 do; v3 does not,
/// and neither does a frame refused before decryption (too large, not JSON, an unknown
/// version). A receiver uses it to keep cheap frames from queueing behind a backlog of
/// expensive ones. Reads only the outer `v`, without decoding any field.
pub fn needs_private_rsa(frame: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        v: Option<u64>,
    }
    if frame.len() > MAX_FRAME_BYTES {
        return false;
    }
    matches!(
        serde_json::from_slice::<Version>(frame),
        Ok(Version { v: None | Some(2) })
    )
}

/// Decrypts `frame` with this identity's message key. The result must still be verified.
/// (A v3 frame is refused as [`FrameError::UnknownPrekey`]: see [`decrypt_with`].)
pub fn decrypt(frame: &[u8], message_key: &PrivateKey) -> Result<Decrypted, FrameError> {
    decrypt_with(frame, Some(message_key), &crate::v3::NoPrekeys)
}

/// Decrypts a frame of any version: v1 and v2 with this identity's message key (refused
/// as [`FrameError::Unwrap`] when `None`), v3 with the prekey it names from `prekeys`.
/// The result must still be verified.
pub fn decrypt_with(
    frame: &[u8],
    message_key: Option<&PrivateKey>,
    prekeys: &dyn crate::v3::Prekeys,
) -> Result<Decrypted, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { size: frame.len() });
    }
    let outer: Outer =
        serde_json::from_slice(frame).map_err(|e| FrameError::Json(e.to_string()))?;
    match (outer.v, message_key) {
        (None, Some(message_key)) => decrypt_v1(outer, message_key),
        (Some(2), Some(message_key)) => decrypt_v2(outer, message_key),
        (None | Some(2), None) => Err(FrameError::Unwrap),
        (Some(3), _) => crate::v3::seal::decrypt(
            crate::v3::seal::Outer {
                prekey: outer.prekey,
                ek: outer.ek,
                kem: outer.kem,
                nonce: outer.nonce,
                ciphertext: outer.ciphertext,
            },
            prekeys,
        ),
        (Some(v), _) => Err(FrameError::UnsupportedVersion(v)),
    }
}

/// A v3 [`Decrypted`]; `signature` holds S ‖ C (see `v3::seal::verify`).
pub(crate) fn decrypted_v3(
    inner_bytes: Vec<u8>,
    inner: Inner,
    signature: Vec<u8>,
    id: String,
) -> Decrypted {
    Decrypted {
        version: Version::V3,
        inner_bytes,
        inner,
        signature,
        id,
    }
}

fn field(value: Option<String>, name: &'static str) -> Result<Vec<u8>, FrameError> {
    let text = value.ok_or_else(|| FrameError::Json(format!("missing field `{name}`")))?;
    b64::decode(&text).ok_or(FrameError::Base64 { field: name })
}

fn decrypt_v1(outer: Outer, key: &PrivateKey) -> Result<Decrypted, FrameError> {
    // Decode every field before the RSA operation: garbage costs no private-key work.
    let cipherkey = field(outer.cipherkey, "cipherkey")?;
    let ciphertext = field(outer.ciphertext, "ciphertext")?;
    let signature = field(outer.signature, "signature")?;
    if ciphertext.is_empty() || ciphertext.len() % 16 != 0 {
        return Err(FrameError::Length {
            field: "ciphertext",
        });
    }
    // Implicit rejection (keys.rs): a cipherkey that does not unwrap yields a stand-in key
    // and goes through the same CBC decryption and inner parsing as a real one; only then is
    // it refused, as `Decrypt`, the class a tampered ciphertext falls in. No early `Unwrap`.
    let unwrapped = key.unwrap_v1_key(&cipherkey);
    let k = &unwrapped.key;
    let parsed = cbc::Decryptor::<aes::Aes256>::new_from_slices(&k[..32], &k[32..])
        .map_err(|_| FrameError::Decrypt)
        .and_then(|d| {
            d.decrypt_padded_vec_mut::<Pkcs7>(&ciphertext)
                .map_err(|_| FrameError::Decrypt)
        })
        .and_then(|bytes| {
            Inner::parse(&bytes)
                .map(|inner| (bytes, inner))
                .map_err(|e| FrameError::Inner(e.to_string()))
        });
    if unwrapped.unwrapped != 1 {
        return Err(FrameError::Decrypt);
    }
    let (inner_bytes, inner) = parsed?;
    let id = v1_signature_id(&signature);
    Ok(Decrypted {
        version: Version::V1,
        inner_bytes,
        inner,
        signature,
        id,
    })
}

fn decrypt_v2(outer: Outer, key: &PrivateKey) -> Result<Decrypted, FrameError> {
    let cipherkey = field(outer.cipherkey, "cipherkey")?;
    let nonce = field(outer.nonce, "nonce")?;
    let ciphertext = field(outer.ciphertext, "ciphertext")?;
    if nonce.len() != 12 {
        return Err(FrameError::Length { field: "nonce" });
    }
    let k = key.decrypt_oaep(&cipherkey).ok_or(FrameError::Unwrap)?;
    if k.len() != 32 {
        return Err(FrameError::Unwrap);
    }
    let cipher = Aes256Gcm::new_from_slice(&k).map_err(|_| FrameError::Unwrap)?;
    let plaintext = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &v2_aad(&cipherkey),
                },
            )
            .map_err(|_| FrameError::Decrypt)?,
    );
    if plaintext.len() < 2 {
        return Err(FrameError::Inner("no signature length".into()));
    }
    let sig_len = usize::from(u16::from_be_bytes([plaintext[0], plaintext[1]]));
    let rest = &plaintext[2..];
    if sig_len > rest.len() {
        return Err(FrameError::Inner("signature length past the end".into()));
    }
    let (signature, inner_bytes) = rest.split_at(sig_len);
    let inner = Inner::parse(inner_bytes).map_err(|e| FrameError::Inner(e.to_string()))?;
    let id = inner
        .id
        .clone()
        .ok_or_else(|| FrameError::Inner("missing field `id`".into()))?;
    if !crate::inner::is_message_id(&id) {
        return Err(FrameError::Inner(
            "`id` is not 16 bytes of base64url".into(),
        ));
    }
    Ok(Decrypted {
        version: Version::V2,
        inner_bytes: inner_bytes.to_vec(),
        inner,
        signature: signature.to_vec(),
        id,
    })
}

impl Decrypted {
    /// The frame's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The claimed inner message: use it only to find the sender's keys.
    pub fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Checks the signature with the signing key of the inner `from`: v2 with a 32-byte
    /// PSS salt as sealed, v1 with any salt as the original does; v3 checks the signing
    /// certificate with it, then the Ed25519 signature with the certificate's key.
    pub fn verify(self, sender_sign_key: &PublicKey) -> Result<Opened, FrameError> {
        let ok = match self.version {
            Version::V1 => sender_sign_key.verify_pss_any_salt(&self.inner_bytes, &self.signature),
            Version::V2 => {
                sender_sign_key.verify_pss_digest_salt(&self.inner_bytes, &self.signature)
            }
            Version::V3 => {
                crate::v3::seal::verify(
                    &self.signature,
                    &self.inner_bytes,
                    &self.inner,
                    sender_sign_key,
                )?;
                true
            }
        };
        if !ok {
            return Err(FrameError::Signature);
        }
        Ok(Opened {
            version: self.version,
            inner_bytes: self.inner_bytes,
            inner: self.inner,
            id: self.id,
        })
    }
}

impl Opened {
    /// Refuses a message whose inner `to` is not `me` (compared lower-case, since the
    /// original wrote the recipient as typed).
    pub fn check_recipient(&self, me: &Username) -> Result<(), FrameError> {
        if self.inner.to.to_ascii_lowercase() == me.as_str() {
            Ok(())
        } else {
            Err(FrameError::Misaddressed {
                to: self.inner.to.chars().take(64).collect(),
            })
        }
    }

    /// Refuses a timestamp more than [`MAX_FUTURE_SKEW_MS`] after `now_ms`.
    pub fn check_time(&self, now_ms: i64) -> Result<(), FrameError> {
        if self.inner.timestamp > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
            Err(FrameError::FromTheFuture {
                timestamp: self.inner.timestamp,
            })
        } else {
            Ok(())
        }
    }
}

/// A fresh v2 message id: 16 bytes from the OS RNG, base64url.
pub fn new_message_id() -> String {
    let mut id = [0u8; ID_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut id);
    b64::encode(&id)
}

/// The id of a v1 message, which has none on the wire: the first 16 bytes of the SHA-256
/// of its signature bytes (decoded), base64url. The signature is what the sender made and
/// only the sender can make, and it verifies over exactly one inner message, so every
/// re-encoding of a frame (whitespace, key order, extra fields, JSON escapes, a re-wrapped
/// cipherkey) has the same id and the duplicate check refuses it; a sender that signs the
/// same text again makes a new PSS signature (random salt), hence a new message. The
/// signature travels in clear, so the id tells nothing about the text. `None` when `frame`
/// is not a v1 frame with a decodable signature.
pub fn v1_id(frame: &[u8]) -> Option<String> {
    let outer: Outer = serde_json::from_slice(frame).ok()?;
    if outer.v.is_some() {
        return None;
    }
    Some(v1_signature_id(&b64::decode(&outer.signature?)?))
}

/// [`v1_id`] from the decoded signature bytes.
pub fn v1_signature_id(signature: &[u8]) -> String {
    b64::encode(&Sha256::digest(signature)[..ID_BYTES])
}

/// The v1 id before the replay fix: SHA-256 of the frame bytes as they came.
/// Messages stored then are keyed by it, so the receiver also checks it (an exact replay of
/// a frame stored before the upgrade is still a duplicate).
pub fn v1_legacy_id(frame: &[u8]) -> String {
    b64::encode(&Sha256::digest(frame)[..ID_BYTES])
}

fn v2_aad(cipherkey: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(V2_AAD_PREFIX.len() + cipherkey.len());
    aad.extend_from_slice(V2_AAD_PREFIX);
    aad.extend_from_slice(cipherkey);
    aad
}

/// Opens with both keys at once: [`decrypt`] then [`Decrypted::verify`].
pub fn open(
    frame: &[u8],
    message_key: &PrivateKey,
    sender_sign_key: &PublicKey,
) -> Result<Opened, FrameError> {
    decrypt(frame, message_key)?.verify(sender_sign_key)
}

/// Opens a frame of any version: [`decrypt_with`] then [`Decrypted::verify`].
pub fn open_with(
    frame: &[u8],
    message_key: Option<&PrivateKey>,
    prekeys: &dyn crate::v3::Prekeys,
    sender_sign_key: &PublicKey,
) -> Result<Opened, FrameError> {
    decrypt_with(frame, message_key, prekeys)?.verify(sender_sign_key)
}
