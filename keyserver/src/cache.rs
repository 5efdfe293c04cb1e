//! An in-memory cache of signed answers (`GET /users/<name>` bodies) in front of the
//! store.
//!
//! Why a time-to-live and not invalidation messages: with SQLite there is one server,
//! and it invalidates its own cache on every activation and deletion, so the cache is
//! exact. With several servers on one PostgreSQL, a deletion through server A reaches
//! server B's cache only when B's entry expires; a short TTL (default 2 s, `--cache-ttl`)
//! bounds that delay without a message bus, and at one query per hot name per TTL the
//! database barely notices the lookups. A key directory whose entries change when a
//! human clicks a link can afford seconds of staleness; it cannot afford an RSA
//! operation or a database round trip per lookup. Only positive answers are cached, so
//! a new activation is visible everywhere at once.
//!
//! The map is bounded: when full, expired entries are dropped, and if that frees
//! nothing the map starts over (a crude but allocation-free policy; the hot names come
//! back within one TTL).

use axum::body::Bytes;
use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 100_000;

/// Cached answers by username.
#[derive(Debug)]
pub struct AnswerCache {
    ttl: Duration,
    map: RwLock<HashMap<String, (Instant, Bytes)>>,
}

impl AnswerCache {
    /// A cache whose entries live `ttl`; a zero `ttl` caches nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: RwLock::new(HashMap::new()),
        }
    }

    /// The answer for `username`, if cached and fresh.
    pub fn get(&self, username: &str) -> Option<Bytes> {
        if self.ttl.is_zero() {
            return None;
        }
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        match map.get(username) {
            Some((stored, answer)) if stored.elapsed() < self.ttl => Some(answer.clone()),
            _ => None,
        }
    }

    /// Caches `answer` for `username`.
    pub fn put(&self, username: &str, answer: Bytes) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES && !map.contains_key(username) {
            let ttl = self.ttl;
            map.retain(|_, (stored, _)| stored.elapsed() < ttl);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(username.to_string(), (Instant::now(), answer));
    }

    /// Forgets `username` (it was activated or deleted here).
    pub fn remove(&self, username: &str) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(username);
    }

    /// Number of entries, fresh or not.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_until_removed() {
        let cache = AnswerCache::new(Duration::from_secs(3600));
        assert!(cache.get("alice").is_none());
        cache.put("alice", Bytes::from_static(b"a"));
        assert_eq!(cache.get("alice").unwrap(), Bytes::from_static(b"a"));
        assert!(cache.get("bob").is_none());
        cache.remove("alice");
        assert!(cache.get("alice").is_none());
    }

    #[test]
    fn entries_expire() {
        let cache = AnswerCache::new(Duration::from_millis(1));
        cache.put("alice", Bytes::from_static(b"a"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(cache.get("alice").is_none());
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let cache = AnswerCache::new(Duration::ZERO);
        cache.put("alice", Bytes::from_static(b"a"));
        assert!(cache.get("alice").is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn stays_bounded() {
        let cache = AnswerCache::new(Duration::from_secs(3600));
        for i in 0..MAX_ENTRIES + 10 {
            cache.put(&format!("u{i}"), Bytes::from_static(b"x"));
        }
        assert!(cache.len() <= MAX_ENTRIES);
        assert!(
            cache.get(&format!("u{}", MAX_ENTRIES + 9)).is_some(),
            "the newest entry is kept"
        );
    }
}
