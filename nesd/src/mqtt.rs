//! The MQTT transport: one persistent session with the broker (rumqttc), over MQTT 5 where
//! the broker speaks it and MQTT 3.1.1 otherwise.
//!
//! - The client id is stable per identity and device and the session is not clean, so the
//!   broker keeps what arrives for `nes/<user>/message` while nesd is down (MQTT 5: the
//!   CONNECT asks for a session expiry, [`MqttConfig::session_expiry_secs`], since a v5
//!   session otherwise ends at disconnect).
//! - Incoming publishes reach the pipeline as [`Incoming`] (rumqttc's v4 and v5 publishes
//!   are different types) and are acknowledged by hand ([`Transport::ack`]), which the
//!   pipeline does only after the message is stored and flushed: a crash in between makes
//!   the broker deliver it again, and the store's duplicate check drops the copy. Only
//!   the connection a publish came on acknowledges it: after a reconnect the broker sends
//!   it again, and that copy is the one acknowledged (mosquitto would count a second
//!   PUBACK as room for one more message and send newer ones ahead of older ones).
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
//!   broker (SENT), acknowledged (DELIVERED: PUBACK, or PUBCOMP for QoS 2), or refused
//!   (MQTT 5: a PUBACK or PUBREC with a failure code, such as an ACL that denies the write).
//! - On any connection error the loop waits (exponential backoff with jitter, at most
//!   [`MAX_BACKOFF`]) and reconnects; rumqttc re-sends what was not acknowledged.
//! - The broker connection may be TLS (rustls, the system's roots or one private CA, an
//!   optional client certificate) with a user name and password ([`Security`]).
//!
//! **Which version** ([`BrokerProtocol`]): `5` and `3.1.1` are used as set. `auto` (the
//! default) decides at the first connection that gets an answer and keeps the decision for
//! the run. Any MQTT 5 CONNACK (a refused login too) decides 5. rumqttc's v5 decoder cannot
//! read a 3.1.1 broker's answer (`20 02 00 01`: the missing property length reads as "need
//! more bytes"), so a 3.1.1 broker looks like a connection that ends, or times out, before
//! any CONNACK; only then is one 3.1.1 attempt made at once, and only a 3.1.1 CONNACK (any
//! code but "unacceptable protocol version") decides 3.1.1. A broker that is down (the TCP
//! or TLS connection fails) gets no 3.1.1 attempt, and a 3.1.1 attempt that gets no CONNACK
//! decides nothing: the next attempt tries 5 again. So a broker that is down is never taken
//! for an old one.
//!
//! **Oversized packets.** Packets from the broker are capped just above the frame limit
//! ([`MAX_INCOMING_PACKET`]), so a huge one is refused from its fixed header instead of
//! being read whole. MQTT 5 tells the broker that cap (Maximum Packet Size in CONNECT) and
//! a broker that honours it (mosquitto does) drops such a message for this client: it never
//! reaches nesd. In MQTT 3.1.1 the broker cannot be told: rumqttc drops the connection on
//! such a packet, and a persistent session would get the same packet again on every
//! reconnect (a poison loop). So after that error (either version: a v5 broker may ignore
//! the property) the next connection reads up to MQTT's maximum ([`DRAIN_INCOMING_PACKET`]),
//! the pipeline refuses the oversized frame and acknowledges it as usual, and once that
//! acknowledgement is written the loop reconnects with the small cap again. A broker that
//! caps message sizes itself (`message_size_limit`, docs/BROKER.md) never sends such a
//! packet.
//!
//! This module knows nothing of frames or the API: it moves bytes and reports.

pub use crate::config::BrokerProtocol;
use crate::sync::lock;
use prost::bytes::Bytes;
use rand::Rng;
use rumqttc::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as packet5;
use rumqttc::Outgoing;
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
/// The Maximum Packet Size nesd sends in an MQTT 5 CONNECT. MQTT 5 counts the whole packet
/// (fixed header included: at most 5 bytes), while rumqttc compares this same number with
/// the remaining length; so a broker that honours it never sends a packet rumqttc would
/// refuse, and everything within [`MAX_INCOMING_PACKET`] still gets through.
pub const MAX_PACKET_SIZE_V5: u32 = (MAX_INCOMING_PACKET + 5) as u32;
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
/// Our publishes in flight at most (MQTT 5; rumqttc's default for 3.1.1). The broker's
/// Receive Maximum lowers it further.
const OUTGOING_INFLIGHT: u16 = 100;

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
    /// Which MQTT version to speak (`auto`: 5 where the broker speaks it).
    pub protocol: BrokerProtocol,
    /// MQTT 5: how long the broker keeps the session after a disconnect (seconds;
    /// `u32::MAX` is never, as 3.1.1's `clean_session = false`).
    pub session_expiry_secs: u32,
}

impl MqttConfig {
    /// A config with the defaults for the protocol (`auto`) and the session expiry.
    pub fn new(host: &str, port: u16, client_id: &str, topic: &str, keep_alive: Duration) -> Self {
        MqttConfig {
            host: host.to_owned(),
            port,
            client_id: client_id.to_owned(),
            topic: topic.to_owned(),
            keep_alive,
            protocol: BrokerProtocol::Auto,
            session_expiry_secs: crate::config::DEFAULT_SESSION_EXPIRY_SECS,
        }
    }
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
    /// rustls found no protocol version the crypto provider supports (aws-lc-rs supports
    /// both TLS 1.2 and 1.3: a broken build).
    #[error("TLS: {0}")]
    Provider(String),
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
            // Certificates that load are used even if others fail to (an unreadable file
            // in the system's directory); none at all is an error that names the failures.
            let system = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(system.certs);
            if roots.is_empty() {
                let why = match system.errors.first() {
                    Some(e) => e.to_string(),
                    None => "none found".into(),
                };
                return Err(TlsSetupError::SystemRoots(why));
            }
        }
    }
    // aws-lc-rs, named: ring is in the build too (reqwest's TLS), so rustls has no single
    // default provider to pick.
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsSetupError::Provider(e.to_string()))?
    .with_root_certificates(roots);
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

/// The MQTT version a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4; rumqttc's v4 client).
    V311,
    /// MQTT 5.
    V5,
}

impl Version {
    /// `"3.1.1"` or `"5"`, as Status shows it and `broker_protocol` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// How an incoming publish is acknowledged: its packet id and QoS, and the connection it
/// came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pkid: u16,
    /// QoS 2 (PUBREC) rather than QoS 1 (PUBACK).
    exactly_once: bool,
    /// The number of the connection it came on (the loop counts CONNACKs from 1). Only
    /// that connection acknowledges it; see [`Transport::ack`].
    connection: u64,
}

/// A publish from the broker as the pipeline sees it, whatever the MQTT version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The topic it came on.
    pub topic: String,
    /// The frame.
    pub payload: Bytes,
    /// The broker sends it again (it was not acknowledged on an earlier connection).
    pub dup: bool,
    /// What acknowledging it means; `None` for QoS 0 and for frames that did not come from
    /// the broker just now.
    ack: Option<Ack>,
}

impl Incoming {
    /// A frame that is not from the broker now (parked or spilled earlier, read back from
    /// the store): [`Transport::ack`] does nothing with it.
    pub fn local(topic: impl Into<String>, payload: impl Into<Bytes>) -> Incoming {
        Incoming {
            topic: topic.into(),
            payload: payload.into(),
            dup: false,
            ack: None,
        }
    }

    fn from_v4(p: rumqttc::Publish) -> Incoming {
        let ack = (p.qos != rumqttc::QoS::AtMostOnce).then_some(Ack {
            pkid: p.pkid,
            exactly_once: p.qos == rumqttc::QoS::ExactlyOnce,
            connection: 0,
        });
        Incoming {
            topic: p.topic,
            payload: p.payload,
            dup: p.dup,
            ack,
        }
    }

    fn from_v5(p: packet5::Publish) -> Incoming {
        use v5::mqttbytes::QoS;
        let ack = (p.qos != QoS::AtMostOnce).then_some(Ack {
            pkid: p.pkid,
            exactly_once: p.qos == QoS::ExactlyOnce,
            connection: 0,
        });
        Incoming {
            // A topic that is not UTF-8 cannot be ours: the pipeline refuses it as
            // `wrong_topic`, which the lossy text still shows.
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            dup: p.dup,
            ack,
        }
    }

    /// Its remaining length as rumqttc compares it with the cap: topic (with its length),
    /// packet id (QoS 1 and 2), MQTT 5's property length (at least one byte), payload.
    fn remaining_length(&self, version: Version) -> usize {
        let pkid = if self.ack.is_some() { 2 } else { 0 };
        let properties = usize::from(version == Version::V5);
        2 + self.topic.len() + pkid + properties + self.payload.len()
    }
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
    /// Refused by the broker (MQTT 5: a PUBACK or PUBREC with a failure code), with why.
    /// It will not be sent again.
    Refused(Token, String),
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
/// write *before* the acknowledgement. A refusal (MQTT 5) is a PUBACK or PUBREC with a
/// failure code ([`Tracker::refused_one`]); the connection stays up. A publish over the
/// broker's Maximum Packet Size is reported by no event at all: rumqttc drops it with the
/// connection, so [`Tracker::refused`] learns it from the pkids rumqttc still holds.
#[derive(Debug, Default)]
pub struct Tracker {
    queued: VecDeque<Token>,
    inflight: HashMap<u16, Token>,
    releasing: HashMap<u16, Token>,
    collided: Option<(u16, Token)>,
    skip_ack: HashSet<u16>,
}

impl Tracker {
    /// The outbox sequence number of the frame in flight under `pkid`, if any.
    pub fn seq_of(&self, pkid: u16) -> Option<u64> {
        self.inflight
            .get(&pkid)
            .or_else(|| self.releasing.get(&pkid))
            .map(|t| t.seq)
    }

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

    /// The broker refused the publish under `pkid` (MQTT 5: a PUBACK, or a PUBREC for QoS
    /// 2, with a failure code). rumqttc has freed the pkid; it will not send it again.
    pub fn refused_one(&mut self, pkid: u16, reason: &str) -> Option<Delivery> {
        if self.skip_ack.remove(&pkid) {
            return None;
        }
        self.inflight
            .remove(&pkid)
            .map(|token| Delivery::Refused(token, reason.to_owned()))
    }

    /// rumqttc dropped the connection with publishes it will not send again (one over the
    /// broker's Maximum Packet Size). `held` are the pkids rumqttc still holds (to send
    /// again, or with an acknowledgement it has yet to report): every pkid in flight that
    /// is not among them was refused. Without this the tracker would take the next frame
    /// written under that pkid for a re-send of the refused one.
    pub fn refused(&mut self, held: &HashSet<u16>, reason: &str) -> Vec<Delivery> {
        let mut gone: Vec<u16> = self
            .inflight
            .keys()
            .filter(|pkid| !held.contains(pkid))
            .copied()
            .collect();
        gone.sort_unstable();
        gone.into_iter()
            .filter_map(|pkid| {
                self.skip_ack.remove(&pkid);
                self.inflight.remove(&pkid)
            })
            .map(|token| Delivery::Refused(token, reason.to_owned()))
            .collect()
    }

    /// rumqttc dropped the next publish request unsent (MQTT 5: over the broker's Maximum
    /// Packet Size): it will not be written, so the next write is the one after it.
    pub fn refuse_next(&mut self, reason: &str) -> Option<Delivery> {
        self.queued
            .pop_front()
            .map(|token| Delivery::Refused(token, reason.to_owned()))
    }

    /// Frames handed over and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.queued.len()
            + self.inflight.len()
            + self.releasing.len()
            + usize::from(self.collided.is_some())
    }
}

/// rumqttc's client of the version in use: where publishes, acknowledgements and the
/// subscription go.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(v5::AsyncClient),
}

impl Client {
    /// The MQTT version it speaks.
    pub fn version(&self) -> Version {
        match self {
            Client::V311(_) => Version::V311,
            Client::V5(_) => Version::V5,
        }
    }

    async fn publish(
        &self,
        topic: String,
        exactly_once: bool,
        frame: Vec<u8>,
    ) -> Result<(), RequestError> {
        match self {
            Client::V311(c) => {
                let qos = if exactly_once {
                    rumqttc::QoS::ExactlyOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                Ok(c.publish(topic, qos, false, frame).await?)
            }
            Client::V5(c) => {
                let qos = if exactly_once {
                    v5::mqttbytes::QoS::ExactlyOnce
                } else {
                    v5::mqttbytes::QoS::AtLeastOnce
                };
                Ok(c.publish(topic, qos, false, frame).await?)
            }
        }
    }

    /// Queues an acknowledgement without waiting; false when rumqttc's channel is full.
    /// rumqttc builds it from a publish, of which it reads only the pkid and QoS: a
    /// skeleton without topic or payload is enough.
    fn try_ack(&self, ack: Ack) -> bool {
        match self {
            Client::V311(c) => {
                let qos = if ack.exactly_once {
                    rumqttc::QoS::ExactlyOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                let mut p = rumqttc::Publish::new("", qos, Vec::new());
                p.pkid = ack.pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V5(c) => {
                let qos = if ack.exactly_once {
                    v5::mqttbytes::QoS::ExactlyOnce
                } else {
                    v5::mqttbytes::QoS::AtLeastOnce
                };
                let mut p = packet5::Publish::new("", qos, Vec::new(), None);
                p.pkid = ack.pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    async fn subscribe(&self, topic: String) -> Result<(), RequestError> {
        match self {
            Client::V311(c) => Ok(c.subscribe(topic, rumqttc::QoS::AtLeastOnce).await?),
            Client::V5(c) => Ok(c.subscribe(topic, v5::mqttbytes::QoS::AtLeastOnce).await?),
        }
    }

    fn try_disconnect(&self) -> Result<(), RequestError> {
        match self {
            Client::V311(c) => Ok(c.try_disconnect()?),
            Client::V5(c) => Ok(c.try_disconnect()?),
        }
    }
}

/// Why a request (a publish, the subscription, a disconnect) was not handed to rumqttc's
/// event loop. A type rather than rumqttc's two `ClientError`s (one per MQTT version) so
/// that callers see one error, named for what went wrong, and so that it does not carry
/// the refused request: a publish's would hold the frame, which must stay out of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No client yet: `auto` has not decided which MQTT version the broker speaks.
    #[error("no MQTT version decided yet (never connected)")]
    NoVersionYet,
    /// The event loop's request channel is closed: the loop has stopped.
    #[error("the MQTT event loop has stopped")]
    LoopStopped,
    /// A request that does not wait (`try_`) found the channel full or closed.
    #[error("the MQTT event loop's request queue is full or closed")]
    NotQueued,
}

impl From<rumqttc::ClientError> for RequestError {
    fn from(e: rumqttc::ClientError) -> Self {
        match e {
            rumqttc::ClientError::Request(_) => RequestError::LoopStopped,
            rumqttc::ClientError::TryRequest(_) => RequestError::NotQueued,
        }
    }
}

impl From<v5::ClientError> for RequestError {
    fn from(e: v5::ClientError) -> Self {
        match e {
            v5::ClientError::Request(_) => RequestError::LoopStopped,
            v5::ClientError::TryRequest(_) => RequestError::NotQueued,
        }
    }
}

/// A handle on the MQTT session; clones share it.
#[derive(Clone)]
pub struct Transport {
    /// The client of the version in use; `None` until `auto` has decided.
    client: watch::Receiver<Option<Client>>,
    tracker: Arc<Mutex<Tracker>>,
    connection: watch::Receiver<Connection>,
    flow: Arc<Flow>,
}

/// Flow control between the event loop and the pipeline (see the module docs).
#[derive(Debug, Default)]
struct Flow {
    /// Acknowledgements that did not fit in rumqttc's request channel, in order.
    overflow: Mutex<VecDeque<Ack>>,
    /// Frames handed to the pipeline and not yet handled.
    backlog: std::sync::atomic::AtomicUsize,
    /// The pipeline handled some frames.
    progress: tokio::sync::Notify,
    /// The connection whose publishes may be acknowledged: the one up now, 0 while none is
    /// (see [`Transport::ack`]). Changed under `overflow`'s lock.
    acking: std::sync::atomic::AtomicU64,
}

impl Flow {
    /// Moves queued acknowledgements into rumqttc's channel while there is room, dropping
    /// those of an earlier connection.
    fn drain(&self, client: &Client) {
        let mut overflow = lock(&self.overflow);
        while let Some(ack) = overflow.front() {
            if self.current(ack) && !client.try_ack(*ack) {
                break;
            }
            overflow.pop_front();
        }
    }

    /// Whether `ack` is for a publish of the connection up now.
    fn current(&self, ack: &Ack) -> bool {
        ack.connection != 0
            && ack.connection == self.acking.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Publishes of `connection` (0: none) may be acknowledged from now on.
    fn ack_for(&self, connection: u64) {
        let _overflow = lock(&self.overflow);
        self.acking
            .store(connection, std::sync::atomic::Ordering::Release);
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
        incoming: mpsc::UnboundedSender<Incoming>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        shutdown: watch::Receiver<bool>,
    ) -> (Transport, tokio::task::JoinHandle<()>) {
        Self::start_with(config, Security::default(), incoming, deliveries, shutdown)
    }

    /// Like [`Transport::start`], with TLS and a login.
    pub fn start_with(
        config: MqttConfig,
        security: Security,
        incoming: mpsc::UnboundedSender<Incoming>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        shutdown: watch::Receiver<bool>,
    ) -> (Transport, tokio::task::JoinHandle<()>) {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let flow = Arc::new(Flow::default());
        let (state_tx, state_rx) = watch::channel(Connection::Down("connecting".into()));
        let (client_tx, client_rx) = watch::channel(None);
        let task = tokio::spawn(run(
            config,
            security,
            Links {
                tracker: tracker.clone(),
                flow: flow.clone(),
                state: state_tx,
                client: client_tx,
                incoming,
                deliveries,
            },
            shutdown,
        ));
        (
            Transport {
                client: client_rx,
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

    /// The MQTT version in use: the one set, or the one `auto` decided; `None` while
    /// `auto` has not decided yet (no broker answered).
    pub fn protocol(&self) -> Option<Version> {
        self.client.borrow().as_ref().map(Client::version)
    }

    /// Hands a frame to the session. QoS 2 (`exactly_once`) is for v1 frames, as the
    /// original sends them; v2 goes with QoS 1 (the receiver drops duplicates by id).
    pub async fn publish(
        &self,
        token: Token,
        topic: String,
        exactly_once: bool,
        frame: Vec<u8>,
    ) -> Result<(), RequestError> {
        // Cloned out: the watch's lock must not be held across the await below.
        let client = self.client.borrow().clone();
        let Some(client) = client else {
            return Err(RequestError::NoVersionYet);
        };
        // Register before handing over: the event loop may write it at once.
        lock(&self.tracker).enqueue(token);
        client.publish(topic, exactly_once, frame).await
    }

    /// Frames handed over and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        lock(&self.tracker).outstanding()
    }

    /// Acknowledges an incoming publish (after it is stored). Never waits: what does
    /// not fit in rumqttc's channel now is queued, in order, for the event loop. Does
    /// nothing for a frame that needs no acknowledgement ([`Incoming::local`], QoS 0).
    ///
    /// Nor for a publish of an earlier connection: the broker sends every publish that
    /// connection left unacknowledged again on the next one (same packet id, DUP; both
    /// MQTT versions require it of a session that is kept), and that copy is acknowledged
    /// when the pipeline has handled it (as a duplicate). Acknowledging both would
    /// acknowledge one packet id twice, and mosquitto (2.0.11, and still 2.0.20) counts
    /// every PUBACK as a free slot in the client's window, even one for a packet id it no
    /// longer holds: the window grows past what is free, and a message that arrives then
    /// goes to the client at once, ahead of the older ones queued for it. That reordered
    /// messages at the recipient in the soak over MQTT 5 (a broker restart: messages
    /// 238..281 after 282..289 by the broker's packet ids). If the session was not kept,
    /// the old packet id means nothing on the new connection, or another message.
    ///
    /// One window is left: an acknowledgement handed to rumqttc between rumqttc's noticing
    /// the broken connection (it moves its request channel into its re-send queue then)
    /// and the loop's seeing the error stays in the channel and goes out on the next
    /// connection.
    pub fn ack(&self, incoming: &Incoming) {
        let Some(ack) = incoming.ack else { return };
        let mut overflow = lock(&self.flow.overflow);
        if !self.flow.current(&ack) {
            trace!(
                pkid = ack.pkid,
                "not acknowledging a publish of an earlier connection (the broker sends it again)"
            );
            return;
        }
        if overflow.is_empty() {
            // A publish came in, so a version was decided and this is its client.
            if let Some(client) = self.client.borrow().as_ref() {
                if client.try_ack(ack) {
                    return;
                }
            }
        }
        overflow.push_back(ack);
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
    client: watch::Sender<Option<Client>>,
    incoming: mpsc::UnboundedSender<Incoming>,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

/// What the event loop reports, whatever the version.
#[derive(Debug)]
enum Ev {
    /// The broker accepted the CONNECT.
    ConnAck { session_present: bool },
    /// The subscription was answered (3.1.1: `ok` false when refused; MQTT 5 reports a
    /// refusal as an error).
    SubAck { ok: bool },
    /// A publish from the broker.
    Publish(Incoming),
    /// PUBACK of our publish.
    PubAck(u16),
    /// PUBREC of our QoS 2 publish.
    PubRec(u16),
    /// MQTT 5: a PUBACK or PUBREC of our publish with a failure code (its name).
    PublishRefused { pkid: u16, why: String },
    /// PUBCOMP of our QoS 2 publish.
    PubComp(u16),
    /// rumqttc wrote our publish with this pkid.
    Written(u16),
    /// rumqttc parked a publish: this pkid is still in use.
    Collision(u16),
    /// rumqttc wrote our acknowledgement of this pkid.
    AckWritten(u16),
    /// rumqttc wrote a DISCONNECT.
    Disconnected,
    /// Nothing the loop acts on (pings and the like).
    Other,
}

/// A connection error, with what the loop needs to know about it.
#[derive(Debug)]
struct Failure {
    /// rumqttc's error, for the log and Status.
    reason: String,
    kind: FailureKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FailureKind {
    /// The TCP or TLS connection failed (the broker is down, the name unknown, its
    /// certificate untrusted): nothing was said about MQTT versions.
    Unreached,
    /// The connection was made but ended, or timed out, before a CONNACK could be read
    /// (how a 3.1.1 broker's answer to an MQTT 5 CONNECT looks to rumqttc). A timeout is
    /// counted here although it may have been the TCP connect: the worst that does is one
    /// 3.1.1 attempt too many, which decides nothing unless the broker answers it.
    NoConnAck,
    /// The broker answered the CONNECT and refused it. `bad_version`: 3.1.1's
    /// "unacceptable protocol version", which decides nothing.
    Refused { bad_version: bool },
    /// A packet over the cap, of this size.
    Oversized(usize),
    /// MQTT 5: one of our publishes is over the broker's Maximum Packet Size (why);
    /// rumqttc dropped it, unsent, with the connection.
    TooLargeForBroker(String),
    /// Anything else.
    Other,
}

impl Failure {
    fn v4(e: rumqttc::ConnectionError) -> Failure {
        use rumqttc::ConnectionError as E;
        let kind = match &e {
            E::ConnectionRefused(code) => FailureKind::Refused {
                bad_version: *code == rumqttc::ConnectReturnCode::RefusedProtocolVersion,
            },
            E::MqttState(rumqttc::StateError::Deserialization(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
            )) => FailureKind::Oversized(*n),
            E::NetworkTimeout | E::NotConnAck(_) => FailureKind::NoConnAck,
            // rumqttc reads and writes through a codec: a socket's errors come back as
            // the codec's, and a connection closed by the peer as `ConnectionAborted`.
            E::MqttState(rumqttc::StateError::ConnectionAborted) => FailureKind::NoConnAck,
            E::Io(io)
            | E::MqttState(rumqttc::StateError::Io(io))
            | E::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::Io(
                io,
            ))) => io_kind(io),
            _ => FailureKind::Other,
        };
        Failure {
            reason: e.to_string(),
            kind,
        }
    }

    fn v5(e: v5::ConnectionError) -> Failure {
        use v5::{ConnectionError as E, StateError as S};
        let kind = match &e {
            // Any MQTT 5 CONNACK, a refusal too, shows the broker speaks 5.
            E::ConnectionRefused(_) => FailureKind::Refused { bad_version: false },
            E::MqttState(S::IncomingPacketTooLarge { pkt_size, .. }) => {
                FailureKind::Oversized(*pkt_size)
            }
            E::MqttState(S::Deserialization(v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                pkt_size,
                ..
            })) => FailureKind::Oversized(*pkt_size),
            E::MqttState(S::OutgoingPacketTooLarge { pkt_size, max }) => {
                FailureKind::TooLargeForBroker(format!(
                    "{pkt_size} bytes, over the broker's maximum packet size of {max}"
                ))
            }
            E::Timeout(_) | E::NotConnAck(_) => FailureKind::NoConnAck,
            // As for 3.1.1 above.
            E::MqttState(S::ConnectionAborted) => FailureKind::NoConnAck,
            E::Io(io)
            | E::MqttState(S::Io(io))
            | E::MqttState(S::Deserialization(v5::mqttbytes::Error::Io(io))) => io_kind(io),
            _ => FailureKind::Other,
        };
        Failure {
            reason: e.to_string(),
            kind,
        }
    }
}

/// An I/O error in the connect phase: after the connection was made (the peer closed it,
/// or sent what does not decode), or before.
fn io_kind(e: &std::io::Error) -> FailureKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset
        | K::ConnectionAborted
        | K::UnexpectedEof
        | K::BrokenPipe
        | K::InvalidData => FailureKind::NoConnAck,
        _ => FailureKind::Unreached,
    }
}

/// rumqttc's event loop of the version in use.
// One of each lives for the run at most, so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Loop {
    V311(rumqttc::EventLoop),
    V5(v5::EventLoop),
}

impl Loop {
    async fn poll(&mut self) -> Result<Ev, Failure> {
        match self {
            Loop::V311(l) => l.poll().await.map(ev_v4).map_err(Failure::v4),
            Loop::V5(l) => l.poll().await.map(ev_v5).map_err(Failure::v5),
        }
    }

    /// The cap on incoming packets for the next connection: the small one, or
    /// [`DRAIN_INCOMING_PACKET`]. MQTT 5 sends it to the broker too.
    fn set_incoming_cap(&mut self, drain: bool) {
        match self {
            Loop::V311(l) => {
                let cap = if drain {
                    DRAIN_INCOMING_PACKET
                } else {
                    MAX_INCOMING_PACKET
                };
                l.mqtt_options.set_max_packet_size(cap, MAX_OUTGOING_PACKET);
            }
            Loop::V5(l) => {
                let cap = if drain {
                    DRAIN_INCOMING_PACKET as u32
                } else {
                    MAX_PACKET_SIZE_V5
                };
                l.options.set_max_packet_size(Some(cap));
            }
        }
    }

    /// The cap rumqttc applies to an incoming packet's remaining length now.
    fn small_cap(&self) -> usize {
        match self {
            Loop::V311(_) => MAX_INCOMING_PACKET,
            Loop::V5(_) => MAX_PACKET_SIZE_V5 as usize,
        }
    }

    /// After a connection error (MQTT 5): sorts the publishes rumqttc will send again by
    /// `seq` (the outbox's order), keeping the other
    /// requests (PUBREL) after them as rumqttc queued them. The v4 state already keeps
    /// that order.
    fn order_pending(&mut self, seq: impl Fn(u16) -> Option<u64>) {
        if let Loop::V5(l) = self {
            let (mut publishes, others): (Vec<v5::Request>, Vec<v5::Request>) = l
                .pending
                .drain(..)
                .partition(|r| matches!(r, v5::Request::Publish(_)));
            // Known to the tracker: by seq. Written but not reported yet (their event
            // still buffered): after those, in pkid order counted on from the newest
            // known one (pkids go round). Not written yet (pkid 0, from the channel): last,
            // as queued. The sort is stable.
            let newest = publishes
                .iter()
                .filter_map(|r| match r {
                    v5::Request::Publish(p) => seq(p.pkid).map(|s| (s, p.pkid)),
                    _ => None,
                })
                .max()
                .map(|(_, pkid)| pkid)
                .unwrap_or(0);
            publishes.sort_by_key(|r| match r {
                v5::Request::Publish(p) => match (seq(p.pkid), p.pkid) {
                    (Some(s), _) => (0, s),
                    (None, 0) => (2, 0),
                    (None, pkid) => (1, u64::from(pkid.wrapping_sub(newest))),
                },
                _ => (2, 0),
            });
            l.pending.extend(publishes);
            l.pending.extend(others);
        }
    }

    /// After a connection error: drops our acknowledgements of incoming publishes that
    /// rumqttc moved from its channel to `pending` for the next connection. They were
    /// for publishes of the broken one, which the broker sends again (see
    /// [`Transport::ack`]).
    fn drop_acks(&mut self) {
        let dropped = match self {
            Loop::V311(l) => {
                let before = l.pending.len();
                l.pending.retain(|r| {
                    !matches!(r, rumqttc::Request::PubAck(_) | rumqttc::Request::PubRec(_))
                });
                before - l.pending.len()
            }
            Loop::V5(l) => {
                let before = l.pending.len();
                l.pending
                    .retain(|r| !matches!(r, v5::Request::PubAck(_) | v5::Request::PubRec(_)));
                before - l.pending.len()
            }
        };
        if dropped > 0 {
            trace!(
                dropped,
                "acknowledgements for the broken connection not sent (the broker sends those publishes again)"
            );
        }
    }

    /// The publishes rumqttc will send again, in order: pkid and outbox sequence number
    /// (when the tracker knows it). For the log.
    fn resend_order(&self, seq: impl Fn(u16) -> Option<u64>) -> Vec<(u16, Option<u64>)> {
        let pkids: Vec<u16> = match self {
            Loop::V311(l) => l
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::Request::Publish(p) => Some(p.pkid),
                    _ => None,
                })
                .collect(),
            Loop::V5(l) => l
                .pending
                .iter()
                .filter_map(|r| match r {
                    v5::Request::Publish(p) => Some(p.pkid),
                    _ => None,
                })
                .collect(),
        };
        pkids.into_iter().map(|pkid| (pkid, seq(pkid))).collect()
    }

    /// After a connection error: the pkids of our publishes rumqttc still holds, to send
    /// again (moved to `pending`) or with an acknowledgement read before the error and not
    /// reported yet (buffered events). Only MQTT 5 refuses publishes.
    fn held_pkids(&self) -> HashSet<u16> {
        let mut held = HashSet::new();
        if let Loop::V5(l) = self {
            for request in &l.pending {
                if let v5::Request::Publish(p) = request {
                    held.insert(p.pkid);
                }
            }
            for event in &l.state.events {
                match event {
                    v5::Event::Incoming(packet5::Packet::PubAck(a)) => {
                        held.insert(a.pkid);
                    }
                    v5::Event::Incoming(packet5::Packet::PubRec(r)) => {
                        held.insert(r.pkid);
                    }
                    _ => {}
                }
            }
        }
        held
    }
}

fn ev_outgoing(o: Outgoing) -> Ev {
    match o {
        Outgoing::Publish(pkid) => Ev::Written(pkid),
        Outgoing::AwaitAck(pkid) => Ev::Collision(pkid),
        Outgoing::PubAck(pkid) | Outgoing::PubRec(pkid) => Ev::AckWritten(pkid),
        Outgoing::Disconnect => Ev::Disconnected,
        _ => Ev::Other,
    }
}

fn ev_v4(e: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Packet};
    match e {
        Event::Incoming(Packet::ConnAck(a)) => Ev::ConnAck {
            session_present: a.session_present,
        },
        Event::Incoming(Packet::SubAck(a)) => Ev::SubAck {
            ok: a
                .return_codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Incoming::from_v4(p)),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
        Event::Incoming(Packet::PubRec(r)) => Ev::PubRec(r.pkid),
        Event::Incoming(Packet::PubComp(c)) => Ev::PubComp(c.pkid),
        Event::Incoming(_) => Ev::Other,
        Event::Outgoing(o) => ev_outgoing(o),
    }
}

fn ev_v5(e: v5::Event) -> Ev {
    use packet5::Packet;
    match e {
        v5::Event::Incoming(Packet::ConnAck(a)) => Ev::ConnAck {
            session_present: a.session_present,
        },
        // rumqttc reports a refused subscription as an error, so a SUBACK here is success.
        v5::Event::Incoming(Packet::SubAck(_)) => Ev::SubAck { ok: true },
        v5::Event::Incoming(Packet::Publish(p)) => Ev::Publish(Incoming::from_v5(p)),
        v5::Event::Incoming(Packet::PubAck(a)) => {
            use packet5::PubAckReason as R;
            let ok = matches!(a.reason, R::Success | R::NoMatchingSubscribers);
            answered(a.pkid, ok, a.reason, Ev::PubAck)
        }
        v5::Event::Incoming(Packet::PubRec(r)) => {
            use packet5::PubRecReason as R;
            let ok = matches!(r.reason, R::Success | R::NoMatchingSubscribers);
            answered(r.pkid, ok, r.reason, Ev::PubRec)
        }
        v5::Event::Incoming(Packet::PubComp(c)) => Ev::PubComp(c.pkid),
        v5::Event::Incoming(_) => Ev::Other,
        v5::Event::Outgoing(o) => ev_outgoing(o),
    }
}

/// The broker's answer to our MQTT 5 publish `pkid`: `ok` (Success, or
/// NoMatchingSubscribers: accepted, nobody subscribed right now; rumqttc counts both as
/// success) is `ack`, anything else a refusal named by its reason code.
fn answered(pkid: u16, ok: bool, reason: impl std::fmt::Debug, ack: fn(u16) -> Ev) -> Ev {
    if ok {
        ack(pkid)
    } else {
        Ev::PublishRefused {
            pkid,
            why: format!("{reason:?}"),
        }
    }
}

/// The TCP options of a broker connection: without Nagle's algorithm. An MQTT client
/// writes small packets and waits for answers; with Nagle on, a PUBLISH written while an
/// earlier small write (a PUBACK, a receipt) is unacknowledged waits for the broker's
/// delayed ACK, up to 40 ms on Linux (the tail of `./scripts/bench` section 4 was that).
/// rumqttc leaves it on unless told.
fn network_options(mut options: rumqttc::NetworkOptions) -> rumqttc::NetworkOptions {
    options.set_tcp_nodelay(true);
    options
}

/// A 3.1.1 client and its loop.
fn session_v4(config: &MqttConfig, security: &Security) -> (Client, Loop) {
    let mut options =
        rumqttc::MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Some(tls) = &security.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    if let Some((user, password)) = &security.login {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUEST_CHANNEL);
    eventloop.set_network_options(network_options(eventloop.network_options()));
    (Client::V311(client), Loop::V311(eventloop))
}

/// An MQTT 5 client and its loop: the session kept `session_expiry_secs` after a
/// disconnect, the Maximum Packet Size told to the broker, no Receive Maximum (mosquitto
/// then keeps to its `max_inflight_messages`, as for 3.1.1).
fn session_v5(config: &MqttConfig, security: &Security) -> (Client, Loop) {
    let mut options =
        v5::MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    let mut properties = packet5::ConnectProperties::new();
    properties.max_packet_size = Some(MAX_PACKET_SIZE_V5);
    properties.session_expiry_interval = Some(config.session_expiry_secs);
    options
        .set_clean_start(false)
        .set_manual_acks(true)
        .set_keep_alive(config.keep_alive)
        .set_connect_properties(properties)
        // rumqttc's v4 default: without an upper limit the v5 state keeps 65,536 slots
        // per queue (megabytes), and the outbox never has more than 64 frames in flight.
        .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    if let Some(tls) = &security.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    if let Some((user, password)) = &security.login {
        options.set_credentials(user.clone(), password.clone());
    }
    options.set_network_options(network_options(options.network_options()));
    let (client, eventloop) = v5::AsyncClient::new(options, REQUEST_CHANNEL);
    (Client::V5(client), Loop::V5(eventloop))
}

/// The reason Status and the log give when a forced MQTT 5 gets no CONNACK.
fn no_v5_answer(reason: &str) -> String {
    format!(
        "the broker did not answer the MQTT 5 CONNECT; it may speak only 3.1.1 \
         (broker_protocol = \"3.1.1\" or \"auto\"): {reason}"
    )
}

async fn run(
    config: MqttConfig,
    security: Security,
    links: Links,
    mut shutdown: watch::Receiver<bool>,
) {
    let Links {
        tracker,
        flow,
        state,
        client: decided_client,
        incoming,
        deliveries,
    } = links;
    let broker = format!("{}:{}", config.host, config.port);
    // `active` is the loop polled; with `auto`, a 3.1.1 one waits in `fallback` until
    // the decision.
    let ((mut client, mut active), mut fallback) = match config.protocol {
        BrokerProtocol::V311 => (session_v4(&config, &security), None),
        BrokerProtocol::V5 => (session_v5(&config, &security), None),
        BrokerProtocol::Auto => (
            session_v5(&config, &security),
            Some(session_v4(&config, &security)),
        ),
    };
    let mut decided = config.protocol != BrokerProtocol::Auto;
    if decided {
        decided_client.send_replace(Some(client.clone()));
    }
    let mut backoff = MIN_BACKOFF;
    let mut subscribed = false;
    // A CONNACK was read on this connection.
    let mut connected = false;
    // CONNACKs read so far: the number of the connection up now (or the last one), which
    // tags its publishes (`Ack::connection`).
    let mut connection_number = 0u64;
    // This connection reads up to MQTT's maximum to get past one oversized packet.
    let mut draining = false;
    // The oversized publish read while draining, until its acknowledgement is written.
    let mut poison: Option<u16> = None;
    // The first event of the 3.1.1 loop after `auto` switched to it.
    let mut injected: Option<Result<Ev, Failure>> = None;
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
        let event = match injected.take() {
            Some(event) => event,
            None => tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                event = active.poll() => event,
            },
        };
        match event {
            Ok(Ev::ConnAck { session_present }) => {
                connected = true;
                // Publishes rumqttc read on the last connection and reports only now came
                // before this CONNACK: they keep that connection's number.
                connection_number += 1;
                flow.ack_for(connection_number);
                if !decided {
                    decided = true;
                    fallback = None;
                    decided_client.send_replace(Some(client.clone()));
                    info!(broker = %broker, "the broker speaks MQTT 5");
                }
                info!(broker = %broker, protocol = client.version().as_str(), session_present, "connected to the broker");
                backoff = MIN_BACKOFF;
                subscribed = false;
                // Subscribing every time is harmless and covers a broker that lost the
                // session. Not awaited here: this loop is what drains the request channel.
                let client = client.clone();
                let topic = config.topic.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(topic).await {
                        debug!(error = %e, "subscribe not sent");
                    }
                });
            }
            Ok(Ev::SubAck { ok }) => {
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
            Ok(Ev::Publish(mut publish)) => {
                if let Some(ack) = &mut publish.ack {
                    ack.connection = connection_number;
                }
                trace!(
                    pkid = publish.ack.map(|a| a.pkid),
                    bytes = publish.payload.len(),
                    dup = publish.dup,
                    "publish in"
                );
                if draining && publish.remaining_length(client.version()) > active.small_cap() {
                    match publish.ack {
                        Some(ack) => poison = Some(ack.pkid),
                        None => {
                            // Nothing to acknowledge: the broker will not send it again.
                            reconnect_capped(&client, &mut active);
                            draining = false;
                        }
                    }
                }
                flow.backlog
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if incoming.send(publish).is_err() {
                    break; // the pipeline is gone: stopping
                }
            }
            Ok(Ev::PubAck(pkid)) => {
                let d = lock(&tracker).puback(pkid);
                if let Some(d) = d {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Ev::PubRec(pkid)) => lock(&tracker).pubrec(pkid),
            Ok(Ev::PublishRefused { pkid, why }) => {
                let refused =
                    lock(&tracker).refused_one(pkid, &format!("the broker refused it ({why})"));
                report_refused(&deliveries, refused);
            }
            Ok(Ev::PubComp(pkid)) => {
                let d = lock(&tracker).pubcomp(pkid);
                if let Some(d) = d {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Ev::Written(pkid)) => {
                trace!(pkid, "publish out");
                let ds = lock(&tracker).written(pkid);
                for d in ds {
                    let _ = deliveries.send(d);
                }
            }
            Ok(Ev::Collision(pkid)) => lock(&tracker).collision(pkid),
            Ok(Ev::AckWritten(pkid)) => {
                trace!(pkid, "ack out");
                if poison == Some(pkid) {
                    // The oversized packet is acknowledged away: back to the small cap.
                    poison = None;
                    draining = false;
                    info!("the oversized packet is acknowledged; reconnecting with the frame-size cap");
                    reconnect_capped(&client, &mut active);
                }
            }
            Ok(Ev::Disconnected | Ev::Other) => {}
            Err(mut failure) => {
                // Nothing acknowledges a publish of the broken connection any more (see
                // `Transport::ack`), nor do the acknowledgements rumqttc took from its
                // channel for it go out on the next one.
                flow.ack_for(0);
                active.drop_acks();
                let in_connect = !std::mem::replace(&mut connected, false);
                if in_connect && failure.kind == FailureKind::NoConnAck {
                    match (decided, fallback.take()) {
                        (false, Some((v4_client, mut v4_loop))) => {
                            // Perhaps a 3.1.1 broker: ask it in 3.1.1 at once.
                            debug!(error = %failure.reason, "no answer to the MQTT 5 CONNECT; trying 3.1.1");
                            let attempt = tokio::select! {
                                _ = crate::stopped(&mut shutdown) => break,
                                attempt = v4_loop.poll() => attempt,
                            };
                            let speaks_v311 = match &attempt {
                                Ok(_) => true,
                                Err(f) => f.kind == FailureKind::Refused { bad_version: false },
                            };
                            if speaks_v311 {
                                info!(broker = %broker, "the broker did not answer MQTT 5 but answers 3.1.1: speaking 3.1.1 with it until nesd restarts");
                                decided = true;
                                client = v4_client;
                                active = v4_loop;
                                decided_client.send_replace(Some(client.clone()));
                                match attempt {
                                    Ok(event) => {
                                        injected = Some(Ok(event));
                                        continue;
                                    }
                                    Err(f) => failure = f,
                                }
                            } else {
                                fallback = Some((v4_client, v4_loop));
                                if let Err(f) = attempt {
                                    failure.reason = format!(
                                        "no answer to MQTT 5 ({}) nor to 3.1.1 ({})",
                                        failure.reason, f.reason
                                    );
                                }
                            }
                        }
                        (_, rest) => {
                            fallback = rest;
                            if config.protocol == BrokerProtocol::V5 {
                                failure.reason = no_v5_answer(&failure.reason);
                            }
                        }
                    }
                }
                // rumqttc's v5 state collects what it re-sends by pkid slot from 0, not
                // from the oldest unacknowledged one as its v4 state does, so publishes in
                // flight across a pkid wrap-around would go out again out of order (and
                // reach the recipient so). Put them back in the order they were sent.
                {
                    let tracker = lock(&tracker);
                    active.order_pending(|pkid| tracker.seq_of(pkid));
                    if tracing::enabled!(tracing::Level::TRACE) {
                        let order = active.resend_order(|pkid| tracker.seq_of(pkid));
                        trace!(?order, "to send again (pkid, outbox seq)");
                    }
                }
                let refusal = match &failure.kind {
                    FailureKind::TooLargeForBroker(why) => {
                        Some(format!("too large for the broker ({why})"))
                    }
                    _ => None,
                };
                if let Some(why) = refusal {
                    let held = active.held_pkids();
                    let mut tracker = lock(&tracker);
                    let mut refused = tracker.refused(&held, &why);
                    if refused.is_empty()
                        && matches!(failure.kind, FailureKind::TooLargeForBroker(_))
                    {
                        // Not a re-send: the request rumqttc took from its channel, which
                        // is the oldest one the tracker has not seen written.
                        refused.extend(tracker.refuse_next(&why));
                    }
                    drop(tracker);
                    report_refused(&deliveries, refused);
                }
                let reason = failure.reason;
                if draining {
                    // One connection at most reads without the cap.
                    draining = false;
                    poison = None;
                    active.set_incoming_cap(false);
                }
                if let FailureKind::Oversized(size) = failure.kind {
                    warn!(
                        bytes = size,
                        limit = active.small_cap(),
                        "the broker sent a packet over the frame-size limit; reading it once to acknowledge it away \
                         (cap message sizes at the broker: docs/BROKER.md)"
                    );
                    draining = true;
                    active.set_incoming_cap(true);
                }
                let was = state.borrow().clone();
                if was == Connection::Up {
                    warn!(error = %reason, "lost the broker connection; reconnecting");
                } else if was != Connection::Down(reason.clone()) {
                    // A new reason (a refused login, an untrusted certificate) is worth a
                    // line; the same one again at every retry is not.
                    warn!(broker = %broker, error = %reason, "cannot connect to the broker");
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
                match active.poll().await {
                    Ok(Ev::Disconnected) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    state.send_replace(Connection::Down("stopped".into()));
}

/// Hands refused frames to the outbox (which marks them FAILED), each with a log line.
fn report_refused(
    deliveries: &mpsc::UnboundedSender<Delivery>,
    refused: impl IntoIterator<Item = Delivery>,
) {
    for d in refused {
        if let Delivery::Refused(token, why) = &d {
            warn!(to = %token.peer, id = %token.id, reason = %why, "a message cannot go through this broker; it is FAILED");
        }
        let _ = deliveries.send(d);
    }
}

/// Restores the small cap for the next connection and ends this one (the broker keeps
/// the session; the loop reconnects at once).
fn reconnect_capped(client: &Client, active: &mut Loop) {
    active.set_incoming_cap(false);
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
            // The fake broker speaks 3.1.1 only.
            protocol: BrokerProtocol::V311,
            ..MqttConfig::new(
                "127.0.0.1",
                port,
                "flood-test",
                "nes/me_/message",
                Duration::from_secs(30),
            )
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

    /// The frame index in a test publish's payload (`frame <i> ...`) and its DUP flag,
    /// from an MQTT 5 PUBLISH (`header`, `body` as [`read_packet`] returns them).
    fn v5_publish_index(header: u8, body: &[u8]) -> (u64, bool) {
        let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let mut at = 2 + topic + 2; // topic, pkid (QoS 1)
        let mut properties = 0usize;
        let mut shift = 0;
        loop {
            let b = body[at];
            at += 1;
            properties |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let payload = std::str::from_utf8(&body[at + properties..][..16]).unwrap();
        let index = payload
            .strip_prefix("frame ")
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        (index, header & 0x08 != 0)
    }

    /// An MQTT 5 broker that lets the first connection choke: it reads the first
    /// PUBLISH, stops reading (so the client's next write blocks on full buffers) and
    /// resets the connection, which makes that write fail with its bytes still in
    /// rumqttc's buffer. On the next connections it acknowledges everything and reports
    /// each PUBLISH (frame index, DUP).
    async fn choking_broker(listener: TcpListener, publishes: mpsc::UnboundedSender<(u64, bool)>) {
        let mut first = true;
        while let Ok((stream, _)) = listener.accept().await {
            let choke = std::mem::replace(&mut first, false);
            let publishes = publishes.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(stream);
                let Ok((header, _)) = read_packet(&mut rd).await else {
                    return;
                };
                if header >> 4 != 1 || wr.write_all(&[0x20, 3, 1, 0, 0]).await.is_err() {
                    return;
                }
                while let Ok((header, body)) = read_packet(&mut rd).await {
                    let answer: Vec<u8> = match header >> 4 {
                        3 if choke => break,
                        3 => {
                            let _ = publishes.send(v5_publish_index(header, &body));
                            let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            vec![0x40, 2, body[2 + topic], body[3 + topic]]
                        }
                        8 => vec![0x90, 4, body[0], body[1], 0, 1],
                        12 => vec![0xd0, 0],
                        _ => continue,
                    };
                    if wr.write_all(&answer).await.is_err() {
                        return;
                    }
                }
                if choke {
                    // Let the client fill the socket buffers and block in a write.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let stream = rd.unsplit(wr);
                    let _ = stream.set_zero_linger(); // close with RST
                }
            });
        }
    }

    /// rumqttc's v5 state keeps the bytes of a write that failed and, unless nesd drops
    /// them, sends them first on the next connection: ahead of the older unacknowledged
    /// publishes it sends again, so the broker (and the recipient) would get them out of
    /// order. After a failed write the next connection sends everything in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_failed_with_the_connection_goes_again_in_order() {
        // A small receive buffer on the broker's side (inherited by the accepted socket)
        // so the client's writes block soon.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let listener = socket.listen(16).unwrap();
        let (publishes_tx, mut publishes) = mpsc::unbounded_channel();
        tokio::spawn(choking_broker(listener, publishes_tx));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, _incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
        let config = MqttConfig {
            protocol: BrokerProtocol::V5,
            ..auto_config(port)
        };
        let (transport, task) = Transport::start(config, incoming_tx, deliveries_tx, shutdown);
        wait_up(&transport).await;
        // 40 frames of 200 KiB: far more than the socket buffers hold (4 MiB at most here).
        let n = 40u64;
        for i in 1..=n {
            let mut frame = format!("frame {i} ").into_bytes();
            frame.resize(200 * 1024, b'.');
            transport
                .publish(t(i), "nes/bob/message".into(), false, frame)
                .await
                .unwrap();
        }
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        while seen.len() < n as usize {
            let (i, dup) = tokio::time::timeout(Duration::from_secs(60), publishes.recv())
                .await
                .expect("the frames did not all arrive after the reconnect")
                .unwrap();
            if seen.insert(i) {
                order.push((i, dup));
            }
        }
        let indices: Vec<u64> = order.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            indices,
            (1..=n).collect::<Vec<_>>(),
            "the frames reached the broker out of order (index, DUP): {order:?}"
        );
        let mut delivered = HashSet::new();
        while delivered.len() < n as usize {
            match tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
                .await
                .expect("not every frame was reported delivered")
                .unwrap()
            {
                Delivery::Delivered(token) => {
                    delivered.insert(token.seq);
                }
                Delivery::Sent(_) => {}
                Delivery::Refused(token, why) => panic!("{token:?} refused: {why}"),
            }
        }
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }

    /// An MQTT 5 broker whose first connection sends one publish (pkid 7) and ends, as a
    /// broker that goes away does; the second sends it again (DUP) with one more (pkid 8),
    /// as a kept session does, and reports each PUBACK until the one for pkid 8.
    async fn resending_broker(listener: TcpListener, acks: mpsc::UnboundedSender<u16>) {
        let publish = |pkid: u8, dup: bool| {
            let topic = b"nes/me_/message";
            let payload = format!("frame {pkid}");
            let mut p = vec![if dup { 0x3a } else { 0x32 }, 0];
            p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            p.extend_from_slice(topic);
            p.extend_from_slice(&[0, pkid, 0]); // pkid, no properties
            p.extend_from_slice(payload.as_bytes());
            p[1] = (p.len() - 2) as u8;
            p
        };
        for first in [true, false] {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (mut rd, mut wr) = tokio::io::split(stream);
            let Ok((1, _)) = read_packet(&mut rd).await.map(|(h, b)| (h >> 4, b)) else {
                return;
            };
            let session_present = u8::from(!first);
            wr.write_all(&[0x20, 3, session_present, 0, 0])
                .await
                .unwrap();
            let sent = if first {
                publish(7, false)
            } else {
                [publish(7, true), publish(8, false)].concat()
            };
            wr.write_all(&sent).await.unwrap();
            while let Ok((header, body)) = read_packet(&mut rd).await {
                match header >> 4 {
                    4 => {
                        let pkid = u16::from_be_bytes([body[0], body[1]]);
                        let _ = acks.send(pkid);
                        if pkid == 8 {
                            std::future::pending::<()>().await;
                        }
                    }
                    8 => {
                        let suback = [0x90, 4, body[0], body[1], 0, 1];
                        wr.write_all(&suback).await.unwrap();
                        if first {
                            // Gone before the client acknowledges anything.
                            break;
                        }
                    }
                    12 => wr.write_all(&[0xd0, 0]).await.unwrap(),
                    _ => {}
                }
            }
        }
    }

    /// A publish that the broker sends again on the next connection is acknowledged
    /// once: its copy of the broken connection is not (see [`Transport::ack`]).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_sent_again_is_acknowledged_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        tokio::spawn(resending_broker(listener, acks_tx));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, mut incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, _deliveries) = mpsc::unbounded_channel();
        let config = MqttConfig {
            protocol: BrokerProtocol::V5,
            ..auto_config(port)
        };
        let (transport, task) = Transport::start(config, incoming_tx, deliveries_tx, shutdown);
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = tokio::time::timeout(Duration::from_secs(30), incoming.recv())
                .await
                .expect("no publish")
                .unwrap();
            got.push(p);
        }
        let [old, again, newer] = <[Incoming; 3]>::try_from(got).unwrap();
        assert_eq!(
            (old.dup, again.dup, newer.dup),
            (false, true, false),
            "{old:?} {again:?} {newer:?}"
        );
        assert_eq!(old.payload, again.payload);
        // The pipeline handles them in order, the old copy first (stored), the copy sent
        // again next (a duplicate).
        for p in [&old, &again, &newer] {
            transport.ack(p);
        }
        let mut got = Vec::new();
        while got.last() != Some(&8) {
            let pkid = tokio::time::timeout(Duration::from_secs(30), acks.recv())
                .await
                .expect("the acknowledgements did not arrive")
                .unwrap();
            got.push(pkid);
        }
        assert_eq!(
            got,
            vec![7, 8],
            "PUBACKs the broker got on the second connection"
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

    #[test]
    fn a_refused_publish_is_the_one_rumqttc_no_longer_holds() {
        let mut tr = Tracker::default();
        for n in 1..=4 {
            tr.enqueue(t(n));
        }
        for pkid in 1..=3 {
            tr.written(pkid);
        }
        // pkid 2 was refused; 1 waits to be sent again, 3's PUBACK was read before the
        // failing one and is still to be reported.
        let held: HashSet<u16> = [1, 3].into();
        assert_eq!(
            tr.refused(&held, "the broker refused it (NotAuthorized)"),
            vec![Delivery::Refused(
                t(2),
                "the broker refused it (NotAuthorized)".into()
            )]
        );
        assert_eq!(tr.puback(3), Some(Delivery::Delivered(t(3))));
        // pkid 2 is free: the next frame written under it is new, not a re-send.
        assert_eq!(tr.written(2), vec![Delivery::Sent(t(4))]);
        assert!(tr.written(1).is_empty(), "a re-send");
        assert_eq!(tr.outstanding(), 2);
    }

    #[test]
    fn the_v5_packet_cap_covers_the_v311_one() {
        // The broker counts the whole packet (at most 5 bytes of fixed header more than
        // the remaining length), rumqttc the remaining length.
        assert_eq!(MAX_PACKET_SIZE_V5 as usize, MAX_INCOMING_PACKET + 5);
        let frame = Incoming {
            topic: "nes/bob/message".into(),
            payload: vec![b'x'; nes_proto::frame::MAX_FRAME_BYTES].into(),
            dup: false,
            ack: Some(Ack {
                pkid: 1,
                exactly_once: false,
                connection: 1,
            }),
        };
        assert!(frame.remaining_length(Version::V5) + 5 <= MAX_PACKET_SIZE_V5 as usize);
        assert!(frame.remaining_length(Version::V311) <= MAX_INCOMING_PACKET);
    }

    /// A broker that answers CONNECT by its protocol level: 5 as a 3.1.1 broker does
    /// (`20 02 00 01`, then close) unless `speaks_v5`, 4 with a session. Reports each level
    /// it saw.
    async fn versioned_broker(
        listener: TcpListener,
        speaks_v5: bool,
        levels: mpsc::UnboundedSender<u8>,
    ) {
        while let Ok((stream, _)) = listener.accept().await {
            let levels = levels.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(stream);
                let Ok((header, body)) = read_packet(&mut rd).await else {
                    return;
                };
                if header >> 4 != 1 || body.len() < 7 {
                    return;
                }
                let level = body[6];
                let _ = levels.send(level);
                if level == 5 && !speaks_v5 {
                    let _ = wr.write_all(&[0x20, 2, 0, 1]).await;
                    let _ = wr.shutdown().await;
                    return;
                }
                let v5 = level == 5;
                let connack: &[u8] = if v5 {
                    &[0x20, 3, 0, 0, 0]
                } else {
                    &[0x20, 2, 0, 0]
                };
                if wr.write_all(connack).await.is_err() {
                    return;
                }
                while let Ok((header, body)) = read_packet(&mut rd).await {
                    let answer: Vec<u8> = match header >> 4 {
                        8 if v5 => vec![0x90, 4, body[0], body[1], 0, 1],
                        8 => vec![0x90, 3, body[0], body[1], 1],
                        12 => vec![0xd0, 0],
                        14 => return,
                        _ => continue,
                    };
                    if wr.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    fn auto_config(port: u16) -> MqttConfig {
        MqttConfig::new(
            "127.0.0.1",
            port,
            "auto-test",
            "nes/me_/message",
            Duration::from_secs(30),
        )
    }

    async fn wait_up(transport: &Transport) {
        let mut c = transport.connection();
        tokio::time::timeout(
            Duration::from_secs(30),
            c.wait_for(|c| *c == Connection::Up),
        )
        .await
        .expect("the session did not come up")
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_falls_back_to_3_1_1_when_the_broker_does_not_answer_5() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (levels_tx, mut levels) = mpsc::unbounded_channel();
        tokio::spawn(versioned_broker(listener, false, levels_tx));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, _incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, _deliveries) = mpsc::unbounded_channel();
        let (transport, task) =
            Transport::start(auto_config(port), incoming_tx, deliveries_tx, shutdown);
        wait_up(&transport).await;
        assert_eq!(transport.protocol(), Some(Version::V311));
        assert_eq!(levels.recv().await, Some(5), "MQTT 5 is tried first");
        assert_eq!(levels.recv().await, Some(4));
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_that_is_down_is_not_taken_for_an_old_one() {
        // A port nobody listens on yet.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, _incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, _deliveries) = mpsc::unbounded_channel();
        let (transport, task) =
            Transport::start(auto_config(port), incoming_tx, deliveries_tx, shutdown);
        let mut c = transport.connection();
        tokio::time::timeout(
            Duration::from_secs(10),
            c.wait_for(|c| matches!(c, Connection::Down(r) if r != "connecting")),
        )
        .await
        .expect("no connection error")
        .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            transport.protocol(),
            None,
            "decided while the broker was down"
        );

        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (levels_tx, mut levels) = mpsc::unbounded_channel();
        tokio::spawn(versioned_broker(listener, true, levels_tx));
        wait_up(&transport).await;
        assert_eq!(transport.protocol(), Some(Version::V5));
        assert_eq!(levels.recv().await, Some(5));
        while let Ok(level) = levels.try_recv() {
            assert_eq!(level, 5, "a 3.1.1 attempt against an MQTT 5 broker");
        }
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forced_5_says_why_a_3_1_1_broker_does_not_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (levels_tx, mut levels) = mpsc::unbounded_channel();
        tokio::spawn(versioned_broker(listener, false, levels_tx));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, _incoming) = mpsc::unbounded_channel();
        let (deliveries_tx, _deliveries) = mpsc::unbounded_channel();
        let config = MqttConfig {
            protocol: BrokerProtocol::V5,
            ..auto_config(port)
        };
        let (transport, task) = Transport::start(config, incoming_tx, deliveries_tx, shutdown);
        let mut c = transport.connection();
        let down = tokio::time::timeout(
            Duration::from_secs(10),
            c.wait_for(|c| matches!(c, Connection::Down(r) if r.contains("may speak only 3.1.1"))),
        )
        .await
        .expect("no clear error")
        .unwrap()
        .clone();
        assert!(matches!(down, Connection::Down(_)));
        assert_eq!(transport.protocol(), Some(Version::V5));
        assert_eq!(levels.recv().await, Some(5));
        while let Ok(level) = levels.try_recv() {
            assert_eq!(level, 5, "3.1.1 tried although 5 was set");
        }
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
