//! The MQTT transport: one persistent session with the broker (rumqttc).
//!
//! - The client id is stable per identity and device and the session is not clean, so the
//!   broker keeps what arrives for `nes/<user>/message` while nesd is down.
//! - Incoming publishes are acknowledged by hand ([`Transport::ack`]), and the receive
//!   pipeline does so only after the message is stored and flushed: a crash in between
//!   makes the broker deliver it again, and the store's duplicate check drops the copy.
//! - The event loop never waits for the pipeline, and the pipeline never waits for the
//!   event loop: rumqttc writes our acknowledgements only while its loop is polled, and
//!   a broker may send any number of unacknowledged messages (mosquitto does not always
//!   hold to `max_inflight_messages`), so either wait could close a circle and stall
//!   both. Publishes go to the pipeline over an unbounded channel; acknowledgements go
//!   into rumqttc's request channel without blocking, the surplus into an ordered
//!   overflow queue the loop moves on after each event. Memory stays bounded because the
//!   loop stops reading (stops polling) while more than [`MAX_BACKLOG`] frames wait in
//!   the pipeline, and resumes as the pipeline reports progress ([`Transport::done`]).
//! - Outgoing frames are handed over by the outbox with a [`Token`]; the [`Tracker`]
//!   follows rumqttc's packet ids to tell the outbox when each frame was written to the
//!   broker (SENT) and acknowledged (DELIVERED: PUBACK, or PUBCOMP for QoS 2).
//! - On any connection error the loop waits (exponential backoff with jitter, at most
//!   [`MAX_BACKOFF`]) and reconnects; rumqttc re-sends what was not acknowledged.
//! - The broker connection may be TLS (rustls, the system's roots or one private CA, an
//!   optional client certificate) with a user name and password ([`Security`]).
//! - Packets from the broker are capped just above the frame limit
//!   ([`MAX_INCOMING_PACKET`]), so a huge one is refused from its fixed header instead of
//!   being read whole. In MQTT 3.1.1 the broker cannot be told the cap: rumqttc drops the
//!   connection on such a packet, and a persistent session would get the same packet again
//!   on every reconnect (a poison loop). So after that error the next connection reads up
//!   to MQTT's maximum ([`DRAIN_INCOMING_PACKET`]), the pipeline refuses the oversized
//!   frame and acknowledges it as usual, and once that acknowledgement is written the loop
//!   reconnects with the small cap again. A broker that caps message sizes itself
//!   (`message_size_limit`, docs/BROKER.md) never sends such a packet.
//!
//! This module knows nothing of frames or the API: it moves bytes and reports.

use crate::sync::lock;
use rand::Rng;
use rumqttc::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    StateError,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, trace, warn};

/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// First wait after a connection error.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Largest packet we accept from the broker (its remaining length): a maximal frame plus
/// topic and header. A bigger one is refused from its fixed header, before it is read; see
/// the module docs for how the session gets past it.
pub const MAX_INCOMING_PACKET: usize = nes_proto::frame::MAX_FRAME_BYTES + 1024;
/// The cap for one connection after a packet over [`MAX_INCOMING_PACKET`] broke the
/// previous one: MQTT's own maximum, to read that packet once and acknowledge it away.
pub const DRAIN_INCOMING_PACKET: usize = 268_435_455 + 5;
/// Largest packet we send: a maximal frame plus topic and header.
pub const MAX_OUTGOING_PACKET: usize = nes_proto::frame::MAX_FRAME_BYTES + 1024;
/// Frames handed to the pipeline and not yet handled, above which the loop stops
/// reading from the broker until the pipeline catches up.
pub const MAX_BACKLOG: usize = 256;
/// Capacity of rumqttc's request channel (publishes and acknowledgements).
const REQUEST_CHANNEL: usize = 256;

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

/// How the session is secured: TLS and a login. The default is plain TCP, anonymous.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS settings ([`tls_config`]); `None` is plain TCP.
    pub tls: Option<Arc<ClientConfig>>,
    /// MQTT user name and password (empty for none).
    pub login: Option<(String, String)>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("user", &self.login.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// Why the TLS settings cannot be used. One line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The system's trusted roots could not be loaded.
    #[error("cannot load the system's trusted certificates ({0}); set broker_ca")]
    SystemRoots(String),
    /// rustls refused the client certificate and key.
    #[error("client certificate: {0}")]
    ClientCert(String),
}

/// The TLS client settings: trust only `ca` (PEM) when given, else the system's roots;
/// present `client` (certificate chain, key; PEM) when given.
pub fn tls_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsSetupError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsSetupError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let bad = |path: &Path, what: &str| TlsSetupError::Bad {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    let certs =
        |path: &Path| -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsSetupError> {
            let pem = read(path)?;
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(path, &format!("bad PEM: {e}")))?;
            if certs.is_empty() {
                return Err(bad(
                    path,
                    "no certificate (PEM \"BEGIN CERTIFICATE\") in it",
                ));
            }
            Ok(certs)
        };
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| bad(path, &format!("not a CA certificate: {e}")))?;
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs()
                .map_err(|e| TlsSetupError::SystemRoots(e.to_string()))?;
            roots.add_parsable_certificates(system);
            if roots.is_empty() {
                return Err(TlsSetupError::SystemRoots("none found".into()));
            }
        }
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    match client {
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let pem = read(key)?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| bad(key, &format!("bad PEM: {e}")))?
                .ok_or_else(|| bad(key, "no private key in it"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsSetupError::ClientCert(e.to_string()))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The session's [`Security`] from the resolved settings: reads the PEM files (so a bad
/// one stops nesd at start, not at each reconnect) and warns when a password would
/// travel in the clear to another machine.
pub fn security(
    broker: &crate::config::Broker,
    auth: &crate::config::BrokerAuth,
) -> Result<Security, TlsSetupError> {
    let tls = if broker.tls {
        let client = auth
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        Some(Arc::new(tls_config(auth.ca.as_deref(), client)?))
    } else {
        None
    };
    let login = auth.user.clone().map(|user| {
        (
            user,
            auth.password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default(),
        )
    });
    let loopback = broker.host == "localhost"
        || broker
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !broker.tls && auth.password.is_some() && !loopback {
        warn!(broker = %broker.url(), "the broker password goes to another machine without TLS: use mqtts://");
    }
    Ok(Security { tls, login })
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
        self.queued.len()
            + self.inflight.len()
            + self.releasing.len()
            + usize::from(self.collided.is_some())
    }
}

/// A handle on the MQTT session; clones share it.
#[derive(Clone)]
pub struct Transport {
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    connection: watch::Receiver<Connection>,
    flow: Arc<Flow>,
}

/// Flow control between the event loop and the pipeline (see the module docs).
#[derive(Debug, Default)]
struct Flow {
    /// Acknowledgements that did not fit in rumqttc's request channel, in order.
    overflow: Mutex<VecDeque<Publish>>,
    /// Frames handed to the pipeline and not yet handled.
    backlog: std::sync::atomic::AtomicUsize,
    /// The pipeline handled some frames.
    progress: tokio::sync::Notify,
}

impl Flow {
    /// Moves queued acknowledgements into rumqttc's channel while there is room.
    fn drain(&self, client: &AsyncClient) {
        let mut overflow = lock(&self.overflow);
        while let Some(publish) = overflow.front() {
            if client.try_ack(publish).is_err() {
                break;
            }
            overflow.pop_front();
        }
    }

    fn backlog(&self) -> usize {
        self.backlog.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Transport {
    /// Starts the session (plain TCP, anonymous). Incoming publishes go to `incoming` (to
    /// be acknowledged with [`Transport::ack`]), delivery progress to `deliveries`. The
    /// loop runs until `shutdown` turns true, then disconnects.
    pub fn start(
        config: MqttConfig,
        incoming: mpsc::UnboundedSender<Publish>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        shutdown: watch::Receiver<bool>,
    ) -> (Transport, tokio::task::JoinHandle<()>) {
        Self::start_with(config, Security::default(), incoming, deliveries, shutdown)
    }

    /// Like [`Transport::start`], with TLS and a login.
    pub fn start_with(
        config: MqttConfig,
        security: Security,
        incoming: mpsc::UnboundedSender<Publish>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        shutdown: watch::Receiver<bool>,
    ) -> (Transport, tokio::task::JoinHandle<()>) {
        let mut options =
            MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(config.keep_alive)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
        if let Some(tls) = security.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        if let Some((user, password)) = security.login {
            options.set_credentials(user, password);
        }
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let flow = Arc::new(Flow::default());
        let (state_tx, state_rx) = watch::channel(Connection::Down("connecting".into()));
        let task = tokio::spawn(run(
            config,
            client.clone(),
            eventloop,
            Links {
                tracker: tracker.clone(),
                flow: flow.clone(),
                state: state_tx,
                incoming,
                deliveries,
            },
            shutdown,
        ));
        (
            Transport {
                client,
                tracker,
                connection: state_rx,
                flow,
            },
            task,
        )
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
    pub async fn publish(
        &self,
        token: Token,
        topic: String,
        exactly_once: bool,
        frame: Vec<u8>,
    ) -> Result<(), String> {
        let qos = if exactly_once {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        // Register before handing over: the event loop may write it at once.
        lock(&self.tracker).enqueue(token);
        self.client
            .publish(topic, qos, false, frame)
            .await
            .map_err(|e| e.to_string())
    }

    /// Frames handed over and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        lock(&self.tracker).outstanding()
    }

    /// Acknowledges an incoming publish (after it is stored). Never waits: what does
    /// not fit in rumqttc's channel now is queued, in order, for the event loop.
    pub fn ack(&self, publish: &Publish) {
        let mut overflow = lock(&self.flow.overflow);
        if overflow.is_empty() && self.client.try_ack(publish).is_ok() {
            return;
        }
        overflow.push_back(publish.clone());
    }

    /// The pipeline has handled `n` frames (stored or refused): the loop may read more.
    pub fn done(&self, n: usize) {
        let _ = self.flow.backlog.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |b| Some(b.saturating_sub(n)),
        );
        self.flow.progress.notify_one();
    }
}

/// What the event loop task talks to.
struct Links {
    tracker: Arc<Mutex<Tracker>>,
    flow: Arc<Flow>,
    state: watch::Sender<Connection>,
    incoming: mpsc::UnboundedSender<Publish>,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

async fn run(
    config: MqttConfig,
    client: AsyncClient,
    mut eventloop: EventLoop,
    links: Links,
    mut shutdown: watch::Receiver<bool>,
) {
    let Links {
        tracker,
        flow,
        state,
        incoming,
        deliveries,
    } = links;
    let mut backoff = MIN_BACKOFF;
    let mut subscribed = false;
    // This connection reads up to MQTT's maximum to get past one oversized packet.
    let mut draining = false;
    // The oversized publish read while draining, until its acknowledgement is written.
    let mut poison: Option<u16> = None;
    loop {
        flow.drain(&client);
        if flow.backlog() >= MAX_BACKLOG {
            // Stop reading until the pipeline catches up. Nothing the pipeline does waits
            // for this loop, so it will.
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                _ = flow.progress.notified() => continue,
            }
        }
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
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                if ok {
                    if !subscribed {
                        subscribed = true;
                        info!(topic = %config.topic, "subscribed");
                        state.send_replace(Connection::Up);
                    }
                } else {
                    warn!(topic = %config.topic, "the broker refused the subscription");
                    state.send_replace(Connection::Down(
                        "the broker refused the subscription".into(),
                    ));
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                trace!(
                    pkid = publish.pkid,
                    bytes = publish.payload.len(),
                    dup = publish.dup,
                    "publish in"
                );
                if draining && remaining_length(&publish) > MAX_INCOMING_PACKET {
                    if publish.qos == QoS::AtMostOnce {
                        // Nothing to acknowledge: the broker will not send it again.
                        reconnect_capped(&client, &mut eventloop);
                        draining = false;
                    } else {
                        poison = Some(publish.pkid);
                    }
                }
                flow.backlog
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if incoming.send(publish).is_err() {
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
            Ok(Event::Outgoing(Outgoing::PubAck(pkid))) => {
                trace!(pkid, "puback out");
                if poison == Some(pkid) {
                    // The oversized packet is acknowledged away: back to the small cap.
                    poison = None;
                    draining = false;
                    info!("the oversized packet is acknowledged; reconnecting with the frame-size cap");
                    reconnect_capped(&client, &mut eventloop);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let reason = e.to_string();
                if draining {
                    // One connection at most reads without the cap.
                    draining = false;
                    poison = None;
                    eventloop
                        .mqtt_options
                        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
                }
                if let Some(size) = oversized(&e) {
                    warn!(
                        bytes = size,
                        limit = MAX_INCOMING_PACKET,
                        "the broker sent a packet over the frame-size limit; reading it once to acknowledge it away \
                         (cap message sizes at the broker: docs/BROKER.md)"
                    );
                    draining = true;
                    eventloop
                        .mqtt_options
                        .set_max_packet_size(DRAIN_INCOMING_PACKET, MAX_OUTGOING_PACKET);
                }
                let was = state.borrow().clone();
                if was == Connection::Up {
                    warn!(error = %reason, "lost the broker connection; reconnecting");
                } else if was != Connection::Down(reason.clone()) {
                    // A new reason (a refused login, an untrusted certificate) is worth a
                    // line; the same one again at every retry is not.
                    warn!(broker = %format!("{}:{}", config.host, config.port), error = %reason, "cannot connect to the broker");
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

/// A publish's remaining length, as rumqttc compares it with the cap: topic (with its
/// length), packet id (QoS 1 and 2), payload.
fn remaining_length(p: &Publish) -> usize {
    let pkid = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    2 + p.topic.len() + pkid + p.payload.len()
}

/// The size of the packet, when `e` is rumqttc refusing one over the cap.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// Restores the small cap for the next connection and ends this one (the broker keeps
/// the session; the loop reconnects at once).
fn reconnect_capped(client: &AsyncClient, eventloop: &mut EventLoop) {
    eventloop
        .mqtt_options
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Err(e) = client.try_disconnect() {
        debug!(error = %e, "disconnect not queued");
    }
}

fn jitter(d: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.8..1.2);
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn read_packet<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
        let header = r.read_u8().await?;
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            let b = r.read_u8().await?;
            len += usize::from(b & 0x7f) * mult;
            if b & 0x80 == 0 {
                break;
            }
            mult *= 128;
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        Ok((header, body))
    }

    /// A broker that, once the client subscribed, sends `n` QoS 1 publishes as fast as it
    /// can, without waiting for any acknowledgement (as mosquitto may), and reports each
    /// PUBACK it gets.
    async fn flooding_broker(listener: TcpListener, n: u16, acks: mpsc::UnboundedSender<u16>) {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        loop {
            let Ok((header, body)) = read_packet(&mut rd).await else {
                return;
            };
            match header >> 4 {
                1 => wr.write_all(&[0x20, 2, 0, 0]).await.unwrap(),
                8 => {
                    wr.write_all(&[0x90, 3, body[0], body[1], 1]).await.unwrap();
                    break;
                }
                _ => {}
            }
        }
        tokio::spawn(async move {
            while let Ok((header, body)) = read_packet(&mut rd).await {
                match header >> 4 {
                    4 => {
                        let _ = acks.send(u16::from_be_bytes([body[0], body[1]]));
                    }
                    12 => {} // PINGREQ: no answer needed for this test
                    _ => {}
                }
            }
        });
        let topic = b"nes/me_/message";
        for pkid in 1..=n {
            let payload = format!("frame {pkid}");
            let len = 2 + topic.len() + 2 + payload.len();
            let mut packet = vec![0x32, len as u8];
            packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            packet.extend_from_slice(topic);
            packet.extend_from_slice(&pkid.to_be_bytes());
            packet.extend_from_slice(payload.as_bytes());
            if wr.write_all(&packet).await.is_err() {
                return;
            }
        }
        // Keep the connection open.
        std::future::pending::<()>().await;
    }

    /// The pipeline acknowledges only after its (slow) work, the broker does not wait
    /// for acknowledgements: neither side may wait on the other, and the loop must stop
    /// reading rather than buffer without bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_broker_and_a_slow_pipeline_do_not_stall_each_other() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let n: u16 = 3000;
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        tokio::spawn(flooding_broker(listener, n, acks_tx));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, mut incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, _deliveries) = mpsc::unbounded_channel();
        let config = MqttConfig {
            host: "127.0.0.1".into(),
            port,
            client_id: "flood-test".into(),
            topic: "nes/me_/message".into(),
            keep_alive: Duration::from_secs(30),
        };
        let (transport, task) = Transport::start(config, incoming_tx, deliveries_tx, shutdown);
        let pipeline = transport.clone();
        let consumer = tokio::spawn(async move {
            let mut most_waiting = 0;
            for i in 0..n {
                let Some(publish) = incoming.recv().await else {
                    break;
                };
                assert_eq!(
                    publish.payload.as_ref(),
                    format!("frame {}", i + 1).as_bytes(),
                    "out of order"
                );
                most_waiting = most_waiting.max(incoming.len() + 1);
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await; // slow work
                }
                pipeline.ack(&publish);
                pipeline.done(1);
            }
            most_waiting
        });
        let mut acked = std::collections::BTreeSet::new();
        while acked.len() < usize::from(n) {
            let pkid = tokio::time::timeout(Duration::from_secs(120), acks.recv())
                .await
                .expect("acks stalled")
                .unwrap();
            acked.insert(pkid);
        }
        assert_eq!(acked.first(), Some(&1));
        assert_eq!(acked.last(), Some(&n));
        let most_waiting = consumer.await.unwrap();
        assert!(
            most_waiting <= MAX_BACKLOG + 64,
            "the loop kept reading: {most_waiting} frames waited"
        );
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }

    fn t(n: u64) -> Token {
        Token {
            seq: n,
            peer: "bob".into(),
            id: format!("m{n}"),
        }
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
        assert_eq!(
            tr.written(1),
            vec![Delivery::Delivered(t(1)), Delivery::Sent(t(2))]
        );
        assert_eq!(tr.puback(1), None);
        assert_eq!(tr.puback(1), Some(Delivery::Delivered(t(2))));
        assert_eq!(tr.outstanding(), 0);
    }
}
