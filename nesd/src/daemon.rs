//! Startup and shutdown: checks everything that can be wrong before serving, wires the
//! parts together, tells systemd when it is ready, and stops cleanly on SIGTERM/SIGINT.
//!
//! Order matters for the one-line errors: data directory, keys, key server key, socket
//! (refuse a live daemon before touching its store), store, then the tasks. Shutdown
//! stops accepting API calls, stops the pipeline and the outbox, disconnects from the
//! broker and closes the store (flushed, and reopened once so that sled writes the
//! snapshot the next start reads: see "Start and close" in `store`); the socket file is
//! removed last.

use crate::config::Config;
use crate::identity::{self, Identity, IdentityError};
use crate::keycache::KeyCache;
use crate::keyserver::KeyServer;
use crate::mqtt::{MqttConfig, Transport};
use crate::outbox::Outbox;
use crate::prekeys::{OwnPrekeys, PeerPrekeys};
use crate::receive::Pipeline;
use crate::service::{Parts, Service, Stats};
use crate::socket::{self, SocketError};
use crate::store::{Closed, Store, StoreError};
use crate::{dbus, grpc};
use nes_proto::PublicKey;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, warn};

/// MQTT keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Why the daemon could not start (or stopped with an error). One line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The data directory is unusable.
    #[error("cannot use the data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// The identity's keys.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The key server's public key.
    #[error("cannot read the key server's public key {path}: {reason}")]
    KeyserverKey {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The API socket.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The message store.
    #[error("cannot open the message store {path}: {reason}")]
    Store {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// Anything else at startup.
    #[error("{0}")]
    Startup(String),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let user = config.user.clone();
    prepare_data_dir(&config.data_dir)?;
    let identity = Arc::new(Identity::load(&config.data_dir, &user)?);
    let server_key =
        PublicKey::read(&config.keyserver_key).map_err(|e| DaemonError::KeyserverKey {
            path: config.keyserver_key.display().to_string(),
            reason: match e {
                nes_proto::KeyError::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            },
        })?;

    let mut socket = match socket::inherited()? {
        Some(s) => {
            info!("using the socket passed by systemd");
            s
        }
        None => socket::bind(&config.socket)?,
    };

    let store_path = config.data_dir.join(format!("store-{user}"));
    let opening = Instant::now();
    let store = Store::open(&store_path).map_err(|e| DaemonError::Store {
        path: store_path.display().to_string(),
        reason: match e {
            // Mostly sled's lock: another daemon has the store.
            StoreError::Sled(_) => {
                format!("{e} (is another nesd running with this data directory?)")
            }
            e => e.to_string(),
        },
    })?;
    // Most of the start (see "Start and close" in `store`): logged to tell a slow one.
    info!(
        ms = opening.elapsed().as_millis() as u64,
        "message store open"
    );
    let device = identity::device_id(&config.data_dir).map_err(|e| DaemonError::DataDir {
        path: config.data_dir.display().to_string(),
        reason: format!("device id: {e}"),
    })?;
    let client_id = identity::client_id(&user, &device);
    // The full id would let whoever reads it take the session: only a prefix is shown.
    let shown_client_id = identity::shown_client_id(&user, &device);
    let security = crate::mqtt::security(&config.broker, &config.broker_auth)
        .map_err(|e| DaemonError::Startup(format!("broker TLS: {e}")))?;
    let keyserver = KeyServer::new(&config.keyserver, server_key, config.keyserver_legacy)
        .map_err(|e| DaemonError::Startup(format!("HTTP client: {e}")))?;
    let keys = KeyCache::open(
        store.clone(),
        Arc::new(keyserver.clone()),
        &user,
        identity.message_key.public_key().clone(),
        identity.sign_key.public_key().clone(),
        config.key_policy,
        config.key_ttl,
    )
    .map_err(|e| DaemonError::Store {
        path: store_path.display().to_string(),
        reason: e.to_string(),
    })?;

    // v3: the first prekey and certificate are made here when there is no current one;
    // publication waits for the task below (the account may not be active yet).
    let own_prekeys = Arc::new(
        OwnPrekeys::open(
            &config.data_dir,
            &user,
            &identity.sign_key,
            config.prekey_rotation,
            config.prekey_grace,
        )
        .map_err(|e| DaemonError::Startup(format!("v3 prekeys: {e}")))?,
    );
    let peer_prekeys = PeerPrekeys::new(keyserver.clone());

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let (delivery_tx, delivery_rx) = mpsc::unbounded_channel();
    let (transport, mqtt_task) = Transport::start_with(
        MqttConfig {
            host: config.broker.host.clone(),
            port: config.broker.port,
            client_id: client_id.clone(),
            topic: user.topic(),
            keep_alive: KEEP_ALIVE,
            protocol: config.broker_protocol,
            session_expiry_secs: config.broker_session_expiry_secs,
        },
        security,
        incoming_tx,
        delivery_tx,
        shutdown.clone(),
    );
    let files = crate::files::Files::open(&config.data_dir, store.clone(), config.max_file_size)
        .map_err(|e| DaemonError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: format!("files: {e}"),
        })?;
    let stats = Arc::new(Stats::default());
    let outbox_wake = Arc::new(Notify::new());
    let receipts_wake = Arc::new(Notify::new());
    let service = Service::new(Parts {
        identity: identity.clone(),
        store: store.clone(),
        keys: keys.clone(),
        keyserver: keyserver.clone(),
        own_prekeys: own_prekeys.clone(),
        peer_prekeys,
        send_v3: config.send_v3,
        read_receipts: config.read_receipts,
        receipts_wake: receipts_wake.clone(),
        presence_interval: config.presence_interval,
        transport: transport.clone(),
        outbox_wake: outbox_wake.clone(),
        stats: stats.clone(),
        broker_url: config.broker.url(),
        client_id: shown_client_id.clone(),
        shutdown: shutdown.clone(),
        files: files.clone(),
    });

    // Key server lookups for senders of received frames run beside the pipeline, never on
    // its ordered path; each finished one is sent back so its parked frames are tried.
    let (resolved_tx, resolved_rx) = mpsc::unbounded_channel();
    let lookups_task = tokio::spawn(keys.clone().run_lookups(
        config.lookup_rate,
        resolved_tx,
        shutdown.clone(),
    ));
    let prekeys_task = tokio::spawn(own_prekeys.clone().run(
        identity.clone(),
        keyserver,
        shutdown.clone(),
    ));
    let pipeline = Pipeline {
        prekeys: own_prekeys,
        identity,
        store: store.clone(),
        keys,
        stats: stats.clone(),
        transport: transport.clone(),
        receipts_wake: receipts_wake.clone(),
        files: files.clone(),
    };
    let receive_task = tokio::spawn(pipeline.run(incoming_rx, resolved_rx, shutdown.clone()));
    let outbox = Outbox {
        store: store.clone(),
        transport,
        deliveries: delivery_rx,
        wake: outbox_wake,
        stats,
    };
    let outbox_task = tokio::spawn(outbox.run(shutdown.clone()));
    let connection_task = tokio::spawn(service.clone().watch_connection());
    let presence_task = tokio::spawn(crate::presence::run(service.clone(), shutdown.clone()));
    let files_task = tokio::spawn(crate::files::run(files, service.clone(), shutdown.clone()));
    let retention_task = tokio::spawn(crate::retention::run(
        store.clone(),
        config.event_retention,
        shutdown.clone(),
    ));
    let receipts_task = tokio::spawn(crate::receipts::run(
        service.clone(),
        receipts_wake,
        shutdown.clone(),
    ));

    let std_listener = socket
        .take_listener()
        .ok_or_else(|| DaemonError::Startup("socket listener already taken".into()))?;
    let listener = tokio::net::UnixListener::from_std(std_listener)
        .map_err(|e| DaemonError::Startup(format!("socket: {e}")))?;
    let mut stop_api = shutdown.clone();
    let mut grpc_task = tokio::spawn(grpc::serve(service.clone(), listener, async move {
        let _ = crate::stopped(&mut stop_api).await;
    }));
    // The D-Bus adapter: runs beside gRPC over the same service; its failure is not fatal.
    let dbus_service = service.clone();
    let dbus_shutdown = shutdown.clone();
    let dbus_task = tokio::spawn(async move {
        if let Err(e) = dbus::serve(dbus_service, dbus_shutdown).await {
            warn!(error = %e, "D-Bus adapter stopped; gRPC keeps serving");
        }
    });

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(
        user = %user,
        socket = %socket.path().map(|p| p.display().to_string()).unwrap_or_else(|| "(systemd)".into()),
        broker = %config.broker.url(),
        client_id = %shown_client_id,
        "nesd is serving"
    );

    let mut grpc_done = false;
    let outcome = tokio::select! {
        signal = wait_for_signal() => {
            match signal {
                Ok(name) => { info!(signal = name, "stopping"); Ok(()) }
                Err(e) => Err(DaemonError::Startup(format!("signal handling: {e}"))),
            }
        }
        r = &mut grpc_task => {
            grpc_done = true;
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(DaemonError::Startup(format!("the API server failed: {e}"))),
                Err(e) => Err(DaemonError::Startup(format!("the API server failed: {e}"))),
            }
        }
    };

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Contacts hear "offline" now rather than when this presence runs out.
    service.say_offline().await;
    let _ = shutdown_tx.send(true);
    if !grpc_done
        && tokio::time::timeout(Duration::from_secs(5), &mut grpc_task)
            .await
            .is_err()
    {
        warn!("API clients did not disconnect in time");
        grpc_task.abort();
    }
    for (name, task) in [
        ("receive", receive_task),
        ("lookups", lookups_task),
        ("prekeys", prekeys_task),
        ("outbox", outbox_task),
        ("receipts", receipts_task),
        ("files", files_task),
        ("presence", presence_task),
        ("retention", retention_task),
        ("connection", connection_task),
        ("mqtt", mqtt_task),
        // Last: releases the bus name and closes the connection.
        ("dbus", dbus_task),
    ] {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            warn!(task = name, "did not stop in time");
        }
    }
    // The last handles on the store are this function's: once they are gone the store can
    // close with a fresh snapshot, so that the next start does not replay today's log.
    // (A blocking call on the runtime: nothing else runs any more.)
    drop(service);
    let closing = Instant::now();
    match store.close() {
        Ok(Closed::Snapshot) => {
            info!(ms = closing.elapsed().as_millis() as u64, "store closed")
        }
        Ok(Closed::StillInUse) => warn!(
            "the store was flushed but is still in use by a task that did not stop: \
             the next start reads its log since this start"
        ),
        Err(e) => error!(error = %e, "cannot close the store"),
    }
    drop(socket);
    info!("stopped");
    outcome
}

/// Creates the data directory (0700) or tightens an existing one: it holds the private
/// keys and the messages.
fn prepare_data_dir(dir: &Path) -> Result<(), DaemonError> {
    let err = |reason: String| DaemonError::DataDir {
        path: dir.display().to_string(),
        reason,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.to_string()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        info!(dir = %dir.display(), "restricting the data directory to its owner (0700)");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
