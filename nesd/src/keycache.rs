//! The key cache: contacts' public keys with the key server's signed answers, pinned on
//! first use.
//!
//! - Keys are fetched from the key server when a contact is first needed, and again
//!   when the cached answer is older than the TTL. If the key server cannot be reached,
//!   cached keys keep working, however old.
//! - TOFU: the first keys seen are pinned. When the key server later answers different
//!   keys, the contact goes to KEY_CHANGED with the new keys *pending*: messages signed by
//!   them are held, sending is refused, until the user accepts them ([`KeyCache::trust`]).
//!   With the `always` policy (bots), new keys replace the pinned ones at once.
//! - The decision itself is the pure function [`decide`], tested on its own.
//! - Keys fetched because a *frame* named a sender are only a candidate: they are pinned
//!   ([`KeyCache::pin_verified`]) once a frame verifies under them, so a forged frame
//!   creates no contact. Keys fetched for a send or a lookup the user asked for pin at once.
//! - Lookups for received frames never run on the receive pipeline's ordered path: the
//!   pipeline asks [`KeyCache::keys_for_frame`], which answers from memory and, when it
//!   knows nothing, queues a lookup for the background task [`KeyCache::run_lookups`]:
//!   newest names first, at most [`LOOKUP_CONCURRENCY`] at once, within a token-bucket
//!   budget per second, paused for a 429's `Retry-After`. Answers go into bounded,
//!   expiring maps: [`NEGATIVE_MAX`] names the key server does not know (for
//!   [`NEGATIVE_TTL`]), [`CANDIDATES_MAX`] candidates, recent failures. No lock is held
//!   across an HTTP call.
//!
//! Records live in the `contacts` tree of the store's database (prost-encoded
//! [`ContactRecord`]), written through the store ([`Store::save_contact`]) so that a
//! contact and the events its change logs are one atomic change; parsed keys are kept in memory so a message costs no PEM parsing.
//! A contact's record is parsed at its first use, not when the cache opens: parsing its
//! two PEM keys costs ~13 µs (11% of a start with 1,000 contacts, ~13 ms, in a profile of
//! it: docs/BENCHMARKS.md), and most contacts are not needed in the first moments of a run.

use crate::config::KeyPolicy;
use crate::keyserver::{FetchError, Fetched, KeySource};
use crate::model::{self, EventKind, KeyChanged, TrustState};
use crate::store::{Store, StoreError};
use crate::sync::lock;
use nes_proto::{now_ms, PublicKey, Username};
use prost::Message as _;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tracing::{debug, info, warn};

/// After a signature failure we ask the key server again, but not more often than this
/// per contact (forged frames must not turn into a flood of key server requests).
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed fetch, cached keys are used (or, with none, the failure repeated)
/// without asking again for this long, unless a refresh is asked for.
pub const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(10);
/// Background lookups in flight at once.
pub const LOOKUP_CONCURRENCY: usize = 8;
/// Names waiting for a background lookup; past this the oldest requests are dropped (the
/// pipeline asks again for senders whose frames are still parked).
pub const LOOKUP_QUEUE_MAX: usize = 4096;
/// Names the key server said it does not know, remembered this long...
pub const NEGATIVE_TTL: Duration = Duration::from_secs(600);
/// ...up to this many (oldest forgotten first).
pub const NEGATIVE_MAX: usize = 65_536;
/// Keys fetched for a frame and not yet pinned (no frame verified under them yet).
pub const CANDIDATES_MAX: usize = 1024;
/// How long such candidate keys are used before they are fetched again.
pub const CANDIDATE_TTL: Duration = Duration::from_secs(600);
/// Recent failures and forced refreshes remembered at most (each for its backoff).
const FAILURES_MAX: usize = 16_384;
/// The pause after a 429 without a usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A map of at most `cap` names whose entries expire after `ttl`, oldest forgotten first
/// (both bounds, so that made-up names cannot grow it).
struct Expiring<V> {
    map: HashMap<String, (Instant, V)>,
    order: VecDeque<(String, Instant)>,
    cap: usize,
    ttl: Duration,
}

impl<V: Clone> Expiring<V> {
    fn new(cap: usize, ttl: Duration) -> Self {
        Expiring {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
            ttl,
        }
    }

    fn get(&mut self, key: &str) -> Option<V> {
        self.prune();
        self.map
            .get(key)
            .filter(|(t, _)| t.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, key: &str, value: V) {
        let now = Instant::now();
        self.map.insert(key.to_owned(), (now, value));
        self.order.push_back((key.to_owned(), now));
        self.prune();
    }

    fn remove(&mut self, key: &str) {
        self.map.remove(key);
    }

    fn prune(&mut self) {
        // `order` may hold stale entries of names inserted again or removed; they are
        // dropped as they come to the front, and bounded by the last condition.
        while let Some((key, at)) = self.order.front() {
            let expired = at.elapsed() >= self.ttl;
            if !(expired || self.map.len() > self.cap || self.order.len() > 2 * self.cap + 16) {
                break;
            }
            if self.map.get(key).is_some_and(|(t, _)| t == at) {
                self.map.remove(key);
            }
            self.order.pop_front();
        }
    }
}

/// What the receive pipeline can do with a frame from `user` now (answered from memory,
/// never waiting for the key server).
#[derive(Debug, Clone)]
pub enum FrameKeys {
    /// A contact: verify under its keys.
    Known(Arc<Contact>),
    /// The key server's keys for a sender not pinned yet: verify under them, then
    /// [`KeyCache::pin_verified`].
    Candidate(Box<KeySet>),
    /// The key server does not know the sender.
    NotFound,
    /// The key server's answer was refused.
    BadAnswer(String),
    /// Not known yet: a lookup is queued or the key server cannot be reached now.
    Waiting,
}

/// Background lookups queued, newest first.
#[derive(Default)]
struct LookupQueue {
    queue: VecDeque<Username>,
    /// Queued or in flight.
    queued: HashSet<String>,
}

/// The lookup budget: a token bucket.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Bucket {
            tokens: rate * 5.0,
            rate,
            burst: rate * 5.0,
            last: Instant::now(),
        }
    }

    /// How long until a token is there (zero: take it now).
    fn wait(&mut self) -> Duration {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// A contact's two public keys and the signed answer they came in.
#[derive(Debug, Clone)]
pub struct KeySet {
    /// Wraps message keys to the contact.
    pub message: PublicKey,
    /// Verifies the contact's signatures.
    pub sign: PublicKey,
    /// `public_key_message` as the key server sent it.
    pub message_pem: String,
    /// `public_key_sign` as the key server sent it.
    pub sign_pem: String,
    /// The key server's signed answer (evidence of where the keys came from).
    pub answer: Vec<u8>,
}

impl KeySet {
    /// From a verified answer.
    pub fn from_fetched(f: Fetched) -> Self {
        KeySet {
            message: f.message_key,
            sign: f.sign_key,
            message_pem: f.answer.public_key_message,
            sign_pem: f.answer.public_key_sign,
            answer: f.body,
        }
    }

    /// Whether both keys are the same as `other`'s.
    pub fn same_keys(&self, other: &KeySet) -> bool {
        self.message == other.message && self.sign == other.sign
    }

    fn record(&self) -> KeySetRecord {
        KeySetRecord {
            message_pem: self.message_pem.clone(),
            sign_pem: self.sign_pem.clone(),
            answer: self.answer.clone(),
        }
    }

    fn from_record(r: &KeySetRecord) -> Result<Self, nes_proto::KeyError> {
        Ok(KeySet {
            message: PublicKey::from_pem(&r.message_pem)?,
            sign: PublicKey::from_pem(&r.sign_pem)?,
            message_pem: r.message_pem.clone(),
            sign_pem: r.sign_pem.clone(),
            answer: r.answer.clone(),
        })
    }
}

/// A contact as the daemon knows it.
#[derive(Debug, Clone)]
pub struct Contact {
    /// The username.
    pub username: Username,
    /// The keys in use: pinned on first use or accepted with trust.
    pub pinned: KeySet,
    /// Different keys the key server answers now, not accepted yet.
    pub pending: Option<KeySet>,
    /// When the keys were last fetched and verified (Unix ms).
    pub fetched_at_ms: i64,
    /// Send v1 frames to this contact.
    pub legacy: bool,
}

impl Contact {
    /// Whether the key server answers keys that are not accepted yet.
    pub fn key_changed(&self) -> bool {
        self.pending.is_some()
    }

    /// As shown (public keys only).
    pub fn shown(&self) -> model::Contact {
        let (pm, ps) = match &self.pending {
            Some(p) => (p.message.fingerprint(), p.sign.fingerprint()),
            None => (String::new(), String::new()),
        };
        model::Contact {
            username: self.username.to_string(),
            trust: if self.pending.is_some() {
                TrustState::KeyChanged
            } else {
                TrustState::Pinned
            },
            message_key_fingerprint: self.pinned.message.fingerprint(),
            sign_key_fingerprint: self.pinned.sign.fingerprint(),
            pending_message_key_fingerprint: pm,
            pending_sign_key_fingerprint: ps,
            legacy: self.legacy,
            fetched_at_ms: self.fetched_at_ms,
            message_key_pem: self.pinned.message.to_pem(),
            sign_key_pem: self.pinned.sign.to_pem(),
            // The version a contact gets depends on its prekey, which the service knows
            // (crate::prekeys); it fills these in.
            frame_version: 0,
            frame_version_reason: String::new(),
            prekey_lost: false,
            // The store keeps presence; the service fills it in.
            presence: None,
        }
    }

    fn record(&self) -> ContactRecord {
        ContactRecord {
            username: self.username.to_string(),
            pinned: Some(self.pinned.record()),
            pending: self.pending.as_ref().map(KeySet::record),
            fetched_at_ms: self.fetched_at_ms,
            legacy: self.legacy,
        }
    }
}

/// A contact as stored in the `contacts` tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContactRecord {
    /// The username.
    #[prost(string, tag = "1")]
    pub username: String,
    /// The pinned keys.
    #[prost(message, optional, tag = "2")]
    pub pinned: Option<KeySetRecord>,
    /// Keys answered since, not accepted yet.
    #[prost(message, optional, tag = "3")]
    pub pending: Option<KeySetRecord>,
    /// Last successful fetch, Unix ms.
    #[prost(int64, tag = "4")]
    pub fetched_at_ms: i64,
    /// Send v1 frames.
    #[prost(bool, tag = "5")]
    pub legacy: bool,
}

/// Keys as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeySetRecord {
    /// PEM.
    #[prost(string, tag = "1")]
    pub message_pem: String,
    /// PEM.
    #[prost(string, tag = "2")]
    pub sign_pem: String,
    /// The signed answer body.
    #[prost(bytes = "vec", tag = "3")]
    pub answer: Vec<u8>,
}

/// What to do with a fresh answer, given what is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pinned yet: pin these (trust on first use).
    Pin,
    /// Same keys as pinned: refresh the timestamp (and drop a pending change that the key
    /// server went back on).
    Confirm,
    /// Different keys and policy `always`: replace the pinned ones.
    Replace,
    /// Different keys and policy `tofu`: keep them pending. `new` is false when the same
    /// change was already pending (no new event).
    Hold {
        /// A change not seen before.
        new: bool,
    },
}

/// The TOFU rule.
pub fn decide(
    pinned: Option<&KeySet>,
    pending: Option<&KeySet>,
    fetched: &KeySet,
    policy: KeyPolicy,
) -> Decision {
    match pinned {
        None => Decision::Pin,
        Some(p) if p.same_keys(fetched) => Decision::Confirm,
        Some(_) => match policy {
            KeyPolicy::Always => Decision::Replace,
            KeyPolicy::Tofu => Decision::Hold {
                new: !pending.is_some_and(|q| q.same_keys(fetched)),
            },
        },
    }
}

/// Why a contact's keys are not available.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The key server does not know the user and nothing is cached.
    #[error("{0} is not registered at the key server")]
    NotFound(String),
    /// The key server cannot be reached and nothing is cached.
    #[error("no keys for {user}: {reason}")]
    Unavailable {
        /// The user.
        user: String,
        /// Why.
        reason: String,
    },
    /// The key server's answer was refused (bad signature, wrong user, weak keys) and
    /// nothing is cached.
    #[error("no keys for {user}: {reason}")]
    BadAnswer {
        /// The user.
        user: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for LookupError {
    fn from(e: StoreError) -> Self {
        LookupError::Store(e.to_string())
    }
}

/// Why trusting failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Unknown contact.
    #[error("no keys are known for {0}; look it up first")]
    Unknown(String),
    /// The pending keys are not the ones the user checked.
    #[error("the keys of {0} are not the ones given (they may have changed again); look again before trusting")]
    Mismatch(String),
    /// The store failed.
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for TrustError {
    fn from(e: StoreError) -> Self {
        TrustError::Store(e.to_string())
    }
}

/// A contact in memory: parsed at its first use.
enum Cached {
    /// The stored record, its keys not parsed yet.
    Stored(ContactRecord),
    /// Parsed.
    Parsed(Arc<Contact>),
}

/// The contact `name` from `mem`, parsing its record if this is its first use; a record
/// that does not parse is dropped from memory (and stays in the store, as before).
fn take_parsed(mem: &mut HashMap<String, Cached>, name: &str) -> Option<Arc<Contact>> {
    let entry = mem.get_mut(name)?;
    let contact = match entry {
        Cached::Parsed(c) => return Some(c.clone()),
        Cached::Stored(record) => contact_from_record(record).map(Arc::new),
    };
    match contact {
        Some(c) => {
            *entry = Cached::Parsed(c.clone());
            Some(c)
        }
        None => {
            warn!(user = %name, "dropping a damaged key cache entry");
            mem.remove(name);
            None
        }
    }
}

/// The key cache; clones share it.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn KeySource>,
    store: Store,
    policy: KeyPolicy,
    ttl: Duration,
    me: Arc<Contact>,
    mem: Mutex<HashMap<String, Cached>>,
    /// Serialises changes of contacts (never held across a key server request).
    write_lock: tokio::sync::Mutex<()>,
    /// Recent failed fetches (for [`FAILED_FETCH_BACKOFF`]), and how they failed.
    failed: Mutex<Expiring<FetchError>>,
    /// Recent refreshes forced by a signature failure (for [`FORCED_REFRESH_INTERVAL`]).
    forced: Mutex<Expiring<()>>,
    /// Names the key server does not know.
    negative: Mutex<Expiring<()>>,
    /// Keys fetched for frames, not pinned until a frame verifies under them.
    candidates: Mutex<Expiring<KeySet>>,
    /// Background lookups to do.
    lookups: Mutex<LookupQueue>,
    /// Wakes the lookup task.
    wake: Notify,
    /// No background lookup before this (a 429's `Retry-After`).
    paused_until: Mutex<Option<Instant>>,
}

impl KeyCache {
    /// Opens the cache in `store`'s database. `me` is this identity with its own public
    /// keys: it is never fetched (a message to or from oneself uses the local keys).
    pub fn open(
        store: Store,
        source: Arc<dyn KeySource>,
        me: &Username,
        my_message_key: PublicKey,
        my_sign_key: PublicKey,
        policy: KeyPolicy,
        ttl: Duration,
    ) -> Result<KeyCache, StoreError> {
        // Decoded now (a record that does not decode fails the open, as any damaged
        // record of the store does); the keys are parsed at first use (module docs).
        let mut mem = HashMap::new();
        for (name, v) in store.contact_records()? {
            let record = ContactRecord::decode(&v[..])?;
            // The tree's key: the name as `save` wrote it, the one lookups ask for.
            mem.insert(name, Cached::Stored(record));
        }
        let own = KeySet {
            message_pem: my_message_key.to_pem(),
            sign_pem: my_sign_key.to_pem(),
            message: my_message_key,
            sign: my_sign_key,
            answer: Vec::new(),
        };
        let me = Arc::new(Contact {
            username: me.clone(),
            pinned: own,
            pending: None,
            fetched_at_ms: now_ms(),
            legacy: false,
        });
        Ok(KeyCache {
            inner: Arc::new(Inner {
                source,
                store,
                policy,
                ttl,
                me,
                mem: Mutex::new(mem),
                write_lock: tokio::sync::Mutex::new(()),
                failed: Mutex::new(Expiring::new(FAILURES_MAX, FAILED_FETCH_BACKOFF)),
                forced: Mutex::new(Expiring::new(FAILURES_MAX, FORCED_REFRESH_INTERVAL)),
                negative: Mutex::new(Expiring::new(NEGATIVE_MAX, NEGATIVE_TTL)),
                candidates: Mutex::new(Expiring::new(CANDIDATES_MAX, CANDIDATE_TTL)),
                lookups: Mutex::new(LookupQueue::default()),
                wake: Notify::new(),
                paused_until: Mutex::new(None),
            }),
        })
    }

    /// The cached contact, without asking the key server.
    pub fn cached(&self, user: &Username) -> Option<Arc<Contact>> {
        if user == &self.inner.me.username {
            return Some(self.inner.me.clone());
        }
        take_parsed(&mut lock(&self.inner.mem), user.as_str())
    }

    /// Every cached contact, by name.
    pub fn list(&self) -> Vec<Arc<Contact>> {
        let mut all: Vec<_> = {
            let mut mem = lock(&self.inner.mem);
            let names: Vec<String> = mem.keys().cloned().collect();
            names
                .iter()
                .filter_map(|name| take_parsed(&mut mem, name))
                .collect()
        };
        all.sort_by(|a, b| a.username.cmp(&b.username));
        all
    }

    fn fresh(&self, c: &Contact) -> bool {
        let age = now_ms().saturating_sub(c.fetched_at_ms);
        age >= 0 && (age as u128) < self.inner.ttl.as_millis()
    }

    /// How the last fetch of `user` failed, if that was less than
    /// [`FAILED_FETCH_BACKOFF`] ago.
    fn recent_failure(&self, user: &Username) -> Option<FetchError> {
        lock(&self.inner.failed).get(user.as_str())
    }

    /// The contact's keys: from the cache while fresh, else from the key server (falling
    /// back to the cache when it cannot be reached). `refresh` asks the key server even
    /// when the cache is fresh.
    pub async fn get(&self, user: &Username, refresh: bool) -> Result<Arc<Contact>, LookupError> {
        self.lookup(user, refresh).await.map(|(c, _)| c)
    }

    /// [`KeyCache::get`], also telling whether the key server answered just now.
    async fn lookup(
        &self,
        user: &Username,
        refresh: bool,
    ) -> Result<(Arc<Contact>, bool), LookupError> {
        if user == &self.inner.me.username {
            return Ok((self.inner.me.clone(), false));
        }
        if !refresh {
            let failure = self.recent_failure(user);
            match (self.cached(user), failure) {
                (Some(c), failure) if self.fresh(&c) || failure.is_some() => return Ok((c, false)),
                // Do not ask again at once about a name that just failed (a flood of
                // frames from made-up senders must not become a flood of lookups).
                (None, Some(e)) => return Err(lookup_failure(user, e)),
                _ => {}
            }
        }
        // No lock across the request: two lookups of the same name at once both ask, and
        // `apply` (serialised) takes both answers in turn.
        match self.inner.source.fetch(user).await {
            Ok(fetched) => {
                self.forget_failures(user);
                Ok((self.apply(user, KeySet::from_fetched(fetched)).await?, true))
            }
            Err(e) => {
                self.remember_failure(user, &e);
                match self.cached(user) {
                    Some(c) => {
                        info!(%user, error = %e, "using cached keys");
                        Ok((c, false))
                    }
                    None => Err(lookup_failure(user, e)),
                }
            }
        }
    }

    /// After a signature did not verify under the cached keys: asks the key server again
    /// (the peer may have changed keys legitimately), at most once per
    /// [`FORCED_REFRESH_INTERVAL`]. `None` when no new answer was obtained.
    pub async fn refresh_after_bad_signature(&self, user: &Username) -> Option<Arc<Contact>> {
        if user == &self.inner.me.username {
            return None;
        }
        {
            let mut forced = lock(&self.inner.forced);
            if forced.get(user.as_str()).is_some() {
                return None;
            }
            forced.insert(user.as_str(), ());
        }
        match self.lookup(user, true).await {
            Ok((contact, true)) => Some(contact),
            _ => None,
        }
    }

    fn forget_failures(&self, user: &Username) {
        lock(&self.inner.failed).remove(user.as_str());
        lock(&self.inner.negative).remove(user.as_str());
        lock(&self.inner.candidates).remove(user.as_str());
    }

    fn remember_failure(&self, user: &Username, e: &FetchError) {
        lock(&self.inner.failed).insert(user.as_str(), e.clone());
        if matches!(e, FetchError::NotFound(_)) {
            lock(&self.inner.negative).insert(user.as_str(), ());
        }
    }

    /// For a frame whose inner `from` is `user`: what is known now, from memory only. When
    /// nothing is known (or a contact's keys are past the TTL) a background lookup is
    /// queued: first in line when `urgent`, else last.
    pub fn keys_for_frame(&self, user: &Username, urgent: bool) -> FrameKeys {
        if let Some(c) = self.cached(user) {
            if !self.fresh(&c) && self.recent_failure(user).is_none() {
                // Expired: keep using the pinned keys, refresh in the background.
                self.request_lookup(user, false);
            }
            return FrameKeys::Known(c);
        }
        if lock(&self.inner.negative).get(user.as_str()).is_some() {
            return FrameKeys::NotFound;
        }
        if let Some(keys) = lock(&self.inner.candidates).get(user.as_str()) {
            return FrameKeys::Candidate(Box::new(keys));
        }
        match self.recent_failure(user) {
            Some(FetchError::NotFound(_)) => FrameKeys::NotFound,
            Some(FetchError::BadAnswer(reason)) => FrameKeys::BadAnswer(reason),
            // Unavailable or rate limited: wait for the backoff before asking again.
            Some(_) => FrameKeys::Waiting,
            None => {
                self.request_lookup(user, urgent);
                FrameKeys::Waiting
            }
        }
    }

    /// Queues a background lookup of `user` (once; newest first when `urgent`).
    pub fn request_lookup(&self, user: &Username, urgent: bool) {
        {
            let mut q = lock(&self.inner.lookups);
            if !q.queued.insert(user.to_string()) {
                return;
            }
            if urgent {
                q.queue.push_front(user.clone());
            } else {
                q.queue.push_back(user.clone());
            }
            while q.queue.len() > LOOKUP_QUEUE_MAX {
                if let Some(old) = q.queue.pop_back() {
                    q.queued.remove(old.as_str());
                }
            }
        }
        self.inner.wake.notify_one();
    }

    /// Names waiting for a background lookup.
    pub fn lookups_queued(&self) -> usize {
        lock(&self.inner.lookups).queue.len()
    }

    /// After a frame verified under candidate keys from [`KeyCache::keys_for_frame`]: pins
    /// them (or, if a contact appeared meanwhile, applies them under the TOFU rule).
    pub async fn pin_verified(
        &self,
        user: &Username,
        keys: KeySet,
    ) -> Result<Arc<Contact>, LookupError> {
        lock(&self.inner.candidates).remove(user.as_str());
        self.apply(user, keys).await
    }

    /// The background lookups: runs until `shutdown`. Each finished lookup (answered or
    /// failed, not rate limited) sends its name on `resolved`, so that the pipeline can
    /// try the frames parked for it.
    pub async fn run_lookups(
        self,
        per_second: u32,
        resolved: mpsc::UnboundedSender<Username>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(LOOKUP_CONCURRENCY));
        let mut bucket = Bucket::new(per_second);
        loop {
            // Something to do.
            while lock(&self.inner.lookups).queue.is_empty() {
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => return,
                    _ = self.inner.wake.notified() => {}
                }
            }
            // A 429 pauses every background lookup (sends and frames from contacts go on).
            let pause = *lock(&self.inner.paused_until);
            if let Some(until) = pause {
                if until > Instant::now() {
                    tokio::select! {
                        _ = crate::stopped(&mut shutdown) => return,
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                    continue;
                }
            }
            let wait = bucket.wait();
            if !wait.is_zero() {
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // Take the token when it is there, next round (the queue may have changed).
                continue;
            }
            let permit = tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            // Taken last, so that the newest request waiting goes first.
            let Some(user) = lock(&self.inner.lookups).queue.pop_front() else {
                continue;
            };
            let cache = self.clone();
            let resolved = resolved.clone();
            tokio::spawn(async move {
                let done = cache.background_lookup(&user).await;
                drop(permit);
                if done {
                    lock(&cache.inner.lookups).queued.remove(user.as_str());
                    let _ = resolved.send(user);
                }
            });
        }
    }

    /// One background lookup; false when it must be tried again (rate limited; the name
    /// is queued again, first in line).
    async fn background_lookup(&self, user: &Username) -> bool {
        match self.inner.source.fetch(user).await {
            Ok(fetched) => {
                self.forget_failures(user);
                let keys = KeySet::from_fetched(fetched);
                if self.cached(user).is_some() {
                    // A refresh of a contact: the TOFU rule as for any fresh answer.
                    if let Err(e) = self.apply(user, keys).await {
                        warn!(%user, error = %e, "cannot save refreshed keys");
                    }
                } else {
                    lock(&self.inner.candidates).insert(user.as_str(), keys);
                }
                true
            }
            Err(FetchError::RateLimited(after)) => {
                let after = after.unwrap_or(DEFAULT_RETRY_AFTER);
                warn!(%user, retry_after_secs = after.as_secs(), "the key server rate limits lookups; pausing them");
                *lock(&self.inner.paused_until) = Some(Instant::now() + after);
                lock(&self.inner.lookups).queue.push_front(user.clone());
                self.inner.wake.notify_one();
                false
            }
            Err(e) => {
                debug!(%user, error = %e, "background lookup failed");
                self.remember_failure(user, &e);
                true
            }
        }
    }

    /// Applies a fresh verified answer under the TOFU rule.
    async fn apply(&self, user: &Username, new: KeySet) -> Result<Arc<Contact>, LookupError> {
        let _guard = self.inner.write_lock.lock().await;
        let existing = self.cached(user);
        let now = now_ms();
        let decision = decide(
            existing.as_ref().map(|c| &c.pinned),
            existing.as_ref().and_then(|c| c.pending.as_ref()),
            &new,
            self.inner.policy,
        );
        let legacy = existing.as_ref().is_some_and(|c| c.legacy);
        let mut events = Vec::new();
        let contact = match (decision, existing) {
            (Decision::Pin, _) | (_, None) => {
                info!(%user, sign = %new.sign.fingerprint(), "pinned keys on first use");
                Contact {
                    username: user.clone(),
                    pinned: new,
                    pending: None,
                    fetched_at_ms: now,
                    legacy,
                }
            }
            (Decision::Confirm, Some(old)) => {
                let was_changed = old.pending.is_some();
                let c = Contact {
                    username: user.clone(),
                    pinned: new,
                    pending: None,
                    fetched_at_ms: now,
                    legacy,
                };
                if was_changed {
                    info!(%user, "the key server answers the pinned keys again; pending change dropped");
                    events.push(EventKind::Contact(c.shown()));
                }
                c
            }
            (Decision::Replace, Some(old)) => {
                warn!(%user, old = %old.pinned.sign.fingerprint(), new = %new.sign.fingerprint(), "keys changed; accepted (policy always)");
                events.push(EventKind::KeyChanged(key_changed(user, &old.pinned, &new)));
                let c = Contact {
                    username: user.clone(),
                    pinned: new,
                    pending: None,
                    fetched_at_ms: now,
                    legacy,
                };
                events.push(EventKind::Contact(c.shown()));
                c
            }
            (Decision::Hold { new: first_time }, Some(old)) => {
                if first_time {
                    warn!(%user, old = %old.pinned.sign.fingerprint(), new = %new.sign.fingerprint(),
                        "keys changed at the key server; holding messages until they are trusted");
                    events.push(EventKind::KeyChanged(key_changed(user, &old.pinned, &new)));
                }
                Contact {
                    username: user.clone(),
                    pinned: old.pinned.clone(),
                    pending: Some(new),
                    fetched_at_ms: now,
                    legacy,
                }
            }
        };
        self.save(contact, events).await.map_err(LookupError::from)
    }

    /// Accepts the pending keys of `user`. When fingerprints are given they must match the
    /// pending keys (or, with no change pending, the pinned ones).
    pub async fn trust(
        &self,
        user: &Username,
        message_fp: &str,
        sign_fp: &str,
    ) -> Result<Arc<Contact>, TrustError> {
        let _guard = self.inner.write_lock.lock().await;
        let contact = self
            .cached(user)
            .ok_or_else(|| TrustError::Unknown(user.to_string()))?;
        let target = contact.pending.as_ref().unwrap_or(&contact.pinned);
        if (!message_fp.is_empty()
            && !message_fp.eq_ignore_ascii_case(&target.message.fingerprint()))
            || (!sign_fp.is_empty() && !sign_fp.eq_ignore_ascii_case(&target.sign.fingerprint()))
        {
            return Err(TrustError::Mismatch(user.to_string()));
        }
        let Some(pending) = contact.pending.clone() else {
            return Ok(contact);
        };
        info!(%user, sign = %pending.sign.fingerprint(), "new keys trusted");
        let c = Contact {
            pinned: pending,
            pending: None,
            ..(*contact).clone()
        };
        let event = EventKind::Contact(c.shown());
        Ok(self.save(c, vec![event]).await?)
    }

    /// Marks `user` as using the original client (v1 frames) or not.
    pub async fn set_legacy(
        &self,
        user: &Username,
        legacy: bool,
    ) -> Result<Arc<Contact>, LookupError> {
        let contact = self.get(user, false).await?;
        if user == &self.inner.me.username || contact.legacy == legacy {
            return Ok(contact);
        }
        let _guard = self.inner.write_lock.lock().await;
        let current = self.cached(user).unwrap_or(contact);
        let c = Contact {
            legacy,
            ..(*current).clone()
        };
        let event = EventKind::Contact(c.shown());
        Ok(self.save(c, vec![event]).await?)
    }

    async fn save(
        &self,
        contact: Contact,
        events: Vec<EventKind>,
    ) -> Result<Arc<Contact>, StoreError> {
        // The record and its events in one atomic change (the store's).
        let logs = !events.is_empty();
        self.inner.store.save_contact(
            contact.username.as_str(),
            contact.record().encode_to_vec(),
            events,
        )?;
        let contact = Arc::new(contact);
        lock(&self.inner.mem).insert(
            contact.username.to_string(),
            Cached::Parsed(contact.clone()),
        );
        if logs {
            self.inner.store.commit().await?;
        }
        Ok(contact)
    }
}

fn lookup_failure(user: &Username, e: FetchError) -> LookupError {
    match e {
        FetchError::NotFound(_) => LookupError::NotFound(user.to_string()),
        FetchError::BadAnswer(reason) => LookupError::BadAnswer {
            user: user.to_string(),
            reason,
        },
        e => LookupError::Unavailable {
            user: user.to_string(),
            reason: e.to_string(),
        },
    }
}

fn key_changed(user: &Username, old: &KeySet, new: &KeySet) -> KeyChanged {
    KeyChanged {
        username: user.to_string(),
        old_message_key: old.message.fingerprint(),
        old_sign_key: old.sign.fingerprint(),
        new_message_key: new.message.fingerprint(),
        new_sign_key: new.sign.fingerprint(),
    }
}

fn contact_from_record(r: &ContactRecord) -> Option<Contact> {
    Some(Contact {
        username: Username::parse(&r.username).ok()?,
        pinned: KeySet::from_record(r.pinned.as_ref()?).ok()?,
        pending: match &r.pending {
            Some(p) => Some(KeySet::from_record(p).ok()?),
            None => None,
        },
        fetched_at_ms: r.fetched_at_ms,
        legacy: r.legacy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use nes_proto::{KeyAnswer, PrivateKey};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// Two RSA keys per "generation" of a user, made once for all tests (keygen is slow).
    fn keys(n: usize) -> &'static (PublicKey, PublicKey) {
        static KEYS: OnceLock<Vec<(PublicKey, PublicKey)>> = OnceLock::new();
        &KEYS.get_or_init(|| {
            (0..3)
                .map(|_| {
                    (
                        PrivateKey::generate(2048).unwrap().public_key().clone(),
                        PrivateKey::generate(2048).unwrap().public_key().clone(),
                    )
                })
                .collect()
        })[n]
    }

    fn fetched(n: usize) -> Fetched {
        let (m, s) = keys(n).clone();
        Fetched {
            answer: KeyAnswer {
                username: None,
                public_key_message: m.to_pem(),
                public_key_sign: s.to_pem(),
            },
            message_key: m,
            sign_key: s,
            body: format!("answer {n}").into_bytes(),
        }
    }

    /// A key server whose answer the test sets.
    struct Fake {
        answer: Mutex<Result<usize, FetchError>>,
        calls: AtomicUsize,
    }

    impl KeySource for Fake {
        fn fetch<'a>(&'a self, _user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = lock(&self.answer).clone();
            Box::pin(async move { answer.map(fetched) })
        }
    }

    fn setup(policy: KeyPolicy, ttl: Duration) -> (tempfile::TempDir, Store, Arc<Fake>, KeyCache) {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::open_in_test(tmp.path());
        let fake = Arc::new(Fake {
            answer: Mutex::new(Ok(0)),
            calls: AtomicUsize::new(0),
        });
        let (m, s) = keys(2).clone();
        let me = Username::parse("me_").unwrap();
        let cache = KeyCache::open(store.clone(), fake.clone(), &me, m, s, policy, ttl).unwrap();
        (tmp, store, fake, cache)
    }

    fn set(fake: &Fake, answer: Result<usize, FetchError>) {
        *lock(&fake.answer) = answer;
    }

    #[test]
    fn the_tofu_rule() {
        let a = KeySet::from_fetched(fetched(0));
        let b = KeySet::from_fetched(fetched(1));
        assert_eq!(decide(None, None, &a, KeyPolicy::Tofu), Decision::Pin);
        assert_eq!(
            decide(Some(&a), None, &a, KeyPolicy::Tofu),
            Decision::Confirm
        );
        assert_eq!(
            decide(Some(&a), Some(&b), &a, KeyPolicy::Tofu),
            Decision::Confirm
        );
        assert_eq!(
            decide(Some(&a), None, &b, KeyPolicy::Tofu),
            Decision::Hold { new: true }
        );
        assert_eq!(
            decide(Some(&a), Some(&b), &b, KeyPolicy::Tofu),
            Decision::Hold { new: false }
        );
        assert_eq!(
            decide(Some(&a), None, &b, KeyPolicy::Always),
            Decision::Replace
        );
    }

    #[tokio::test]
    async fn pins_then_holds_a_change_until_trusted() {
        let (_tmp, store, fake, cache) = setup(KeyPolicy::Tofu, Duration::from_secs(3600));
        let bob = Username::parse("bob").unwrap();
        let c = cache.get(&bob, false).await.unwrap();
        assert!(!c.key_changed());
        assert_eq!(c.pinned.sign, keys(0).1);
        // Fresh: no second request.
        cache.get(&bob, false).await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);

        set(&fake, Ok(1));
        let c = cache.get(&bob, true).await.unwrap();
        assert!(c.key_changed());
        assert_eq!(c.pinned.sign, keys(0).1, "pinned keys stay until trusted");
        assert_eq!(c.pending.as_ref().unwrap().sign, keys(1).1);
        assert_eq!(c.shown().trust, TrustState::KeyChanged);
        let events = store.events_after(0, 10).unwrap();
        assert!(matches!(
            events.last().unwrap().kind,
            EventKind::KeyChanged(_)
        ));
        // The same change again is not a new event.
        cache.get(&bob, true).await.unwrap();
        assert_eq!(store.events_after(0, 10).unwrap().len(), events.len());

        let err = cache.trust(&bob, "00", "").await.unwrap_err();
        assert!(matches!(err, TrustError::Mismatch(_)));
        let fp = keys(1).1.fingerprint();
        let c = cache.trust(&bob, "", &fp).await.unwrap();
        assert!(!c.key_changed());
        assert_eq!(c.pinned.sign, keys(1).1);
        assert_eq!(cache.get(&bob, true).await.unwrap().pinned.sign, keys(1).1);
    }

    #[tokio::test]
    async fn policy_always_replaces_at_once() {
        let (_tmp, _store, fake, cache) = setup(KeyPolicy::Always, Duration::from_secs(3600));
        let bob = Username::parse("bob").unwrap();
        cache.get(&bob, false).await.unwrap();
        set(&fake, Ok(1));
        let c = cache.get(&bob, true).await.unwrap();
        assert!(!c.key_changed());
        assert_eq!(c.pinned.sign, keys(1).1);
    }

    #[tokio::test]
    async fn cached_keys_outlive_the_ttl_when_the_key_server_is_down() {
        let (_tmp, _store, fake, cache) = setup(KeyPolicy::Tofu, Duration::from_millis(1));
        let bob = Username::parse("bob").unwrap();
        let carol = Username::parse("carol").unwrap();
        cache.get(&bob, false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        set(&fake, Err(FetchError::Unavailable("down".into())));
        let c = cache.get(&bob, false).await.unwrap();
        assert_eq!(c.pinned.sign, keys(0).1);
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            2,
            "an expired entry is fetched again"
        );
        assert!(matches!(
            cache.get(&carol, false).await,
            Err(LookupError::Unavailable { .. })
        ));
        set(&fake, Err(FetchError::NotFound("carol".into())));
        assert!(matches!(
            cache.get(&carol, true).await,
            Err(LookupError::NotFound(_))
        ));
        // Own keys never go to the key server.
        let me = Username::parse("me_").unwrap();
        assert_eq!(cache.get(&me, true).await.unwrap().pinned.sign, keys(2).1);
    }

    #[tokio::test]
    async fn forced_refreshes_are_rate_limited_and_state_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = Username::parse("bob").unwrap();
        {
            let store = crate::store::open_in_test(tmp.path());
            let fake = Arc::new(Fake {
                answer: Mutex::new(Ok(0)),
                calls: AtomicUsize::new(0),
            });
            let (m, s) = keys(2).clone();
            let me = Username::parse("me_").unwrap();
            let cache = KeyCache::open(
                store.clone(),
                fake.clone(),
                &me,
                m,
                s,
                KeyPolicy::Tofu,
                Duration::from_secs(3600),
            )
            .unwrap();
            cache.get(&bob, false).await.unwrap();
            set(&fake, Ok(1));
            let c = cache.refresh_after_bad_signature(&bob).await.unwrap();
            assert!(c.key_changed());
            assert!(cache.refresh_after_bad_signature(&bob).await.is_none());
            assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
            cache.set_legacy(&bob, true).await.unwrap();
            store.flush().unwrap();
        }
        let store = crate::store::open_in_test(tmp.path());
        let fake = Arc::new(Fake {
            answer: Mutex::new(Err(FetchError::Unavailable("down".into()))),
            calls: AtomicUsize::new(0),
        });
        let (m, s) = keys(2).clone();
        let me = Username::parse("me_").unwrap();
        let cache = KeyCache::open(
            store,
            fake,
            &me,
            m,
            s,
            KeyPolicy::Tofu,
            Duration::from_secs(3600),
        )
        .unwrap();
        let c = cache.cached(&bob).unwrap();
        assert!(c.key_changed());
        assert!(c.legacy);
        assert_eq!(cache.list().len(), 1);
    }

    #[tokio::test]
    async fn frame_lookups_run_in_the_background_and_pin_only_after_verifying() {
        let (_tmp, _store, fake, cache) = setup(KeyPolicy::Tofu, Duration::from_secs(3600));
        let (tx, mut resolved) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(cache.clone().run_lookups(1000, tx, stop));
        let carol = Username::parse("carol").unwrap();
        assert!(matches!(
            cache.keys_for_frame(&carol, true),
            FrameKeys::Waiting
        ));
        assert_eq!(resolved.recv().await.unwrap(), carol);
        let FrameKeys::Candidate(ks) = cache.keys_for_frame(&carol, true) else {
            panic!("no candidate")
        };
        assert!(cache.list().is_empty(), "a lookup for a frame pins nothing");
        cache.pin_verified(&carol, *ks).await.unwrap();
        assert_eq!(cache.cached(&carol).unwrap().pinned.sign, keys(0).1);

        // Unknown names: one lookup, then refused from memory.
        set(&fake, Err(FetchError::NotFound("x".into())));
        let nobody = Username::parse("nobody").unwrap();
        assert!(matches!(
            cache.keys_for_frame(&nobody, true),
            FrameKeys::Waiting
        ));
        assert_eq!(resolved.recv().await.unwrap(), nobody);
        let calls = fake.calls.load(Ordering::SeqCst);
        for _ in 0..10 {
            assert!(matches!(
                cache.keys_for_frame(&nobody, true),
                FrameKeys::NotFound
            ));
        }
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            calls,
            "negative answers are cached"
        );

        // A 429 pauses lookups for its Retry-After, then the name is looked up again.
        set(
            &fake,
            Err(FetchError::RateLimited(Some(Duration::from_secs(1)))),
        );
        let dave = Username::parse("dave").unwrap();
        let asked = Instant::now();
        assert!(matches!(
            cache.keys_for_frame(&dave, true),
            FrameKeys::Waiting
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        set(&fake, Ok(1));
        assert_eq!(resolved.recv().await.unwrap(), dave);
        assert!(
            asked.elapsed() >= Duration::from_secs(1),
            "the Retry-After was not honoured"
        );
        assert!(matches!(
            cache.keys_for_frame(&dave, true),
            FrameKeys::Candidate(_)
        ));
        // Known contacts answer from memory meanwhile, whatever the key server does.
        assert!(matches!(
            cache.keys_for_frame(&carol, true),
            FrameKeys::Known(_)
        ));
    }

    #[tokio::test]
    async fn stored_contacts_are_parsed_at_first_use_and_a_damaged_one_is_dropped() {
        let (tmp, store, fake, cache) = setup(KeyPolicy::Tofu, Duration::from_secs(3600));
        let bob = Username::parse("bob").unwrap();
        cache.get(&bob, false).await.unwrap();
        let mut damaged = cache.cached(&bob).unwrap().record();
        damaged.username = "mallory".into();
        if let Some(keys) = damaged.pinned.as_mut() {
            keys.sign_pem = "not a key".into();
        }
        store
            .save_contact("mallory", damaged.encode_to_vec(), Vec::new())
            .unwrap();
        store.flush().unwrap();
        drop((cache, store));

        let store = crate::store::open_in_test(tmp.path());
        let (m, s) = keys(2).clone();
        let me = Username::parse("me_").unwrap();
        let cache = KeyCache::open(
            store,
            fake.clone(),
            &me,
            m,
            s,
            KeyPolicy::Tofu,
            Duration::from_secs(3600),
        )
        .unwrap();
        let mem = |name: &str| match lock(&cache.inner.mem).get(name) {
            Some(Cached::Stored(_)) => "stored",
            Some(Cached::Parsed(_)) => "parsed",
            None => "absent",
        };
        assert_eq!((mem("bob"), mem("mallory")), ("stored", "stored"));
        let calls = fake.calls.load(Ordering::SeqCst);
        assert_eq!(cache.cached(&bob).unwrap().pinned.sign, keys(0).1);
        assert_eq!(mem("bob"), "parsed");
        assert!(cache.cached(&Username::parse("mallory").unwrap()).is_none());
        assert_eq!(mem("mallory"), "absent");
        let listed: Vec<String> = cache
            .list()
            .iter()
            .map(|c| c.username.to_string())
            .collect();
        assert_eq!(listed, ["bob"]);
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            calls,
            "all from the store"
        );
    }

    #[test]
    fn expiring_maps_are_bounded() {
        let mut m: Expiring<u32> = Expiring::new(100, Duration::from_secs(60));
        for i in 0..10_000u32 {
            m.insert(&format!("name{i}"), i);
        }
        assert!(
            m.map.len() <= 100 && m.order.len() <= 216,
            "{} {}",
            m.map.len(),
            m.order.len()
        );
        assert_eq!(m.get("name9999"), Some(9999));
        assert_eq!(m.get("name0"), None);
        let mut short: Expiring<()> = Expiring::new(100, Duration::from_millis(1));
        short.insert("a", ());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(short.get("a"), None);
    }
}
