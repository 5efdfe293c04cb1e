//! Event log retention: removes the events older than `event_retention` every so often
//! (see "Retention" in [`crate::store`]). The messages stay; only the log that clients
//! resume from is bounded.

use crate::store::Store;
use nes_proto::now_ms;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the log is pruned: hourly, or more often for a retention under two hours (a
/// removal is then at most half a retention late), but not more than once a second.
pub fn prune_every(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Runs until `shutdown` turns true; the first pruning comes one period after the start,
/// off the start's path.
pub async fn run(store: Store, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let every = prune_every(retention);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let before =
            now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let pruning = store.clone();
        // sled reads and writes block: off the runtime's threads.
        match tokio::task::spawn_blocking(move || pruning.prune_events(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                info!(
                    events = n,
                    "removed events older than event_retention from the log"
                );
                if let Err(e) = store.commit_all().await {
                    warn!(error = %e, "cannot flush the store after pruning the event log");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot prune the event log"),
            Err(e) => warn!(error = %e, "the event log pruning task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_runs_hourly_or_at_half_a_short_retention() {
        assert_eq!(
            prune_every(Duration::from_secs(30 * 86_400)),
            Duration::from_secs(3600)
        );
        assert_eq!(
            prune_every(Duration::from_secs(600)),
            Duration::from_secs(300)
        );
        assert_eq!(prune_every(Duration::from_secs(1)), Duration::from_secs(1));
    }
}
