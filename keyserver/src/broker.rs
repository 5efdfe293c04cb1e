//! The optional embedded MQTT broker (`serve --embedded-broker ADDR`), so a machine with
//! only the Rust toolchain can run the whole system: key server and broker in one
//! process.
//!
//! It is rumqttd, in-process, speaking MQTT 3.1.1 (what NES clients and the original
//! speak) with QoS 0, 1 and 2, retained messages and persistent sessions
//! (`clean_session = false`: subscriptions and queued messages survive a client's
//! disconnect). Sessions live in memory: they do not survive a restart of the key
//! server. No authentication and no TLS: bind it to loopback or a private network.
//!
//! rumqttd runs its own threads and runtimes; this module starts them, checks that the
//! listener is up, and leaves them running until the process exits.
//!
//! The broker is compiled in only with the `embedded-broker` cargo feature (the
//! quickstart and the tests turn it on; `cargo install` does not): rumqttd brings a
//! second HTTP stack and crates a production key server has no use for. Without the
//! feature, [`AVAILABLE`] is false, `serve --embedded-broker` is refused at startup with
//! [`NOT_BUILT`], and [`start`] returns [`BrokerError::NotBuilt`].

#[cfg(feature = "embedded-broker")]
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
#[cfg(feature = "embedded-broker")]
use std::collections::HashMap;
use std::net::SocketAddr;
#[cfg(feature = "embedded-broker")]
use std::net::{TcpStream, ToSocketAddrs};
#[cfg(feature = "embedded-broker")]
use std::time::{Duration, Instant};

/// Whether this binary has the embedded broker (the `embedded-broker` feature).
pub const AVAILABLE: bool = cfg!(feature = "embedded-broker");

/// What a binary built without the broker says to `--embedded-broker`: what and how.
pub const NOT_BUILT: &str =
    "--embedded-broker: this nes-keyserver was built without the embedded broker; \
     rebuild it with `cargo build -p nes-keyserver --features embedded-broker` \
     (or run an MQTT broker such as mosquitto beside it)";

/// Largest MQTT payload accepted: above the 256 KiB NES frame limit, so the receivers
/// (which count and drop oversized frames) decide, not the broker.
pub const MAX_PAYLOAD: usize = 512 * 1024;

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// ADDR is not `host:port`.
    #[error("--embedded-broker {0:?} is not an address: use HOST:PORT, e.g. 127.0.0.1:1883")]
    Addr(String),
    /// ADDR cannot be bound.
    #[error("cannot listen on {addr}: {source}; pick another --embedded-broker address")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The broker's threads did not come up.
    #[error("the broker did not start on {0}")]
    Start(SocketAddr),
    /// This binary was built without the `embedded-broker` feature.
    #[error("{}", NOT_BUILT)]
    NotBuilt,
}

/// Without the `embedded-broker` feature there is no broker to start.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(_addr: &str) -> Result<SocketAddr, BrokerError> {
    Err(BrokerError::NotBuilt)
}

/// Starts the broker on `addr` and returns the address it listens on once it accepts
/// connections.
#[cfg(feature = "embedded-broker")]
pub fn start(addr: &str) -> Result<SocketAddr, BrokerError> {
    let wanted = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| BrokerError::Addr(addr.to_string()))?;
    // rumqttd binds inside its own thread and only logs a failure there: try the address
    // here first so a taken port is a clear startup error. (Port 0 becomes a real port.)
    let probe = std::net::TcpListener::bind(wanted).map_err(|source| BrokerError::Listen {
        addr: wanted,
        source,
    })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Listen {
        addr: wanted,
        source,
    })?;
    drop(probe);

    let mut broker = Broker::new(config(addr));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|source| BrokerError::Listen { addr, source })?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            tracing::info!(%addr, "embedded MQTT broker listening (MQTT 3.1.1)");
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(BrokerError::Start(addr))
}

/// rumqttd's settings: one MQTT 3.1.1 listener on `addr`, modest in-memory logs.
#[cfg(feature = "embedded-broker")]
fn config(addr: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "nes-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 10 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "embedded-broker")]
    #[test]
    fn bad_addresses_are_refused() {
        assert!(matches!(start("not an address"), Err(BrokerError::Addr(_))));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        assert!(matches!(start(&addr), Err(BrokerError::Listen { .. })));
    }

    #[cfg(not(feature = "embedded-broker"))]
    #[test]
    fn without_the_feature_there_is_no_broker() {
        assert!(!AVAILABLE);
        assert!(matches!(start("127.0.0.1:0"), Err(BrokerError::NotBuilt)));
        assert!(NOT_BUILT.contains("--features embedded-broker"));
    }
}
