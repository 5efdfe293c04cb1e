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

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
}

/// Starts the broker on `addr` and returns the address it listens on once it accepts
/// connections.
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

    #[test]
    fn bad_addresses_are_refused() {
        assert!(matches!(start("not an address"), Err(BrokerError::Addr(_))));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        assert!(matches!(start(&addr), Err(BrokerError::Listen { .. })));
    }
}
