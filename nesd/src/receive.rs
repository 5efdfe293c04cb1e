//! The receive pipeline: from an MQTT publish to a stored message and an event, applying
//! every rule of docs/PROTOCOL.md "Receiving rules".
//!
//! ```text
//! publish ─▶ lane ─┬─ v1/v2 (RSA): decrypt ahead, a few chunks at once ──────────────┐
//!                  │     └─ falling behind: spill to the inbox, flush, ack; read back ┤
//!                  └─ v3 and frames refused unopened: decrypt ahead ──────────────────┤
//!   one consumer, in each lane's order: ◀────────────────────────────────────────────┘
//!   sender keys (key cache, from memory) ─▶ verify ─▶ `to` ─▶ timestamp ─▶ duplicate?
//!   ─▶ store ─▶ (batch) flush ─▶ ack to the broker ─▶ events go live
//!                 └─ not known yet ─▶ park ─▶ (flush, ack) ... lookup done ─▶ try again
//! ```
//!
//! - Decryption runs on tokio's blocking pool: frames that arrive together are decrypted
//!   together, [`DECRYPT_CHUNK`] per task, with [`DECRYPT_AHEAD`] (RSA) or [`CHEAP_AHEAD`]
//!   chunks in parallel per lane; results are consumed strictly in arrival order within a
//!   lane, so messages of one sender are stored in the order they came (a sender whose
//!   frames change version, v2 to v3, may have the first v3 one overtake the last v2 ones).
//! - Lanes: opening a v1 or v2 frame costs an RSA private operation (~0.8 ms here), a v3
//!   frame does not ([`frame::needs_private_rsa`]). Anyone who knows this identity's
//!   public key can seal v2 frames to it from made-up senders, and they cannot be told
//!   apart before decryption; so RSA frames have their own lane, and when they arrive
//!   faster than it decrypts, the surplus is *spilled* to the store's inbox (flushed, then
//!   acknowledged) and read back in order. The broker's window of unacknowledged messages
//!   therefore never fills with RSA work, and frames of the cheap lane (contacts on v3)
//!   keep arriving and being stored however long the RSA backlog is.
//! - A frame is acknowledged to the broker only after it is flushed to disk (or refused):
//!   a crash in between makes the broker deliver it again and the duplicate check (same
//!   `from` and `id`) drops the second copy. Frames that arrive together are flushed
//!   together.
//! - Every refusal is counted by reason ([`FrameError::reason`] or one of the pipeline's
//!   own: `unknown_sender`, `keyserver_unavailable`, `keyserver_bad_answer`,
//!   `bad_sender`, `duplicate`, `wrong_topic`), logged without frame content, and
//!   acknowledged: it would be refused again.
//! - The ordered path never waits for the key server. A frame from a sender whose keys
//!   are not in memory is *parked* in the store (the batch's parked frames in one write,
//!   flushed with the rest, then acknowledged) and a background lookup is queued
//!   ([`KeyCache::keys_for_frame`]); when it is done the
//!   sender's parked frames are tried again at once, and every [`RETRY_WAITING`] those
//!   whose lookup could not complete (key server down, 429). Later frames of that sender
//!   wait behind it, so per-sender order holds, while frames of known contacts keep
//!   flowing. A sender the key server does not know is remembered (negative cache), so its
//!   next frames are refused (`unknown_sender`) without a lookup. At most
//!   [`crate::store::MAX_WAITING_PER_SENDER`] frames of one sender wait (more are refused,
//!   `parked_too_many`) and [`crate::store::MAX_WAITING`] in all (the oldest makes room,
//!   `parked_evicted`).
//! - Keys fetched for a frame are pinned only once a frame verifies under them: a forged
//!   frame refused for its signature leaves no contact behind.
//! - A signature that fails under the pinned keys makes the key cache ask the key server
//!   once; new keys there put the contact in KEY_CHANGED and messages that verify under
//!   them are stored HELD, without text, until the user trusts the keys.

use crate::identity::Identity;
use crate::keycache::{Contact, FrameKeys, KeyCache};
use crate::model::{Content, Direction, Message, MessageState};
use crate::mqtt::{Incoming, Transport};
use crate::prekeys::OwnPrekeys;
use crate::service::Stats;
use crate::store::{Parked, Store, Waiting};
use nes_proto::frame::{self, Decrypted, FrameError, Opened};
use nes_proto::inner::{Kind, PresenceBody, PresenceStatus, Receipt};
use nes_proto::{now_ms, Username};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

/// Frames that arrive together are decrypted together in one blocking task, up to this
/// many (one thread hand-off per chunk instead of one per frame).
pub const DECRYPT_CHUNK: usize = 8;
/// RSA chunks decrypting ahead of the one being stored (they run in parallel; more
/// would only hold more frames back from the inbox, as two keep both cores busy).
pub const DECRYPT_AHEAD: usize = 2;
/// Cheap chunks decrypting ahead: enough for a whole batch, so that everything the broker
/// has in flight to nesd (one window, however wide the broker lets it run) is decrypted
/// at once and stored with one flush, however it was split into chunks.
pub const CHEAP_AHEAD: usize = MAX_BATCH / DECRYPT_CHUNK;
/// How long frames left in the inbox by the last run wait, at start, for the broker to
/// send again the older frames that run had not acknowledged.
const INBOX_HOLD_AT_START: Duration = Duration::from_secs(3);
/// Most frames stored per flush.
pub const MAX_BATCH: usize = 64;
/// How often frames parked while the key server was down are tried again.
pub const RETRY_WAITING: Duration = Duration::from_secs(5);
/// Most parked frames of one sender tried in one round.
const RETRY_BATCH: usize = 256;
/// Parked frames logged at info level per minute at most.
const PARK_LOGS_PER_MINUTE: u64 = 100;
static PARK_LOG: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64) = (
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
);
/// [`Pipeline::process`]'s `parking` for a parked frame tried again.
const RETRYING: Option<&HashSet<Username>> = None;
/// Most senders with parked frames looked at in one [`RETRY_WAITING`] round.
const RETRY_SENDERS: usize = 4096;

/// What the pipeline works with.
#[derive(Clone)]
pub struct Pipeline {
    /// This identity (its message key decrypts v1 and v2).
    pub identity: Arc<Identity>,
    /// Our v3 prekeys (they decrypt v3).
    pub prekeys: Arc<OwnPrekeys>,
    /// Where messages go.
    pub store: Store,
    /// Senders' keys.
    pub keys: KeyCache,
    /// Refusal counters.
    pub stats: Arc<Stats>,
    /// For acknowledgements.
    pub transport: Transport,
    /// Woken after a flush stored messages (they may owe receipts).
    pub receipts_wake: Arc<tokio::sync::Notify>,
    /// File transfers (offers, chunks, reports, cancellations).
    pub files: crate::files::Files,
}

enum Outcome {
    /// Stored: flush, then ack.
    Stored,
    /// Refused: ack (it would be refused again).
    Refused,
    /// Our own message to ourselves: ack, nothing to store or count.
    Ignored,
    /// To be parked until the sender's keys can be fetched (with why, for the log):
    /// parked with the rest of its batch in one write ([`Store::park_all`]), then flush,
    /// then ack.
    Park(Username, &'static str),
    /// (Retrying a parked frame) the key server still cannot be reached: keep it.
    StillWaiting,
    /// The store failed: do not ack, the broker will deliver it again.
    Failed,
}

/// A frame on its way through the pipeline, and where it came from.
struct Item {
    publish: Incoming,
    /// `Some(seq)`: read back from the inbox (acknowledged to the broker already; removed
    /// from the inbox once handled). `None`: straight from the broker (acknowledge it).
    spilled: Option<u64>,
}

/// A chunk of frames and the job decrypting them, one result per frame.
type Pending = (Vec<Item>, JoinHandle<Vec<Result<Decrypted, FrameError>>>);

/// Decrypts a chunk of frames on the blocking pool.
fn decrypt_chunk(
    identity: &Arc<Identity>,
    prekeys: &OwnPrekeys,
    chunk: &[Item],
) -> JoinHandle<Vec<Result<Decrypted, FrameError>>> {
    let identity = identity.clone();
    // One snapshot per chunk: a rotation meanwhile swaps the map, never changes it.
    let prekeys = prekeys.snapshot();
    let payloads: Vec<_> = chunk.iter().map(|i| i.publish.payload.clone()).collect();
    tokio::task::spawn_blocking(move || {
        payloads
            .iter()
            .map(|payload| frame::decrypt_with(payload, Some(&identity.message_key), &*prekeys))
            .collect()
    })
}

impl Pipeline {
    /// Runs until the transport stops sending or `shutdown` turns true. `resolved` names
    /// senders whose background lookup finished ([`KeyCache::run_lookups`]).
    pub async fn run(
        self,
        mut incoming: mpsc::UnboundedReceiver<Incoming>,
        mut resolved: mpsc::UnboundedReceiver<Username>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Two lanes, each decrypting ahead in parallel and strictly ordered within itself:
        // frames that need an RSA private operation (v1, v2) and those that do not (v3, and
        // frames refused before decryption). One consumer below stores both, so the
        // duplicate check and the per-sender rules see one frame at a time.
        let (cheap_in, cheap_rx) = mpsc::unbounded_channel::<Incoming>();
        let (rsa_in, rsa_rx) = mpsc::unbounded_channel::<Incoming>();
        let (cheap_tx, mut cheap) = mpsc::channel::<Pending>(CHEAP_AHEAD);
        let (rsa_tx, mut rsa) = mpsc::channel::<Pending>(DECRYPT_AHEAD);
        let mut stop = shutdown.clone();
        let routing = tokio::spawn(async move {
            loop {
                let p = tokio::select! {
                    _ = crate::stopped(&mut stop) => break,
                    p = incoming.recv() => match p { Some(p) => p, None => break },
                };
                let lane = if frame::needs_private_rsa(&p.payload) {
                    &rsa_in
                } else {
                    &cheap_in
                };
                if lane.send(p).is_err() {
                    break;
                }
            }
        });
        let cheap_lane = tokio::spawn(cheap_lane(
            self.identity.clone(),
            self.prekeys.clone(),
            cheap_rx,
            cheap_tx,
            shutdown.clone(),
        ));
        let rsa_lane = tokio::spawn(self.clone().rsa_lane(rsa_rx, rsa_tx, shutdown.clone()));
        let mut retry = tokio::time::interval(RETRY_WAITING);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                _ = crate::stopped(&mut shutdown) => break,
                // Finished lookups and the retry round before frames: under a flood the
                // lanes never run dry, and a real sender's parked frame must be tried as
                // soon as its keys are in (before it ages out of the parking area). Names
                // come at most at the lookup rate, so frames are not starved either.
                Some(first) = resolved.recv() => {
                    // Each name once: its refused frames are forgotten after the round.
                    let mut names = vec![first];
                    while names.len() < MAX_BATCH {
                        match resolved.try_recv() {
                            Ok(n) if !names.contains(&n) => names.push(n),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    let mut drops = Vec::new();
                    for from in names {
                        if self.store.has_waiting(from.as_str()).unwrap_or(true) {
                            self.retry_sender(from.as_str(), true, &mut drops).await;
                        }
                    }
                    self.forget_parked(&drops);
                    continue;
                }
                _ = retry.tick() => {
                    // Here, between batches, so that parked frames and new ones of the same
                    // sender are never stored out of order.
                    if self.store.waiting_len() > 0 {
                        let mut drops = Vec::new();
                        for from in self.store.waiting_senders(RETRY_SENDERS) {
                            self.retry_sender(&from, false, &mut drops).await;
                        }
                        self.forget_parked(&drops);
                    }
                    continue;
                }
                p = cheap.recv() => match p { Some(p) => p, None => break },
                p = rsa.recv() => match p { Some(p) => p, None => break },
            };
            let mut frames = first.0.len();
            let mut batch = vec![first];
            // Cheap frames first: taking an RSA chunk waits for its decryption.
            for lane in [&mut cheap, &mut rsa] {
                while frames < MAX_BATCH {
                    match lane.try_recv() {
                        Ok(p) => {
                            frames += p.0.len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
            }
            let from_broker = self.handle(batch).await;
            self.transport.done(from_broker);
        }
        routing.abort();
        cheap_lane.abort();
        rsa_lane.abort();
    }

    /// The lane of frames that need an RSA private operation. While it keeps up, frames go
    /// straight to decryption, as the cheap lane's do. When they arrive faster than it
    /// decrypts, the surplus is *spilled*: written to the store's inbox, flushed and
    /// acknowledged, then read back in order as the lane catches up. Without that, a
    /// backlog of expensive frames (a flood of frames sealed to this identity by anyone)
    /// would fill the broker's window of unacknowledged messages and hold back everything
    /// behind it, including cheap frames from contacts. Order within the lane is arrival
    /// order: frames kept in memory arrived before any spilled ones (spilling starts only
    /// when they are all in decryption) and are decrypted first; a frame that arrives
    /// while spilled ones wait is spilled behind them; if the inbox is full, frames wait
    /// in memory behind it, unacknowledged, and the broker keeps the rest. After a crash
    /// or a reconnect the broker sends the frames that were in memory again, marked DUP:
    /// they go ahead of the inbox, as they came before it.
    async fn rsa_lane(
        self,
        mut input: mpsc::UnboundedReceiver<Incoming>,
        out: mpsc::Sender<Pending>,
        mut stop: watch::Receiver<bool>,
    ) {
        let topic = self.identity.user.topic();
        // Straight from the broker, older than anything in the inbox.
        let mut direct: VecDeque<Incoming> = VecDeque::new();
        // Arrived while the inbox was full: after everything in it.
        let mut behind: VecDeque<Incoming> = VecDeque::new();
        // Inbox frames up to this sequence number are in decryption or done (a restart
        // reads what the last run left there first).
        let mut read_upto = 0u64;
        let mut next: Option<Pending> = None;
        // Frames left in the inbox by the last run came after those it had in memory, which
        // the broker sends again first (DUP) once connected: hold the inbox back until a
        // frame that is not sent again arrives, or for INBOX_HOLD_AT_START.
        let mut hold_until =
            (self.store.inbox_len() > 0).then(|| tokio::time::Instant::now() + INBOX_HOLD_AT_START);
        loop {
            if next.is_none() {
                let held = hold_until.is_some_and(|t| tokio::time::Instant::now() < t);
                if !held {
                    hold_until = None;
                }
                next = self.next_rsa_chunk(&topic, &mut direct, &mut behind, &mut read_upto, held);
            }
            let hold_ends = hold_until.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                biased;
                _ = crate::stopped(&mut stop) => break,
                _ = tokio::time::sleep_until(hold_ends), if hold_until.is_some() && next.is_none() => {
                    hold_until = None;
                }
                permit = out.reserve(), if next.is_some() => {
                    let Ok(permit) = permit else { break };
                    if let Some(p) = next.take() {
                        permit.send(p);
                    }
                }
                p = input.recv() => {
                    let Some(p) = p else { break };
                    let mut arrived = vec![p];
                    while let Ok(p) = input.try_recv() {
                        arrived.push(p);
                    }
                    // A frame the broker sends again (DUP: it was not acknowledged when
                    // the connection or this process ended) came before everything spilled
                    // since; its first copy, if it was spilled, is then a duplicate.
                    let (again, arrived): (Vec<_>, Vec<_>) =
                        arrived.into_iter().partition(|p| p.dup);
                    if !arrived.is_empty() {
                        hold_until = None;
                    }
                    let mut known = 0;
                    for p in again {
                        if self.store.inbox_holds(&p.payload) {
                            // Spilled, and its acknowledgement lost: the inbox copy is
                            // the one that keeps its place.
                            self.transport.ack(&p);
                            known += 1;
                        } else {
                            direct.push_back(p);
                        }
                    }
                    self.transport.done(known);
                    let inbox_unread = self.store.inbox_last_seq() > read_upto;
                    let idle = next.is_none() && direct.is_empty() && behind.is_empty()
                        && !inbox_unread && out.capacity() > 0;
                    let mut arrived = VecDeque::from(arrived);
                    if idle {
                        // Keep what the free decryption slots take now; spill the rest.
                        let take = (out.capacity() * DECRYPT_CHUNK).min(arrived.len());
                        direct.extend(arrived.drain(..take));
                    }
                    if !arrived.is_empty() {
                        if behind.is_empty() {
                            self.spill(&mut arrived).await;
                        }
                        behind.extend(arrived);
                    }
                }
            }
        }
    }

    /// The lane's next chunk: straight frames first, then the inbox in order, then the
    /// frames that waited behind a full inbox.
    fn next_rsa_chunk(
        &self,
        topic: &str,
        direct: &mut VecDeque<Incoming>,
        behind: &mut VecDeque<Incoming>,
        read_upto: &mut u64,
        hold_inbox: bool,
    ) -> Option<Pending> {
        let mut chunk: Vec<Item> = Vec::new();
        if hold_inbox && direct.is_empty() {
            return None;
        }
        if direct.is_empty() && self.store.inbox_last_seq() > *read_upto {
            match self.store.inbox_after(*read_upto, DECRYPT_CHUNK) {
                Ok(spilled) => {
                    for s in spilled {
                        *read_upto = s.seq;
                        chunk.push(Item {
                            publish: Incoming::local(topic, s.frame),
                            spilled: Some(s.seq),
                        });
                    }
                    if chunk.is_empty() {
                        // Nothing after `read_upto`: the inbox is read to its end.
                        *read_upto = self.store.inbox_last_seq();
                    }
                }
                Err(e) => error!(error = %e, "cannot read the inbox; trying again later"),
            }
        }
        if chunk.is_empty() {
            if direct.is_empty() && self.store.inbox_last_seq() <= *read_upto {
                std::mem::swap(direct, behind);
            }
            while chunk.len() < DECRYPT_CHUNK {
                let Some(publish) = direct.pop_front() else {
                    break;
                };
                chunk.push(Item {
                    publish,
                    spilled: None,
                });
            }
        }
        if chunk.is_empty() {
            return None;
        }
        let job = decrypt_chunk(&self.identity, &self.prekeys, &chunk);
        Some((chunk, job))
    }

    /// Writes as many of `frames` as fit to the inbox, flushes, acknowledges them to the
    /// broker, and leaves in `frames` those that did not fit (or all, if the store failed).
    async fn spill(&self, frames: &mut VecDeque<Incoming>) {
        let payloads: Vec<&[u8]> = frames.iter().map(|p| p.payload.as_ref()).collect();
        let fit = self.store.inbox_room(&payloads);
        if fit == 0 {
            return;
        }
        if let Err(e) = self.store.spill(&payloads[..fit]) {
            error!(error = %e, "cannot spill frames to the inbox; they wait in memory");
            return;
        }
        if let Err(e) = self.store.commit_all().await {
            // Not durable: do not acknowledge; the broker will deliver them again, and the
            // copies that made it to the inbox are dropped as duplicates.
            error!(error = %e, "cannot flush the inbox; not acknowledging");
            frames.drain(..fit);
            return;
        }
        for publish in frames.drain(..fit) {
            self.transport.ack(&publish);
        }
        self.transport.done(fit);
        debug!(
            spilled = fit,
            inbox = self.store.inbox_len(),
            "frames spilled to the inbox"
        );
    }

    /// Handles a batch; answers how many of its frames came straight from the broker.
    async fn handle(&self, batch: Vec<Pending>) -> usize {
        let mut to_ack = Vec::new();
        let mut to_unspill = Vec::new();
        let mut from_broker = 0;
        let mut stored = 0u64;
        // Frames to park, in arrival order, and their senders: a later frame of a sender
        // in here parks behind it, as behind one parked already.
        let mut to_park: Vec<(Username, &'static str, Item)> = Vec::new();
        let mut parking: HashSet<Username> = HashSet::new();
        for (items, job) in batch {
            from_broker += items.iter().filter(|i| i.spilled.is_none()).count();
            let results = match job.await {
                Ok(r) => r,
                Err(e) => {
                    // A panic in decryption: the frames would do the same again; drop them.
                    error!(error = %e, "decryption task failed");
                    for item in items {
                        self.stats.refuse("internal", "decryption task failed");
                        done_with(item, &mut to_ack, &mut to_unspill);
                    }
                    continue;
                }
            };
            for (item, decrypted) in items.into_iter().zip(results) {
                match self.process(&item.publish, decrypted, Some(&parking)).await {
                    Outcome::Stored => {
                        stored += 1;
                        done_with(item, &mut to_ack, &mut to_unspill);
                    }
                    Outcome::Park(from, why) => {
                        parking.insert(from.clone());
                        to_park.push((from, why, item));
                    }
                    Outcome::Refused | Outcome::Ignored => {
                        done_with(item, &mut to_ack, &mut to_unspill)
                    }
                    // A spilled frame stays in the inbox and is read again at the next start.
                    Outcome::Failed | Outcome::StillWaiting => {}
                }
            }
        }
        let parked = self.park(to_park, &mut to_ack, &mut to_unspill);
        if stored + parked > 0 {
            // Chunks written in this batch reach the disk before the flush that lets
            // their frames be acknowledged.
            self.files.sync_dirty();
            // commit_all: parked frames log no event, and must be on disk before the ack.
            if let Err(e) = self.store.commit_all().await {
                error!(error = %e, "cannot flush the store; not acknowledging the batch");
                return from_broker;
            }
        }
        for publish in &to_ack {
            self.transport.ack(publish);
        }
        if stored > 0 {
            self.receipts_wake.notify_one();
        }
        for seq in to_unspill {
            if let Err(e) = self.store.inbox_remove(seq) {
                error!(error = %e, "cannot forget an inbox frame");
            }
        }
        from_broker
    }

    /// Parks a batch's frames until their senders' keys are known, in one write (or
    /// refuses those of a sender with too many parked already); answers how many it kept.
    /// Kept and refused frames are done (acknowledged after the flush); if the write
    /// fails none is, and the broker delivers them again.
    fn park(
        &self,
        frames: Vec<(Username, &'static str, Item)>,
        to_ack: &mut Vec<Incoming>,
        to_unspill: &mut Vec<u64>,
    ) -> u64 {
        if frames.is_empty() {
            return 0;
        }
        let payloads: Vec<(&str, &[u8])> = frames
            .iter()
            .map(|(from, _, item)| (from.as_str(), item.publish.payload.as_ref()))
            .collect();
        let answers = match self.store.park_all(&payloads) {
            Ok(a) => a,
            Err(e) => {
                error!(error = %e, frames = frames.len(), "cannot park frames; the broker will deliver them again");
                return 0;
            }
        };
        let mut kept = 0;
        for ((from, why, item), answer) in frames.into_iter().zip(answers) {
            match answer {
                Parked::Kept { evicted } => {
                    kept += 1;
                    debug!(from = %from, "parking a frame: {why}");
                    self.log_parked(&from);
                    if let Some(who) = evicted {
                        self.stats.refuse(
                            "parked_evicted",
                            &format!("the oldest parked frame (claimed sender {who}) made room"),
                        );
                    }
                }
                Parked::TooManyFromSender => {
                    self.refuse(
                        "parked_too_many",
                        &format!("too many frames of {from} wait for its keys ({why})"),
                    );
                }
            }
            done_with(item, to_ack, to_unspill);
        }
        kept
    }

    fn refuse(&self, reason: &str, detail: &str) -> Outcome {
        self.stats.refuse(reason, detail);
        Outcome::Refused
    }

    /// One info line per parked frame for the first few a minute (a flood must not
    /// become a flood of log lines).
    fn log_parked(&self, from: &Username) {
        use std::sync::atomic::Ordering;
        let minute = (now_ms() / 60_000) as u64;
        let (window, count) = &PARK_LOG;
        if window.swap(minute, Ordering::AcqRel) != minute {
            count.store(0, Ordering::Release);
        }
        if count.fetch_add(1, Ordering::AcqRel) < PARK_LOGS_PER_MINUTE {
            info!(from = %from, "frame parked until the sender's keys are known");
        }
    }

    /// Tries the parked frames of `from` again, in order, when its keys are known now (or
    /// refuses them all at once when the key server does not know it); a sender whose keys
    /// still cannot be fetched keeps its frames parked (and, unless `just_looked_up`, gets
    /// a lookup queued). Frames refused unopened go to `drops`, forgotten together by
    /// [`Pipeline::forget_parked`] (one write for a round of names, not one per frame).
    async fn retry_sender(&self, from: &str, just_looked_up: bool, drops: &mut Vec<(String, u64)>) {
        let Ok(user) = Username::parse(from) else {
            // Cannot happen (parked frames have a parsed sender); do not keep it forever.
            self.drop_parked(
                drops,
                from,
                "bad_sender",
                "the parked frame's sender is not a username",
            );
            return;
        };
        match self.keys.keys_for_frame(&user, false) {
            FrameKeys::Waiting => {
                if just_looked_up {
                    debug!(%user, "keys still not available; frames stay parked");
                }
                return;
            }
            FrameKeys::NotFound => {
                self.drop_parked(
                    drops,
                    from,
                    "unknown_sender",
                    &format!("{from} is not registered at the key server"),
                );
                return;
            }
            FrameKeys::BadAnswer(reason) => {
                self.drop_parked(
                    drops,
                    from,
                    "keyserver_bad_answer",
                    &format!("no keys for {from}: {reason}"),
                );
                return;
            }
            FrameKeys::Known(_) | FrameKeys::Candidate(_) => {}
        }
        let waiting = match self.store.waiting_of(from, RETRY_BATCH) {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot read the parked frames");
                return;
            }
        };
        let identity = self.identity.clone();
        let prekeys = self.prekeys.snapshot();
        let decrypted = match tokio::task::spawn_blocking(move || {
            waiting
                .into_iter()
                .map(|w| {
                    let d = frame::decrypt_with(&w.frame, Some(&identity.message_key), &*prekeys);
                    (w, d)
                })
                .collect::<Vec<_>>()
        })
        .await
        {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "decryption task failed");
                return;
            }
        };
        let topic = self.identity.user.topic();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut done: Vec<Waiting> = Vec::new();
        let mut stored = 0usize;
        for (mut w, decrypted) in decrypted {
            if blocked.contains(&w.from) {
                continue;
            }
            let publish = Incoming::local(topic.clone(), std::mem::take(&mut w.frame));
            match self.process(&publish, decrypted, RETRYING).await {
                Outcome::Stored => {
                    stored += 1;
                    done.push(w);
                }
                Outcome::Refused | Outcome::Ignored => done.push(w),
                Outcome::StillWaiting | Outcome::Failed | Outcome::Park(..) => {
                    blocked.insert(w.from.clone());
                }
            }
        }
        if stored > 0 {
            if let Err(e) = self.store.commit().await {
                error!(error = %e, "cannot flush the store; parked frames stay parked");
                return;
            }
            self.receipts_wake.notify_one();
        }
        // Stored first, forgotten after: a crash in between retries a frame whose copy is
        // already stored, and the duplicate check drops it.
        for w in &done {
            if let Err(e) = self.store.unpark(&w.from, w.seq) {
                error!(error = %e, "cannot forget a parked frame");
            }
        }
        if !done.is_empty() {
            info!(
                from,
                handled = done.len(),
                stored,
                still_waiting = self.store.waiting_len(),
                "parked frames tried again"
            );
        }
    }

    /// Refuses every parked frame of `from` without opening them (the answer is the same
    /// for all: the sender is unknown or its keys unusable).
    fn drop_parked(&self, drops: &mut Vec<(String, u64)>, from: &str, reason: &str, detail: &str) {
        for seq in self.store.waiting_seqs(from) {
            self.stats.refuse(reason, detail);
            drops.push((from.to_owned(), seq));
        }
    }

    /// Forgets parked frames refused by [`Pipeline::drop_parked`]. If that fails they are
    /// refused again (and counted again) at the next round or start.
    fn forget_parked(&self, drops: &[(String, u64)]) {
        let keys: Vec<(&str, u64)> = drops
            .iter()
            .map(|(from, seq)| (from.as_str(), *seq))
            .collect();
        if let Err(e) = self.store.unpark_all(&keys) {
            error!(error = %e, frames = keys.len(), "cannot forget parked frames");
        }
    }

    /// One frame through the receiving rules. `parking`: senders whose earlier frames are
    /// about to be parked (they are not in the store yet); [`RETRYING`] when this is a
    /// parked frame tried again, which never parks again.
    async fn process(
        &self,
        publish: &Incoming,
        decrypted: Result<Decrypted, FrameError>,
        parking: Option<&HashSet<Username>>,
    ) -> Outcome {
        let retry = parking.is_none();
        let me = &self.identity.user;
        let size = publish.payload.len();
        if publish.topic != me.topic() {
            return self.refuse(
                "wrong_topic",
                &format!("{size}-byte frame on another topic"),
            );
        }
        let decrypted = match decrypted {
            Ok(d) => d,
            Err(e) => return self.refuse(e.reason(), &describe(&e, size)),
        };
        let from = match Username::parse(&decrypted.inner().from) {
            Ok(u) => u,
            Err(_) => return self.refuse("bad_sender", "the inner `from` is not a username"),
        };
        if let Some(parking) = parking {
            if parking.contains(&from) {
                return Outcome::Park(from, "behind earlier frames of the same sender");
            }
            match self.store.has_waiting(from.as_str()) {
                Ok(false) => {}
                Ok(true) => return Outcome::Park(from, "behind earlier frames of the same sender"),
                Err(e) => {
                    error!(error = %e, "cannot read the parked frames");
                    return Outcome::Failed;
                }
            }
        }
        let (opened, held) = match self.keys.keys_for_frame(&from, true) {
            FrameKeys::NotFound => {
                return self.refuse(
                    "unknown_sender",
                    &format!("{from} is not registered at the key server"),
                )
            }
            FrameKeys::BadAnswer(reason) => {
                return self.refuse(
                    "keyserver_bad_answer",
                    &format!("no keys for {from}: {reason}"),
                )
            }
            FrameKeys::Waiting if retry => return Outcome::StillWaiting,
            FrameKeys::Waiting => return Outcome::Park(from, "waiting for a key server lookup"),
            FrameKeys::Known(contact) => match self.verify(&from, &contact, &decrypted).await {
                Some(found) => found,
                None => return self.refuse("signature", &format!("claimed sender {from}")),
            },
            FrameKeys::Candidate(keys) => {
                // Not pinned yet: only a frame that verifies under them pins them.
                let Ok(opened) = decrypted.clone().verify(&keys.sign) else {
                    return self.refuse(
                        "signature",
                        &format!("claimed sender {from} (its keys are not pinned)"),
                    );
                };
                if let Err(e) = self.keys.pin_verified(&from, *keys).await {
                    error!(error = %e, "cannot pin keys");
                    return Outcome::Failed;
                }
                (opened, false)
            }
        };
        if let Err(e) = opened.check_recipient(me) {
            return self.refuse(e.reason(), &format!("from {from}: {e}"));
        }
        if let Err(e) = opened.check_time(now_ms()) {
            return self.refuse(e.reason(), &format!("from {from}: {e}"));
        }
        if &from == me && !held {
            // A note to self coming back from the broker: the outgoing copy is the record.
            if let Ok(Some(mine)) = self.store.message(me.as_str(), &opened.id) {
                if mine.direction == Direction::Outgoing {
                    return Outcome::Ignored;
                }
            }
        }
        match opened.inner.kind() {
            Kind::Text => {}
            Kind::Receipt(receipt) => return self.receipt(&from, held, receipt),
            Kind::Presence(presence) => {
                return self.presence(&from, held, presence, opened.inner.timestamp)
            }
            Kind::File(_) | Kind::Chunk(_) | Kind::FileAck(_) | Kind::FileCancel(_) => {
                return self.file_frame(&from, held, &opened)
            }
            Kind::Unknown(kind) => {
                return self.refuse(
                    "unknown_kind",
                    &format!(
                        "from {from}: a message of kind {kind:?}, which this release does not know"
                    ),
                )
            }
        }
        if opened.version == frame::Version::V1 {
            // Stored before the v1 id came from the signature, a v1 message is keyed by the
            // hash of its frame bytes: an exact replay of such a frame is a duplicate too.
            if let Ok(Some(_)) = self
                .store
                .message(from.as_str(), &frame::v1_legacy_id(&publish.payload))
            {
                return self.refuse(
                    "duplicate",
                    &format!("from {from}, stored before the upgrade"),
                );
            }
        }
        let message = Message {
            id: opened.id.clone(),
            from: from.to_string(),
            to: me.to_string(),
            peer: from.to_string(),
            direction: Direction::Incoming,
            // A held message shows no text until its sender's new keys are trusted.
            content: Content::Text(if held {
                String::new()
            } else {
                opened.inner.message
            }),
            timestamp_ms: opened.inner.timestamp,
            stored_at_ms: 0,
            state: if held {
                MessageState::Held
            } else {
                MessageState::Received
            },
            read: false,
            wire_version: opened.version.number(),
            // v1 ids are derived, not the sender's: a receipt could not name them.
            wants_receipts: opened.inner.receipts && opened.version != frame::Version::V1,
            error: if held {
                format!("held: the keys of {from} changed; compare fingerprints and trust them to read it")
            } else {
                String::new()
            },
        };
        let version = opened.version.number();
        let held_frame = held.then(|| publish.payload.to_vec());
        match self.store.insert_incoming(message, held_frame) {
            Ok(Some(_)) => {
                if !held {
                    self.stats.add_received(version, 1);
                }
                Outcome::Stored
            }
            Ok(None) => self.refuse("duplicate", &format!("from {from}, id already stored")),
            Err(e) => {
                error!(error = %e, "cannot store a message; the broker will deliver it again");
                Outcome::Failed
            }
        }
    }

    /// A verified receipt from `from`: moves the messages it names forward. One that only
    /// verifies under keys not trusted yet is refused (a receipt is not worth holding).
    fn receipt(&self, from: &Username, held: bool, receipt: &Receipt) -> Outcome {
        if held {
            return self.refuse(
                "receipt_untrusted",
                &format!("a receipt from {from} under keys not trusted yet"),
            );
        }
        if from == &self.identity.user {
            return Outcome::Ignored;
        }
        match self
            .store
            .apply_receipt(from.as_str(), receipt.state, &receipt.ids)
        {
            Ok(moved) => {
                self.stats.add_receipt_received();
                debug!(from = %from, state = receipt.state.as_str(), ids = receipt.ids.len(), moved, "receipt");
                // Flushed before the acknowledgement like a stored message.
                Outcome::Stored
            }
            Err(e) => {
                error!(error = %e, "cannot apply a receipt; the broker will deliver it again");
                Outcome::Failed
            }
        }
    }

    /// A verified frame of a file transfer from `from` ([`crate::files`]).
    fn file_frame(&self, from: &Username, held: bool, opened: &Opened) -> Outcome {
        use crate::files::Handled;
        if held {
            return self.refuse(
                "file_untrusted",
                &format!("a file frame from {from} under keys not trusted yet"),
            );
        }
        if from == &self.identity.user {
            return Outcome::Ignored;
        }
        let files = &self.files;
        let handled = match opened.inner.kind() {
            Kind::File(offer) => files.offer(
                from.as_str(),
                self.identity.user.as_str(),
                offer,
                opened.version.number(),
                opened.inner.receipts,
                opened.inner.timestamp,
            ),
            Kind::Chunk(chunk) => {
                let handled = files.chunk(from.as_str(), chunk);
                if matches!(handled, Handled::Stored) {
                    self.stats
                        .chunks_received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                handled
            }
            Kind::FileAck(report) => files.ack(from.as_str(), report),
            Kind::FileCancel(c) => files.cancelled(from.as_str(), c),
            _ => Handled::Ignored,
        };
        match handled {
            Handled::Stored => Outcome::Stored,
            Handled::Ignored => Outcome::Ignored,
            Handled::Refused(reason, detail) => self.refuse(reason, &detail),
            Handled::Failed(e) => {
                error!(error = %e, "cannot keep a file frame; the broker will deliver it again");
                Outcome::Failed
            }
        }
    }

    /// A verified presence from `from`: kept when newer than the last one heard.
    fn presence(&self, from: &Username, held: bool, p: &PresenceBody, at_ms: i64) -> Outcome {
        if held {
            return self.refuse(
                "presence_untrusted",
                &format!("a presence from {from} under keys not trusted yet"),
            );
        }
        if from == &self.identity.user {
            return Outcome::Ignored;
        }
        let status = crate::model::PresenceStatus::from(p.status);
        let expires = if p.status == PresenceStatus::Offline {
            0
        } else {
            p.expires
        };
        match self
            .store
            .set_peer_presence(from.as_str(), status, &p.note, at_ms, expires)
        {
            Ok(_) => {
                self.stats.add_presence_received();
                Outcome::Stored
            }
            Err(e) => {
                error!(error = %e, "cannot keep a presence; the broker will deliver it again");
                Outcome::Failed
            }
        }
    }

    /// Verifies under the pinned keys; else under keys pending from a change; else asks
    /// the key server once more. The flag is true when only unaccepted keys verify (hold).
    async fn verify(
        &self,
        from: &Username,
        contact: &Contact,
        d: &Decrypted,
    ) -> Option<(Opened, bool)> {
        if let Some(found) = verify_with(contact, d) {
            return Some(found);
        }
        let refreshed = self.keys.refresh_after_bad_signature(from).await?;
        verify_with(&refreshed, d)
    }
}

/// The lane of frames that need no RSA private operation: decrypted in chunks, in
/// parallel, as they come (they are cheap, so the broker's window never fills behind them).
async fn cheap_lane(
    identity: Arc<Identity>,
    prekeys: Arc<OwnPrekeys>,
    mut input: mpsc::UnboundedReceiver<Incoming>,
    out: mpsc::Sender<Pending>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            _ = crate::stopped(&mut stop) => break,
            p = input.recv() => match p { Some(p) => p, None => break },
        };
        let mut chunk = vec![Item {
            publish: first,
            spilled: None,
        }];
        while chunk.len() < DECRYPT_CHUNK {
            match input.try_recv() {
                Ok(publish) => chunk.push(Item {
                    publish,
                    spilled: None,
                }),
                Err(_) => break,
            }
        }
        let job = decrypt_chunk(&identity, &prekeys, &chunk);
        if out.send((chunk, job)).await.is_err() {
            break;
        }
    }
}

/// Where a handled frame's acknowledgement goes: to the broker, or out of the inbox.
fn done_with(item: Item, to_ack: &mut Vec<Incoming>, to_unspill: &mut Vec<u64>) {
    match item.spilled {
        Some(seq) => to_unspill.push(seq),
        None => to_ack.push(item.publish),
    }
}

fn verify_with(contact: &Contact, d: &Decrypted) -> Option<(Opened, bool)> {
    if let Ok(o) = d.clone().verify(&contact.pinned.sign) {
        return Some((o, false));
    }
    let pending = contact.pending.as_ref()?;
    d.clone().verify(&pending.sign).ok().map(|o| (o, true))
}

/// A log line for a frame refused before decryption succeeded (no content).
fn describe(e: &FrameError, size: usize) -> String {
    match e {
        FrameError::TooLarge { .. } => format!(
            "{size}-byte frame is over the {}-byte limit",
            frame::MAX_FRAME_BYTES
        ),
        FrameError::UnsupportedVersion(v) => format!("{size}-byte frame of version {v}"),
        _ => format!("{size}-byte frame"),
    }
}
