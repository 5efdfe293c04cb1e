//! v3 prekeys: our own (made, published, rotated, deleted) and our contacts' (fetched,
//! verified with the pinned sign key, cached) — DESIGN.md "v3", docs/PROTOCOL.md "v3 in
//! nesd".
//!
//! **Own.** [`OwnPrekeys`] holds every prekey of the data directory's `keys/prekeys/` in
//! memory (the receive pipeline opens v3 frames with it, no file read per frame) and the
//! current signing certificate (sending signs with it: no RSA private operation per
//! message). [`OwnPrekeys::run`] is one periodic task: it makes a new prekey and
//! certificate when there is no current one or the current one is `rotation` old,
//! deletes those past `expires + grace`, reloads the map whenever it made or deleted one,
//! and publishes the newest prekey with `PUT /users/<me>/prekey` until the key server
//! takes it — an account is active only once its mail link is followed, so it retries
//! with backoff (2 s doubling to 5 min, or the server's `Retry-After`) and says why in
//! [`PublishState`], which `nes status` shows.
//!
//! **Contacts'.** [`PeerPrekeys`] fetches `GET /users/<name>/prekey`, verifies it with
//! the contact's pinned sign key (`verify_for`) and `check_valid`, and caches the answer
//! in memory: a prekey until an hour has passed or it nears expiry, "none" (404, or an
//! original key server) for 10 minutes, a failure for a minute. No lock is held across
//! HTTP. A contact without a valid prekey gets v2; one that had prekeys and loses them is
//! logged as a warning and told in `nes contacts show`.

use crate::keyserver::{FetchError, KeyServer, PublishError};
use crate::sync::lock;
use nes_proto::v3::{CertificateSecret, KeyDir, KeyId, PrekeySecret, Prekeys, SignedPrekey};
use nes_proto::{now_ms, PrivateKey, PublicKey, Username};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// First wait after a failed publication; doubles up to [`PUBLISH_BACKOFF_MAX`].
pub const PUBLISH_BACKOFF_MIN: Duration = Duration::from_secs(2);
/// Longest wait between publication attempts.
pub const PUBLISH_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A contact's prekey is fetched again after this long.
pub const PEER_REFRESH: Duration = Duration::from_secs(3600);
/// ... or when it expires within this long.
pub const PEER_NEAR_EXPIRY: Duration = Duration::from_secs(3600);
/// "No prekey" (404) is believed this long.
pub const PEER_NONE_TTL: Duration = Duration::from_secs(600);
/// A failed fetch is not tried again for this long (v2 meanwhile).
pub const PEER_FAILURE_TTL: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Where our own prekey stands with the key server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishState {
    /// The newest prekey's id (hex), empty when none.
    pub prekey_id: String,
    /// Its `expires`, Unix ms.
    pub expires_ms: i64,
    /// The key server holds it.
    pub published: bool,
    /// When not published: why (the last attempt's answer).
    pub waiting_reason: String,
    /// When not published: the next attempt, Unix ms.
    pub next_try_ms: i64,
}

/// Our own prekeys and certificate.
pub struct OwnPrekeys {
    dir: KeyDir,
    user: Username,
    rotation: Duration,
    grace: Duration,
    map: RwLock<Arc<HashMap<KeyId, Arc<PrekeySecret>>>>,
    certificate: RwLock<Option<Arc<CertificateSecret>>>,
    state: Mutex<PublishState>,
    /// Wakes the task (after `register`: publish at once).
    wake: Notify,
}

impl std::fmt::Debug for OwnPrekeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnPrekeys")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl OwnPrekeys {
    /// Loads the prekeys of `data_dir` and makes the first prekey and certificate when
    /// there is no current one.
    pub fn open(
        data_dir: &Path,
        user: &Username,
        sign_key: &PrivateKey,
        rotation: Duration,
        grace: Duration,
    ) -> Result<OwnPrekeys, nes_proto::v3::V3Error> {
        let own = OwnPrekeys {
            dir: KeyDir::new(data_dir),
            user: user.clone(),
            rotation,
            grace,
            map: RwLock::new(Arc::new(HashMap::new())),
            certificate: RwLock::new(None),
            state: Mutex::new(PublishState::default()),
            wake: Notify::new(),
        };
        own.maintain(sign_key, now_ms())?;
        Ok(own)
    }

    /// The prekeys held now (a snapshot for a chunk of frames).
    pub fn snapshot(&self) -> Arc<HashMap<KeyId, Arc<PrekeySecret>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The certificate to sign v3 frames with, when one is valid now.
    pub fn certificate(&self) -> Option<Arc<CertificateSecret>> {
        let c = self
            .certificate
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        c.certificate().check_valid(now_ms()).ok().map(|_| c)
    }

    /// Where publication stands.
    pub fn state(&self) -> PublishState {
        lock(&self.state).clone()
    }

    /// Asks the task to publish now (after a registration).
    pub fn publish_soon(&self) {
        self.wake.notify_one();
    }

    /// The newest prekey held.
    fn newest(&self) -> Option<Arc<PrekeySecret>> {
        self.snapshot()
            .values()
            .filter(|p| p.prekey().username == self.user)
            .max_by_key(|p| (p.prekey().created, p.id()))
            .cloned()
    }

    /// Makes a new prekey and certificate when the newest is `rotation` old (or there is
    /// none), deletes those past `expires + grace`, and reloads. Returns when to come back.
    fn maintain(&self, sign_key: &PrivateKey, now: i64) -> Result<i64, nes_proto::v3::V3Error> {
        let gone = self.dir.delete_expired(now, self.grace)?;
        for id in &gone {
            info!(prekey = %nes_proto::v3::id_hex(id), "deleted an expired prekey's private parts");
        }
        // Made under another sign key (the identity was rekeyed): not ours any more, and a
        // certificate the old key signed would make receivers trust the old key.
        let public = sign_key.public_key();
        let current = self
            .dir
            .current_prekey(&self.user, now)
            .ok()
            .filter(|p| p.signed().verify(public).is_ok());
        let certificate = self
            .dir
            .current_certificate(&self.user, now)
            .ok()
            .filter(|c| c.signed().verify(public).is_ok());
        let due = match (&current, &certificate) {
            (Some(p), Some(c)) => {
                p.prekey().created.saturating_add(ms(self.rotation)) <= now
                    || c.certificate().created.saturating_add(ms(self.rotation)) <= now
            }
            _ => true,
        };
        let certificate = if due {
            let (p, c) = self.dir.create(&self.user, sign_key, self.rotation, now)?;
            info!(prekey = %nes_proto::v3::id_hex(&p.id()), expires = p.prekey().expires, "made a new prekey and certificate");
            c
        } else {
            match certificate {
                Some(c) => Arc::new(c),
                None => unreachable_certificate()?,
            }
        };
        let map = self.dir.prekey_map()?;
        let next_delete = map
            .values()
            .map(|p| p.prekey().expires.saturating_add(ms(self.grace)))
            .chain(
                self.dir
                    .list_certificates()?
                    .iter()
                    .map(|c| c.certificate().expires.saturating_add(ms(self.grace))),
            )
            .min()
            .unwrap_or(i64::MAX);
        let next_rotation = certificate
            .certificate()
            .created
            .saturating_add(ms(self.rotation));
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        *self.certificate.write().unwrap_or_else(|e| e.into_inner()) = Some(certificate);
        if let Some(newest) = self.newest() {
            let mut state = lock(&self.state);
            let id = nes_proto::v3::id_hex(&newest.id());
            if state.prekey_id != id {
                *state = PublishState {
                    prekey_id: id,
                    expires_ms: newest.prekey().expires,
                    published: false,
                    waiting_reason: "not tried yet".into(),
                    next_try_ms: now,
                };
            }
        }
        Ok(next_rotation.min(next_delete))
    }

    /// The periodic task: rotation, deletion and publication. Runs until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        identity: Arc<crate::identity::Identity>,
        keyserver: KeyServer,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = PUBLISH_BACKOFF_MIN;
        loop {
            let now = now_ms();
            let mut next = match self.maintain(&identity.sign_key, now) {
                Ok(at) => at,
                Err(e) => {
                    warn!(error = %e, "cannot rotate the prekeys; trying again in a minute");
                    now.saturating_add(60_000)
                }
            };
            let state = self.state();
            if !state.published && !state.prekey_id.is_empty() {
                match self.publish(&keyserver).await {
                    Ok(()) => {
                        backoff = PUBLISH_BACKOFF_MIN;
                        let mut s = lock(&self.state);
                        if s.prekey_id == state.prekey_id {
                            s.published = true;
                            s.waiting_reason.clear();
                            s.next_try_ms = 0;
                        }
                        info!(prekey = %state.prekey_id, "published the prekey");
                    }
                    Err(e) => {
                        let wait = match &e {
                            PublishError::RateLimited(Some(after)) => *after,
                            _ => backoff,
                        };
                        backoff = (backoff * 2).min(PUBLISH_BACKOFF_MAX);
                        let at = now_ms().saturating_add(ms(wait));
                        next = next.min(at);
                        let mut s = lock(&self.state);
                        s.waiting_reason = e.to_string();
                        s.next_try_ms = at;
                        info!(error = %e, retry_in_secs = wait.as_secs(), "the key server did not take the prekey yet");
                    }
                }
            }
            let wait = Duration::from_millis(
                u64::try_from(next.saturating_sub(now_ms()).max(0)).unwrap_or(0),
            )
            // A clock jump or a far deadline: look again at least hourly.
            .min(Duration::from_secs(3600));
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => { backoff = PUBLISH_BACKOFF_MIN; }
            }
        }
    }

    async fn publish(&self, keyserver: &KeyServer) -> Result<(), PublishError> {
        let Some(newest) = self.newest() else {
            return Ok(());
        };
        keyserver
            .put_prekey(&self.user, newest.signed().as_bytes())
            .await
    }
}

/// `maintain` made a certificate whenever none was current; this only keeps the types
/// honest without a panic.
fn unreachable_certificate() -> Result<Arc<CertificateSecret>, nes_proto::v3::V3Error> {
    Err(nes_proto::v3::V3Error::Missing(
        "no current certificate".into(),
    ))
}

impl Prekeys for OwnPrekeys {
    fn prekey(&self, id: &KeyId) -> Option<Arc<PrekeySecret>> {
        self.snapshot().get(id).cloned()
    }
}

/// Which frame version a contact gets, and why (for `nes contacts show`).
#[derive(Debug, Clone)]
pub enum PeerPrekey {
    /// v3 to this verified, valid prekey.
    Valid(Arc<SignedPrekey>),
    /// v2: the key server has none for the contact (`lost` when it had one before).
    None {
        /// It had a prekey before and has none now.
        lost: bool,
    },
    /// v2: fetching or verifying failed (the reason).
    Failed(String),
}

impl PeerPrekey {
    /// One line: the version and why.
    pub fn describe(&self) -> String {
        match self {
            PeerPrekey::Valid(p) => format!(
                "v3: prekey {} valid until {} (Unix ms)",
                nes_proto::v3::id_hex(&p.prekey().id),
                p.prekey().expires
            ),
            PeerPrekey::None { lost: false } => {
                "v2: the key server has no prekey for this contact (an older NES or key server)"
                    .into()
            }
            PeerPrekey::None { lost: true } => {
                "v2: the contact HAD v3 prekeys and the key server has none now (ask them why)"
                    .into()
            }
            PeerPrekey::Failed(why) => format!("v2: no usable prekey: {why}"),
        }
    }
}

struct Entry {
    value: PeerPrekey,
    fetched: Instant,
    /// The pinned sign key it was verified under.
    sign_key: PublicKey,
    /// It has ever had a valid prekey.
    had: bool,
}

/// Contacts' signed prekeys, verified and cached in memory.
#[derive(Clone)]
pub struct PeerPrekeys {
    keyserver: KeyServer,
    cache: Arc<Mutex<HashMap<Username, Entry>>>,
}

impl PeerPrekeys {
    /// An empty cache over `keyserver`.
    pub fn new(keyserver: KeyServer) -> PeerPrekeys {
        PeerPrekeys {
            keyserver,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// What is cached for `user` (no fetch), for display.
    pub fn cached(&self, user: &Username) -> Option<PeerPrekey> {
        lock(&self.cache).get(user).map(|e| e.value.clone())
    }

    /// Contacts that had a valid prekey and whose key server has none now, by name.
    pub fn lost(&self) -> Vec<String> {
        let mut lost: Vec<String> = lock(&self.cache)
            .iter()
            .filter(|(_, e)| matches!(e.value, PeerPrekey::None { lost: true }))
            .map(|(user, _)| user.to_string())
            .collect();
        lost.sort();
        lost
    }

    /// The valid prekey to seal to for `user` (pinned sign key `sign_key`), fetching when
    /// the cache has nothing fresh; the reason when v2 it is.
    pub async fn get(&self, user: &Username, sign_key: &PublicKey) -> PeerPrekey {
        self.get_or_fetch(user, sign_key, false).await
    }

    /// As `get`, but asks the key server even when the cache is fresh (`nes contacts show
    /// --refresh`): how a user learns at once that a contact's prekey is gone.
    pub async fn refresh(&self, user: &Username, sign_key: &PublicKey) -> PeerPrekey {
        self.get_or_fetch(user, sign_key, true).await
    }

    async fn get_or_fetch(&self, user: &Username, sign_key: &PublicKey, force: bool) -> PeerPrekey {
        let now = now_ms();
        let had = {
            let cache = lock(&self.cache);
            match cache.get(user) {
                Some(e) if !force && &e.sign_key == sign_key && fresh(e, now) => {
                    return e.value.clone()
                }
                Some(e) => e.had,
                None => false,
            }
        };
        // No lock held here: the HTTP request may take seconds.
        let value = match self.keyserver.fetch_prekey(user).await {
            Ok(Some(body)) => match check(&body, user, sign_key, now) {
                Ok(p) => PeerPrekey::Valid(Arc::new(p)),
                Err(why) => PeerPrekey::Failed(why.to_string()),
            },
            Ok(None) => PeerPrekey::None { lost: had },
            Err(FetchError::RateLimited(_)) => {
                PeerPrekey::Failed("the key server is rate limiting".into())
            }
            Err(e) => PeerPrekey::Failed(e.to_string()),
        };
        if let PeerPrekey::Failed(why) = &value {
            info!(%user, reason = %why, "no usable v3 prekey for the contact; sending v2");
        }
        if let PeerPrekey::None { lost: true } = value {
            warn!(%user, "the contact had v3 prekeys and the key server has none now; sending v2");
        }
        let mut cache = lock(&self.cache);
        let had = had || matches!(value, PeerPrekey::Valid(_));
        // A failed refresh keeps a prekey that is still valid.
        if let (PeerPrekey::Failed(_), Some(old)) = (&value, cache.get(user)) {
            if let PeerPrekey::Valid(p) = &old.value {
                if &old.sign_key == sign_key && p.prekey().check_valid(now).is_ok() {
                    return old.value.clone();
                }
            }
        }
        cache.insert(
            user.clone(),
            Entry {
                value: value.clone(),
                fetched: Instant::now(),
                sign_key: sign_key.clone(),
                had,
            },
        );
        value
    }
}

/// Whether a cache entry may be used without fetching.
fn fresh(e: &Entry, now: i64) -> bool {
    let age = e.fetched.elapsed();
    match &e.value {
        PeerPrekey::Valid(p) => {
            age < PEER_REFRESH
                && p.prekey().expires.saturating_sub(ms(PEER_NEAR_EXPIRY)) > now
                && p.prekey().check_valid(now).is_ok()
        }
        PeerPrekey::None { .. } => age < PEER_NONE_TTL,
        PeerPrekey::Failed(_) => age < PEER_FAILURE_TTL,
    }
}

/// Parses and verifies a fetched signed prekey of `user` with its pinned sign key.
fn check(
    body: &[u8],
    user: &Username,
    sign_key: &PublicKey,
    now: i64,
) -> Result<SignedPrekey, FetchedPrekeyError> {
    let p = SignedPrekey::parse(body.trim_ascii()).map_err(FetchedPrekeyError::Malformed)?;
    p.verify_for(user, sign_key)
        .map_err(FetchedPrekeyError::Unverified)?;
    p.prekey()
        .check_valid(now)
        .map_err(FetchedPrekeyError::NotValid)?;
    Ok(p)
}

/// Why a prekey fetched from the key server is not used (the contact is then sent v2,
/// and [`PeerPrekey::Failed`] keeps the message): one variant per check of [`check`],
/// so that its tests, and any caller that comes to need it, tell a forged prekey from
/// an expired one without reading the message. The message embeds the check's error
/// (it is no `source`, so a printer of error chains does not repeat it).
#[derive(Debug, thiserror::Error)]
enum FetchedPrekeyError {
    /// It does not parse as a signed prekey.
    #[error("the key server's prekey is malformed: {0}")]
    Malformed(nes_proto::v3::V3Error),
    /// It does not verify under the contact's pinned sign key, or names someone else.
    #[error("the key server's prekey does not verify under the pinned sign key: {0}")]
    Unverified(nes_proto::v3::V3Error),
    /// It is not valid now (expired, or not valid yet).
    #[error("the key server's prekey is not valid now: {0}")]
    NotValid(nes_proto::v3::V3Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use nes_proto::v3::PrekeySecret;

    fn key() -> PrivateKey {
        PrivateKey::generate(2048).expect("RSA key")
    }

    #[test]
    fn fetched_prekeys_are_checked_with_the_pinned_key() {
        let alice: Username = Username::parse("alice").expect("name");
        let mallory: Username = Username::parse("mallory").expect("name");
        let sign = key();
        let other = key();
        let now = now_ms();
        let p = PrekeySecret::generate(&alice, now - 1000, now + 3_600_000, &sign).expect("prekey");
        let body = p.signed().as_bytes().to_vec();
        assert!(check(&body, &alice, sign.public_key(), now).is_ok());
        let wrong_key = check(&body, &alice, other.public_key(), now).expect_err("wrong key");
        assert!(
            matches!(wrong_key, FetchedPrekeyError::Unverified(_))
                && wrong_key.to_string().contains("pinned"),
            "{wrong_key}"
        );
        assert!(matches!(
            check(&body, &mallory, sign.public_key(), now),
            Err(FetchedPrekeyError::Unverified(_))
        ));
        let expired =
            check(&body, &alice, sign.public_key(), now + 7_200_000).expect_err("expired");
        assert!(
            matches!(expired, FetchedPrekeyError::NotValid(_))
                && expired.to_string().contains("not valid"),
            "{expired}"
        );
        assert!(matches!(
            check(b"{}", &alice, sign.public_key(), now),
            Err(FetchedPrekeyError::Malformed(_))
        ));
    }

    #[test]
    fn own_prekeys_rotate_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alice = Username::parse("alice").expect("name");
        let sign = key();
        let own = OwnPrekeys::open(
            dir.path(),
            &alice,
            &sign,
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
        .expect("open");
        assert_eq!(own.snapshot().len(), 1);
        assert!(own.certificate().is_some());
        let first = own.state().prekey_id;
        let now = now_ms();
        // Not due: nothing new.
        own.maintain(&sign, now + 1_000).expect("maintain");
        assert_eq!(own.snapshot().len(), 1);
        // Due: a second one; the first is kept until expires + grace.
        own.maintain(&sign, now + 11_000).expect("maintain");
        assert_eq!(own.snapshot().len(), 2);
        assert_ne!(own.state().prekey_id, first);
        assert!(!own.state().published);
        // Past the first's expires (20 s) + grace (5 s): gone from memory and disk.
        own.maintain(&sign, now + 26_000).expect("maintain");
        let ids: Vec<String> = own.snapshot().keys().map(nes_proto::v3::id_hex).collect();
        assert!(!ids.contains(&first), "{ids:?}");
        let path = dir
            .path()
            .join("keys/prekeys")
            .join(format!("{first}.json"));
        assert!(!path.exists());
    }
}
