//! The private halves of prekeys and certificates, and their files.
//!
//! ```text
//! DIR/keys/prekeys/<id as lower-case hex>.json        0600, folder 0700
//!   {"prekey":{..},"signature":"..","x25519":"<32-byte private key>","mlkem768":"<2400-byte decapsulation key>"}
//! DIR/keys/certificates/<id hex>.json                 0600, folder 0700
//!   {"certificate":{..},"signature":"..","ed25519":"<32-byte private seed>"}
//! ```
//!
//! The first two fields are the signed document exactly as published (the same bytes of
//! the signed object; [`PrekeySecret::signed`] gives the published document back), the
//! others the secrets in padded base64url. `mlkem768` is the full FIPS 203 decapsulation
//! key, which embeds the encapsulation key: loading checks that it, and the X25519 or
//! Ed25519 public key derived from the secret, match the signed object, so a file whose
//! halves were mixed up is refused rather than silently failing to open frames.
//!
//! Deleting a prekey deletes its file; nothing else on the machine holds its secret, so
//! frames sealed to it no longer open (forward secrecy). Secrets come from the OS RNG
//! and are zeroed when dropped where the types allow it (the aws-lc-rs key objects zero
//! their own memory).

use super::doc::{Certificate, Prekey, SignedCertificate, SignedPrekey};
use super::{
    fixed, id_hex, new_id, parse_id_hex, KeyId, V3Error, ED25519_BYTES, ED25519_SIGNATURE_BYTES,
    MLKEM768_PRIVATE_BYTES, MLKEM768_PUBLIC_BYTES, X25519_BYTES,
};
use crate::b64;
use crate::keys::{write_private_file, PrivateKey};
use crate::username::Username;
use aws_lc_rs::agreement;
use aws_lc_rs::kem::{DecapsulationKey, ML_KEM_768};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use rand::RngCore;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::{Zeroize, Zeroizing};

/// Where the encapsulation key sits inside a FIPS 203 ML-KEM-768 decapsulation key
/// (`dk = dk_PKE(1152) ‖ ek(1184) ‖ H(ek) ‖ z`).
const DK_EK_START: usize = 1152;

/// Files larger than this are not ours.
const MAX_FILE_BYTES: usize = 64 * 1024;

/// A prekey with its private parts: what opens frames sealed to it.
pub struct PrekeySecret {
    signed: SignedPrekey,
    x25519: Zeroizing<[u8; X25519_BYTES]>,
    mlkem768: Zeroizing<Vec<u8>>,
    /// Both private keys parsed once (AWS-LC holds them, and clears them when dropped):
    /// parsing the X25519 one computes its public key, a scalar multiplication that every
    /// frame opened would otherwise repeat.
    keys: OpeningKeys,
}

/// The parsed private keys of a prekey (see [`PrekeySecret`]).
pub(crate) struct OpeningKeys {
    pub(crate) x25519: agreement::PrivateKey,
    pub(crate) mlkem768: DecapsulationKey,
}

impl OpeningKeys {
    fn parse(x25519: &[u8; X25519_BYTES], mlkem768: &[u8]) -> Result<Self, V3Error> {
        Ok(Self {
            x25519: agreement::PrivateKey::from_private_key(&agreement::X25519, x25519)
                .map_err(|_| V3Error::Crypto("X25519 private key refused"))?,
            mlkem768: DecapsulationKey::new(&ML_KEM_768, mlkem768)
                .map_err(|_| V3Error::Crypto("ML-KEM-768 decapsulation key refused"))?,
        })
    }
}

/// A signing certificate with its private seed: what signs our v3 frames.
pub struct CertificateSecret {
    signed: SignedCertificate,
    seed: Zeroizing<[u8; ED25519_BYTES]>,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for PrekeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PrekeySecret({}, {})",
            self.signed.prekey().username,
            id_hex(&self.signed.prekey().id)
        )
    }
}

impl std::fmt::Debug for CertificateSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.signed.certificate();
        write!(f, "CertificateSecret({}, {})", c.username, id_hex(&c.id))
    }
}

fn x25519_public(secret: &[u8; X25519_BYTES]) -> Result<[u8; X25519_BYTES], V3Error> {
    let key = agreement::PrivateKey::from_private_key(&agreement::X25519, secret)
        .map_err(|_| V3Error::Crypto("X25519 private key refused"))?;
    let public = key
        .compute_public_key()
        .map_err(|_| V3Error::Crypto("X25519 public key"))?;
    <[u8; X25519_BYTES]>::try_from(public.as_ref())
        .map_err(|_| V3Error::Crypto("X25519 public key size"))
}

fn ed25519_pair(seed: &[u8; ED25519_BYTES]) -> Result<Ed25519KeyPair, V3Error> {
    Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| V3Error::Crypto("Ed25519 seed refused"))
}

impl PrekeySecret {
    /// Makes a new prekey for `user` valid from `created` to `expires` (Unix ms), signed
    /// with the identity's RSA sign key.
    pub fn generate(
        user: &Username,
        created: i64,
        expires: i64,
        sign_key: &PrivateKey,
    ) -> Result<Self, V3Error> {
        let mut x25519 = Zeroizing::new([0u8; X25519_BYTES]);
        rand::rngs::OsRng.fill_bytes(x25519.as_mut());
        let x_public = x25519_public(&x25519)?;
        let dk = DecapsulationKey::generate(&ML_KEM_768)
            .map_err(|_| V3Error::Crypto("ML-KEM key generation"))?;
        let ek = dk
            .encapsulation_key()
            .and_then(|ek| ek.key_bytes())
            .map_err(|_| V3Error::Crypto("ML-KEM encapsulation key"))?;
        let dk_bytes = dk
            .key_bytes()
            .map_err(|_| V3Error::Crypto("ML-KEM decapsulation key"))?;
        let mlkem768 = Zeroizing::new(dk_bytes.as_ref().to_vec());
        if mlkem768.len() != MLKEM768_PRIVATE_BYTES || ek.as_ref().len() != MLKEM768_PUBLIC_BYTES {
            return Err(V3Error::Crypto("ML-KEM key sizes"));
        }
        let prekey = Prekey {
            username: user.clone(),
            id: new_id(),
            created,
            expires,
            x25519: x_public,
            mlkem768: ek.as_ref().to_vec(),
        };
        let signed = SignedPrekey::sign(prekey, sign_key)?;
        let keys = OpeningKeys::parse(&x25519, &mlkem768)?;
        Ok(Self {
            signed,
            x25519,
            mlkem768,
            keys,
        })
    }

    /// The published document.
    pub fn signed(&self) -> &SignedPrekey {
        &self.signed
    }

    /// The public prekey.
    pub fn prekey(&self) -> &Prekey {
        self.signed.prekey()
    }

    /// Its id.
    pub fn id(&self) -> KeyId {
        self.signed.prekey().id
    }

    /// The private keys, parsed.
    pub(crate) fn opening_keys(&self) -> &OpeningKeys {
        &self.keys
    }

    #[cfg(test)]
    pub(crate) fn x25519_secret(&self) -> &[u8; X25519_BYTES] {
        &self.x25519
    }

    #[cfg(test)]
    pub(crate) fn mlkem768_secret(&self) -> &[u8] {
        &self.mlkem768
    }

    /// The private file's bytes (see the module header).
    pub fn to_file(&self) -> Zeroizing<Vec<u8>> {
        let mut x = Zeroizing::new(b64::encode(self.x25519.as_ref()));
        let mut m = Zeroizing::new(b64::encode(&self.mlkem768));
        let text = Zeroizing::new(format!(
            "{{\"prekey\":{},\"signature\":\"{}\",\"x25519\":\"{}\",\"mlkem768\":\"{}\"}}\n",
            String::from_utf8_lossy(self.signed.body_bytes()),
            b64::encode(self.signed.signature()),
            x.as_str(),
            m.as_str()
        ));
        x.zeroize();
        m.zeroize();
        Zeroizing::new(text.as_bytes().to_vec())
    }

    /// Reads a private file's bytes, checking that the secrets match the signed prekey.
    pub fn from_file(bytes: &[u8]) -> Result<Self, V3Error> {
        #[derive(Deserialize)]
        struct File<'a> {
            #[serde(borrow)]
            prekey: &'a RawValue,
            signature: String,
            x25519: String,
            mlkem768: String,
        }
        if bytes.len() > MAX_FILE_BYTES {
            return Err(V3Error::TooLarge { size: bytes.len() });
        }
        let mut file: File<'_> =
            serde_json::from_slice(bytes).map_err(|e| V3Error::Json(e.to_string()))?;
        let x = fixed::<X25519_BYTES>(&file.x25519, "x25519").map(Zeroizing::new);
        let m = b64::decode(&file.mlkem768).map(Zeroizing::new);
        file.x25519.zeroize();
        file.mlkem768.zeroize();
        let x25519 = x?;
        let mlkem768 = m.ok_or(V3Error::Base64 { field: "mlkem768" })?;
        if mlkem768.len() != MLKEM768_PRIVATE_BYTES {
            return Err(V3Error::Length { field: "mlkem768" });
        }
        let published = format!(
            "{{\"prekey\":{},\"signature\":{}}}",
            file.prekey.get(),
            json_string(&file.signature)
        );
        let signed = SignedPrekey::parse(published.as_bytes())?;
        if x25519_public(&x25519)? != signed.prekey().x25519 {
            return Err(V3Error::Mismatch(
                "the X25519 private key does not match the prekey".into(),
            ));
        }
        if mlkem768[DK_EK_START..DK_EK_START + MLKEM768_PUBLIC_BYTES]
            != signed.prekey().mlkem768[..]
        {
            return Err(V3Error::Mismatch(
                "the ML-KEM decapsulation key does not match the prekey".into(),
            ));
        }
        let keys = OpeningKeys::parse(&x25519, &mlkem768)?;
        Ok(Self {
            signed,
            x25519,
            mlkem768,
            keys,
        })
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl CertificateSecret {
    /// Makes a new signing certificate for `user` valid from `created` to `expires` (Unix
    /// ms), signed with the identity's RSA sign key.
    pub fn generate(
        user: &Username,
        created: i64,
        expires: i64,
        sign_key: &PrivateKey,
    ) -> Result<Self, V3Error> {
        let mut seed = Zeroizing::new([0u8; ED25519_BYTES]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        let pair = ed25519_pair(&seed)?;
        let ed25519 = <[u8; ED25519_BYTES]>::try_from(pair.public_key().as_ref())
            .map_err(|_| V3Error::Crypto("Ed25519 public key size"))?;
        let certificate = Certificate {
            username: user.clone(),
            id: new_id(),
            created,
            expires,
            ed25519,
        };
        let signed = SignedCertificate::sign(certificate, sign_key)?;
        Ok(Self { signed, seed, pair })
    }

    /// The published document (a frame's `C`).
    pub fn signed(&self) -> &SignedCertificate {
        &self.signed
    }

    /// The public certificate.
    pub fn certificate(&self) -> &Certificate {
        self.signed.certificate()
    }

    /// Its id.
    pub fn id(&self) -> KeyId {
        self.signed.certificate().id
    }

    /// Ed25519 signature of `message` with the certificate's key.
    pub fn sign(&self, message: &[u8]) -> [u8; ED25519_SIGNATURE_BYTES] {
        let mut out = [0u8; ED25519_SIGNATURE_BYTES];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }

    /// The private file's bytes (see the module header).
    pub fn to_file(&self) -> Zeroizing<Vec<u8>> {
        let mut seed = Zeroizing::new(b64::encode(self.seed.as_ref()));
        let text = Zeroizing::new(format!(
            "{{\"certificate\":{},\"signature\":\"{}\",\"ed25519\":\"{}\"}}\n",
            String::from_utf8_lossy(self.signed.body_bytes()),
            b64::encode(self.signed.signature()),
            seed.as_str()
        ));
        seed.zeroize();
        Zeroizing::new(text.as_bytes().to_vec())
    }

    /// Reads a private file's bytes, checking that the seed matches the certificate.
    pub fn from_file(bytes: &[u8]) -> Result<Self, V3Error> {
        #[derive(Deserialize)]
        struct File<'a> {
            #[serde(borrow)]
            certificate: &'a RawValue,
            signature: String,
            ed25519: String,
        }
        if bytes.len() > MAX_FILE_BYTES {
            return Err(V3Error::TooLarge { size: bytes.len() });
        }
        let mut file: File<'_> =
            serde_json::from_slice(bytes).map_err(|e| V3Error::Json(e.to_string()))?;
        let seed = fixed::<ED25519_BYTES>(&file.ed25519, "ed25519").map(Zeroizing::new);
        file.ed25519.zeroize();
        let seed = seed?;
        let published = format!(
            "{{\"certificate\":{},\"signature\":{}}}",
            file.certificate.get(),
            json_string(&file.signature)
        );
        let signed = SignedCertificate::parse(published.as_bytes())?;
        let pair = ed25519_pair(&seed)?;
        if pair.public_key().as_ref() != &signed.certificate().ed25519[..] {
            return Err(V3Error::Mismatch(
                "the Ed25519 seed does not match the certificate".into(),
            ));
        }
        Ok(Self { signed, seed, pair })
    }
}

/// Where the v3 private parts of one identity live: `DIR/keys/prekeys/` and
/// `DIR/keys/certificates/`.
#[derive(Debug, Clone)]
pub struct KeyDir {
    keys: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> V3Error + '_ {
    move |source| V3Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn ensure_private_dir(dir: &Path) -> Result<(), V3Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

fn read_small(path: &Path) -> Result<Option<Vec<u8>>, V3Error> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn remove(path: &Path) -> Result<bool, V3Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(path)(e)),
    }
}

/// The ids of the `<hex>.json` files in `dir` (none when it does not exist).
fn ids_in(dir: &Path) -> Result<Vec<KeyId>, V3Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(parse_id_hex)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl KeyDir {
    /// The v3 key folders of data directory `data_dir` (`data_dir/keys/...`).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            keys: data_dir.join("keys"),
        }
    }

    /// `DIR/keys/prekeys`.
    pub fn prekeys_dir(&self) -> PathBuf {
        self.keys.join("prekeys")
    }

    /// `DIR/keys/certificates`.
    pub fn certificates_dir(&self) -> PathBuf {
        self.keys.join("certificates")
    }

    /// `DIR/keys/prekeys/<id hex>.json`.
    pub fn prekey_path(&self, id: &KeyId) -> PathBuf {
        self.prekeys_dir().join(format!("{}.json", id_hex(id)))
    }

    /// `DIR/keys/certificates/<id hex>.json`.
    pub fn certificate_path(&self, id: &KeyId) -> PathBuf {
        self.certificates_dir().join(format!("{}.json", id_hex(id)))
    }

    /// Makes and saves a new prekey and a new certificate for `user`, both valid from
    /// `now_ms` to `now_ms + 2 × rotation`, signed with the identity's RSA sign key.
    pub fn create(
        &self,
        user: &Username,
        sign_key: &PrivateKey,
        rotation: Duration,
        now_ms: i64,
    ) -> Result<(Arc<PrekeySecret>, Arc<CertificateSecret>), V3Error> {
        let expires = now_ms.saturating_add(ms(rotation).saturating_mul(2));
        let prekey = PrekeySecret::generate(user, now_ms, expires, sign_key)?;
        let certificate = CertificateSecret::generate(user, now_ms, expires, sign_key)?;
        self.save_prekey(&prekey)?;
        self.save_certificate(&certificate)?;
        Ok((Arc::new(prekey), Arc::new(certificate)))
    }

    /// Writes a prekey's private file (0600, never overwriting; folders 0700).
    pub fn save_prekey(&self, prekey: &PrekeySecret) -> Result<PathBuf, V3Error> {
        ensure_private_dir(&self.prekeys_dir())?;
        let path = self.prekey_path(&prekey.id());
        write_private_file(&path, &prekey.to_file(), false)?;
        Ok(path)
    }

    /// Writes a certificate's private file (0600, never overwriting; folders 0700).
    pub fn save_certificate(&self, certificate: &CertificateSecret) -> Result<PathBuf, V3Error> {
        ensure_private_dir(&self.certificates_dir())?;
        let path = self.certificate_path(&certificate.id());
        write_private_file(&path, &certificate.to_file(), false)?;
        Ok(path)
    }

    /// Loads prekey `id`; `None` when its file does not exist. A file that names another
    /// id than its name is refused.
    pub fn load_prekey(&self, id: &KeyId) -> Result<Option<PrekeySecret>, V3Error> {
        let path = self.prekey_path(id);
        let Some(bytes) = read_small(&path)?.map(Zeroizing::new) else {
            return Ok(None);
        };
        let prekey = PrekeySecret::from_file(&bytes).map_err(|e| in_file(&path, e))?;
        if prekey.id() != *id {
            return Err(in_file(
                &path,
                V3Error::Mismatch("the file name is not the prekey's id".into()),
            ));
        }
        Ok(Some(prekey))
    }

    /// Loads certificate `id`; `None` when its file does not exist.
    pub fn load_certificate(&self, id: &KeyId) -> Result<Option<CertificateSecret>, V3Error> {
        let path = self.certificate_path(id);
        let Some(bytes) = read_small(&path)?.map(Zeroizing::new) else {
            return Ok(None);
        };
        let certificate = CertificateSecret::from_file(&bytes).map_err(|e| in_file(&path, e))?;
        if certificate.id() != *id {
            return Err(in_file(
                &path,
                V3Error::Mismatch("the file name is not the certificate's id".into()),
            ));
        }
        Ok(Some(certificate))
    }

    /// Every prekey held, oldest `created` first. A file that does not load is an error
    /// naming it (other files in the folder are ignored).
    pub fn list_prekeys(&self) -> Result<Vec<PrekeySecret>, V3Error> {
        let mut all = Vec::new();
        for id in ids_in(&self.prekeys_dir())? {
            if let Some(p) = self.load_prekey(&id)? {
                all.push(p);
            }
        }
        all.sort_by_key(|p| (p.prekey().created, p.id()));
        Ok(all)
    }

    /// Every prekey held, by id: an in-memory [`Prekeys`] for a daemon that opens many
    /// frames (reload it after making or deleting one).
    pub fn prekey_map(&self) -> Result<HashMap<KeyId, Arc<PrekeySecret>>, V3Error> {
        Ok(self
            .list_prekeys()?
            .into_iter()
            .map(|p| (p.id(), Arc::new(p)))
            .collect())
    }

    /// Every certificate held, oldest `created` first.
    pub fn list_certificates(&self) -> Result<Vec<CertificateSecret>, V3Error> {
        let mut all = Vec::new();
        for id in ids_in(&self.certificates_dir())? {
            if let Some(c) = self.load_certificate(&id)? {
                all.push(c);
            }
        }
        all.sort_by_key(|c| (c.certificate().created, c.id()));
        Ok(all)
    }

    /// The newest prekey of `user` valid at `now_ms` (the one to publish).
    pub fn current_prekey(&self, user: &Username, now_ms: i64) -> Result<PrekeySecret, V3Error> {
        self.list_prekeys()?
            .into_iter()
            .rev()
            .find(|p| &p.prekey().username == user && p.prekey().check_valid(now_ms).is_ok())
            .ok_or_else(|| {
                V3Error::Missing(format!(
                    "no valid prekey of {user} in {}",
                    self.prekeys_dir().display()
                ))
            })
    }

    /// The newest certificate of `user` valid at `now_ms` (the one to sign with).
    pub fn current_certificate(
        &self,
        user: &Username,
        now_ms: i64,
    ) -> Result<CertificateSecret, V3Error> {
        self.list_certificates()?
            .into_iter()
            .rev()
            .find(|c| {
                &c.certificate().username == user && c.certificate().check_valid(now_ms).is_ok()
            })
            .ok_or_else(|| {
                V3Error::Missing(format!(
                    "no valid certificate of {user} in {}",
                    self.certificates_dir().display()
                ))
            })
    }

    /// Deletes prekey `id`'s file; `false` when there was none.
    pub fn delete_prekey(&self, id: &KeyId) -> Result<bool, V3Error> {
        remove(&self.prekey_path(id))
    }

    /// Deletes certificate `id`'s file; `false` when there was none.
    pub fn delete_certificate(&self, id: &KeyId) -> Result<bool, V3Error> {
        remove(&self.certificate_path(id))
    }

    /// Deletes every prekey and certificate whose `expires + grace <= now_ms`; returns
    /// the ids of the prekeys deleted.
    pub fn delete_expired(&self, now_ms: i64, grace: Duration) -> Result<Vec<KeyId>, V3Error> {
        let grace = ms(grace);
        let mut gone = Vec::new();
        for p in self.list_prekeys()? {
            if p.prekey().expires.saturating_add(grace) <= now_ms && self.delete_prekey(&p.id())? {
                gone.push(p.id());
            }
        }
        for c in self.list_certificates()? {
            if c.certificate().expires.saturating_add(grace) <= now_ms {
                self.delete_certificate(&c.id())?;
            }
        }
        Ok(gone)
    }
}

fn in_file(path: &Path, e: V3Error) -> V3Error {
    match e {
        e @ (V3Error::Io { .. } | V3Error::Key(_)) => e,
        e => V3Error::Mismatch(format!("{}: {e}", path.display())),
    }
}

/// Where opening finds the private half of the prekey a frame names.
pub trait Prekeys {
    /// The prekey `id`, when held; `None` makes the frame `unknown_prekey`.
    fn prekey(&self, id: &KeyId) -> Option<Arc<PrekeySecret>>;
}

/// Holds no prekeys (opening v1/v2 only).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPrekeys;

impl Prekeys for NoPrekeys {
    fn prekey(&self, _id: &KeyId) -> Option<Arc<PrekeySecret>> {
        None
    }
}

impl Prekeys for HashMap<KeyId, Arc<PrekeySecret>> {
    fn prekey(&self, id: &KeyId) -> Option<Arc<PrekeySecret>> {
        self.get(id).cloned()
    }
}

/// Reads the prekey's file at each lookup, so a deleted file is at once a deleted key. A
/// file that exists but does not load counts as not held (the frame is refused as
/// `unknown_prekey`); [`KeyDir::load_prekey`] says why.
impl Prekeys for KeyDir {
    fn prekey(&self, id: &KeyId) -> Option<Arc<PrekeySecret>> {
        self.load_prekey(id).ok().flatten().map(Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sign_key() -> PrivateKey {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/legacy-v1/keys/alice-rsa-sign"
        ))
        .expect("vector");
        PrivateKey::from_pem(&pem).expect("key")
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_list_load_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::new(dir.path());
        let alice = Username::parse("alice").unwrap();
        let key = sign_key();
        let rotation = Duration::from_secs(7 * 24 * 3600);
        let (prekey, cert) = keys.create(&alice, &key, rotation, 1_000).unwrap();
        assert_eq!(prekey.prekey().expires, 1_000 + 14 * 24 * 3600 * 1000);
        assert_eq!(cert.certificate().expires, prekey.prekey().expires);
        prekey
            .signed()
            .verify_for(&alice, key.public_key())
            .unwrap();
        cert.signed().verify_for(&alice, key.public_key()).unwrap();

        let path = keys.prekey_path(&prekey.id());
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            format!("{}.json", id_hex(&prekey.id()))
        );
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&keys.certificate_path(&cert.id())), 0o600);
        assert_eq!(mode(&keys.prekeys_dir()), 0o700);
        assert_eq!(mode(&keys.certificates_dir()), 0o700);

        // The file holds the published document's bytes and the secrets, as documented.
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            b64::decode(value["x25519"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            b64::decode(value["mlkem768"].as_str().unwrap())
                .unwrap()
                .len(),
            2400
        );
        let loaded = keys.load_prekey(&prekey.id()).unwrap().unwrap();
        assert_eq!(loaded.signed().as_bytes(), prekey.signed().as_bytes());
        assert_eq!(loaded.mlkem768_secret(), prekey.mlkem768_secret());
        let loaded_cert = keys.load_certificate(&cert.id()).unwrap().unwrap();
        assert_eq!(loaded_cert.signed().as_bytes(), cert.signed().as_bytes());
        assert_eq!(loaded_cert.sign(b"x"), cert.sign(b"x"));
        let cert_file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(keys.certificate_path(&cert.id())).unwrap())
                .unwrap();
        assert_eq!(
            b64::decode(cert_file["ed25519"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );

        let (newer, _) = keys.create(&alice, &key, rotation, 2_000).unwrap();
        let listed: Vec<_> = keys
            .list_prekeys()
            .unwrap()
            .iter()
            .map(|p| p.id())
            .collect();
        assert_eq!(listed, vec![prekey.id(), newer.id()]);
        assert_eq!(keys.current_prekey(&alice, 3_000).unwrap().id(), newer.id());
        assert_eq!(
            keys.current_certificate(&alice, 1_500).unwrap().id(),
            cert.id()
        );
        assert!(keys.current_certificate(&alice, 500).is_err());
        assert!(keys
            .current_certificate(&Username::parse("bob").unwrap(), 3_000)
            .is_err());

        assert!(keys.prekey(&prekey.id()).is_some());
        assert!(keys.delete_prekey(&prekey.id()).unwrap());
        assert!(!path.exists());
        assert!(keys.prekey(&prekey.id()).is_none());
        assert!(!keys.delete_prekey(&prekey.id()).unwrap());

        let far = newer.prekey().expires + ms(Duration::from_secs(14 * 24 * 3600));
        assert!(keys
            .delete_expired(far - 1, Duration::from_secs(14 * 24 * 3600))
            .unwrap()
            .is_empty());
        assert_eq!(
            keys.delete_expired(far, Duration::from_secs(14 * 24 * 3600))
                .unwrap(),
            vec![newer.id()]
        );
        assert!(keys.list_prekeys().unwrap().is_empty());
        assert!(keys.list_certificates().unwrap().is_empty());
    }

    #[test]
    fn mixed_up_or_broken_files_are_refused() {
        let key = sign_key();
        let alice = Username::parse("alice").unwrap();
        let a = PrekeySecret::generate(&alice, 0, 10, &key).unwrap();
        let b = PrekeySecret::generate(&alice, 0, 10, &key).unwrap();
        let a_file: serde_json::Value = serde_json::from_slice(&a.to_file()).unwrap();
        let b_text = String::from_utf8(b.to_file().to_vec()).unwrap();
        let mixed = b_text.replacen(
            &b64::encode(b.x25519_secret()),
            a_file["x25519"].as_str().unwrap(),
            1,
        );
        assert!(matches!(
            PrekeySecret::from_file(mixed.as_bytes()),
            Err(V3Error::Mismatch(_))
        ));
        let mixed_kem = b_text.replacen(
            &b64::encode(b.mlkem768_secret()),
            a_file["mlkem768"].as_str().unwrap(),
            1,
        );
        assert!(matches!(
            PrekeySecret::from_file(mixed_kem.as_bytes()),
            Err(V3Error::Mismatch(_))
        ));
        assert!(PrekeySecret::from_file(b"{}").is_err());
        assert!(CertificateSecret::from_file(&a.to_file()).is_err());

        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::new(dir.path());
        keys.save_prekey(&a).unwrap();
        // A file renamed to another id is not that prekey.
        std::fs::rename(keys.prekey_path(&a.id()), keys.prekey_path(&b.id())).unwrap();
        assert!(keys.load_prekey(&b.id()).is_err());
        assert!(keys.prekey(&b.id()).is_none());
        assert!(keys.list_prekeys().is_err());
        std::fs::write(keys.prekeys_dir().join("notes.txt"), "not a key").unwrap();
        std::fs::remove_file(keys.prekey_path(&b.id())).unwrap();
        assert!(keys.list_prekeys().unwrap().is_empty());
    }
}
