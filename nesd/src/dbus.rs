//! The D-Bus adapter: `org.nes.Messenger1` on the session bus.
//!
//! It sits beside [`crate::grpc`] over the same [`Service`] and holds no logic of its
//! own: each method is one service call, each signal one event of [`Service::events`].
//! It reads the domain types ([`crate::model`]) directly: D-Bus shows only a few of their
//! fields, and enumerations by their names ([`MessageState::name`], ...).
//!
//! | D-Bus | service |
//! |---|---|
//! | `Send(s recipient, s text) -> s id` | [`Service::send`] |
//! | `ListConversations() -> a(sttxs)` (peer, unread, total, last timestamp, last text) | [`Service::conversations`] |
//! | `History(s peer, u limit) -> a(sssxsss)` (id, from, to, timestamp, text, direction, state), oldest first; limit 0: all | [`Service::history`] |
//! | `MarkRead(s peer) -> t marked` | [`Service::mark_read`] |
//! | property `User` (s, constant), `Connected` (b), `Unread` (t), with `PropertiesChanged` | [`Service::status`] + events |
//! | signal `MessageReceived(s id, s from, x timestamp, s text)` | an incoming message event |
//! | `SetPresence(s status, s note) -> s status` | [`Service::set_presence`] |
//! | `GetPresence(s user) -> (s status, s note, x last_seen)` | [`Service::get_presence`] |
//! | signal `PresenceChanged(s user, s status, s note)` | a presence event |
//! | signal `MessageStateChanged(s id, s peer, s state)` | an outgoing message's state event (`sent`, `delivered`, `read`, `failed`) |
//! | `SendFile(s recipient, s path) -> s id` | [`Service::begin_file`] + [`Service::finish_file`] (nesd reads the file at `path`) |
//! | signal `FileReceived(s id, s from, s name, t size, s path)` | an incoming file, complete and checked |
//!
//! Errors are D-Bus errors named `org.nes.Messenger1.Error.<Class>` (`InvalidArgument`,
//! `NotFound`, `FailedPrecondition`, `Unavailable`, `AlreadyExists`, `ResourceExhausted`,
//! `Internal`) with the service's one-line message: the same classes as the gRPC
//! statuses ([`MessengerError`]).
//!
//! zbus's object server does the D-Bus side: [`Messenger`] is an `#[interface]`, so zbus
//! dispatches the calls, checks the argument types, answers `Properties`, `Peer` and
//! `Introspectable` (the introspection XML is generated from the impl, intermediate nodes
//! included, so `busctl tree` finds the object) and builds `PropertiesChanged` through
//! the generated `*_changed` emitters. What stays here is the mapping to the service and
//! the one task that turns service events into signals.
//!
//! Without a session bus (a server, a systemd system service) nesd logs that once and
//! serves gRPC as usual; the same when another process already owns the name. On
//! shutdown the adapter releases the name and closes its connection, and the daemon
//! joins it like its other tasks.

use crate::error::ServiceError;
use crate::model::{
    Content, Direction, Event, EventKind, FileState, Message, MessageState, NewText, PresenceStatus,
};
use crate::service::Service;
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{debug, info, warn};
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::{interface, Connection};

/// The well-known bus name.
pub const NAME: &str = "org.nes.Messenger1";
/// The object path.
pub const PATH: &str = "/org/nes/Messenger1";
/// The interface.
pub const INTERFACE: &str = "org.nes.Messenger1";

/// Why the D-Bus adapter stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbusError {
    /// The session bus could not be used.
    #[error("D-Bus: {0}")]
    Bus(String),
}

/// The D-Bus errors of `org.nes.Messenger1`: one per class of [`ServiceError`], named
/// `org.nes.Messenger1.Error.<Variant>`, with the service's message as the description.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.nes.Messenger1.Error")]
#[non_exhaustive]
pub enum MessengerError {
    /// Bad input: a bad username, an empty text, ...
    InvalidArgument(String),
    /// An unknown peer or message id.
    NotFound(String),
    /// Keys not trusted yet, or a request that does not fit the current state.
    FailedPrecondition(String),
    /// The key server cannot be reached and nothing is cached, or nesd is stopping.
    Unavailable(String),
    /// The name is already taken at the key server.
    AlreadyExists(String),
    /// A client fell too far behind.
    ResourceExhausted(String),
    /// Something broke inside the daemon.
    Internal(String),
}

impl From<ServiceError> for MessengerError {
    fn from(e: ServiceError) -> Self {
        // Every class by name: a new ServiceError variant must choose its D-Bus error here.
        match e {
            ServiceError::InvalidArgument(m) => MessengerError::InvalidArgument(m),
            ServiceError::NotFound(m) => MessengerError::NotFound(m),
            ServiceError::FailedPrecondition(m) => MessengerError::FailedPrecondition(m),
            ServiceError::Unavailable(m) => MessengerError::Unavailable(m),
            ServiceError::AlreadyExists(m) => MessengerError::AlreadyExists(m),
            ServiceError::ResourceExhausted(m) => MessengerError::ResourceExhausted(m),
            ServiceError::Internal(m) => MessengerError::Internal(m),
        }
    }
}

/// Serves the service on the session bus until `shutdown` turns true (or the service's
/// event stream ends, or the bus goes away). Then releases the name and closes the
/// connection, so a clean stop leaves nothing on the bus.
pub async fn serve(service: Service, mut shutdown: watch::Receiver<bool>) -> Result<(), DbusError> {
    let conn = match Connection::session().await {
        Ok(conn) => conn,
        Err(e) => {
            info!(error = %e, "no D-Bus session bus: the D-Bus API is off (gRPC serves as usual)");
            return Ok(());
        }
    };
    // Subscribe to the events before reading the values the signals compare against: a
    // change (the broker connection coming up) between the two is then certain to reach
    // `signal`, instead of being missed and making the next change look like none.
    let events = service.events(None);
    let status = service
        .status()
        .await
        .map_err(|e| DbusError::Bus(e.to_string()))?;
    let messenger = Messenger {
        service: service.clone(),
        user: status.user,
        last: Arc::new(Mutex::new(Props {
            connected: status.connected,
            unread: status.unread,
        })),
    };
    // The object exists before the name does, so no call to the name finds nothing.
    conn.object_server()
        .at(PATH, messenger)
        .await
        .map_err(|e| DbusError::Bus(e.to_string()))?;
    match conn
        .request_name_with_flags(NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
        Ok(other) => {
            warn!(name = NAME, reply = ?other, "another process owns the D-Bus name (another nesd on this session bus?): the D-Bus API is off");
            close(conn, false).await;
            return Ok(());
        }
        Err(e) => {
            warn!(name = NAME, error = %e, "cannot own the D-Bus name (another nesd on this session bus?): the D-Bus API is off");
            close(conn, false).await;
            return Ok(());
        }
    }
    let iface = conn
        .object_server()
        .interface::<_, Messenger>(PATH)
        .await
        .map_err(|e| DbusError::Bus(e.to_string()))?;
    info!(
        name = NAME,
        path = PATH,
        "serving the D-Bus API on the session bus"
    );

    tokio::select! {
        // The event stream ends when the daemon stops.
        _ = signals(service, iface, events) => {}
        _ = crate::stopped(&mut shutdown) => {}
        _ = conn.closed() => {
            warn!("the D-Bus session bus connection closed: the D-Bus API is off");
            return Ok(());
        }
    }
    close(conn, true).await;
    Ok(())
}

/// Gives the name back (when owned), removes the object and closes the connection.
async fn close(conn: Connection, owned: bool) {
    if owned {
        // Explicitly, before closing: watchers see the name go while nesd still finishes
        // its shutdown, and the log says so (the tests look for this line).
        match conn.release_name(NAME).await {
            Ok(_) => info!(name = NAME, "released the D-Bus name"),
            Err(e) => debug!(error = %e, "cannot release the D-Bus name"),
        }
    }
    if let Err(e) = conn.object_server().remove::<Messenger, _>(PATH).await {
        debug!(error = %e, "cannot remove the D-Bus object");
    }
    if let Err(e) = conn.close().await {
        debug!(error = %e, "cannot close the D-Bus connection");
    }
    debug!("the D-Bus adapter stopped");
}

/// Property values last announced, to signal only real changes (and to answer when
/// the service cannot).
#[derive(Debug)]
struct Props {
    connected: bool,
    unread: u64,
}

/// The object at [`PATH`]: the `org.nes.Messenger1` interface over the service.
pub struct Messenger {
    service: Service,
    user: String,
    last: Arc<Mutex<Props>>,
}

/// One `ListConversations` row: (peer, unread, total, last timestamp, last text).
type ConversationRow = (String, u64, u64, i64, String);
/// One `History` row: (id, from, to, timestamp, text, direction, state).
type HistoryRow = (String, String, String, i64, String, String, String);

#[interface(name = "org.nes.Messenger1")]
impl Messenger {
    /// Sends `text` to `recipient`; answers the new message's id.
    #[zbus(out_args("id"))]
    async fn send(&self, recipient: String, text: String) -> Result<String, MessengerError> {
        let request = NewText {
            to: recipient,
            text,
            legacy: false,
        };
        Ok(self.service.send(request).await?.id)
    }

    /// Sends the file at `path` (read by nesd, as this user) to `recipient`; answers the
    /// file message's id.
    #[zbus(out_args("id"))]
    async fn send_file(&self, recipient: String, path: String) -> Result<String, MessengerError> {
        let name = std::path::Path::new(&path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut file = self.service.begin_file(&recipient, &name, "").await?;
        // Read in pieces on the blocking pool: never the whole file in memory.
        let file = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&path)
                .map_err(|e| ServiceError::InvalidArgument(format!("cannot read {path}: {e}")))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(|e| {
                    ServiceError::InvalidArgument(format!("cannot read {path}: {e}"))
                })?;
                if n == 0 {
                    return Ok::<_, ServiceError>(file);
                }
                file.upload.write(&buf[..n])?;
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("reading the file: {e}")))??;
        Ok(self.service.finish_file(file).await?.id)
    }

    /// Every conversation: (peer, unread, total, last timestamp, last text).
    #[zbus(out_args("conversations"))]
    async fn list_conversations(&self) -> Result<Vec<ConversationRow>, MessengerError> {
        let conversations = self.service.conversations().await?;
        Ok(conversations
            .into_iter()
            .map(|c| {
                let (at, text) = c
                    .last
                    .map(|m| (m.timestamp_ms, m.text().to_owned()))
                    .unwrap_or_default();
                (c.peer, c.unread, c.total, at, text)
            })
            .collect())
    }

    /// The last `limit` messages with `peer` (0: all), oldest first.
    #[zbus(out_args("messages"))]
    async fn history(&self, peer: String, limit: u32) -> Result<Vec<HistoryRow>, MessengerError> {
        let messages = self.service.history(&peer, limit, "").await?;
        Ok(messages.into_iter().map(history_row).collect())
    }

    /// Marks the conversation with `peer` read; answers how many messages were unread.
    #[zbus(out_args("marked"))]
    async fn mark_read(&self, peer: String) -> Result<u64, MessengerError> {
        Ok(self.service.mark_read(&peer, "").await?)
    }

    /// Sets this identity's presence (`online`, `away`, `busy`, `invisible`) and note;
    /// answers the status set.
    #[zbus(out_args("status"))]
    async fn set_presence(&self, status: String, note: String) -> Result<String, MessengerError> {
        let Some(s) = PresenceStatus::settable_of_name(status.trim()) else {
            return Err(MessengerError::from(ServiceError::InvalidArgument(
                format!("presence {status:?}: online, away, busy or invisible"),
            )));
        };
        let p = self.service.set_presence(s, &note).await?;
        Ok(p.status.name().to_owned())
    }

    /// A contact's presence as last heard (`unknown` when it never told one; `offline`
    /// once it ran out), its note and when it was last heard (Unix ms); an empty `user`:
    /// this identity's own.
    #[zbus(out_args("status", "note", "last_seen"))]
    async fn get_presence(&self, user: String) -> Result<(String, String, i64), MessengerError> {
        let p = self.service.get_presence(&user).await?;
        Ok((p.status.name().to_owned(), p.note, p.last_seen_ms))
    }

    /// The user this nesd runs for.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn user(&self) -> String {
        self.user.clone()
    }

    /// Whether nesd is connected to the broker.
    #[zbus(property)]
    async fn connected(&self) -> bool {
        match self.service.status().await {
            Ok(s) => s.connected,
            Err(_) => self.last.lock().await.connected,
        }
    }

    /// Unread messages in all conversations.
    #[zbus(property)]
    async fn unread(&self) -> u64 {
        match self.service.status().await {
            Ok(s) => s.unread,
            Err(_) => self.last.lock().await.unread,
        }
    }

    /// A verified incoming message.
    #[zbus(signal)]
    async fn message_received(
        emitter: &SignalEmitter<'_>,
        id: &str,
        from: &str,
        timestamp: i64,
        text: &str,
    ) -> zbus::Result<()>;

    /// A contact's presence changed or ran out (`offline`), or (empty `user`) this
    /// identity's own was set.
    #[zbus(signal)]
    async fn presence_changed(
        emitter: &SignalEmitter<'_>,
        user: &str,
        status: &str,
        note: &str,
    ) -> zbus::Result<()>;

    /// An incoming file is complete and matches the hash its sender signed; `path` is
    /// where nesd keeps it.
    #[zbus(signal)]
    async fn file_received(
        emitter: &SignalEmitter<'_>,
        id: &str,
        from: &str,
        name: &str,
        size: u64,
        path: &str,
    ) -> zbus::Result<()>;

    /// An outgoing message moved on: `sent` (the broker has it), `delivered` and `read`
    /// (the recipient's receipts), `failed`.
    #[zbus(signal)]
    async fn message_state_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        peer: &str,
        state: &str,
    ) -> zbus::Result<()>;
}

/// Turns the service's events into signals until the daemon stops. A stream that ends
/// with an error (this adapter fell behind) is resumed after its last cursor.
async fn signals(
    service: Service,
    iface: InterfaceRef<Messenger>,
    first: mpsc::Receiver<Result<Arc<Event>, ServiceError>>,
) {
    let mut since = None;
    let mut first = Some(first);
    loop {
        let mut events = match first.take() {
            Some(events) => events,
            None => service.events(since),
        };
        let mut failed = false;
        while let Some(event) = events.recv().await {
            match event {
                Ok(event) => {
                    since = Some(event.cursor);
                    signal(&iface, &event).await;
                }
                Err(e) => {
                    warn!(error = %e, "D-Bus signals: the event stream broke; resuming");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            return; // the daemon is stopping
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The signals of one service event, if any.
async fn signal(iface: &InterfaceRef<Messenger>, event: &Event) {
    let emitter = iface.signal_emitter();
    let messenger = iface.get().await;
    let result = match &event.kind {
        EventKind::Message(m)
            if m.direction == Direction::Incoming && m.state == MessageState::Received =>
        {
            match &m.content {
                Content::Text(text) => {
                    let sent =
                        Messenger::message_received(emitter, &m.id, &m.from, m.timestamp_ms, text)
                            .await;
                    unread_changed(&messenger, emitter).await;
                    sent
                }
                // A file is announced once complete (FileReceived), not when its offer
                // arrives.
                Content::File(_) => Ok(()),
            }
        }
        EventKind::MarkedRead(_) => {
            unread_changed(&messenger, emitter).await;
            Ok(())
        }
        EventKind::File(m) if m.direction == Direction::Incoming => match &m.content {
            Content::File(f) if f.state == FileState::Complete => {
                let sent =
                    Messenger::file_received(emitter, &m.id, &m.from, &f.name, f.size, &f.path)
                        .await;
                unread_changed(&messenger, emitter).await;
                sent
            }
            // Not complete yet, or (never logged as a file event) not a file.
            Content::File(_) | Content::Text(_) => Ok(()),
        },
        EventKind::Presence(p) => {
            Messenger::presence_changed(emitter, &p.username, p.status.name(), &p.note).await
        }
        EventKind::StateChanged(c) => {
            Messenger::message_state_changed(emitter, &c.id, &c.peer, c.state.name()).await
        }
        EventKind::Connection(c) => {
            let changed = {
                let mut last = messenger.last.lock().await;
                let changed = last.connected != c.connected;
                last.connected = c.connected;
                changed
            };
            if changed {
                messenger.connected_changed(emitter).await
            } else {
                Ok(())
            }
        }
        // No D-Bus signal for these (the D-Bus API is the small one; gRPC's Events has
        // them all). Named, so that a new kind of event has to decide here.
        EventKind::Message(_)
        | EventKind::File(_)
        | EventKind::KeyChanged(_)
        | EventKind::Contact(_) => Ok(()),
    };
    if let Err(e) = result {
        debug!(error = %e, "cannot emit a D-Bus signal");
    }
}

/// `PropertiesChanged` for `Unread`, when it really changed.
async fn unread_changed(messenger: &Messenger, emitter: &SignalEmitter<'_>) {
    let Ok(status) = messenger.service.status().await else {
        return;
    };
    let changed = {
        let mut last = messenger.last.lock().await;
        let changed = last.unread != status.unread;
        last.unread = status.unread;
        changed
    };
    if changed {
        if let Err(e) = messenger.unread_changed(emitter).await {
            debug!(error = %e, "cannot emit PropertiesChanged");
        }
    }
}

/// One History row: (id, from, to, timestamp, text, direction, state).
fn history_row(m: Message) -> HistoryRow {
    // Held messages are not verified yet: their text is not shown. A file's row has none.
    let text = if m.state == MessageState::Held {
        String::new()
    } else {
        m.text().to_owned()
    };
    (
        m.id,
        m.from,
        m.to,
        m.timestamp_ms,
        text,
        m.direction.name().to_owned(),
        m.state.name().to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError as _;

    #[test]
    fn errors_keep_the_class_and_message() {
        let e = MessengerError::from(ServiceError::NotFound("unknown user zed".into()));
        assert_eq!(e.name().as_str(), "org.nes.Messenger1.Error.NotFound");
        assert_eq!(e.description(), Some("unknown user zed"));
        let e = MessengerError::from(ServiceError::ResourceExhausted("behind".into()));
        assert_eq!(
            e.name().as_str(),
            "org.nes.Messenger1.Error.ResourceExhausted"
        );
        let e = MessengerError::from(ServiceError::Internal("store".into()));
        assert_eq!(e.name().as_str(), "org.nes.Messenger1.Error.Internal");
    }

    #[test]
    fn held_rows_hide_the_text() {
        let m = Message {
            content: Content::Text("secret".into()),
            state: MessageState::Held,
            direction: Direction::Incoming,
            ..Message::example()
        };
        let row = history_row(m);
        assert_eq!(row.4, "");
        assert_eq!(row.6, "held");
        assert_eq!(row.5, "incoming");
    }
}
