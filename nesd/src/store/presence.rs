//! Presence in the store: each peer's as last heard (`p`), this identity's own, and the
//! peers that speak kinds (`k`) (see "Presence" in the store's docs).

use super::records::{stored, Stored};
use super::*;
use crate::model::{OwnPresence, Presence, PresenceStatus};

/// A peer's presence as last heard (the `p` record).
#[derive(Clone, PartialEq, prost::Message)]
struct PeerPresence {
    /// [`PresenceStatus`], as [`Stored`].
    #[prost(int32, tag = "1")]
    status: i32,
    /// Its note.
    #[prost(string, tag = "2")]
    note: String,
    /// The sender's timestamp of the frame that told it.
    #[prost(int64, tag = "3")]
    at_ms: i64,
    /// When it runs out (0: offline).
    #[prost(int64, tag = "4")]
    expires_ms: i64,
    /// Its expiry was logged as an event already.
    #[prost(bool, tag = "5")]
    expiry_logged: bool,
}

impl PeerPresence {
    /// As shown at `now`: offline (and `expired`) once it ran out.
    fn shown(&self, peer: &str, now: i64) -> StoreResult<Presence> {
        let status: PresenceStatus = stored(self.status)?;
        let expired = status != PresenceStatus::Offline && self.expires_ms <= now;
        Ok(Presence {
            username: peer.to_owned(),
            status: if expired {
                PresenceStatus::Offline
            } else {
                status
            },
            note: if expired {
                String::new()
            } else {
                self.note.clone()
            },
            last_seen_ms: self.at_ms,
            expires_ms: if expired { 0 } else { self.expires_ms },
            expired,
        })
    }
}

/// This identity's presence as set (the `n/presence` record).
#[derive(Clone, PartialEq, prost::Message)]
struct OwnPresenceRecord {
    /// [`PresenceStatus`] (online, away, busy or invisible), as [`Stored`].
    #[prost(int32, tag = "1")]
    status: i32,
    /// The note.
    #[prost(string, tag = "2")]
    note: String,
}

impl Store {
    /// Peers known to speak kinds (the ones presence goes to), in name order.
    pub fn capable_peers(&self) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for kv in self.data()?.scan_prefix([P_CAPABLE]) {
            let (k, _) = kv?;
            if let Some(peer) = k.get(1..k.len().saturating_sub(1)) {
                out.push(String::from_utf8_lossy(peer).into_owned());
            }
        }
        Ok(out)
    }

    /// A peer told its presence (a verified frame with the sender's timestamp `at_ms`).
    /// An older one than the last heard is ignored (`None`); else it is kept, the peer
    /// counts as speaking kinds, and a change of status or note (or the first news after
    /// an expiry) logs a presence event. Returns the presence as shown now.
    pub fn set_peer_presence(
        &self,
        peer: &str,
        status: PresenceStatus,
        note: &str,
        at_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<Option<Presence>> {
        let key = peer_key(P_PRESENCE, peer, &[]);
        let mut c = self.change();
        let old = match c.get(&key)? {
            Some(v) => Some(PeerPresence::decode(&v[..])?),
            None => None,
        };
        if old.as_ref().is_some_and(|o| o.at_ms >= at_ms) {
            return Ok(None);
        }
        let new = PeerPresence {
            status: status.number(),
            note: note.to_owned(),
            at_ms,
            expires_ms,
            expiry_logged: false,
        };
        let now = now_ms();
        let shown = new.shown(peer, now)?;
        let changed = match &old {
            None => true,
            Some(o) => {
                let before = o.shown(peer, now)?;
                before.status != shown.status || before.note != shown.note
            }
        };
        c.insert(key, new.encode_to_vec());
        c.insert(peer_key(P_CAPABLE, peer, &[]), &[]);
        if changed {
            c.event(EventKind::Presence(shown.clone()));
        }
        c.apply()?;
        Ok(Some(shown))
    }

    /// A peer's presence as shown now (`None`: it never told any).
    pub fn peer_presence(&self, peer: &str) -> StoreResult<Option<Presence>> {
        match self.data()?.get(peer_key(P_PRESENCE, peer, &[]))? {
            Some(v) => Ok(Some(PeerPresence::decode(&v[..])?.shown(peer, now_ms())?)),
            None => Ok(None),
        }
    }

    /// Logs a presence event (offline, expired) for each peer whose presence ran out by
    /// `now` and was not logged yet; returns them.
    pub fn expire_presences(&self, now: i64) -> StoreResult<Vec<Presence>> {
        let mut c = self.change();
        let mut out = Vec::new();
        // The scan needs every change made so far in sled (this one has written nothing).
        for kv in c.settled()?.scan_prefix([P_PRESENCE]) {
            let (k, v) = kv?;
            let mut p = PeerPresence::decode(&v[..])?;
            if p.expiry_logged || p.status == PresenceStatus::Offline.number() || p.expires_ms > now
            {
                continue;
            }
            let peer = String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)]).into_owned();
            p.expiry_logged = true;
            c.insert(k, p.encode_to_vec());
            let shown = p.shown(&peer, now)?;
            c.event(EventKind::Presence(shown.clone()));
            out.push(shown);
        }
        if !out.is_empty() {
            c.apply()?;
        }
        Ok(out)
    }

    /// This identity's presence as set (online when never set).
    pub fn own_presence(&self) -> StoreResult<OwnPresence> {
        Ok(match self.data()?.get(K_OWN_PRESENCE)? {
            Some(v) => {
                let OwnPresenceRecord { status, note } = OwnPresenceRecord::decode(&v[..])?;
                OwnPresence {
                    status: stored(status)?,
                    note,
                }
            }
            None => OwnPresence {
                status: PresenceStatus::Online,
                note: String::new(),
            },
        })
    }

    /// Sets this identity's presence and logs it as an event (username empty).
    pub fn set_own_presence(&self, own: &OwnPresence) -> StoreResult<()> {
        let OwnPresence { status, note } = own;
        let record = OwnPresenceRecord {
            status: status.number(),
            note: note.clone(),
        };
        let mut c = self.change();
        c.insert(K_OWN_PRESENCE, record.encode_to_vec());
        c.event(EventKind::Presence(own.shown("")));
        c.apply()
    }
}
