//! The service: what the daemon can do, as one cloneable handle with async methods.
//!
//! The frontend adapters ([`crate::grpc`], [`crate::dbus`]) translate their protocol to
//! these calls and [`ServiceError`] back to their error form; they hold no logic of
//! their own. The service speaks the domain types of [`crate::model`] (the adapters
//! convert them at their edge). It reaches the store, the key cache, the key server and
//! (through the outbox) the transport.
//!
//! Sending is two steps so that a stream of sends can seal in parallel and still store
//! in order: [`Service::prepare_send`] (validate, find keys, seal on the blocking pool)
//! and [`Service::commit_sends`] (store as QUEUED, flush, wake the outbox).

use crate::error::ServiceError;
use crate::identity::Identity;
use crate::keycache::{Contact, KeyCache, LookupError, TrustError};
use crate::keyserver::{KeyServer, RegisterError};
use crate::model::{
    self, ConnectionChanged, Content, Conversation, Direction, Event, EventKind, Message,
    MessageState, NewText, OwnPresence, Presence, PresenceStatus, Status,
};
use crate::mqtt::{Connection, Transport};
use crate::prekeys::{OwnPrekeys, PeerPrekey, PeerPrekeys};
use crate::store::{CursorError, OutboxRecord, Store};
use crate::sync::lock;
use nes_proto::frame::{self, Draft, FrameError, Version};
use nes_proto::{now_ms, Username};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tracing::{info, warn};

/// Events buffered per client of [`Service::events`] on top of the shared live buffer.
pub const EVENT_CLIENT_BUFFER: usize = 256;
/// Longest text accepted by Send (the sealed frame must also fit in 256 KiB).
pub const MAX_TEXT_BYTES: usize = 128 * 1024;

/// Counters shown by Status, and the rate limit of refusal logs.
#[derive(Debug, Default)]
pub struct Stats {
    refused: Mutex<BTreeMap<String, u64>>,
    /// Messages stored as received, by frame version (index = version - 1).
    received: [AtomicU64; 3],
    sent: AtomicU64,
    /// Frames sealed and queued, by version (index = version - 1).
    sealed: [AtomicU64; 3],
    /// Receipt frames received and applied; receipt frames queued.
    receipts_received: AtomicU64,
    receipts_sent: AtomicU64,
    /// Presence frames received and applied; presence frames queued.
    presence_received: AtomicU64,
    presence_sent: AtomicU64,
    /// File chunks handed to the broker.
    pub chunks_sent: AtomicU64,
    /// File chunks received and written.
    pub chunks_received: AtomicU64,
    log_window: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Refusal log lines per reason per minute; the rest are only counted.
const REFUSAL_LOGS_PER_MINUTE: u32 = 10;

impl Stats {
    /// Counts a refused frame and logs it once (rate-limited per reason). `detail` must
    /// not contain frame content.
    pub fn refuse(&self, reason: &str, detail: &str) {
        *lock(&self.refused).entry(reason.to_owned()).or_insert(0) += 1;
        let mut window = lock(&self.log_window);
        let entry = window
            .entry(reason.to_owned())
            .or_insert((Instant::now(), 0));
        if entry.0.elapsed() > Duration::from_secs(60) {
            if entry.1 > REFUSAL_LOGS_PER_MINUTE {
                warn!(
                    reason,
                    suppressed = entry.1 - REFUSAL_LOGS_PER_MINUTE,
                    "more frames were refused for this reason"
                );
            }
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        if entry.1 <= REFUSAL_LOGS_PER_MINUTE {
            warn!(reason, detail, "refused a frame");
        }
    }

    /// Refusals by reason.
    pub fn refused(&self) -> HashMap<String, u64> {
        lock(&self.refused)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// One more receipt received and applied.
    pub fn add_receipt_received(&self) {
        self.receipts_received.fetch_add(1, Ordering::Relaxed);
    }

    /// One more presence received and kept.
    pub fn add_presence_received(&self) {
        self.presence_received.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` more messages of frame `version` (1, 2 or 3) stored as received.
    pub fn add_received(&self, version: u32, n: u64) {
        if let Some(c) = by_version(&self.received, version) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One more message acknowledged by the broker.
    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// One more frame of `version` (1, 2 or 3) sealed and queued for sending.
    pub fn add_sealed(&self, version: u32) {
        if let Some(c) = by_version(&self.sealed, version) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frames sealed and queued since the start, for v1, v2 and v3.
    pub fn sealed(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.sealed[i].load(Ordering::Relaxed))
    }

    /// Messages stored as received since the start, for v1, v2 and v3.
    pub fn received_by_version(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.received[i].load(Ordering::Relaxed))
    }

    /// Messages stored as received since the start.
    pub fn received(&self) -> u64 {
        self.received_by_version().iter().sum()
    }

    /// Messages acknowledged by the broker since the start.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// The counter of frame `version` (1, 2 or 3); none for another number.
fn by_version(counters: &[AtomicU64; 3], version: u32) -> Option<&AtomicU64> {
    version
        .checked_sub(1)
        .and_then(|i| counters.get(i as usize))
}

/// What the service is built from.
pub struct Parts {
    /// This identity.
    pub identity: Arc<Identity>,
    /// The store.
    pub store: Store,
    /// The key cache.
    pub keys: KeyCache,
    /// The key server (for Register).
    pub keyserver: KeyServer,
    /// v3: our prekeys and certificate.
    pub own_prekeys: Arc<OwnPrekeys>,
    /// v3: contacts' prekeys.
    pub peer_prekeys: PeerPrekeys,
    /// v3 to contacts with a valid prekey (`send_v3`); false: v2 at most.
    pub send_v3: bool,
    /// Send read receipts (`read_receipts`); delivery receipts are always sent.
    pub read_receipts: bool,
    /// Wakes the receipts task when receipts are owed ([`crate::receipts`]).
    pub receipts_wake: Arc<Notify>,
    /// Presence is told again this often; each lasts half as long again
    /// ([`crate::presence`]).
    pub presence_interval: Duration,
    /// The MQTT session.
    pub transport: Transport,
    /// Wakes the outbox when something was queued.
    pub outbox_wake: Arc<Notify>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// `mqtt://host:port`, for Status.
    pub broker_url: String,
    /// The MQTT client id, for Status.
    pub client_id: String,
    /// Turns true when the daemon stops.
    pub shutdown: watch::Receiver<bool>,
    /// File transfers.
    pub files: crate::files::Files,
}

/// The daemon's service; clones share it.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    parts: Parts,
    started: Instant,
}

/// A sealed message ready to be stored.
#[derive(Debug, Clone)]
pub struct Prepared {
    message: Message,
    outbox: OutboxRecord,
}

impl Service {
    /// Builds the service.
    pub fn new(parts: Parts) -> Service {
        Service {
            inner: Arc::new(Inner {
                parts,
                started: Instant::now(),
            }),
        }
    }

    fn p(&self) -> &Parts {
        &self.inner.parts
    }

    /// This identity's username.
    pub fn user(&self) -> &Username {
        &self.p().identity.user
    }

    /// Turns true when the daemon stops: adapters end their streams and loops then.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.p().shutdown.clone()
    }

    /// Status: identity, connection, queue, counters.
    pub async fn status(&self) -> Result<Status, ServiceError> {
        let p = self.p();
        let prekey = p.own_prekeys.state();
        let [sent_v1, sent_v2, sent_v3] = p.stats.sealed();
        let [received_v1, received_v2, received_v3] = p.stats.received_by_version();
        Ok(Status {
            user: p.identity.user.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connected: p.transport.is_connected(),
            broker: p.broker_url.clone(),
            keyserver: p.keyserver.base().to_owned(),
            queued: p.store.outbox_len(),
            refused: p.stats.refused(),
            received: p.stats.received(),
            sent: p.stats.sent(),
            last_cursor: p.store.last_cursor(),
            uptime_seconds: self.inner.started.elapsed().as_secs(),
            client_id: p.client_id.clone(),
            unread: p.store.unread_total()?,
            pid: std::process::id(),
            waiting: p.store.waiting_len(),
            inbox: p.store.inbox_len(),
            store_id: p.store.store_id().to_owned(),
            last_log_cursor: p.store.last_log_cursor()?,
            prekey_id: prekey.prekey_id,
            prekey_expires_ms: prekey.expires_ms,
            prekey_published: prekey.published,
            prekey_waiting: prekey.waiting_reason,
            prekey_next_try_ms: prekey.next_try_ms,
            sent_v1,
            sent_v2,
            sent_v3,
            received_v1,
            received_v2,
            received_v3,
            prekeys_lost: p.peer_prekeys.lost(),
            receipts_received: p.stats.receipts_received.load(Ordering::Relaxed),
            receipts_sent: p.stats.receipts_sent.load(Ordering::Relaxed),
            presence_received: p.stats.presence_received.load(Ordering::Relaxed),
            presence_sent: p.stats.presence_sent.load(Ordering::Relaxed),
            file_chunks_sent: p.stats.chunks_sent.load(Ordering::Relaxed),
            file_chunks_received: p.stats.chunks_received.load(Ordering::Relaxed),
            broker_protocol: p
                .transport
                .protocol()
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            broker_error: match &*p.transport.connection().borrow() {
                Connection::Up => String::new(),
                Connection::Down(reason) => reason.clone(),
            },
        })
    }

    /// Seals and queues one message; returns once it is stored (QUEUED).
    pub async fn send(&self, request: NewText) -> Result<Message, ServiceError> {
        let prepared = self.prepare_send(request).await;
        self.commit_sends(vec![prepared])
            .await
            .pop()
            .unwrap_or_else(|| Err(ServiceError::Internal("no result".into())))
    }

    /// Step one of a send: checks the request, finds the recipient's keys, seals (on the
    /// blocking pool).
    pub async fn prepare_send(&self, request: NewText) -> Result<Prepared, ServiceError> {
        let mut one = self.prepare_sends(vec![request]).await;
        one.pop()
            .unwrap_or_else(|| Err(ServiceError::Internal("no result".into())))
    }

    /// Step one for several sends at once: checks each, then seals them all in one task
    /// of the blocking pool (one hand-off instead of one per message). One result per
    /// request, in order.
    pub async fn prepare_sends(
        &self,
        requests: Vec<NewText>,
    ) -> Vec<Result<Prepared, ServiceError>> {
        let mut checked = Vec::with_capacity(requests.len());
        for request in requests {
            checked.push(self.check_send(request).await);
        }
        let identity = self.p().identity.clone();
        let count = checked.len();
        tokio::task::spawn_blocking(move || {
            checked
                .into_iter()
                .map(|c| c.and_then(|ready| seal_one(&identity, ready)))
                .collect()
        })
        .await
        .unwrap_or_else(|e| {
            (0..count)
                .map(|_| Err(ServiceError::Internal(format!("sealing failed: {e}"))))
                .collect()
        })
    }

    /// Validates a send and finds the recipient's keys.
    async fn check_send(&self, request: NewText) -> Result<ReadyToSeal, ServiceError> {
        let NewText { to, text, legacy } = request;
        let to = parse_user(&to, "recipient")?;
        if text.is_empty() {
            return Err(ServiceError::InvalidArgument("the message is empty".into()));
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "the message is {} bytes long; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        Ok(ReadyToSeal {
            recipient: self.recipient(to, legacy).await?,
            text,
            body: None,
            timestamp_ms: now_ms(),
        })
    }

    /// The recipient's keys and the frame version it gets (v1 when `legacy` is asked for
    /// or the contact is marked legacy). Refused while its keys changed and are not
    /// trusted.
    async fn recipient(&self, to: Username, legacy: bool) -> Result<Recipient, ServiceError> {
        let contact = self.p().keys.get(&to, false).await.map_err(lookup_error)?;
        if contact.key_changed() {
            return Err(ServiceError::FailedPrecondition(format!(
                "the keys of {to} changed; compare the new fingerprints with {to} and trust them (`nes trust {to}`) before sending"
            )));
        }
        let legacy = legacy || contact.legacy;
        let (prekey, certificate) = if legacy || !self.p().send_v3 {
            (None, None)
        } else {
            match self.p().own_prekeys.certificate() {
                Some(cert) => match self.p().peer_prekeys.get(&to, &contact.pinned.sign).await {
                    PeerPrekey::Valid(p) => (Some(p), Some(cert)),
                    _ => (None, None),
                },
                None => (None, None),
            }
        };
        Ok(Recipient {
            version: choose_version(legacy, prekey.is_some()),
            prekey,
            certificate,
            to_key: contact.pinned.message.clone(),
            to,
        })
    }

    /// Sets this identity's presence (not offline: `invisible` is how to look offline)
    /// and tells the contacts at once.
    pub async fn set_presence(
        &self,
        status: PresenceStatus,
        note: &str,
    ) -> Result<Presence, ServiceError> {
        use PresenceStatus as S;
        if !matches!(status, S::Online | S::Away | S::Busy | S::Invisible) {
            return Err(ServiceError::InvalidArgument(
                "a presence is online, away, busy or invisible".into(),
            ));
        }
        let note = note.trim();
        if note.len() > nes_proto::inner::MAX_PRESENCE_NOTE {
            return Err(ServiceError::InvalidArgument(format!(
                "the note is {} bytes long; the limit is {}",
                note.len(),
                nes_proto::inner::MAX_PRESENCE_NOTE
            )));
        }
        let store = &self.p().store;
        let before = store.own_presence()?;
        let own = OwnPresence {
            status,
            note: note.to_owned(),
        };
        store.set_own_presence(&own)?;
        store.commit().await?;
        // Going invisible is told once, as offline; while invisible nothing is sent.
        let went_invisible = status == S::Invisible && before.status != S::Invisible;
        if status != S::Invisible || went_invisible {
            self.announce_presence(went_invisible).await?;
        }
        self.get_presence("").await
    }

    /// A contact's presence as last heard, or (empty `username`) this identity's own.
    pub async fn get_presence(&self, username: &str) -> Result<Presence, ServiceError> {
        let store = &self.p().store;
        if username.trim().is_empty() {
            return Ok(store.own_presence()?.shown(self.user().as_str()));
        }
        let user = parse_user(username, "username")?;
        Ok(store
            .peer_presence(user.as_str())?
            .unwrap_or_else(|| Presence::unknown(user.as_str())))
    }

    /// Tells every contact that speaks kinds this identity's presence: as set (lasting
    /// [`Parts::presence_interval`] and half again), or offline when `offline` (a clean
    /// shutdown, going invisible). Invisible, and not `offline`: sends nothing. Contacts
    /// that are legacy, unknown or whose keys changed are skipped. Returns how many
    /// frames it queued.
    pub async fn announce_presence(&self, offline: bool) -> Result<u64, ServiceError> {
        use nes_proto::inner::{PresenceBody, PresenceStatus as W};
        let store = &self.p().store;
        let own = store.own_presence()?;
        let now = now_ms();
        let body = match own.status.on_the_wire() {
            _ if offline => PresenceBody {
                status: W::Offline,
                note: String::new(),
                expires: 0,
            },
            None => return Ok(0),
            Some(status) => {
                let lasts = self.p().presence_interval * 3 / 2;
                let lasts = i64::try_from(lasts.as_millis())
                    .unwrap_or(i64::MAX)
                    .clamp(1, nes_proto::inner::MAX_PRESENCE_TTL_MS);
                PresenceBody {
                    status,
                    note: own.note,
                    expires: now + lasts,
                }
            }
        };
        let mut ready = Vec::new();
        for peer in store.capable_peers()? {
            let Ok(user) = Username::parse(&peer) else {
                continue;
            };
            if &user == self.user() {
                continue;
            }
            match self.recipient(user, false).await {
                Ok(r) if r.version != Version::V1 => ready.push((
                    peer,
                    ReadyToSeal {
                        recipient: r,
                        text: String::new(),
                        body: Some(Body::Presence(body.clone())),
                        timestamp_ms: now,
                    },
                )),
                Ok(_) => {}
                Err(e) => info!(%peer, error = %e, "presence not told"),
            }
        }
        if ready.is_empty() {
            return Ok(0);
        }
        let mut records = Vec::new();
        for (peer, record) in self.seal_controls(ready).await? {
            match record {
                Ok(record) => records.push(record),
                Err(e) => warn!(%peer, error = %e, "presence not told: cannot seal"),
            }
        }
        let n = records.len() as u64;
        store.queue_frames(records)?;
        store.commit().await?;
        self.p().outbox_wake.notify_one();
        self.p().stats.presence_sent.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Seals frames that are not messages (receipts, presence) on the blocking pool, one
    /// task for them all, as outbox entries (QoS 1: they are v2 or v3), each beside the tag
    /// it came with.
    async fn seal_controls<T: Send + 'static>(
        &self,
        items: Vec<(T, ReadyToSeal)>,
    ) -> Result<Vec<(T, Result<OutboxRecord, ServiceError>)>, ServiceError> {
        let identity = self.p().identity.clone();
        tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .map(|(tag, ready)| {
                    let record = seal_frame(&identity, &ready).map(|sealed| OutboxRecord {
                        peer: ready.recipient.to.to_string(),
                        id: sealed.id,
                        exactly_once: false,
                        frame: sealed.frame,
                    });
                    (tag, record)
                })
                .collect()
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("sealing failed: {e}")))
    }

    /// Seals frames of a file transfer to `peer`, one task for them all, in the version
    /// it gets; `None` for a legacy contact (v1 carries no kinds).
    async fn seal_file_frames(
        &self,
        peer: &str,
        bodies: Vec<Body>,
    ) -> Result<Option<Vec<OutboxRecord>>, ServiceError> {
        let recipient = self.recipient(parse_user(peer, "peer")?, false).await?;
        if recipient.version == Version::V1 {
            return Ok(None);
        }
        let now = now_ms();
        let ready = bodies
            .into_iter()
            .map(|body| {
                let ready = ReadyToSeal {
                    recipient: recipient.clone(),
                    text: String::new(),
                    body: Some(body),
                    timestamp_ms: now,
                };
                ((), ready)
            })
            .collect();
        let mut records = Vec::new();
        for ((), record) in self.seal_controls(ready).await? {
            records.push(record?);
        }
        Ok(Some(records))
    }

    /// Logs the presences that ran out (see [`Store::expire_presences`]).
    pub async fn expire_presences(&self) -> Result<(), ServiceError> {
        let store = &self.p().store;
        if !store.expire_presences(now_ms())?.is_empty() {
            store.commit().await?;
        }
        Ok(())
    }

    /// Before a clean shutdown: tells the contacts "offline" and waits (a little) until the
    /// broker has those frames.
    pub async fn say_offline(&self) {
        if !self.p().transport.is_connected() {
            return;
        }
        // Behind other queued frames it could not go out in time anyway: it stays queued
        // (the next start tells a newer presence after it, and the newer one wins).
        let others_queued = self.p().store.outbox_len() > 0;
        match self.announce_presence(true).await {
            Ok(0) => {}
            Ok(_) if others_queued => {}
            Ok(_) => {
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.p().store.outbox_len() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot tell the contacts this daemon stops"),
        }
    }

    /// The MQTT session's state, to follow.
    pub fn connection(&self) -> watch::Receiver<Connection> {
        self.p().transport.connection()
    }

    /// How often presence is told again.
    pub fn presence_interval(&self) -> Duration {
        self.p().presence_interval
    }

    /// Seals the receipts this daemon owes and queues them in the outbox (one frame per
    /// peer and state, up to [`nes_proto::inner::MAX_RECEIPT_IDS`] ids), until none is
    /// owed or the rest has to wait (the key server cannot be reached). Receipts to a
    /// contact that is legacy now, unknown, or whose keys changed are dropped. Returns how
    /// many receipt frames it queued.
    pub async fn send_receipts_due(&self) -> Result<u64, ServiceError> {
        let store = &self.p().store;
        let mut queued = 0u64;
        loop {
            let due = store.receipts_due(64)?;
            if due.is_empty() {
                return Ok(queued);
            }
            let mut ready = Vec::with_capacity(due.len());
            let mut waiting = false;
            for group in due {
                let Ok(peer) = Username::parse(&group.peer) else {
                    store.drop_receipts(&group)?;
                    continue;
                };
                match self.recipient(peer, false).await {
                    Ok(r) if r.version == Version::V1 => {
                        info!(peer = %group.peer, "receipts dropped: a legacy contact now");
                        store.drop_receipts(&group)?;
                    }
                    Ok(recipient) => {
                        let receipt = nes_proto::inner::Receipt {
                            state: group.state,
                            ids: group.ids.clone(),
                        };
                        ready.push((
                            group,
                            ReadyToSeal {
                                recipient,
                                text: String::new(),
                                body: Some(Body::Receipt(receipt)),
                                timestamp_ms: now_ms(),
                            },
                        ));
                    }
                    Err(ServiceError::Unavailable(why)) => {
                        warn!(peer = %group.peer, %why, "receipts wait: no keys for now");
                        waiting = true;
                    }
                    Err(e) => {
                        info!(peer = %group.peer, error = %e, "receipts dropped");
                        store.drop_receipts(&group)?;
                    }
                }
            }
            for (group, record) in self.seal_controls(ready).await? {
                match record {
                    Ok(record) => {
                        self.p().stats.receipts_sent.fetch_add(1, Ordering::Relaxed);
                        store.queue_receipt(&group, record)?;
                        queued += 1;
                    }
                    Err(e) => {
                        warn!(peer = %group.peer, error = %e, "receipts dropped: cannot seal");
                        store.drop_receipts(&group)?;
                    }
                }
            }
            // Not flushed here: see crate::receipts (a lost queueing is sent again).
            self.p().outbox_wake.notify_one();
            if waiting {
                return Ok(queued);
            }
        }
    }

    /// Step two: stores prepared messages in order, flushes, wakes the outbox. One result
    /// per item, in order; items that failed to prepare keep their error.
    pub async fn commit_sends(
        &self,
        items: Vec<Result<Prepared, ServiceError>>,
    ) -> Vec<Result<Message, ServiceError>> {
        let store = &self.p().store;
        let mut results: Vec<Result<Message, ServiceError>> = items
            .into_iter()
            .map(|item| {
                item.and_then(|p| {
                    let version = p.message.wire_version;
                    let stored = store
                        .insert_outgoing(p.message, p.outbox)
                        .map_err(ServiceError::from);
                    if stored.is_ok() {
                        self.p().stats.add_sealed(version);
                    }
                    stored
                })
            })
            .collect();
        if results.iter().any(Result::is_ok) {
            if let Err(e) = store.commit().await {
                let e = ServiceError::from(e);
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(e.clone());
                }
            }
            self.p().outbox_wake.notify_one();
        }
        results
    }

    /// A conversation, oldest first.
    pub async fn history(
        &self,
        peer: &str,
        limit: u32,
        before_id: &str,
    ) -> Result<Vec<Message>, ServiceError> {
        let peer = parse_user(peer, "peer")?;
        let before = (!before_id.is_empty()).then_some(before_id);
        let mut messages = self
            .p()
            .store
            .history(peer.as_str(), limit as usize, before)?;
        self.p().files.refresh(&mut messages);
        Ok(messages)
    }

    /// Starts sending a file to `to`: checks the recipient first (a legacy contact cannot
    /// receive files, and nothing is kept then), then opens the upload.
    pub async fn begin_file(
        &self,
        to: &str,
        name: &str,
        media_type: &str,
    ) -> Result<FileUpload, ServiceError> {
        let to = parse_user(to, "recipient")?;
        // Only the last component: a path given as a name must not reach the peer.
        let name = std::path::Path::new(name.trim())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        nes_proto::files::check_name(&name)
            .map_err(|e| ServiceError::InvalidArgument(format!("bad file name: {e}")))?;
        let media_type = match media_type.trim() {
            "" => nes_proto::files::guess_media_type(&name).to_owned(),
            m => {
                nes_proto::files::check_media_type(m)
                    .map_err(|e| ServiceError::InvalidArgument(format!("bad media type: {e}")))?;
                m.to_owned()
            }
        };
        let recipient = self.recipient(to.clone(), false).await?;
        if recipient.version == Version::V1 {
            return Err(ServiceError::FailedPrecondition(format!(
                "{to} is a legacy contact (the original client), which cannot receive files; nothing was sent"
            )));
        }
        Ok(FileUpload {
            upload: self.p().files.begin_upload()?,
            to,
            name,
            media_type,
        })
    }

    /// Ends an upload: the file message is stored QUEUED with its offer in the outbox,
    /// and the transfer starts.
    pub async fn finish_file(&self, file: FileUpload) -> Result<Message, ServiceError> {
        let FileUpload {
            upload,
            to,
            name,
            media_type,
        } = file;
        let id = upload.id().to_owned();
        let (size, sha256, path) = tokio::task::spawn_blocking(move || upload.finish())
            .await
            .map_err(|e| ServiceError::Internal(format!("storing the file: {e}")))??;
        let offer = nes_proto::files::FileOffer {
            id: id.clone(),
            name,
            size,
            sha256,
            media_type,
            chunk_size: nes_proto::files::MAX_CHUNK_BYTES,
            probe: 1,
        };
        let recipient = self.recipient(to.clone(), false).await?;
        let ready = ReadyToSeal {
            recipient,
            text: String::new(),
            body: Some(Body::File(offer.clone())),
            timestamp_ms: now_ms(),
        };
        let identity = self.p().identity.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            seal_frame(&identity, &ready).map(|s| (s, ready.timestamp_ms))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("sealing failed: {e}")))?;
        let (sealed, timestamp_ms) = match sealed {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let transfer = crate::store::Transfer::new(
            true,
            to.as_str(),
            nes_proto::files::FileOffer { probe: 0, ..offer },
        );
        let message = Message {
            id: id.clone(),
            from: self.user().to_string(),
            to: to.to_string(),
            peer: to.to_string(),
            direction: Direction::Outgoing,
            content: Content::File(transfer.info(&path.display().to_string())),
            timestamp_ms,
            stored_at_ms: 0,
            state: MessageState::Queued,
            read: true,
            wire_version: sealed.version.number(),
            error: String::new(),
            wants_receipts: true,
        };
        let outbox = OutboxRecord {
            peer: to.to_string(),
            id: sealed.id,
            exactly_once: false,
            frame: sealed.frame,
        };
        let store = &self.p().store;
        let stored = store.insert_outgoing_file(message, outbox, &transfer)?;
        store.commit().await?;
        self.p().stats.add_sealed(sealed.version.number());
        self.p().outbox_wake.notify_one();
        self.p().files.start(&id, 1);
        info!(to = %to, %id, size, "sending a file");
        Ok(stored)
    }

    /// File messages (one peer's, or all), oldest first.
    pub async fn files(&self, peer: &str) -> Result<Vec<Message>, ServiceError> {
        let peer = if peer.trim().is_empty() {
            String::new()
        } else {
            parse_user(peer, "peer")?.to_string()
        };
        self.p().files.list(&peer)
    }

    /// One file message, with its progress.
    pub async fn get_file(&self, id: &str) -> Result<Message, ServiceError> {
        self.p().files.message(id.trim())
    }

    /// The path of a complete file, to stream to a frontend.
    pub async fn file_path(&self, id: &str) -> Result<std::path::PathBuf, ServiceError> {
        self.p().files.readable(id.trim())
    }

    /// Cancels a transfer; the peer is told.
    pub async fn cancel_file(&self, id: &str) -> Result<Message, ServiceError> {
        self.p().files.cancel(id.trim()).await
    }

    /// `max_file_size`.
    pub fn max_file_size(&self) -> u64 {
        self.p().files.max_size()
    }

    /// All conversations, most recent first.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ServiceError> {
        Ok(self.p().store.conversations()?)
    }

    /// Marks a conversation read (all, or up to an id). Returns how many changed.
    pub async fn mark_read(&self, peer: &str, up_to_id: &str) -> Result<u64, ServiceError> {
        let peer = parse_user(peer, "peer")?;
        let up_to = (!up_to_id.is_empty()).then_some(up_to_id);
        let store = &self.p().store;
        let marked = store.mark_read(peer.as_str(), up_to, self.p().read_receipts)?;
        if marked > 0 {
            store.commit().await?;
            self.p().receipts_wake.notify_one();
        }
        Ok(marked)
    }

    /// Every cached contact, with the version it gets as far as known without asking the
    /// key server.
    pub async fn contacts(&self) -> Result<Vec<model::Contact>, ServiceError> {
        Ok(self
            .p()
            .keys
            .list()
            .iter()
            .map(|c| self.shown_contact(c))
            .collect())
    }

    /// One contact, fetched when unknown (or when `refresh`), with the version the next
    /// message to it gets and why; its prekey is asked for when not cached (or `refresh`).
    pub async fn lookup_contact(
        &self,
        username: &str,
        refresh: bool,
    ) -> Result<model::Contact, ServiceError> {
        let user = parse_user(username, "username")?;
        let contact = self
            .p()
            .keys
            .get(&user, refresh)
            .await
            .map_err(lookup_error)?;
        let p = self.p();
        let prekey = if contact.legacy || self.v3_off().is_some() {
            None
        } else if refresh {
            Some(p.peer_prekeys.refresh(&user, &contact.pinned.sign).await)
        } else {
            Some(p.peer_prekeys.get(&user, &contact.pinned.sign).await)
        };
        Ok(self.contact_with_version(&contact, prekey.as_ref()))
    }

    /// `contact` as shown, with what is cached about its prekey.
    fn shown_contact(&self, contact: &Contact) -> model::Contact {
        let prekey = self.p().peer_prekeys.cached(&contact.username);
        self.contact_with_version(contact, prekey.as_ref())
    }

    /// Why this daemon sends no v3 to anyone right now, when it does not.
    fn v3_off(&self) -> Option<&'static str> {
        if !self.p().send_v3 {
            Some("v2: v3 is turned off here (send_v3 = false)")
        } else if self.p().own_prekeys.certificate().is_none() {
            Some("v2: this daemon has no v3 signing certificate (see its log)")
        } else {
            None
        }
    }

    fn contact_with_version(
        &self,
        contact: &Contact,
        prekey: Option<&PeerPrekey>,
    ) -> model::Contact {
        let (version, reason) = version_and_reason(contact.legacy, self.v3_off(), prekey);
        model::Contact {
            frame_version: version,
            frame_version_reason: reason,
            prekey_lost: !contact.legacy && matches!(prekey, Some(PeerPrekey::None { lost: true })),
            presence: self
                .p()
                .store
                .peer_presence(contact.username.as_str())
                .unwrap_or_default(),
            ..contact.shown()
        }
    }

    /// Accepts a contact's new keys and releases the messages held because of the change.
    pub async fn trust_contact(
        &self,
        username: &str,
        message_fp: &str,
        sign_fp: &str,
    ) -> Result<model::Contact, ServiceError> {
        let user = parse_user(username, "username")?;
        let contact = self
            .p()
            .keys
            .trust(&user, message_fp, sign_fp)
            .await
            .map_err(|e| match e {
                TrustError::Unknown(_) => ServiceError::NotFound(e.to_string()),
                TrustError::Mismatch(_) => ServiceError::FailedPrecondition(e.to_string()),
                TrustError::Store(m) => ServiceError::Internal(m),
            })?;
        self.release_held(&user, &contact.pinned.sign).await?;
        Ok(self.shown_contact(&contact))
    }

    /// Opens the held messages of `user` again with its now trusted signing key.
    async fn release_held(
        &self,
        user: &Username,
        sign_key: &nes_proto::PublicKey,
    ) -> Result<(), ServiceError> {
        let store = &self.p().store;
        let held = store.held(user.as_str())?;
        if held.is_empty() {
            return Ok(());
        }
        // The frame version of each message released, counted once the flush is done.
        let mut released: Vec<u32> = Vec::new();
        for h in held {
            let identity = self.p().identity.clone();
            let prekeys = self.p().own_prekeys.snapshot();
            let sign_key = sign_key.clone();
            let frame = h.frame;
            let opened = tokio::task::spawn_blocking(move || {
                frame::open_with(&frame, Some(&identity.message_key), &*prekeys, &sign_key)
            })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
            match opened {
                Ok(o)
                    if o.inner.from.eq_ignore_ascii_case(user.as_str())
                        && o.check_recipient(self.user()).is_ok() =>
                {
                    let version = o.version.number();
                    if store
                        .release_held(user.as_str(), h.seq, o.inner.message)?
                        .is_some()
                    {
                        released.push(version);
                    }
                }
                _ => {
                    self.p().stats.refuse(
                        "signature",
                        "a held message does not verify under the trusted keys",
                    );
                    store.drop_held(user.as_str(), h.seq)?;
                }
            }
        }
        store.commit().await?;
        self.p().receipts_wake.notify_one();
        for &version in &released {
            self.p().stats.add_received(version, 1);
        }
        let released = released.len();
        info!(%user, released, "released held messages");
        Ok(())
    }

    /// Sets whether a contact gets v1 frames.
    pub async fn set_contact_legacy(
        &self,
        username: &str,
        legacy: bool,
    ) -> Result<model::Contact, ServiceError> {
        let user = parse_user(username, "username")?;
        let contact = self
            .p()
            .keys
            .set_legacy(&user, legacy)
            .await
            .map_err(lookup_error)?;
        Ok(self.shown_contact(&contact))
    }

    /// Registers this identity's public keys with the key server; answers what the key
    /// server said, for the user.
    pub async fn register(&self, email: &str) -> Result<String, ServiceError> {
        let email = email.trim();
        let plausible = email.len() <= 254
            && email
                .split_once('@')
                .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            && !email.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plausible {
            return Err(ServiceError::InvalidArgument(format!(
                "{email:?} is not an email address"
            )));
        }
        let identity = &self.p().identity;
        let message = self
            .p()
            .keyserver
            .register(
                &identity.user,
                email,
                &identity.message_key.public_key().to_pem(),
                &identity.sign_key.public_key().to_pem(),
            )
            .await
            .map_err(|e| match e {
                RegisterError::Taken(_) => ServiceError::AlreadyExists(e.to_string()),
                RegisterError::Refused(_) => ServiceError::InvalidArgument(e.to_string()),
                RegisterError::Unavailable(_) => ServiceError::Unavailable(e.to_string()),
            })?;
        // The account becomes active once its mail link is followed: retry from now.
        self.p().own_prekeys.publish_soon();
        Ok(message)
    }

    /// The event stream for a client: like [`Service::events`], after the cursor the
    /// client brings back (a log cursor, or a bare number), once the store has checked
    /// that it is a position in this log. A cursor of another store, beyond the last
    /// event, or of an event this store does not have is refused (FailedPrecondition,
    /// saying what happened and what to do) rather than waited on: waiting would hide
    /// every message until the log reached that number.
    pub fn events_from(
        &self,
        since: Option<&str>,
    ) -> Result<mpsc::Receiver<Result<Arc<Event>, ServiceError>>, ServiceError> {
        let Some(since) = since else {
            return Ok(self.events(None));
        };
        let after = self.p().store.resolve_since(since).map_err(|e| match e {
            CursorError::Store(e) => ServiceError::from(e),
            e @ CursorError::Malformed { .. } => ServiceError::InvalidArgument(e.to_string()),
            e => ServiceError::FailedPrecondition(format!(
                "{e}. Drop the cursor to start from now, or resume from 0 to get every event the log holds"
            )),
        })?;
        Ok(self.events(Some(after)))
    }

    /// The event stream: with `since`, the logged events after that cursor, then live
    /// events, without gap or repeat. A client that falls too far behind gets a
    /// ResourceExhausted error and the stream ends; it resumes with the last cursor.
    pub fn events(&self, since: Option<u64>) -> mpsc::Receiver<Result<Arc<Event>, ServiceError>> {
        // Subscribe before reading the log: whatever is logged after the read is then
        // certain to come through the live channel (events go live only once durable,
        // and the log read stops at the last durable cursor).
        let mut live = self.p().store.subscribe();
        let (tx, rx) = mpsc::channel(EVENT_CLIENT_BUFFER);
        let store = self.p().store.clone();
        let mut shutdown = self.p().shutdown.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            if let Some(since) = since {
                match replay(&store, since, &tx).await {
                    Some(l) => last = l,
                    None => return,
                }
            }
            loop {
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => return,
                    _ = tx.closed() => return,
                    received = live.recv() => match received {
                        Ok(event) => {
                            if event.cursor <= last {
                                continue;
                            }
                            last = event.cursor;
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let e = ServiceError::ResourceExhausted(format!(
                                "this client fell {n} events behind; reconnect with since={last}"
                            ));
                            let _ = tokio::time::timeout(Duration::from_secs(10), tx.send(Err(e))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        rx
    }

    /// Logs a ConnectionChanged event whenever the MQTT session goes up or down. Runs until
    /// the daemon stops.
    pub async fn watch_connection(self) {
        let mut conn = self.p().transport.connection();
        let mut shutdown = self.p().shutdown.clone();
        let mut was_up = false;
        loop {
            let (up, reason) = match &*conn.borrow_and_update() {
                Connection::Up => (true, String::new()),
                Connection::Down(r) => (false, r.clone()),
            };
            if up != was_up {
                was_up = up;
                let store = &self.p().store;
                let kind = EventKind::Connection(ConnectionChanged {
                    connected: up,
                    reason,
                });
                match store.log_event(kind) {
                    Ok(_) => {
                        if let Err(e) = store.commit().await {
                            warn!(error = %e, "cannot log a connection event");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot log a connection event"),
                }
            }
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                changed = conn.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Where a frame to a contact goes, and how it is sealed.
#[derive(Clone)]
struct Recipient {
    to: Username,
    version: Version,
    /// v3: the contact's verified prekey and our certificate.
    prekey: Option<Arc<nes_proto::v3::SignedPrekey>>,
    certificate: Option<Arc<nes_proto::v3::CertificateSecret>>,
    to_key: nes_proto::PublicKey,
}

/// A file being uploaded to be sent ([`Service::begin_file`]).
pub struct FileUpload {
    /// The bytes so far.
    pub upload: crate::files::Upload,
    to: Username,
    name: String,
    media_type: String,
}

impl crate::files::Sender for Service {
    fn connected(&self) -> bool {
        self.p().transport.is_connected()
    }

    async fn queue_controls(
        &self,
        peer: &str,
        due: Vec<crate::files::Due>,
    ) -> Result<(), ServiceError> {
        let Some(records) = self
            .seal_file_frames(peer, due.into_iter().map(Body::from).collect())
            .await?
        else {
            return Ok(());
        };
        self.p().store.queue_frames(records)?;
        self.p().outbox_wake.notify_one();
        Ok(())
    }

    async fn send_chunks(
        &self,
        peer: &str,
        chunks: Vec<nes_proto::files::FileChunk>,
    ) -> Result<(), ServiceError> {
        let Some(records) = self
            .seal_file_frames(peer, chunks.into_iter().map(Body::Chunk).collect())
            .await?
        else {
            return Err(ServiceError::FailedPrecondition(format!(
                "{peer} is a legacy contact now: it cannot receive files"
            )));
        };
        let topic = nes_proto::username::topic_of(peer);
        for record in records {
            // Not through the outbox: a chunk lost on the way is made again from the file.
            let token = crate::mqtt::Token {
                seq: crate::outbox::NO_SEQ,
                peer: record.peer,
                id: record.id,
            };
            self.p()
                .transport
                .publish(token, topic.clone(), false, record.frame)
                .await
                .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            self.p().stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A checked send (a text, a receipt, a presence), waiting to be sealed.
struct ReadyToSeal {
    recipient: Recipient,
    text: String,
    /// `None`: a text.
    body: Option<Body>,
    timestamp_ms: i64,
}

/// What a frame that is not a text carries.
enum Body {
    Receipt(nes_proto::inner::Receipt),
    Presence(nes_proto::inner::PresenceBody),
    File(nes_proto::files::FileOffer),
    Chunk(nes_proto::files::FileChunk),
    FileAck(nes_proto::files::FileAck),
    FileCancel(nes_proto::files::FileCancel),
}

impl From<crate::files::Due> for Body {
    fn from(d: crate::files::Due) -> Body {
        use crate::files::Due;
        match d {
            Due::Ack(_, a) => Body::FileAck(a),
            Due::Cancel(_, c) => Body::FileCancel(c),
            Due::Probe(_, o) => Body::File(o),
        }
    }
}

impl ReadyToSeal {
    fn control(&self) -> Option<nes_proto::inner::Control<'_>> {
        use nes_proto::inner::Control;
        self.body.as_ref().map(|b| match b {
            Body::Receipt(r) => Control::Receipt(r),
            Body::Presence(p) => Control::Presence(p),
            Body::File(f) => Control::File(f),
            Body::Chunk(c) => Control::Chunk(c),
            Body::FileAck(a) => Control::FileAck(a),
            Body::FileCancel(c) => Control::FileCancel(c),
        })
    }
}

/// Seals one text and makes its records (CPU: see [`seal_frame`]): call it on the
/// blocking pool.
fn seal_one(identity: &Identity, ready: ReadyToSeal) -> Result<Prepared, ServiceError> {
    let sealed = seal_frame(identity, &ready)?;
    let to = ready.recipient.to;
    let message = Message {
        id: sealed.id.clone(),
        from: identity.user.to_string(),
        to: to.to_string(),
        peer: to.to_string(),
        direction: Direction::Outgoing,
        content: Content::Text(ready.text),
        timestamp_ms: ready.timestamp_ms,
        stored_at_ms: 0,
        state: MessageState::Queued,
        read: true,
        wire_version: sealed.version.number(),
        error: String::new(),
        wants_receipts: sealed.version != Version::V1,
    };
    let outbox = OutboxRecord {
        peer: to.to_string(),
        id: sealed.id,
        exactly_once: sealed.version == Version::V1,
        frame: sealed.frame,
    };
    Ok(Prepared { message, outbox })
}

/// Seals one frame: v3 needs no RSA private operation (the certificate was signed once
/// per rotation), v1 and v2 one RSA signature and one RSA encryption. Texts in v2 and v3
/// ask for receipts; receipts ask for nothing.
fn seal_frame(identity: &Identity, ready: &ReadyToSeal) -> Result<frame::Sealed, ServiceError> {
    let Recipient {
        to,
        version,
        prekey,
        certificate,
        to_key,
    } = &ready.recipient;
    let draft = Draft {
        control: ready.control(),
        wants_receipts: matches!(ready.body, None | Some(Body::File(_))),
        from: &identity.user,
        to,
        text: &ready.text,
        timestamp_ms: ready.timestamp_ms,
    };
    let too_large = |size: usize| {
        ServiceError::InvalidArgument(format!(
            "the message is too long: its frame would be {size} bytes, the limit is {}",
            frame::MAX_FRAME_BYTES
        ))
    };
    let sealed = match (*version, prekey, certificate) {
        (Version::V3, Some(prekey), Some(certificate)) => {
            nes_proto::v3::seal(&draft, prekey, certificate, now_ms()).map_err(|e| match e {
                nes_proto::v3::V3Error::Frame(FrameError::TooLarge { size }) => too_large(size),
                other => ServiceError::Internal(format!("sealing failed: {other}")),
            })?
        }
        (version, _, _) => {
            let version = if version == Version::V3 {
                Version::V2
            } else {
                version
            };
            frame::seal(version, &draft, to_key, &identity.sign_key).map_err(|e| match e {
                FrameError::TooLarge { size } => too_large(size),
                other => ServiceError::Internal(format!("sealing failed: {other}")),
            })?
        }
    };
    Ok(sealed)
}

/// The frame version a contact gets: v1 to legacy contacts, v3 to one with a valid
/// (verified) prekey while we hold a valid certificate, else v2.
fn choose_version(legacy: bool, has_prekey: bool) -> Version {
    match (legacy, has_prekey) {
        (true, _) => Version::V1,
        (false, true) => Version::V3,
        (false, false) => Version::V2,
    }
}

/// Parses a username from a request.
/// The version (0 when not known yet) the next message to a contact gets, and why: what
/// `nes contacts show` says. The number agrees with `choose_version`.
fn version_and_reason(
    legacy: bool,
    v3_off: Option<&str>,
    prekey: Option<&PeerPrekey>,
) -> (u32, String) {
    if legacy {
        let v = choose_version(true, false);
        return (
            v.number(),
            "v1: marked legacy (the original client); `nes contacts legacy USER off` for v2/v3"
                .into(),
        );
    }
    if let Some(why) = v3_off {
        return (choose_version(false, false).number(), why.into());
    }
    match prekey {
        None => (
            0,
            "not known yet: the contact's prekey is asked for on the next message (or `nes contacts show`)".into(),
        ),
        Some(p) => (
            choose_version(false, matches!(p, PeerPrekey::Valid(_))).number(),
            p.describe(),
        ),
    }
}

fn parse_user(name: &str, what: &str) -> Result<Username, ServiceError> {
    Username::parse(name.trim())
        .map_err(|e| ServiceError::InvalidArgument(format!("bad {what}: {e}")))
}

fn lookup_error(e: LookupError) -> ServiceError {
    match e {
        LookupError::NotFound(_) => ServiceError::NotFound(e.to_string()),
        LookupError::Unavailable { .. } | LookupError::BadAnswer { .. } => {
            ServiceError::Unavailable(e.to_string())
        }
        LookupError::Store(m) => ServiceError::Internal(m),
    }
}

/// Sends the logged events after `since` to a client, oldest first; answers the cursor of
/// the last one sent (`since` when none), or `None` when the client went away or was told
/// of an error (the stream ends there).
///
/// The log has no holes but the ones retention makes at its old end, so a replay that
/// meets one lost events to pruning while it ran (they were past `event_retention` when it
/// started): the client is told, as a refused cursor would be, rather than left with a
/// silent gap. From 0 ("everything the log holds") the first event may be any.
async fn replay(
    store: &Store,
    since: u64,
    tx: &mpsc::Sender<Result<Arc<Event>, ServiceError>>,
) -> Option<u64> {
    let mut last = since;
    let mut next = (since > 0).then_some(since + 1);
    loop {
        let batch = match store.events_after(last, 256) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(ServiceError::Internal(e.to_string()))).await;
                return None;
            }
        };
        if batch.is_empty() {
            return Some(last);
        }
        for event in batch {
            if next.is_some_and(|n| event.cursor != n) {
                let e = ServiceError::FailedPrecondition(format!(
                    "the events after {last} were removed from the log (`event_retention`) while this client replayed them; the messages are still in the history (`nes history`). Resume from now (no cursor), or from 0 for every event the log holds"
                ));
                let _ = tx.send(Err(e)).await;
                return None;
            }
            next = Some(event.cursor + 1);
            last = event.cursor;
            if tx.send(Ok(event)).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_show_the_version_they_get_and_why() {
        let (v, why) = version_and_reason(true, None, None);
        assert_eq!((v, why.starts_with("v1: marked legacy")), (1, true));
        let (v, why) = version_and_reason(false, Some("v2: off"), None);
        assert_eq!((v, why.as_str()), (2, "v2: off"));
        assert_eq!(version_and_reason(false, None, None).0, 0);
        let lost = PeerPrekey::None { lost: true };
        let (v, why) = version_and_reason(false, None, Some(&lost));
        assert_eq!((v, why.contains("HAD v3 prekeys")), (2, true));
        let never = PeerPrekey::None { lost: false };
        let (v, why) = version_and_reason(false, None, Some(&never));
        assert_eq!((v, why.contains("older NES")), (2, true));
        let failed = PeerPrekey::Failed("boom".into());
        assert_eq!(version_and_reason(false, None, Some(&failed)).0, 2);
    }

    #[tokio::test]
    async fn a_replay_that_meets_a_pruned_hole_says_so_instead_of_skipping_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::open_in_test(tmp.path());
        for i in 0..5 {
            let m = crate::store::incoming(&format!("m{i}"), "bob", "t");
            store.insert_incoming(m, None).unwrap();
        }
        store.commit().await.unwrap();
        let replayed = |since: u64| {
            let store = store.clone();
            async move {
                let (tx, mut rx) = mpsc::channel(16);
                let last = replay(&store, since, &tx).await;
                drop(tx);
                let mut got = Vec::new();
                while let Some(item) = rx.recv().await {
                    got.push(item.map(|e| e.cursor).map_err(|e| e.to_string()));
                }
                (last, got)
            }
        };
        // Whole: every event after the cursor, in order.
        assert_eq!(replayed(2).await, (Some(5), vec![Ok(3), Ok(4), Ok(5)]));
        // Events 1-4 pruned (as if while a client that had seen event 1 replayed).
        assert_eq!(store.prune_events(nes_proto::now_ms() + 1000).unwrap(), 4);
        let (last, got) = replayed(1).await;
        assert_eq!(last, None, "the stream ends");
        assert_eq!(got.len(), 1, "{got:?}");
        let why = got[0].as_ref().unwrap_err();
        assert!(why.contains("were removed from the log"), "{why}");
        // From 0 the log starts where it starts.
        assert_eq!(replayed(0).await, (Some(5), vec![Ok(5)]));
        // From the newest removed one, nothing is missing.
        assert_eq!(replayed(4).await, (Some(5), vec![Ok(5)]));
    }

    #[test]
    fn legacy_gets_v1_a_valid_prekey_v3_else_v2() {
        assert_eq!(choose_version(true, true), Version::V1);
        assert_eq!(choose_version(true, false), Version::V1);
        assert_eq!(choose_version(false, true), Version::V3);
        assert_eq!(choose_version(false, false), Version::V2);
    }
}
