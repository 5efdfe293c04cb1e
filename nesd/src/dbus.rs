//! The D-Bus adapter: `org.nes.Messenger1` on the session bus.
//!
//! It sits beside [`crate::grpc`] over the same [`Service`] and holds no logic of its
//! own: each method is one service call, each signal one event of [`Service::events`].
//!
//! | D-Bus | service |
//! |---|---|
//! | `Send(s recipient, s text) -> s id` | [`Service::send`] |
//! | `ListConversations() -> a(sttxs)` (peer, unread, total, last timestamp, last text) | [`Service::conversations`] |
//! | `History(s peer, u limit) -> a(sssxsss)` (id, from, to, timestamp, text, direction, state), oldest first; limit 0: all | [`Service::history`] |
//! | `MarkRead(s peer) -> t marked` | [`Service::mark_read`] |
//! | property `User` (s), `Connected` (b), `Unread` (t), with `PropertiesChanged` | [`Service::status`] + events |
//! | signal `MessageReceived(s id, s from, x timestamp, s text)` | an incoming message event |
//!
//! Errors are D-Bus errors named `org.nes.Messenger1.Error.<Class>` (`InvalidArgument`,
//! `NotFound`, `FailedPrecondition`, `Unavailable`, `AlreadyExists`, `Internal`) with
//! the service's one-line message, the same classes as the gRPC statuses.
//!
//! The workspace builds zbus without its object-server macros (only the `tokio`
//! connection layer), so this adapter dispatches method calls itself from the
//! connection's message stream and answers `Introspect`, `Properties` and `Peer` by hand.
//! That keeps the whole surface in this one file, including the introspection XML that
//! `busctl introspect` and `gdbus` read.
//!
//! Without a session bus (a server, a systemd system service) nesd logs that once and
//! serves gRPC as usual; the same when another process already owns the name.

use crate::error::ServiceError;
use crate::service::Service;
use futures::StreamExt;
use nes_proto::rpc::{self, event::Kind, Direction, MessageState};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::{Flags, Header, Type as MessageType};
use zbus::{Connection, Message, Variant};

/// The well-known bus name.
pub const NAME: &str = "org.nes.Messenger1";
/// The object path.
pub const PATH: &str = "/org/nes/Messenger1";
/// The interface.
pub const INTERFACE: &str = "org.nes.Messenger1";

const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PEER: &str = "org.freedesktop.DBus.Peer";

/// Why the D-Bus adapter stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbusError {
    /// The session bus could not be used.
    #[error("D-Bus: {0}")]
    Bus(String),
}

/// Serves the service on the session bus until the daemon stops (its event stream ends).
pub async fn serve(service: Service) -> Result<(), DbusError> {
    let conn = match Connection::session().await {
        Ok(conn) => conn,
        Err(e) => {
            info!(error = %e, "no D-Bus session bus: the D-Bus API is off (gRPC serves as usual)");
            return Ok(());
        }
    };
    // The stream exists before the name does, so no call to the name can be missed.
    let mut calls = zbus::MessageStream::from(&conn);
    match conn
        .request_name_with_flags(NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
        Ok(other) => {
            warn!(name = NAME, reply = ?other, "another process owns the D-Bus name (another nesd on this session bus?): the D-Bus API is off");
            return Ok(());
        }
        Err(e) => {
            warn!(name = NAME, error = %e, "cannot own the D-Bus name (another nesd on this session bus?): the D-Bus API is off");
            return Ok(());
        }
    }
    let status = service
        .status()
        .await
        .map_err(|e| DbusError::Bus(e.to_string()))?;
    let adapter = Adapter {
        conn: conn.clone(),
        service,
        props: Arc::new(Mutex::new(Props {
            connected: status.connected,
            unread: status.unread,
        })),
        user: status.user,
    };
    info!(
        name = NAME,
        path = PATH,
        "serving the D-Bus API on the session bus"
    );

    let mut signals = tokio::spawn(adapter.clone().signals());
    loop {
        tokio::select! {
            // The event stream ends when the daemon stops: so does the adapter.
            _ = &mut signals => break,
            call = calls.next() => match call {
                Some(Ok(msg)) if msg.message_type() == MessageType::MethodCall => {
                    // One task per call: a slow Send (key lookup, sealing) blocks no one.
                    let adapter = adapter.clone();
                    tokio::spawn(async move { adapter.dispatch(msg).await });
                }
                Some(_) => {}
                None => {
                    warn!("the D-Bus session bus connection closed: the D-Bus API is off");
                    signals.abort();
                    break;
                }
            },
        }
    }
    let _ = conn.release_name(NAME).await;
    Ok(())
}

/// Property values last announced, to signal only real changes.
#[derive(Debug)]
struct Props {
    connected: bool,
    unread: u64,
}

#[derive(Clone)]
struct Adapter {
    conn: Connection,
    service: Service,
    props: Arc<Mutex<Props>>,
    user: String,
}

/// What a method call answers: a body, or a D-Bus error (name, message).
type Answer = Result<Reply, (String, String)>;

/// The reply bodies of the methods.
enum Reply {
    Empty,
    Str(String),
    U64(u64),
    Variant(Variant<'static>),
    Props(HashMap<String, Variant<'static>>),
    Conversations(Vec<(String, u64, u64, i64, String)>),
    History(Vec<(String, String, String, i64, String, String, String)>),
}

impl Adapter {
    async fn dispatch(&self, msg: Message) {
        let header = msg.header();
        let path = header
            .path()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let interface = header.interface().map(|i| i.as_str().to_owned());
        let member = header
            .member()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        debug!(%path, ?interface, %member, "D-Bus call");
        let answer = self
            .answer(&msg, &path, interface.as_deref(), &member)
            .await;
        if msg
            .primary_header()
            .flags()
            .contains(Flags::NO_REPLY_EXPECTED)
        {
            return;
        }
        if let Err(e) = self.reply(&header, answer).await {
            debug!(error = %e, "cannot reply to a D-Bus call");
        }
    }

    async fn answer(
        &self,
        msg: &Message,
        path: &str,
        interface: Option<&str>,
        member: &str,
    ) -> Answer {
        match (interface, member) {
            (Some(INTROSPECTABLE) | None, "Introspect") => {
                return introspect(path)
                    .map(Reply::Str)
                    .ok_or_else(|| unknown_object(path))
            }
            (Some(PEER) | None, "Ping") => return Ok(Reply::Empty),
            (Some(PEER) | None, "GetMachineId") => {
                let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
                return Ok(Reply::Str(id.trim().to_owned()));
            }
            _ => {}
        }
        if path != PATH {
            return Err(unknown_object(path));
        }
        match (interface, member) {
            (Some(INTERFACE) | None, "Send") => {
                let (to, text): (String, String) = args(msg)?;
                let request = rpc::SendRequest {
                    to,
                    text,
                    legacy: false,
                };
                let message = self.service.send(request).await.map_err(service_error)?;
                Ok(Reply::Str(message.id))
            }
            (Some(INTERFACE) | None, "ListConversations") => {
                let conversations = self.service.conversations().await.map_err(service_error)?;
                Ok(Reply::Conversations(
                    conversations
                        .into_iter()
                        .map(|c| {
                            let (at, text) =
                                c.last.map(|m| (m.timestamp_ms, m.text)).unwrap_or_default();
                            (c.peer, c.unread, c.total, at, text)
                        })
                        .collect(),
                ))
            }
            (Some(INTERFACE) | None, "History") => {
                let (peer, limit): (String, u32) = args(msg)?;
                let messages = self
                    .service
                    .history(&peer, limit, "")
                    .await
                    .map_err(service_error)?;
                Ok(Reply::History(
                    messages.into_iter().map(history_row).collect(),
                ))
            }
            (Some(INTERFACE) | None, "MarkRead") => {
                let (peer,): (String,) = args(msg)?;
                let marked = self
                    .service
                    .mark_read(&peer, "")
                    .await
                    .map_err(service_error)?;
                Ok(Reply::U64(marked))
            }
            (Some(PROPERTIES), "Get") => {
                let (iface, name): (String, String) = args(msg)?;
                if iface != INTERFACE {
                    return Err(unknown_interface(&iface));
                }
                let mut all = self.properties().await;
                all.remove(&name).map(Reply::Variant).ok_or_else(|| {
                    (
                        "org.freedesktop.DBus.Error.UnknownProperty".into(),
                        format!("no property {name}"),
                    )
                })
            }
            (Some(PROPERTIES), "GetAll") => {
                let (iface,): (String,) = args(msg)?;
                if iface == INTERFACE {
                    Ok(Reply::Props(self.properties().await))
                } else {
                    // The standard interfaces have no properties.
                    Ok(Reply::Props(HashMap::new()))
                }
            }
            (Some(PROPERTIES), "Set") => Err((
                "org.freedesktop.DBus.Error.PropertyReadOnly".into(),
                "the properties of org.nes.Messenger1 are read-only".into(),
            )),
            (Some(i), _) if ![INTERFACE, PROPERTIES, INTROSPECTABLE, PEER].contains(&i) => {
                Err(unknown_interface(i))
            }
            _ => Err((
                "org.freedesktop.DBus.Error.UnknownMethod".into(),
                format!("no method {member} on {}", interface.unwrap_or(INTERFACE)),
            )),
        }
    }

    async fn reply(&self, header: &Header<'_>, answer: Answer) -> zbus::Result<()> {
        match answer {
            Ok(Reply::Empty) => self.conn.reply(header, &()).await,
            Ok(Reply::Str(s)) => self.conn.reply(header, &s).await,
            Ok(Reply::U64(n)) => self.conn.reply(header, &n).await,
            Ok(Reply::Variant(v)) => self.conn.reply(header, &v).await,
            Ok(Reply::Props(p)) => self.conn.reply(header, &p).await,
            Ok(Reply::Conversations(c)) => self.conn.reply(header, &c).await,
            Ok(Reply::History(h)) => self.conn.reply(header, &h).await,
            Err((name, message)) => self.conn.reply_error(header, name.as_str(), &message).await,
        }
    }

    /// The current properties, read from the service.
    async fn properties(&self) -> HashMap<String, Variant<'static>> {
        let mut props = HashMap::new();
        props.insert("User".to_owned(), Variant::from(self.user.clone()));
        match self.service.status().await {
            Ok(s) => {
                props.insert("Connected".to_owned(), Variant::from(s.connected));
                props.insert("Unread".to_owned(), Variant::from(s.unread));
            }
            Err(_) => {
                let last = self.props.lock().await;
                props.insert("Connected".to_owned(), Variant::from(last.connected));
                props.insert("Unread".to_owned(), Variant::from(last.unread));
            }
        }
        props
    }

    /// Turns the service's events into signals until the daemon stops. A stream that
    /// ends with an error (this adapter fell behind) is resumed after its last cursor.
    async fn signals(self) {
        let mut since = None;
        loop {
            let mut events = self.service.events(since);
            let mut failed = false;
            while let Some(event) = events.recv().await {
                match event {
                    Ok(event) => {
                        since = Some(event.cursor);
                        self.signal(&event).await;
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

    async fn signal(&self, event: &rpc::Event) {
        let result = match &event.kind {
            Some(Kind::Message(m))
                if m.direction == Direction::Incoming as i32
                    && m.state == MessageState::Received as i32 =>
            {
                let sent = self
                    .conn
                    .emit_signal(
                        None::<&str>,
                        PATH,
                        INTERFACE,
                        "MessageReceived",
                        &(
                            m.id.as_str(),
                            m.from.as_str(),
                            m.timestamp_ms,
                            m.text.as_str(),
                        ),
                    )
                    .await;
                self.unread_changed().await;
                sent
            }
            Some(Kind::MarkedRead(_)) => {
                self.unread_changed().await;
                Ok(())
            }
            Some(Kind::Connection(c)) => {
                let changed = {
                    let mut props = self.props.lock().await;
                    let changed = props.connected != c.connected;
                    props.connected = c.connected;
                    changed
                };
                if changed {
                    self.properties_changed("Connected", Variant::from(c.connected))
                        .await
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            debug!(error = %e, "cannot emit a D-Bus signal");
        }
    }

    async fn unread_changed(&self) {
        let Ok(status) = self.service.status().await else {
            return;
        };
        let changed = {
            let mut props = self.props.lock().await;
            let changed = props.unread != status.unread;
            props.unread = status.unread;
            changed
        };
        if changed {
            if let Err(e) = self
                .properties_changed("Unread", Variant::from(status.unread))
                .await
            {
                debug!(error = %e, "cannot emit PropertiesChanged");
            }
        }
    }

    async fn properties_changed(&self, name: &str, value: Variant<'static>) -> zbus::Result<()> {
        let mut changed: HashMap<&str, Variant<'static>> = HashMap::new();
        changed.insert(name, value);
        let invalidated: Vec<&str> = Vec::new();
        self.conn
            .emit_signal(
                None::<&str>,
                PATH,
                PROPERTIES,
                "PropertiesChanged",
                &(INTERFACE, changed, invalidated),
            )
            .await
    }
}

/// The arguments of a call, or an InvalidArgs error naming the expected signature.
fn args<B>(msg: &Message) -> Result<B, (String, String)>
where
    B: for<'d> serde::Deserialize<'d> + zbus::Type,
{
    msg.body().deserialize::<B>().map_err(|e| {
        (
            "org.freedesktop.DBus.Error.InvalidArgs".into(),
            format!("expected arguments ({}): {e}", B::SIGNATURE),
        )
    })
}

/// One History row: (id, from, to, timestamp, text, direction, state).
fn history_row(m: rpc::Message) -> (String, String, String, i64, String, String, String) {
    let direction = match Direction::try_from(m.direction) {
        Ok(Direction::Incoming) => "incoming",
        Ok(Direction::Outgoing) => "outgoing",
        _ => "unknown",
    };
    let state = match MessageState::try_from(m.state) {
        Ok(MessageState::Queued) => "queued",
        Ok(MessageState::Sent) => "sent",
        Ok(MessageState::Delivered) => "delivered",
        Ok(MessageState::Failed) => "failed",
        Ok(MessageState::Received) => "received",
        Ok(MessageState::Held) => "held",
        _ => "unknown",
    };
    // Held messages are not verified yet: their text is not shown.
    let text = if m.state == MessageState::Held as i32 {
        String::new()
    } else {
        m.text
    };
    (
        m.id,
        m.from,
        m.to,
        m.timestamp_ms,
        text,
        direction.to_owned(),
        state.to_owned(),
    )
}

/// The D-Bus error for a service error: same classes as the gRPC statuses.
fn service_error(e: ServiceError) -> (String, String) {
    let class = match &e {
        ServiceError::InvalidArgument(_) => "InvalidArgument",
        ServiceError::NotFound(_) => "NotFound",
        ServiceError::FailedPrecondition(_) => "FailedPrecondition",
        ServiceError::Unavailable(_) => "Unavailable",
        ServiceError::AlreadyExists(_) => "AlreadyExists",
        ServiceError::ResourceExhausted(_) => "ResourceExhausted",
        _ => "Internal",
    };
    (format!("{INTERFACE}.Error.{class}"), e.to_string())
}

fn unknown_object(path: &str) -> (String, String) {
    (
        "org.freedesktop.DBus.Error.UnknownObject".into(),
        format!("no object at {path}"),
    )
}

fn unknown_interface(interface: &str) -> (String, String) {
    (
        "org.freedesktop.DBus.Error.UnknownInterface".into(),
        format!("no interface {interface}"),
    )
}

/// The introspection XML of `path`: the object itself, or the nodes leading to it (so
/// `busctl tree` finds it).
fn introspect(path: &str) -> Option<String> {
    const DOCTYPE: &str = "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n";
    let child = match path {
        "/" => Some("org"),
        "/org" => Some("nes"),
        "/org/nes" => Some("Messenger1"),
        PATH => None,
        _ => return None,
    };
    Some(match child {
        Some(child) => format!("{DOCTYPE}<node>\n  <node name=\"{child}\"/>\n</node>\n"),
        None => format!("{DOCTYPE}{OBJECT_XML}"),
    })
}

/// The object's interfaces, as `Introspect` reports them.
const OBJECT_XML: &str = r#"<node>
  <interface name="org.nes.Messenger1">
    <method name="Send">
      <arg name="recipient" type="s" direction="in"/>
      <arg name="text" type="s" direction="in"/>
      <arg name="id" type="s" direction="out"/>
    </method>
    <method name="ListConversations">
      <arg name="conversations" type="a(sttxs)" direction="out"/>
    </method>
    <method name="History">
      <arg name="peer" type="s" direction="in"/>
      <arg name="limit" type="u" direction="in"/>
      <arg name="messages" type="a(sssxsss)" direction="out"/>
    </method>
    <method name="MarkRead">
      <arg name="peer" type="s" direction="in"/>
      <arg name="marked" type="t" direction="out"/>
    </method>
    <signal name="MessageReceived">
      <arg name="id" type="s"/>
      <arg name="from" type="s"/>
      <arg name="timestamp" type="x"/>
      <arg name="text" type="s"/>
    </signal>
    <property name="User" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Connected" type="b" access="read"/>
    <property name="Unread" type="t" access="read"/>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="props" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
</node>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_covers_the_tree() {
        assert!(introspect("/").unwrap().contains("<node name=\"org\"/>"));
        assert!(introspect("/org/nes")
            .unwrap()
            .contains("<node name=\"Messenger1\"/>"));
        let xml = introspect(PATH).unwrap();
        for needle in [
            "name=\"Send\"",
            "name=\"ListConversations\"",
            "name=\"History\"",
            "name=\"MarkRead\"",
            "name=\"MessageReceived\"",
            "name=\"Unread\"",
        ] {
            assert!(xml.contains(needle), "{needle}");
        }
        assert!(introspect("/elsewhere").is_none());
    }

    #[test]
    fn errors_keep_the_class_and_message() {
        let (name, message) = service_error(ServiceError::NotFound("unknown user zed".into()));
        assert_eq!(name, "org.nes.Messenger1.Error.NotFound");
        assert_eq!(message, "unknown user zed");
    }

    #[test]
    fn held_rows_hide_the_text() {
        let m = rpc::Message {
            text: "secret".into(),
            state: MessageState::Held as i32,
            direction: Direction::Incoming as i32,
            ..Default::default()
        };
        let row = history_row(m);
        assert_eq!(row.4, "");
        assert_eq!(row.6, "held");
        assert_eq!(row.5, "incoming");
    }
}
