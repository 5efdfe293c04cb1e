//! A store written by an earlier release opens in this one: the fixture
//! `tests/fixtures/store-0.1.0/store/` (made by `examples/make_store_fixture.rs` with
//! release 0.1.0, see its README) is copied to a temporary directory, opened with today's
//! code, and every record is compared with what the generator wrote (`content.rs`) and
//! what the store chose itself then (the constants below).

#[path = "fixtures/store-0.1.0/content.rs"]
mod content;

use content::{Ev, Msg};
use futures::future::BoxFuture;
use nes_proto::rpc::{Direction, MessageState};
use nes_proto::{PublicKey, Username};
use nesd::config::KeyPolicy;
use nesd::keycache::KeyCache;
use nesd::keyserver::{FetchError, Fetched, KeySource};
use nesd::model::{self, EventKind as Kind, TrustState};
use nesd::store::Store;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

// Chosen by the store when the fixture was made (make_store_fixture printed it).
const STORE_ID: &str = "b41c09c027fe060f";
const LOG_CURSORS: &[&str] = &[
    "b41c09c027fe060f-1-d3478884",  // at_ms 1796298164210
    "b41c09c027fe060f-2-c683dcc1",  // at_ms 1796298164210
    "b41c09c027fe060f-3-b52e0ce0",  // at_ms 1796298164210
    "b41c09c027fe060f-4-a829e968",  // at_ms 1796298164210
    "b41c09c027fe060f-5-8b139ea3",  // at_ms 1796298164211
    "b41c09c027fe060f-6-a2eaaf1d",  // at_ms 1796298164211
    "b41c09c027fe060f-7-57eebad6",  // at_ms 1796298164211
    "b41c09c027fe060f-8-4ac5eac0",  // at_ms 1796298164211
    "b41c09c027fe060f-9-5a7addd2",  // at_ms 1796298164211
    "b41c09c027fe060f-10-6799e175", // at_ms 1796298164211
    "b41c09c027fe060f-11-72b302aa", // at_ms 1796298164212
    "b41c09c027fe060f-12-3d41c3f5", // at_ms 1796298164212
    "b41c09c027fe060f-13-14944f47", // at_ms 1796298164212
    "b41c09c027fe060f-14-feb83c37", // at_ms 1796298164212
    "b41c09c027fe060f-15-1f482871", // at_ms 1796298164212
    "b41c09c027fe060f-16-287bce46", // at_ms 1796298164212
    "b41c09c027fe060f-17-7aef0566", // at_ms 1796298164213
    "b41c09c027fe060f-18-39a3b26d", // at_ms 1796298164213
];
const STORED_AT_MS: &[(&str, i64)] = &[
    ("a-1", 1796298164210),
    ("a-2", 1796298164210),
    ("o-1", 1796298164210),
    ("o-2", 1796298164211),
    ("c-1", 1796298164211),
    ("o-3", 1796298164211),
    ("o-4", 1796298164212),
    ("b-1", 1796298164212),
    ("b-2", 1796298164213),
];
const FETCHED_AT_MS: &[(&str, i64)] = &[
    ("alice", 1796298164210),
    ("bob", 1796298164212),
    ("carol", 1796298164210),
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-0.1.0")
}

/// Copies the fixture, so that the committed files are never opened (sled writes to a
/// store it opens).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn key_pair(name: &str) -> (PublicKey, PublicKey) {
    let read = |role: &str| {
        let pem =
            std::fs::read_to_string(fixture().join(format!("keys/{name}-{role}.pem"))).unwrap();
        PublicKey::from_pem(&pem).unwrap()
    };
    (read("message"), read("sign"))
}

/// A key server that cannot be reached: every contact must come from the store.
struct Down;

impl KeySource for Down {
    fn fetch<'a>(&'a self, _user: &'a Username) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        Box::pin(async { Err(FetchError::Unavailable("the test has none".into())) })
    }
}

fn stored_at(id: &str) -> i64 {
    STORED_AT_MS
        .iter()
        .find(|(i, _)| *i == id)
        .unwrap_or_else(|| panic!("no stored_at_ms for {id}"))
        .1
}

/// The state a message of the fixture has once the store is converted to format 2:
/// format 1's outgoing SENT ("handed to MQTT") is QUEUED, its DELIVERED ("acknowledged by
/// the broker") is SENT.
fn in_format_2(want: &Msg) -> i32 {
    match (want.direction, want.state) {
        (Direction::Outgoing, MessageState::Sent) => MessageState::Queued as i32,
        (Direction::Outgoing, MessageState::Delivered) => MessageState::Sent as i32,
        (_, state) => state as i32,
    }
}

/// `content.rs` names values as the API does: the store's are compared by their API
/// numbers.
fn check_message(got: &model::Message, want: &Msg) {
    let incoming = want.direction == Direction::Incoming;
    let ctx = want.id;
    assert_eq!(got.id, want.id, "{ctx}");
    assert_eq!(got.peer, want.peer, "{ctx}");
    let (from, to) = if incoming {
        (want.peer, content::ME)
    } else {
        (content::ME, want.peer)
    };
    assert_eq!((got.from.as_str(), got.to.as_str()), (from, to), "{ctx}");
    assert_eq!(got.direction.api_number(), want.direction as i32, "{ctx}");
    assert_eq!(got.text(), want.text, "{ctx}");
    assert_eq!(got.timestamp_ms, want.timestamp_ms, "{ctx}");
    assert_eq!(got.stored_at_ms, stored_at(want.id), "{ctx}");
    assert_eq!(got.state.api_number(), in_format_2(want), "{ctx}");
    assert_eq!(got.read, want.read, "{ctx}");
    assert_eq!(got.wire_version, want.wire_version, "{ctx}");
    assert_eq!(got.error, want.error, "{ctx}");
}

#[tokio::test]
async fn a_store_written_by_release_0_1_0_opens_with_everything_in_it() {
    assert_eq!(content::RELEASE, "0.1.0");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    copy_dir(&fixture().join("store"), &dir);
    let store = Store::open(&dir).expect("the 0.1.0 store opens");
    assert_eq!(store.store_id(), STORE_ID);
    // 0.1.0 wrote no format version: its format is format 1, converted to 2 at once.
    assert_eq!(store.format_version(), 2);

    // Messages, by conversation, in order, every field.
    for peer in ["alice", "carol", "bob"] {
        let want: Vec<&Msg> = content::MESSAGES
            .iter()
            .filter(|m| m.peer == peer)
            .collect();
        let got = store.history(peer, 0, None).unwrap();
        assert_eq!(got.len(), want.len(), "{peer}");
        for (g, w) in got.iter().zip(&want) {
            check_message(g, w);
            check_message(&store.message(peer, w.id).unwrap().unwrap(), w);
        }
    }
    assert_eq!(content::MESSAGES.len(), 9);

    // Conversations: most recent first, counters.
    let convs: Vec<(String, u64, u64, String)> = store
        .conversations()
        .unwrap()
        .into_iter()
        .map(|c| (c.peer, c.total, c.unread, c.last.unwrap().id))
        .collect();
    let want: Vec<(String, u64, u64, String)> = [
        ("bob", 2, 0, "b-2"),
        ("carol", 3, 1, "o-4"),
        ("alice", 4, 1, "o-2"),
    ]
    .into_iter()
    .map(|(p, t, u, l)| (p.into(), t, u, l.into()))
    .collect();
    assert_eq!(convs, want);
    assert_eq!(store.unread_total().unwrap(), 2);

    // The outbox: the queued and the sent frame, in order, byte for byte.
    assert_eq!(store.outbox_len(), content::OUTBOX.len() as u64);
    let outbox = store.outbox_after(0, 100).unwrap();
    assert_eq!(outbox.len(), content::OUTBOX.len());
    for ((_, record), id) in outbox.iter().zip(content::OUTBOX) {
        let m = content::MESSAGES.iter().find(|m| m.id == *id).unwrap();
        assert_eq!(record.id, m.id);
        assert_eq!(record.peer, m.peer);
        assert_eq!(record.exactly_once, m.exactly_once, "{id}");
        assert_eq!(record.frame, m.frame, "{id}");
    }
    assert!(outbox[0].0 < outbox[1].0);

    // The held message and its frame.
    let held = store.held("bob").unwrap();
    assert_eq!(held.len(), 1);
    let b2 = content::MESSAGES.iter().find(|m| m.id == "b-2").unwrap();
    check_message(&held[0].message, b2);
    assert_eq!(held[0].frame, b2.frame);
    assert!(store.held("alice").unwrap().is_empty());

    // The parked frame and the inbox frame.
    let (from, frame) = content::PARKED;
    assert_eq!(store.waiting_len(), 1);
    assert!(store.has_waiting(from).unwrap());
    let waiting = store.waiting(10).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        (waiting[0].from.as_str(), &waiting[0].frame[..]),
        (from, frame)
    );
    assert_eq!(store.waiting_senders(10), [from]);
    assert_eq!(store.inbox_len(), 1);
    let inbox = store.inbox_after(0, 10).unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].frame, content::INBOX);
    assert_eq!(store.inbox_last_seq(), inbox[0].seq);
    assert!(store.inbox_holds(content::INBOX));

    // The event log: every event, its cursor and log cursor, and what it says.
    let n = content::EVENTS.len();
    assert_eq!(LOG_CURSORS.len(), n);
    assert_eq!(store.last_cursor(), n as u64);
    assert_eq!(store.last_log_cursor().unwrap(), LOG_CURSORS[n - 1]);
    let events = store.events_after(0, 1000).unwrap();
    assert_eq!(events.len(), n);
    let (bob_m, bob_s) = key_pair("bob");
    let (new_m, new_s) = key_pair("bob-new");
    for (i, (event, want)) in events.iter().zip(content::EVENTS).enumerate() {
        assert_eq!(event.cursor, i as u64 + 1);
        assert_eq!(event.log_cursor, LOG_CURSORS[i], "event {}", i + 1);
        let kind = &event.kind;
        match (want, kind) {
            (Ev::Message(id), Kind::Message(m)) => {
                assert_eq!(m.id, *id);
                assert_eq!(m.stored_at_ms, stored_at(id));
            }
            (Ev::State(id, state), Kind::StateChanged(s)) => {
                assert_eq!((s.id.as_str(), s.state.api_number()), (*id, *state as i32));
            }
            (Ev::MarkedRead(peer, unread), Kind::MarkedRead(r)) => {
                assert_eq!((r.peer.as_str(), r.unread), (*peer, *unread));
            }
            (Ev::Contact(user), Kind::Contact(c)) => {
                assert_eq!(c.username, *user);
                assert!(c.legacy);
            }
            (Ev::KeyChanged(user), Kind::KeyChanged(k)) => {
                assert_eq!(k.username, *user);
                assert_eq!(k.old_message_key, bob_m.fingerprint());
                assert_eq!(k.old_sign_key, bob_s.fingerprint());
                assert_eq!(k.new_message_key, new_m.fingerprint());
                assert_eq!(k.new_sign_key, new_s.fingerprint());
            }
            (Ev::ConnectionDown, Kind::Connection(c)) => {
                assert!(!c.connected);
                assert_eq!(c.reason, content::CONNECTION_REASON);
            }
            (want, got) => panic!("event {}: {got:?}, expected {want:?}", i + 1),
        }
    }
    // Replay from a cursor a client kept.
    for (i, cursor) in LOG_CURSORS.iter().enumerate() {
        assert_eq!(store.resolve_since(cursor).unwrap(), i as u64 + 1);
        let rest = store.events_after(i as u64 + 1, 1000).unwrap();
        assert_eq!(rest.len(), n - i - 1);
        if let Some(next) = rest.first() {
            assert_eq!(next.log_cursor, LOG_CURSORS[i + 1]);
        }
    }

    // The contacts the key cache pinned, with the key server down.
    let (my_m, my_s) = key_pair(content::MY_KEYS);
    let cache = KeyCache::open(
        store.clone(),
        Arc::new(Down),
        &Username::parse(content::ME).unwrap(),
        my_m,
        my_s,
        KeyPolicy::Tofu,
        Duration::from_secs(3600),
    )
    .unwrap();
    let contacts = cache.list();
    assert_eq!(
        contacts
            .iter()
            .map(|c| c.username.as_str())
            .collect::<Vec<_>>(),
        ["alice", "bob", "carol"]
    );
    for (contact, (user, pinned, pending, legacy)) in contacts.iter().zip(content::CONTACTS) {
        assert_eq!(contact.username.as_str(), *user);
        let (m, s) = key_pair(pinned);
        assert_eq!(contact.pinned.message, m, "{user}");
        assert_eq!(contact.pinned.sign, s, "{user}");
        assert_eq!(contact.pinned.message_pem, m.to_pem(), "{user}");
        assert_eq!(contact.pinned.sign_pem, s.to_pem(), "{user}");
        assert_eq!(
            contact.pinned.answer,
            content::answer_body(pinned),
            "{user}"
        );
        assert_eq!(contact.legacy, *legacy, "{user}");
        let fetched = FETCHED_AT_MS.iter().find(|(u, _)| u == user).unwrap().1;
        assert_eq!(contact.fetched_at_ms, fetched, "{user}");
        let shown = contact.shown();
        assert_eq!(shown.message_key_fingerprint, m.fingerprint());
        assert_eq!(shown.sign_key_fingerprint, s.fingerprint());
        match pending {
            Some(p) => {
                let (pm, ps) = key_pair(p);
                let got = contact.pending.as_ref().unwrap();
                assert_eq!((&got.message, &got.sign), (&pm, &ps), "{user}");
                assert_eq!(got.answer, content::answer_body(p), "{user}");
                assert_eq!(shown.trust, TrustState::KeyChanged, "{user}");
                assert_eq!(shown.pending_message_key_fingerprint, pm.fingerprint());
                assert_eq!(shown.pending_sign_key_fingerprint, ps.fingerprint());
            }
            None => {
                assert!(contact.pending.is_none(), "{user}");
                assert_eq!(shown.trust, TrustState::Pinned, "{user}");
            }
        }
    }

    // And it goes on from there: the next event follows the old ones, the held message
    // can be released once bob's new keys are trusted.
    let bob = Username::parse("bob").unwrap();
    let trusted = cache.trust(&bob, "", &new_s.fingerprint()).await.unwrap();
    assert!(!trusted.key_changed());
    assert_eq!(store.last_cursor(), n as u64 + 1);
    let released = store
        .release_held("bob", held[0].seq, "after the key change".into())
        .unwrap()
        .unwrap();
    assert_eq!(released.state.api_number(), MessageState::Received as i32);
    store.commit().await.unwrap();
    assert_eq!(store.last_cursor(), n as u64 + 2);
    assert_eq!(store.unread_total().unwrap(), 3);
    assert_eq!(
        store.resolve_since(LOG_CURSORS[n - 1]).unwrap(),
        n as u64,
        "old cursors still resume"
    );
}
