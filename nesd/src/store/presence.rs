//! Presence in the store: each peer's as last heard (`p`), this identity's own, and the
//! peers that speak kinds (`k`) (see "Presence" in the store's docs).

use super::*;

/// A peer's presence as last heard.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerPresence {
    /// [`rpc::PresenceStatus`].
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// Its note.
    #[prost(string, tag = "2")]
    pub note: String,
    /// The sender's timestamp of the frame that told it.
    #[prost(int64, tag = "3")]
    pub at_ms: i64,
    /// When it runs out (0: offline).
    #[prost(int64, tag = "4")]
    pub expires_ms: i64,
    /// Its expiry was logged as an event already.
    #[prost(bool, tag = "5")]
    pub expiry_logged: bool,
}

impl PeerPresence {
    /// As the API shows it at `now`: offline (and `expired`) once it ran out.
    fn shown(&self, peer: &str, now: i64) -> rpc::Presence {
        let offline = rpc::PresenceStatus::Offline as i32;
        let expired = self.status != offline && self.expires_ms <= now;
        rpc::Presence {
            username: peer.to_owned(),
            status: if expired { offline } else { self.status },
            note: if expired {
                String::new()
            } else {
                self.note.clone()
            },
            last_seen_ms: self.at_ms,
            expires_ms: if expired { 0 } else { self.expires_ms },
            expired,
        }
    }
}

/// This identity's presence as set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OwnPresence {
    /// [`rpc::PresenceStatus`] (online, away, busy or invisible).
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// The note.
    #[prost(string, tag = "2")]
    pub note: String,
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
        status: rpc::PresenceStatus,
        note: &str,
        at_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<Option<rpc::Presence>> {
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
            status: status as i32,
            note: note.to_owned(),
            at_ms,
            expires_ms,
            expiry_logged: false,
        };
        let now = now_ms();
        let shown = new.shown(peer, now);
        let changed = match &old {
            None => true,
            Some(o) => {
                let before = o.shown(peer, now);
                before.status != shown.status || before.note != shown.note
            }
        };
        c.insert(key, new.encode_to_vec());
        c.insert(peer_key(P_CAPABLE, peer, &[]), &[]);
        if changed {
            c.event(Kind::Presence(shown.clone()));
        }
        c.apply()?;
        Ok(Some(shown))
    }

    /// A peer's presence as shown now (`None`: it never told any).
    pub fn peer_presence(&self, peer: &str) -> StoreResult<Option<rpc::Presence>> {
        Ok(match self.data()?.get(peer_key(P_PRESENCE, peer, &[]))? {
            Some(v) => Some(PeerPresence::decode(&v[..])?.shown(peer, now_ms())),
            None => None,
        })
    }

    /// Logs a presence event (offline, expired) for each peer whose presence ran out by
    /// `now` and was not logged yet; returns them.
    pub fn expire_presences(&self, now: i64) -> StoreResult<Vec<rpc::Presence>> {
        let mut c = self.change();
        let mut out = Vec::new();
        // The scan needs every change made so far in sled (this one has written nothing).
        for kv in c.settled()?.scan_prefix([P_PRESENCE]) {
            let (k, v) = kv?;
            let mut p = PeerPresence::decode(&v[..])?;
            if p.expiry_logged
                || p.status == rpc::PresenceStatus::Offline as i32
                || p.expires_ms > now
            {
                continue;
            }
            let peer = String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)]).into_owned();
            p.expiry_logged = true;
            c.insert(k, p.encode_to_vec());
            let shown = p.shown(&peer, now);
            c.event(Kind::Presence(shown.clone()));
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
            Some(v) => OwnPresence::decode(&v[..])?,
            None => OwnPresence {
                status: rpc::PresenceStatus::Online as i32,
                note: String::new(),
            },
        })
    }

    /// Sets this identity's presence and logs it as an event (username empty).
    pub fn set_own_presence(&self, own: &OwnPresence) -> StoreResult<()> {
        let mut c = self.change();
        c.insert(K_OWN_PRESENCE, own.encode_to_vec());
        c.event(Kind::Presence(rpc::Presence {
            username: String::new(),
            status: own.status,
            note: own.note.clone(),
            ..Default::default()
        }));
        c.apply()
    }
}
