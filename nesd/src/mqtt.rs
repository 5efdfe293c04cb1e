//! The MQTT transport: one persistent session with the broker (rumqttc).
//!
//! - The client id is stable per identity and device and the session is not clean, so the
//!   broker keeps what arrives for `nes/<user>/message` while nesd is down.
//! - Incoming publishes are acknowledged by hand ([`Transport::ack`]), and the receive
//!   pipeline does so only after the message is stored and flushed: a crash in between
//!   makes the broker deliver it again, and the store's duplicate check drops the copy.
//! - Outgoing frames are handed over by the outbox with a [`Token`]; the [`Tracker`]
//!   follows rumqttc's packet ids to tell the outbox when each frame was written to the
//!   broker (SENT) and acknowledged (DELIVERED: PUBACK, or PUBCOMP for QoS 2).
//! - On any connection error the loop waits (exponential backoff with jitter, at most
//!   [`MAX_BACKOFF`]) and reconnects; rumqttc re-sends what was not acknowledged.
//!
//! This module knows nothing of frames or the API: it moves bytes and reports.

use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// First wait after a connection error.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Largest packet we accept from the broker. Bigger frames are refused by the pipeline,
/// but the packet itself must be read: a packet rumqttc refuses to read breaks the
/// connection, and the broker would deliver it again on every reconnect, forever. So
/// this is MQTT's own maximum; brokers should cap message sizes themselves.
pub const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;
/// Largest packet we send: a maximal frame plus topic and header.
pub const MAX_OUTGOING_PACKET: usize = nes_proto::frame::MAX_FRAME_BYTES + 1024;

/// Where and who to connect as.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Stable client id.
    pub client_id: String,
    /// The topic to subscribe (QoS 1): `nes/<user>/message`.
    pub topic: String,
    /// Keep-alive interval.
    pub keep_alive: Duration,
}

/// The connection as the rest of the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Connected and subscribed.
    Up,
    /// Not connected, with the last reason.
    Down(String),
}

/// Identifies an outgoing frame to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Outbox sequence number.
    pub seq: u64,
    /// Recipient.
    pub peer: String,
    /// Message id.
    pub id: String,
}

/// Progress of an outgoing frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the broker connection.
    Sent(Token),
    /// Acknowledged by the broker.
    Delivered(Token),
}

/// Follows rumqttc's packet ids back to our tokens.
///
/// rumqttc takes publish requests in order from its channel and reports
/// `Outgoing::Publish(pkid)` when it writes one; a pkid it has not seen in flight is the
/// next request, so the oldest queued token. A known pkid is a re-send after a reconnect.
/// QoS 2 frames move from `inflight` to `releasing` at PUBREC, since rumqttc may reuse
/// their pkid for a new publish before PUBCOMP. When rumqttc finds a pkid still in use
/// ("collision", only with brokers that acknowledge out of order) it reports
/// `AwaitAck(pkid)`, and writes the packet when the old one is acknowledged, reporting the
/// write *before* the acknowledgement.
#[derive(Debug, Default)]
pub struct Tracker {
    queued: VecDeque<Token>,
    inflight: HashMap<u16, Token>,
    releasing: HashMap<u16, Token>,
    collided: Option<(u16, Token)>,
    skip_ack: HashSet<u16>,
}

impl Tracker {
    /// A publish request is about to be handed to rumqttc.
    pub fn enqueue(&mut self, token: Token) {
        self.queued.push_back(token);
    }

    /// rumqttc wrote a publish with `pkid`.
    pub fn written(&mut self, pkid: u16) -> Vec<Delivery> {
        if self.collided.as_ref().is_some_and(|(p, _)| *p == pkid) {
            // The old holder of pkid is being acknowledged right now.
            let mut out = Vec::new();
            if let Some(old) = self.inflight.remove(&pkid) {
                out.push(Delivery::Delivered(old));
                self.skip_ack.insert(pkid);
            }
            if let Some((_, token)) = self.collided.take() {
                self.inflight.insert(pkid, token.clone());
                out.push(Delivery::Sent(token));
            }
            return out;
        }
        if self.inflight.contains_key(&pkid) {
            return Vec::new(); // a re-send after reconnecting
        }
        match self.queued.pop_front() {
            Some(token) => {
                self.inflight.insert(pkid, token.clone());
                vec![Delivery::Sent(token)]
            }
            None => Vec::new(),
        }
    }

    /// rumqttc found `pkid` still in use and parked the next publish.
    pub fn collision(&mut self, pkid: u16) {
        if let Some(token) = self.queued.pop_front() {
            self.collided = Some((pkid, token));
        }
    }

    /// PUBACK (QoS 1).
    pub fn puback(&mut self, pkid: u16) -> Option<Delivery> {
        if self.skip_ack.remove(&pkid) {
            return None;
        }
        self.inflight.remove(&pkid).map(Delivery::Delivered)
    }

    /// PUBREC (QoS 2, first half).
    pub fn pubrec(&mut self, pkid: u16) {
        if let Some(token) = self.inflight.remove(&pkid) {
            self.releasing.insert(pkid, token);
        }
    }

    /// PUBCOMP (QoS 2, done).
    pub fn pubcomp(&mut self, pkid: u16) -> Option<Delivery> {
        if self.skip_ack.remove(&pkid) {
            return None;
        }
        self.releasing.remove(&pkid).map(Delivery::Delivered)
    }

    /// Frames handed over and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.queued.len() + self.inflight.len() + self.releasing.len() + usize::from(self.collided.is_some())
    }
}

/// A handle on the MQTT session; clones share it.
#[derive(Clone)]
pub struct Transport {
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    connection: watch::Receiver<Connection>,
}

impl Transport {
    /// Starts the session. Incoming publishes go to `incoming` (to be acknowledged with
    /// [`Transport::ack`]), delivery progress to `deliveries`. The loop runs until
    /// `shutdown` turns true, then disconnects.
    pub fn start(
        config: MqttConfig,
        incoming: mpsc::Sender<Publish>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        shutdown: watch::Receiver<bool>,
    ) -> (Transport, tokio::task::JoinHandle<()>) {
        let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(config.keep_alive)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
        let (client, eventloop) = AsyncClient::new(options, 256);
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let (state_tx, state_rx) = watch::channel(Connection::Down("connecting".into()));
        let task = tokio::spawn(run(
            config,
            client.clone(),
            eventloop,
            tracker.clone(),
            state_tx,
            incoming,
            deliveries,
            shutdown,
        ));
        (Transport { client, tracker, connection: state_rx }, task)
    }

    /// The connection state, watchable.
    pub fn connection(&self) -> watch::Receiver<Connection> {
        self.connection.clone()
    }

    /// Whether the session is up now.
    pub fn is_connected(&self) -> bool {
        *self.connection.borrow() == Connection::Up
    }

    /// Hands a frame to the session. QoS 2 (`exactly_once`) is for v1 frames, as the
    /// original sends them; v2 goes with QoS 1 (the receiver drops duplicates by id).
    pub async fn publish(&self, token: Token, topic: String, exactly_once: bool, frame: Vec<u8>) -> Result<(), String> {
        let qos = if exactly_once { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        // Register before handing over: the event loop may write it at once.
        lock(&self.tracker).enqueue(token);
        self.client.publish(topic, qos, false, frame).await.map_err(|e| e.to_string())
    }

    /// Frames handed over and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        lock(&self.tracker).outstanding()
    }

    /// Acknowledges an incoming publish (after it is stored).
    pub async fn ack(&self, publish: &Publish) {
        if let Err(e) = self.client.ack(publish).await {
            debug!(error = %e, "ack not sent (stopping)");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The tracker holds plain maps; a panic elsewhere cannot break them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: MqttConfig,
    client: AsyncClient,
    mut eventloop: EventLoop,
    tracker: Arc<Mutex<Tracker>>,
    state: watch::Sender<Connection>,
    incoming: mpsc::Sender<Publish>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut subscribed = false;
    loop {
        let event = tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(broker = %format!("{}:{}", config.host, config.port), session_present = ack.session_present, "connected to the broker");
                backoff = MIN_BACKOFF;
                subscribed = false;
                // Subscribing every time is harmless and covers a broker that lost the
                // session. Not awaited here: this loop is what drains the request channel.
                let client = client.clone();
                let topic = config.topic.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(topic, QoS::AtLeastOnce).await {
                        debug!(error = %e, "subscribe not sent");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                if ok {
                    if !subscribed {
                        subscribed = true;
                        info!(topic = %config.topic, "subscribed");
                        state.send_replace(Connection::Up);
                    }
                } else {
                    warn!(topic = %config.topic, "the broker refused the subscription");
                    state.send_replace(Connection::Down("the broker refused the subscription".into()));
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                debug!(pkid = publish.pkid, bytes = publish.payload.len(), dup = publish.dup, "publish in");
                if incoming.send(publish).await.is_err() {
                    break; // the pipeline is gone: stopping
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let d = lock(&tracker).puback(ack.pkid);
                if let Some(d) = d {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Event::Incoming(Packet::PubRec(rec))) => lock(&tracker).pubrec(rec.pkid),
            Ok(Event::Incoming(Packet::PubComp(comp))) => {
                let d = lock(&tracker).pubcomp(comp.pkid);
                if let Some(d) = d {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let ds = lock(&tracker).written(pkid);
                for d in ds {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => lock(&tracker).collision(pkid),
            Ok(Event::Outgoing(Outgoing::PubAck(pkid))) => debug!(pkid, "puback out"),
            Ok(_) => {}
            Err(e) => {
                let reason = e.to_string();
                if matches!(*state.borrow(), Connection::Up) {
                    warn!(error = %reason, "lost the broker connection; reconnecting");
                } else {
                    debug!(error = %reason, "cannot reach the broker");
                }
                subscribed = false;
                state.send_replace(Connection::Down(reason));
                let wait = jitter(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    // Say goodbye so the broker does not wait for the keep-alive to expire.
    if state.borrow().clone() == Connection::Up {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    state.send_replace(Connection::Down("stopped".into()));
}

fn jitter(d: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.8..1.2);
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u64) -> Token {
        Token { seq: n, peer: "bob".into(), id: format!("m{n}") }
    }

    #[test]
    fn tokens_follow_packet_ids_in_order() {
        let mut tr = Tracker::default();
        for n in 1..=3 {
            tr.enqueue(t(n));
        }
        assert_eq!(tr.written(1), vec![Delivery::Sent(t(1))]);
        assert_eq!(tr.written(2), vec![Delivery::Sent(t(2))]);
        // A reconnect re-sends pkid 1: nothing new.
        assert!(tr.written(1).is_empty());
        assert_eq!(tr.puback(2), Some(Delivery::Delivered(t(2))));
        assert_eq!(tr.puback(1), Some(Delivery::Delivered(t(1))));
        assert_eq!(tr.puback(1), None, "an unknown ack is ignored");
        // pkid 1 is free again and taken by the next frame.
        assert_eq!(tr.written(1), vec![Delivery::Sent(t(3))]);
        assert_eq!(tr.outstanding(), 1);
    }

    #[test]
    fn qos2_frees_its_pkid_at_pubrec() {
        let mut tr = Tracker::default();
        tr.enqueue(t(1));
        tr.enqueue(t(2));
        assert_eq!(tr.written(1), vec![Delivery::Sent(t(1))]);
        tr.pubrec(1);
        // rumqttc may reuse pkid 1 for a QoS 1 frame before PUBCOMP.
        assert_eq!(tr.written(1), vec![Delivery::Sent(t(2))]);
        assert_eq!(tr.pubcomp(1), Some(Delivery::Delivered(t(1))));
        assert_eq!(tr.puback(1), Some(Delivery::Delivered(t(2))));
    }

    #[test]
    fn collisions_resolve_when_the_old_frame_is_acknowledged() {
        let mut tr = Tracker::default();
        tr.enqueue(t(1));
        tr.enqueue(t(2));
        assert_eq!(tr.written(1), vec![Delivery::Sent(t(1))]);
        tr.collision(1);
        // rumqttc reports the parked write before the ack that freed the pkid.
        assert_eq!(tr.written(1), vec![Delivery::Delivered(t(1)), Delivery::Sent(t(2))]);
        assert_eq!(tr.puback(1), None);
        assert_eq!(tr.puback(1), Some(Delivery::Delivered(t(2))));
        assert_eq!(tr.outstanding(), 0);
    }
}
