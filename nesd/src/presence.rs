//! The presence task: tells this identity's contacts its presence, and notices when
//! theirs run out.
//!
//! Presence is a kind of inner message (docs/PROTOCOL.md "Presence"), sealed to each
//! contact like a text, so the broker and strangers see only frames they cannot read
//! and cannot tell from texts. It goes to the contacts known to speak kinds
//! ([`crate::store`] "Presence"), and only while connected:
//!
//! - when the MQTT session comes up, and every `presence_interval` (default 30 min)
//!   after; each presence lasts half an interval more than that, so one lost refresh
//!   does not make this identity look offline, and an unclean exit (a crash, `kill -9`,
//!   a lost network) shows as offline within 1.5 intervals;
//! - when the user sets it (`SetPresence`), at once;
//! - `offline` on a clean shutdown ([`Service::say_offline`]) and when going invisible;
//!   while invisible nothing is sent.
//!
//! Cost: one frame per contact per interval, plus one per contact per connect, change
//! and clean stop. With 50 contacts and the default interval that is 100 frames an hour,
//! whatever the contacts do. Contacts' presences are checked for expiry every
//! [`expiry_check`] (an event is logged once per expiry).

use crate::mqtt::Connection;
use crate::service::Service;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// Default `presence_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// How often contacts' presences are checked for expiry: a tenth of the interval,
/// between 1 s and 30 s.
pub fn expiry_check(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Runs until `shutdown` turns true.
pub async fn run(service: Service, mut shutdown: watch::Receiver<bool>) {
    let interval = service.presence_interval();
    let mut connection = service.connection();
    let mut refresh = tokio::time::interval(interval);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expiry = tokio::time::interval(expiry_check(interval));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = false;
    loop {
        let up = matches!(&*connection.borrow_and_update(), Connection::Up);
        let announce = up && !was_up;
        was_up = up;
        if announce {
            tell(&service).await;
            refresh.reset();
        }
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            changed = connection.changed() => if changed.is_err() { return },
            _ = refresh.tick() => if up { tell(&service).await },
            _ = expiry.tick() => {
                if let Err(e) = service.expire_presences().await {
                    warn!(error = %e, "cannot check contacts' presences");
                }
            }
        }
    }
}

async fn tell(service: &Service) {
    if let Err(e) = service.announce_presence(false).await {
        warn!(error = %e, "cannot tell the contacts this identity's presence");
    }
}
