//! The counters behind `GET /metrics` (Prometheus / OpenMetrics text).
//!
//! | metric | labels |
//! |---|---|
//! | `nes_keyserver_lookups_total` | `result`: `found`, `not_found` |
//! | `nes_keyserver_answer_cache_hits_total` | |
//! | `nes_keyserver_registrations_total` | |
//! | `nes_keyserver_activations_total` | |
//! | `nes_keyserver_deletions_total` | |
//! | `nes_keyserver_expired_removed_total` | |
//! | `nes_keyserver_mails_total` | `result`: `sent`, `failed` |
//! | `nes_keyserver_prekey_uploads_total` | `result`: `stored`, `unchanged` (the same bytes again) |
//! | `nes_keyserver_prekey_lookups_total` | `result`: `found`, `not_found` |
//! | `nes_keyserver_rejections_total` | `reason`: the `error` code of the 4xx/5xx body |
//!
//! Counters are atomics; the hot path (a lookup) touches one or two.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// The server's counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    lookups_found: Counter,
    lookups_not_found: Counter,
    cache_hits: Counter,
    registrations: Counter,
    activations: Counter,
    deletions: Counter,
    expired_removed: Counter,
    mails: Family<Labels, Counter>,
    prekey_uploads: Family<Labels, Counter>,
    prekey_lookups: Family<Labels, Counter>,
    rejections: Family<Labels, Counter>,
}

/// Every `error` code the API answers with, so each rejection series exists (at 0) from
/// the start.
pub const REJECTION_REASONS: &[&str] = &[
    "invalid_json",
    "invalid_username",
    "invalid_email",
    "invalid_key",
    "same_keys",
    "body_too_large",
    "body_timeout",
    "username_taken",
    "too_many_pending",
    "rate_limited",
    "not_found",
    "token_expired",
    "invalid_prekey",
    "wrong_username",
    "prekey_expired",
    "invalid_lifetime",
    "bad_signature",
    "prekey_outdated",
    "method_not_allowed",
    "mail_failed",
    "internal",
    "unavailable",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every counter.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nes_keyserver");
        let lookups = Family::<Labels, Counter>::default();
        registry.register(
            "lookups",
            "GET /users/<name> answers, by result",
            lookups.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "answer_cache_hits",
            "Lookups answered from the in-memory cache",
            cache_hits.clone(),
        );
        let registrations = Counter::default();
        registry.register(
            "registrations",
            "Registrations accepted (201)",
            registrations.clone(),
        );
        let activations = Counter::default();
        registry.register(
            "activations",
            "Users activated by their link",
            activations.clone(),
        );
        let deletions = Counter::default();
        registry.register(
            "deletions",
            "Users deleted by their link",
            deletions.clone(),
        );
        let expired_removed = Counter::default();
        registry.register(
            "expired_removed",
            "Registrations removed because they were not activated in time",
            expired_removed.clone(),
        );
        let mails = Family::<Labels, Counter>::default();
        registry.register("mails", "Activation mails, by result", mails.clone());
        let prekey_uploads = Family::<Labels, Counter>::default();
        registry.register(
            "prekey_uploads",
            "PUT /users/<name>/prekey answered 204, by result",
            prekey_uploads.clone(),
        );
        let prekey_lookups = Family::<Labels, Counter>::default();
        registry.register(
            "prekey_lookups",
            "GET /users/<name>/prekey answers, by result",
            prekey_lookups.clone(),
        );
        let rejections = Family::<Labels, Counter>::default();
        registry.register(
            "rejections",
            "Requests refused, by reason (the error code)",
            rejections.clone(),
        );
        for reason in REJECTION_REASONS {
            let _ = rejections.get_or_create(&[("reason", reason)]);
        }
        for result in ["sent", "failed"] {
            let _ = mails.get_or_create(&[("result", result)]);
        }
        for result in ["stored", "unchanged"] {
            let _ = prekey_uploads.get_or_create(&[("result", result)]);
        }
        for result in ["found", "not_found"] {
            let _ = prekey_lookups.get_or_create(&[("result", result)]);
        }
        let lookups_found = lookups.get_or_create(&[("result", "found")]).clone();
        let lookups_not_found = lookups.get_or_create(&[("result", "not_found")]).clone();
        Self {
            registry,
            lookups_found,
            lookups_not_found,
            cache_hits,
            registrations,
            activations,
            deletions,
            expired_removed,
            mails,
            prekey_uploads,
            prekey_lookups,
            rejections,
        }
    }

    /// A lookup answered 200 (`cached`: from memory).
    pub fn lookup_found(&self, cached: bool) {
        self.lookups_found.inc();
        if cached {
            self.cache_hits.inc();
        }
    }

    /// A lookup answered 404.
    pub fn lookup_not_found(&self) {
        self.lookups_not_found.inc();
    }

    /// A registration was accepted.
    pub fn registered(&self) {
        self.registrations.inc();
    }

    /// A user was activated.
    pub fn activated(&self) {
        self.activations.inc();
    }

    /// A user was deleted.
    pub fn deleted(&self) {
        self.deletions.inc();
    }

    /// The cleanup task removed `n` expired registrations.
    pub fn expired_removed(&self, n: u64) {
        self.expired_removed.inc_by(n);
    }

    /// An activation mail went out (or failed to).
    pub fn mail(&self, sent: bool) {
        self.mails
            .get_or_create(&[("result", if sent { "sent" } else { "failed" })])
            .inc();
    }

    /// A prekey upload was answered 204 (`stored`: it replaced what was there; else the
    /// same bytes were there already).
    pub fn prekey_uploaded(&self, stored: bool) {
        self.prekey_uploads
            .get_or_create(&[("result", if stored { "stored" } else { "unchanged" })])
            .inc();
    }

    /// A prekey fetch was answered 200 (`found`) or 404.
    pub fn prekey_lookup(&self, found: bool) {
        self.prekey_lookups
            .get_or_create(&[("result", if found { "found" } else { "not_found" })])
            .inc();
    }

    /// A request was refused with `reason` (an error code).
    pub fn rejected(&self, reason: &'static str) {
        self.rejections.get_or_create(&[("reason", reason)]).inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::new();
        m.lookup_found(true);
        m.lookup_found(false);
        m.lookup_not_found();
        m.registered();
        m.rejected("invalid_email");
        m.rejected("invalid_email");
        m.expired_removed(3);
        let text = m.render();
        assert!(
            text.contains("nes_keyserver_lookups_total{result=\"found\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_lookups_total{result=\"not_found\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_answer_cache_hits_total 1"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_registrations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_rejections_total{reason=\"invalid_email\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_rejections_total{reason=\"rate_limited\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_expired_removed_total 3"),
            "{text}"
        );
        assert!(text.contains("nes_keyserver_activations_total 0"), "{text}");
        m.prekey_uploaded(true);
        m.prekey_lookup(false);
        let text = m.render();
        assert!(
            text.contains("nes_keyserver_prekey_uploads_total{result=\"stored\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_prekey_uploads_total{result=\"unchanged\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("nes_keyserver_prekey_lookups_total{result=\"not_found\"} 1"),
            "{text}"
        );
    }
}
