//! The outbox: publishes queued frames in order and records their progress.
//!
//! Send stores a message QUEUED with its sealed frame (see [`crate::service`]); this task
//! hands queued frames to the MQTT session in sequence order while the session is up,
//! at most [`WINDOW`] unacknowledged at a time, and moves each message to SENT when the
//! broker acknowledges it (DELIVERED and READ come later, with the recipient's receipts:
//! [`crate::receipts`]). Receipts this daemon owes travel through the outbox too, as
//! entries without a message.
//!
//! - Broker down: nothing is handed over; messages stay QUEUED and go out in order once
//!   the session is back. Frames handed over before the connection broke are re-sent
//!   by rumqttc first, so the order holds.
//! - Daemon restart: everything still QUEUED is handed over again, with the same
//!   frame bytes; the receiver drops the copies it already has (same `from` and `id`).
//! - A frame the broker refuses (MQTT 5: a PUBACK or PUBREC with a failure code, e.g. an
//!   ACL that denies writing to that topic) becomes FAILED with the broker's reason, and
//!   leaves the outbox; the frames after it go on.
//! - A frame whose QoS differs from the one before it (v1 frames go with QoS 2) waits
//!   until the ones before it are acknowledged: brokers keep order only within a QoS.

use crate::model::MessageState;
use crate::mqtt::{Delivery, Token, Transport};
use crate::service::Stats;
use crate::store::Store;
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error};

/// Frames handed to the MQTT session and not yet acknowledged, at most.
pub const WINDOW: usize = 64;
/// The sequence number of frames handed to the session outside the outbox (file chunks,
/// [`crate::files`]): their acknowledgement finds no entry and changes nothing.
pub const NO_SEQ: u64 = u64::MAX;

/// The outbox task.
pub struct Outbox {
    /// Where the queue is.
    pub store: Store,
    /// The MQTT session.
    pub transport: Transport,
    /// Progress reports from the transport.
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    /// Woken when a message was queued.
    pub wake: Arc<Notify>,
    /// The `sent` counter.
    pub stats: Arc<Stats>,
}

impl Outbox {
    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut connection = self.transport.connection();
        // Sequence number of the last frame handed over in this process, and its QoS.
        let mut handed_upto = 0u64;
        let mut last_qos2 = None;
        loop {
            if self.transport.is_connected() {
                handed_upto = self.hand_over(handed_upto, &mut last_qos2).await;
            }
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                d = self.deliveries.recv() => {
                    let Some(d) = d else { return };
                    let mut batch = vec![d];
                    while let Ok(d) = self.deliveries.try_recv() {
                        batch.push(d);
                    }
                    self.record(batch).await;
                }
                _ = self.wake.notified() => {}
                changed = connection.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Hands over queued frames after `after`, as many as the window allows. Returns the
    /// new high-water mark.
    ///
    /// The broker keeps the order of one client's publishes only within one QoS level
    /// (a QoS 2 publish is released to subscribers at PUBREL, so a QoS 1 publish sent
    /// after it can overtake it). So a frame of the other QoS waits until everything
    /// before it is acknowledged; that only happens around v1 (legacy) sends.
    async fn hand_over(&self, mut after: u64, last_qos2: &mut Option<bool>) -> u64 {
        loop {
            let room = WINDOW.saturating_sub(self.transport.outstanding());
            if room == 0 {
                return after;
            }
            let items = match self.store.outbox_after(after, room) {
                Ok(items) => items,
                Err(e) => {
                    error!(error = %e, "cannot read the outbox");
                    return after;
                }
            };
            if items.is_empty() {
                return after;
            }
            for (seq, record) in items {
                if last_qos2.is_some_and(|q| q != record.exactly_once)
                    && self.transport.outstanding() > 0
                {
                    return after; // resumes when the outstanding ones are acknowledged
                }
                *last_qos2 = Some(record.exactly_once);
                let token = Token {
                    seq,
                    peer: record.peer.clone(),
                    id: record.id.clone(),
                };
                let topic = nes_proto::username::topic_of(&record.peer);
                if let Err(e) = self
                    .transport
                    .publish(token, topic, record.exactly_once, record.frame)
                    .await
                {
                    debug!(error = %e, "publish not handed over (stopping)");
                    return after;
                }
                after = seq;
            }
        }
    }

    /// Records SENT (the broker's acknowledgement) / FAILED, takes the entries out of the
    /// outbox, and makes the changes durable and visible.
    async fn record(&self, batch: Vec<Delivery>) {
        let mut delivered = 0u64;
        let mut changed = false;
        for d in batch {
            let (token, state, error) = match d {
                // Written to the connection: it stays QUEUED until the broker answers.
                Delivery::Sent(_) => continue,
                Delivery::Delivered(t) => (t, MessageState::Sent, String::new()),
                // Sending it again would be refused again: FAILED, with the broker's reason.
                Delivery::Refused(t, why) => (t, MessageState::Failed, why),
            };
            match self
                .store
                .set_outgoing_state(&token.peer, &token.id, state, &error)
            {
                Ok(Some(_)) if state == MessageState::Sent => {
                    changed = true;
                    delivered += 1
                }
                Ok(Some(_)) => changed = true,
                // A receipt (no message), or a message a receipt moved on first.
                Ok(None) => {
                    if let Err(e) = self.store.outbox_forget(token.seq) {
                        error!(error = %e, id = %token.id, "cannot record a delivery");
                    }
                }
                Err(e) => error!(error = %e, id = %token.id, "cannot record a delivery"),
            }
        }
        // Only a message's new state needs to be durable now (and its event published,
        // which waits for the flush). A batch of "written" reports changes nothing, and
        // an acknowledged receipt or presence leaving the outbox may come back after a
        // crash: sent twice, it changes nothing at the other end.
        if changed {
            if let Err(e) = self.store.commit().await {
                error!(error = %e, "cannot flush the store");
            }
        }
        self.stats.add_sent(delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Content, Direction, Message};
    use crate::mqtt::MqttConfig;
    use crate::store::OutboxRecord;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Just enough of an MQTT 3.1.1 broker for one client: CONNACK, SUBACK, PUBACK, PUBREC
    /// and PUBCOMP, PINGRESP. Reports each PUBLISH payload, in arrival order.
    async fn fake_broker(listener: TcpListener, published: mpsc::UnboundedSender<Vec<u8>>) {
        while let Ok((mut stream, _)) = listener.accept().await {
            let published = published.clone();
            tokio::spawn(async move {
                let _ = serve(&mut stream, &published).await;
            });
        }
    }

    async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
        let header = s.read_u8().await?;
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            let b = s.read_u8().await?;
            len += usize::from(b & 0x7f) * mult;
            if b & 0x80 == 0 {
                break;
            }
            mult *= 128;
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        Ok((header, body))
    }

    async fn serve(
        s: &mut TcpStream,
        published: &mpsc::UnboundedSender<Vec<u8>>,
    ) -> std::io::Result<()> {
        loop {
            let (header, body) = read_packet(s).await?;
            match header >> 4 {
                1 => s.write_all(&[0x20, 2, 0, 0]).await?,
                8 => s.write_all(&[0x90, 3, body[0], body[1], 1]).await?,
                3 => {
                    let qos = (header >> 1) & 3;
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let at = 2 + topic_len;
                    let (pkid, payload) = (&body[at..at + 2], &body[at + 2..]);
                    let _ = published.send(payload.to_vec());
                    let ack = if qos == 2 { 0x50 } else { 0x40 };
                    s.write_all(&[ack, 2, pkid[0], pkid[1]]).await?;
                }
                6 => s.write_all(&[0x70, 2, body[0], body[1]]).await?,
                12 => s.write_all(&[0xd0, 0]).await?,
                14 => return Ok(()),
                _ => {}
            }
        }
    }

    fn queued(i: usize) -> (Message, OutboxRecord) {
        let peer = if i % 2 == 0 { "bob" } else { "carol" };
        let id = format!("id{i:02}");
        let m = Message {
            id: id.clone(),
            from: "me_".into(),
            to: peer.into(),
            peer: peer.into(),
            direction: Direction::Outgoing,
            content: Content::Text(format!("text {i}")),
            timestamp_ms: 0,
            stored_at_ms: 0,
            state: MessageState::Queued,
            read: true,
            wire_version: 2,
            error: String::new(),
            wants_receipts: false,
        };
        let frame = format!("frame {i:02}").into_bytes();
        (
            m,
            OutboxRecord {
                peer: peer.into(),
                id,
                exactly_once: i % 5 == 0,
                frame,
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_while_the_broker_is_down_then_published_in_order_and_delivered() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        // A port nobody listens on yet: the broker is "down".
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (incoming_tx, _incoming_rx) = mpsc::unbounded_channel();
        let (delivery_tx, deliveries) = mpsc::unbounded_channel();
        let config = MqttConfig {
            // The fake broker speaks 3.1.1 only.
            protocol: crate::mqtt::BrokerProtocol::V311,
            ..MqttConfig::new(
                "127.0.0.1",
                port,
                "outbox-test",
                "nes/me_/message",
                Duration::from_secs(30),
            )
        };
        let (transport, mqtt_task) =
            Transport::start(config, incoming_tx, delivery_tx, shutdown.clone());
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(Stats::default());
        let outbox = Outbox {
            store: store.clone(),
            transport,
            deliveries,
            wake: wake.clone(),
            stats: stats.clone(),
        };
        let outbox_task = tokio::spawn(outbox.run(shutdown.clone()));

        let n = 150; // more than the window, to see it refill in order
        for i in 0..n {
            let (m, o) = queued(i);
            store.insert_outgoing(m, o).unwrap();
            wake.notify_one();
        }
        assert_eq!(store.outbox_len(), n as u64);
        assert!(store
            .history("bob", 0, None)
            .unwrap()
            .iter()
            .all(|m| m.state == MessageState::Queued));

        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (published_tx, mut published) = mpsc::unbounded_channel();
        tokio::spawn(fake_broker(listener, published_tx));
        for i in 0..n {
            let frame = tokio::time::timeout(Duration::from_secs(120), published.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(String::from_utf8(frame).unwrap(), format!("frame {i:02}"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while store.outbox_len() > 0 || stats.sent() < n as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "still queued: {}",
                store.outbox_len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for peer in ["bob", "carol"] {
            let h = store.history(peer, 0, None).unwrap();
            assert!(
                h.iter().all(|m| m.state == MessageState::Sent),
                "{peer}: {h:?}"
            );
        }
        assert_eq!(stats.sent(), n as u64);
        assert!(
            published.try_recv().is_err(),
            "nothing is published twice on a steady connection"
        );
        shutdown_tx.send(true).unwrap();
        outbox_task.await.unwrap();
        mqtt_task.await.unwrap();
    }
}
