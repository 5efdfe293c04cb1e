//! The receipts task: sends the delivery and read receipts this daemon owes.
//!
//! A stored message whose sender asked for receipts owes a delivery receipt; marking it
//! read owes a read receipt (unless `read_receipts = false`). The owed ids are records in
//! the store, written with the message or the read mark (see [`crate::store`]
//! "Receipts"), so a crash loses none. This task is woken when some are owed (by the
//! receive pipeline after a flush, by MarkRead), and every [`RETRY`] in case a round had
//! to leave some: it seals one receipt frame per peer and state for up to
//! [`nes_proto::inner::MAX_RECEIPT_IDS`] ids, in the version that peer gets (v3 or v2;
//! never v1: the original knows no receipts), and queues it in the outbox, which
//! publishes it like any frame and retries it across broker restarts and daemon restarts.
//!
//! Receipts are batched by construction: everything owed when the task wakes goes in one
//! frame per peer, so a burst of 64 messages costs its sender one receipt, not 64.
//!
//! Queuing a receipt is not flushed on its own (sled's background flush, every 500 ms,
//! makes it durable): a crash before that leaves the owed records in place, or the queued
//! frame, so the receipt is sent (again) after the restart, and a receipt twice moves
//! nothing. Measured (`./scripts/bench` section 4, sends 50 ms apart): flushing each
//! queued receipt put an fsync beside each incoming message and took the send→D-Bus
//! latency from p50 1.7 / p90 2.5 ms without receipts to 3–4.5 / 35 ms; waiting 100 ms
//! before sealing (to batch more) made it worse, 17–19 ms p50, as the flush then fell on
//! the next message.
//! Receipts are never receipted, and a receipt that comes back twice (a replay, or the
//! broker's redelivery) moves nothing, since states only move forward.

use crate::service::Service;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::warn;

/// How often owed receipts are looked at without a wake (a round that had to leave some,
/// e.g. while the key server could not be reached).
pub const RETRY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` turns true.
pub async fn run(service: Service, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Err(e) = service.send_receipts_due().await {
            warn!(error = %e, "cannot send the receipts owed; trying again later");
        }
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = wake.notified() => {}
            _ = retry.tick() => {}
        }
    }
}
