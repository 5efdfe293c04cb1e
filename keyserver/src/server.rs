//! Startup and shutdown of `serve`.
//!
//! Startup opens everything that can fail *before* answering anyone (key, database and
//! migrations, mail transport, listener, broker), so a misconfiguration is a one-line
//! error and exit 1, never a half-working server. Then the cleanup task and the HTTP
//! server run until SIGTERM or SIGINT: the server stops accepting, lets requests in
//! flight finish (at most [`SHUTDOWN_GRACE`]), the cleanup task is told to stop, the
//! database pool is closed, and `serve` returns.

use crate::api::{self, Shared};
use crate::cache::AnswerCache;
use crate::config::ServeConfig;
use crate::error::Error;
use crate::mail::Mailer;
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::store::{redact, Store};
use nes_proto::PrivateKey;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long requests in flight may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How often idle clients are dropped from the rate limiters.
const LIMITER_HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Runs the key server until a shutdown signal.
pub async fn serve(config: ServeConfig) -> Result<(), Error> {
    let key = PrivateKey::read(&config.key).map_err(|source| Error::Key {
        path: config.key.display().to_string(),
        source,
    })?;
    warn_if_key_readable_by_others(&config.key);
    let store = Store::open(&config.database)
        .await
        .map_err(|source| Error::Database {
            url: redact(&config.database),
            source,
        })?;
    let mailer = Mailer::new(
        &config.mail,
        config.mail_from.as_deref(),
        &config.public_url,
    )?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    if let Some(addr) = &config.embedded_broker {
        crate::broker::start(addr)?;
    }

    let state = Arc::new(Shared {
        store,
        key: Arc::new(key),
        mailer,
        cache: AnswerCache::new(config.cache_ttl),
        limits: Limits::new(config.register_rate, config.lookup_rate)
            .with_prekey(config.prekey_rate),
        metrics: Metrics::new(),
        public_url: config.public_url.clone(),
        pending_ttl: config.pending_ttl,
        max_pending_per_email: config.max_pending_per_email,
        behind_proxy: config.behind_proxy,
    });

    // SMTP reachability is worth a warning, not a refusal: lookups need no mail.
    let check = state.clone();
    tokio::spawn(async move {
        if let Err(e) = check.mailer.check().await {
            tracing::warn!(error = %e, "the SMTP server does not answer yet; registrations will fail until it does");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let cleanup = tokio::spawn(cleanup_task(
        state.clone(),
        config.cleanup_interval,
        stop_rx.clone(),
    ));
    tokio::spawn(signal_task(stop_tx));

    tracing::info!(
        addr = %local,
        public_url = %config.public_url,
        database = state.store.backend(),
        mail = state.mailer.description(),
        key = %state.key.public_key().fingerprint(),
        "nes-keyserver listening"
    );

    let app = api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let mut graceful = stop_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    });
    let mut deadline = stop_rx.clone();
    let result = tokio::select! {
        result = server => result.map_err(Error::Serve),
        () = async move {
            let _ = deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("requests still running after {} s; stopping anyway", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    let _ = cleanup.await;
    state.store.close().await;
    tracing::info!("stopped");
    result
}

/// Waits for SIGTERM or SIGINT and tells everyone to stop.
async fn signal_task(stop: watch::Sender<bool>) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
    let _ = stop.send(true);
}

/// Removes expired registrations every `every` and forgets idle rate-limit clients.
async fn cleanup_task(state: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut expiry = tokio::time::interval(every);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(LIMITER_HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = expiry.tick() => match state.store.remove_expired(crate::now_ms()).await {
                Ok(0) => {}
                Ok(n) => {
                    state.metrics.expired_removed(n);
                    tracing::info!(removed = n, "removed registrations that were not activated in time");
                }
                Err(e) => tracing::warn!(error = %e, "cleanup of expired registrations failed; will retry"),
            },
            _ = housekeeping.tick() => state.limits.forget_idle(),
            _ = stop.changed() => break,
        }
    }
}

fn warn_if_key_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %path.display(), "the server key is readable by others: chmod 600 it");
        }
    }
}
