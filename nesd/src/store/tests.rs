//! The store's tests: each family of records, the format versions, cursors.

use super::events::START_TAG;
use super::records::Stored;
use super::*;
use crate::model::{Content, MarkedRead, Message, OwnPresence, PresenceStatus};

fn outgoing(id: &str, to: &str) -> (Message, OutboxRecord) {
    let m = Message {
        id: id.into(),
        from: "me_".into(),
        to: to.into(),
        peer: to.into(),
        direction: Direction::Outgoing,
        content: Content::Text(format!("text {id}")),
        timestamp_ms: 0,
        stored_at_ms: 0,
        state: MessageState::Queued,
        read: true,
        wire_version: 2,
        error: String::new(),
        wants_receipts: false,
    };
    let o = OutboxRecord {
        peer: to.into(),
        id: id.into(),
        exactly_once: false,
        frame: id.as_bytes().to_vec(),
    };
    (m, o)
}

#[tokio::test]
async fn inbox_frames_keep_arrival_order_survive_a_reopen_and_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let seqs = {
        let store = open_in_test(tmp.path());
        assert_eq!(store.inbox_len(), 0);
        assert_eq!(store.inbox_last_seq(), 0);
        let frames: [&[u8]; 3] = [b"one", b"two", b"three"];
        assert_eq!(store.inbox_room(&frames), 3);
        let seqs = store.spill(&frames).unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(store.inbox_last_seq(), seqs[2]);
        // A message stored meanwhile takes a sequence number of its own.
        store
            .insert_incoming(incoming("m1", "alice", "hi"), None)
            .unwrap();
        store.commit_all().await.unwrap();
        seqs
    };
    let store = open_in_test(tmp.path());
    assert_eq!(store.inbox_len(), 3, "counted again at open");
    assert_eq!(store.inbox_last_seq(), seqs[2]);
    let all = store.inbox_after(0, 10).unwrap();
    let frames: Vec<&[u8]> = all.iter().map(|s| s.frame.as_slice()).collect();
    assert_eq!(frames, [&b"one"[..], b"two", b"three"]);
    let after_first = store.inbox_after(seqs[0], 1).unwrap();
    assert_eq!(after_first.len(), 1, "the limit holds");
    assert_eq!(after_first[0].frame, b"two");
    assert!(store.inbox_after(seqs[2], 10).unwrap().is_empty());
    assert!(store.inbox_holds(b"two") && !store.inbox_holds(b"four"));
    store.inbox_remove(seqs[1]).unwrap();
    store.inbox_remove(seqs[1]).unwrap();
    assert!(!store.inbox_holds(b"two"), "forgotten with its frame");
    assert!(store.inbox_holds(b"three"));
    assert_eq!(store.inbox_len(), 2, "removing twice counts once");
    let left: Vec<u64> = store
        .inbox_after(0, 10)
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(left, [seqs[0], seqs[2]]);
    // Other prefixes are not the inbox.
    assert_eq!(store.history("alice", 10, None).unwrap().len(), 1);
}

#[test]
fn the_inbox_room_stops_at_its_byte_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let big = vec![0u8; (MAX_INBOX_BYTES / 2) as usize];
    let frames: [&[u8]; 3] = [&big, &big, &big];
    assert_eq!(store.inbox_room(&frames), 2);
}

#[tokio::test]
async fn parked_frames_survive_a_reopen_in_per_sender_order_and_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        assert!(!store.has_waiting("alice").unwrap());
        assert_eq!(
            store.park("alice", b"a1").unwrap(),
            Parked::Kept { evicted: None }
        );
        assert_eq!(
            store.park("bob", b"b1").unwrap(),
            Parked::Kept { evicted: None }
        );
        assert_eq!(
            store.park("alice", b"a2").unwrap(),
            Parked::Kept { evicted: None }
        );
        store.commit_all().await.unwrap();
    }
    let store = open_in_test(tmp.path());
    assert_eq!(store.waiting_len(), 3, "counted again at open");
    assert!(store.has_waiting("alice").unwrap());
    assert!(!store.has_waiting("carol").unwrap());
    assert!(
        !store.has_waiting("alic").unwrap(),
        "a prefix of a name is another sender"
    );
    let w = store.waiting(10).unwrap();
    let got: Vec<_> = w
        .iter()
        .map(|w| (w.from.as_str(), w.frame.as_slice()))
        .collect();
    assert_eq!(
        got,
        [("alice", &b"a1"[..]), ("alice", b"a2"), ("bob", b"b1")]
    );
    assert!(w[0].seq < w[1].seq);
    assert_eq!(store.waiting(1).unwrap().len(), 1);
    store.unpark("alice", w[0].seq).unwrap();
    store.unpark("alice", w[0].seq).unwrap();
    assert_eq!(
        store.waiting_len(),
        2,
        "a second unpark of the same frame counts nothing"
    );
    // The per-sender cap: past it, that sender's frames are not kept; others' are.
    for i in 0..MAX_WAITING_PER_SENDER {
        assert!(matches!(
            store.park("dave", format!("d{i}").as_bytes()).unwrap(),
            Parked::Kept { evicted: None }
        ));
    }
    assert_eq!(
        store.park("dave", b"one too many").unwrap(),
        Parked::TooManyFromSender
    );
    assert_eq!(
        store.waiting_of("dave", 1000).unwrap().len(),
        MAX_WAITING_PER_SENDER as usize
    );
    // The global cap: the oldest parked frame makes room for a new one.
    let before = store.waiting_len();
    for i in 0..MAX_WAITING - before {
        store.park(&format!("flood{}", i % 5000), b"f").unwrap();
    }
    assert_eq!(store.waiting_len(), MAX_WAITING);
    assert_eq!(
        store.waiting_senders(1),
        vec!["bob".to_owned()],
        "bob's frame is the oldest left"
    );
    assert_eq!(
        store.park("carol", b"c1").unwrap(),
        Parked::Kept {
            evicted: Some("bob".into())
        }
    );
    assert_eq!(store.waiting_len(), MAX_WAITING);
    assert!(store.has_waiting("carol").unwrap());
    assert!(!store.has_waiting("bob").unwrap());
}

#[tokio::test]
async fn frames_parked_together_keep_each_limit_in_order_and_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        // Fill one sender to one short of its cap, then a batch that crosses it: the
        // batch's own frames count against the cap as they come.
        let first: Vec<Vec<u8>> = (0..MAX_WAITING_PER_SENDER - 1)
            .map(|i| format!("d{i}").into_bytes())
            .collect();
        let first: Vec<(&str, &[u8])> = first.iter().map(|f| ("dave", f.as_slice())).collect();
        assert!(store
            .park_all(&first)
            .unwrap()
            .iter()
            .all(|p| *p == Parked::Kept { evicted: None }));
        let answers = store
            .park_all(&[
                ("alice", b"a1"),
                ("dave", b"last one"),
                ("dave", b"one too many"),
                ("alice", b"a2"),
            ])
            .unwrap();
        assert_eq!(
            answers,
            vec![
                Parked::Kept { evicted: None },
                Parked::Kept { evicted: None },
                Parked::TooManyFromSender,
                Parked::Kept { evicted: None },
            ]
        );
        assert_eq!(store.waiting_len(), u64::from(MAX_WAITING_PER_SENDER) + 2);
        store.commit_all().await.unwrap();
    }
    let store = open_in_test(tmp.path());
    let alice = store.waiting_of("alice", 10).unwrap();
    let frames: Vec<&[u8]> = alice.iter().map(|w| w.frame.as_slice()).collect();
    assert_eq!(frames, vec![&b"a1"[..], &b"a2"[..]], "in arrival order");
    assert_eq!(
        store.waiting_seqs("alice"),
        alice.iter().map(|w| w.seq).collect::<Vec<_>>(),
        "the index, rebuilt at open, knows the same frames"
    );
    let dave = store.waiting_of("dave", 1000).unwrap();
    assert_eq!(dave.len(), MAX_WAITING_PER_SENDER as usize);
    assert_eq!(dave.last().unwrap().frame, b"last one");
    // Forgotten together, counted down together; an unknown key changes nothing.
    let keys: Vec<(&str, u64)> = dave
        .iter()
        .map(|w| ("dave", w.seq))
        .chain([("alice", alice[0].seq), ("nobody", 1)])
        .collect();
    store.unpark_all(&keys).unwrap();
    assert_eq!(store.waiting_len(), 1);
    assert!(!store.has_waiting("dave").unwrap());
    assert_eq!(store.waiting_of("alice", 10).unwrap()[0].frame, b"a2");
    // The global cap within one batch: each frame past it evicts the oldest.
    let flood: Vec<String> = (0..MAX_WAITING).map(|i| format!("flood{i}")).collect();
    let flood: Vec<(&str, &[u8])> = flood.iter().map(|n| (n.as_str(), &b"f"[..])).collect();
    let answers = store.park_all(&flood).unwrap();
    assert_eq!(store.waiting_len(), MAX_WAITING);
    assert_eq!(
        answers.last().unwrap(),
        &Parked::Kept {
            evicted: Some("alice".into())
        },
        "alice's frame was the oldest"
    );
    assert!(!store.has_waiting("alice").unwrap());
    assert!(store.has_waiting("flood0").unwrap());
}

#[tokio::test]
async fn incoming_is_stored_once_and_counted_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let mut live = store.subscribe();
    assert!(store
        .insert_incoming(incoming("a", "bob", "1"), None)
        .unwrap()
        .is_some());
    assert!(store
        .insert_incoming(incoming("a", "bob", "again"), None)
        .unwrap()
        .is_none());
    // The same id from someone else is another message.
    assert!(store
        .insert_incoming(incoming("a", "eve", "x"), None)
        .unwrap()
        .is_some());
    assert!(live.try_recv().is_err(), "events wait for the commit");
    store.commit().await.unwrap();
    assert_eq!(live.try_recv().unwrap().cursor, 1);
    assert_eq!(live.try_recv().unwrap().cursor, 2);
    let h = store.history("bob", 0, None).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].text(), "1");
    assert_eq!(store.unread_total().unwrap(), 2);
    assert_eq!(store.mark_read("bob", None, false).unwrap(), 1);
    assert_eq!(store.mark_read("bob", None, false).unwrap(), 0);
    assert_eq!(store.unread_total().unwrap(), 1);
    assert!(store.history("bob", 0, None).unwrap()[0].read);
}

#[tokio::test]
async fn history_pages_backwards_and_conversations_sort_by_recency() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    for i in 0..2000 {
        store
            .insert_incoming(incoming(&format!("id{i}"), "bob", &format!("{i}")), None)
            .unwrap();
        if i % 500 == 0 {
            store
                .insert_incoming(incoming(&format!("x{i}"), "carol", "c"), None)
                .unwrap();
        }
    }
    let last = store.history("bob", 3, None).unwrap();
    assert_eq!(
        last.iter().map(|m| m.text()).collect::<Vec<_>>(),
        ["1997", "1998", "1999"]
    );
    let before = store.history("bob", 2, Some("id1997")).unwrap();
    assert_eq!(
        before.iter().map(|m| m.text()).collect::<Vec<_>>(),
        ["1995", "1996"]
    );
    assert!(matches!(
        store.history("bob", 2, Some("nope")),
        Err(StoreError::UnknownId { .. })
    ));
    assert!(store.history("nobody", 0, None).unwrap().is_empty());
    // A peer whose name is a prefix of another's does not see its messages.
    assert!(store.history("bo", 0, None).unwrap().is_empty());
    let convs = store.conversations().unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(convs[0].peer, "bob");
    assert_eq!(convs[0].total, 2000);
    assert_eq!(convs[0].unread, 2000);
    assert_eq!(convs[0].last.as_ref().unwrap().text(), "1999");
    assert_eq!(convs[1].total, 4);
    assert_eq!(store.mark_read("bob", Some("id9"), false).unwrap(), 10);
    assert_eq!(store.conversations().unwrap()[0].unread, 1990);
}

#[tokio::test]
async fn outbox_keeps_order_and_states_only_move_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    for i in 0..5 {
        let (m, o) = outgoing(&format!("o{i}"), if i % 2 == 0 { "bob" } else { "carol" });
        store.insert_outgoing(m, o).unwrap();
    }
    assert_eq!(store.outbox_len(), 5);
    let all = store.outbox_after(0, 100).unwrap();
    assert_eq!(
        all.iter().map(|(_, o)| o.id.as_str()).collect::<Vec<_>>(),
        ["o0", "o1", "o2", "o3", "o4"]
    );
    let after = store.outbox_after(all[1].0, 2).unwrap();
    assert_eq!(
        after.iter().map(|(_, o)| o.id.as_str()).collect::<Vec<_>>(),
        ["o2", "o3"]
    );

    assert!(store
        .set_outgoing_state("bob", "o0", MessageState::Sent, "")
        .unwrap()
        .is_some());
    assert!(store
        .set_outgoing_state("bob", "o0", MessageState::Delivered, "")
        .unwrap()
        .is_some());
    assert!(store
        .set_outgoing_state("bob", "o0", MessageState::Sent, "")
        .unwrap()
        .is_none());
    assert!(store
        .set_outgoing_state("carol", "o1", MessageState::Failed, "no keys")
        .unwrap()
        .is_some());
    assert!(store
        .set_outgoing_state("carol", "missing", MessageState::Sent, "")
        .unwrap()
        .is_none());
    assert_eq!(store.outbox_len(), 3);
    assert_eq!(store.outbox_after(0, 100).unwrap()[0].1.id, "o2");
    let h = store.history("carol", 0, None).unwrap();
    assert_eq!(h[0].state, MessageState::Failed);
    assert_eq!(h[0].error, "no keys");
}

#[tokio::test]
async fn reopening_keeps_counters_cursor_and_outbox() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        let (m, o) = outgoing("o1", "bob");
        store.insert_outgoing(m, o).unwrap();
        store
            .insert_incoming(incoming("i1", "bob", "hi"), None)
            .unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_cursor(), 2);
    }
    let store = open_in_test(tmp.path());
    assert_eq!(store.last_cursor(), 2);
    assert_eq!(store.outbox_len(), 1);
    assert!(
        store
            .insert_incoming(incoming("i1", "bob", "hi"), None)
            .unwrap()
            .is_none(),
        "dedup survives"
    );
    store
        .insert_incoming(incoming("i2", "bob", "two"), None)
        .unwrap();
    store.commit().await.unwrap();
    let events = store.events_after(0, 100).unwrap();
    assert_eq!(
        events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(store.events_after(2, 100).unwrap().len(), 1);
    let h = store.history("bob", 0, None).unwrap();
    assert_eq!(
        h.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["o1", "i1", "i2"]
    );
}

/// Copies a (closed) store directory, as a backup would.
/// The log position of sled's newest snapshot in `dir` (0 when none): sled names each
/// `snap.<position, 16 hex digits>`.
fn snapshot_position(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn closing_leaves_a_snapshot_so_the_next_open_replays_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    for i in 0..300 {
        store
            .insert_incoming(incoming(&format!("m{i}"), "bob", "hello"), None)
            .unwrap();
    }
    store.commit().await.unwrap();
    let before = snapshot_position(tmp.path());
    // While another handle is alive the store is only flushed.
    let other = store.clone();
    assert_eq!(store.close().unwrap(), Closed::StillInUse);
    assert_eq!(snapshot_position(tmp.path()), before);
    assert_eq!(other.close().unwrap(), Closed::Snapshot);
    let after = snapshot_position(tmp.path());
    assert!(after > before, "a newer snapshot: {before} -> {after}");
    // Nothing was lost, and the snapshot covers the whole log: this open found nothing to
    // replay, so it wrote no newer one.
    let store = open_in_test(tmp.path());
    assert_eq!(store.history("bob", 0, None).unwrap().len(), 300);
    assert_eq!(snapshot_position(tmp.path()), after);
}

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

fn refusal(store: &Store, since: &str) -> CursorError {
    match store.resolve_since(since) {
        Ok(n) => panic!("{since} was accepted as {n}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn log_cursors_name_their_store_and_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let id = store.store_id().to_owned();
    assert_eq!(id.len(), 16);
    assert_eq!(
        store.last_log_cursor().unwrap(),
        format!("{id}-0-{START_TAG}")
    );
    assert_eq!(
        store
            .resolve_since(&store.last_log_cursor().unwrap())
            .unwrap(),
        0
    );
    let mut live = store.subscribe();
    store
        .insert_incoming(incoming("a", "bob", "1"), None)
        .unwrap();
    store
        .insert_incoming(incoming("b", "bob", "2"), None)
        .unwrap();
    store.commit().await.unwrap();
    let logged = store.events_after(0, 10).unwrap();
    let first = live.try_recv().unwrap();
    assert_eq!(
        first.log_cursor, logged[0].log_cursor,
        "live and replayed events carry the same cursor"
    );
    assert!(
        first.log_cursor.starts_with(&format!("{id}-1-")),
        "{}",
        first.log_cursor
    );
    assert_ne!(logged[0].log_cursor, logged[1].log_cursor);
    assert_eq!(store.last_log_cursor().unwrap(), logged[1].log_cursor);
    assert_eq!(store.resolve_since(&logged[0].log_cursor).unwrap(), 1);
    assert_eq!(store.resolve_since(&logged[1].log_cursor).unwrap(), 2);
    // Bare numbers, as cursors were before: up to the last event.
    assert_eq!(store.resolve_since("0").unwrap(), 0);
    assert_eq!(store.resolve_since(" 2 ").unwrap(), 2);
    assert!(matches!(
        refusal(&store, "3"),
        CursorError::Beyond { last: 2, .. }
    ));
    assert!(matches!(
        refusal(&store, "1000"),
        CursorError::Beyond { last: 2, .. }
    ));
    let beyond = format!("{id}-3-{START_TAG}");
    assert!(matches!(
        refusal(&store, &beyond),
        CursorError::Beyond { .. }
    ));
    let wrong_tag = format!("{id}-2-{START_TAG}");
    assert!(matches!(
        refusal(&store, &wrong_tag),
        CursorError::OtherEvent { seq: 2, .. }
    ));
    let other = format!("{}-1-{}", "0123456789abcdef", &logged[0].log_cursor[19..]);
    let e = refusal(&store, &other);
    assert!(matches!(e, CursorError::OtherStore { .. }), "{e}");
    assert!(e.to_string().contains("another message store"), "{e}");
    let (bad_number, no_tag) = (format!("{id}-x-1"), format!("{id}-1"));
    let bads: [&str; 6] = ["", "x", "-5", "abc-1-2", &bad_number, &no_tag];
    for bad in bads {
        assert!(
            matches!(refusal(&store, bad), CursorError::Malformed { .. }),
            "{bad:?}"
        );
    }
    // The id stays across a reopen, and so do the cursors.
    drop(live);
    drop(store);
    let store = open_in_test(tmp.path());
    assert_eq!(store.store_id(), id);
    assert_eq!(store.resolve_since(&logged[1].log_cursor).unwrap(), 2);
    assert_eq!(
        store.events_after(1, 10).unwrap()[0].log_cursor,
        logged[1].log_cursor
    );
    // A re-created store (a new directory) has another id and refuses the old cursors.
    let tmp2 = tempfile::tempdir().unwrap();
    let fresh = open_in_test(tmp2.path());
    assert_ne!(fresh.store_id(), id);
    fresh
        .insert_incoming(incoming("x", "bob", "x"), None)
        .unwrap();
    fresh
        .insert_incoming(incoming("y", "bob", "y"), None)
        .unwrap();
    fresh.commit().await.unwrap();
    assert!(matches!(
        refusal(&fresh, &logged[1].log_cursor),
        CursorError::OtherStore { .. }
    ));
}

#[tokio::test]
async fn retention_removes_old_events_keeps_messages_and_refuses_cursors_that_would_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let id = store.store_id().to_owned();
    for i in 0..5 {
        store
            .insert_incoming(incoming(&format!("m{i}"), "bob", "t"), None)
            .unwrap();
    }
    store.commit().await.unwrap();
    let logged = store.events_after(0, 10).unwrap();
    assert_eq!(logged.len(), 5);
    // Nothing is older than the epoch.
    assert_eq!(store.prune_events(0).unwrap(), 0);
    assert_eq!(store.events_after(0, 10).unwrap().len(), 5);

    // Everything is older than a second from now; the newest event stays.
    assert_eq!(store.prune_events(now_ms() + 1000).unwrap(), 4);
    let kept = store.events_after(0, 10).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].log_cursor, logged[4].log_cursor);
    assert_eq!(
        store.prune_events(now_ms() + 1000).unwrap(),
        0,
        "the newest stays"
    );
    assert_eq!(
        store.history("bob", 100, None).unwrap().len(),
        5,
        "the messages stay"
    );
    assert_eq!(store.last_log_cursor().unwrap(), logged[4].log_cursor);

    let check = |store: &Store| {
        // The newest removed event's cursor resumes: nothing after it is gone.
        assert_eq!(store.resolve_since(&logged[3].log_cursor).unwrap(), 4);
        assert_eq!(store.resolve_since("4").unwrap(), 4);
        assert_eq!(store.resolve_since(&logged[4].log_cursor).unwrap(), 5);
        // Older ones would skip removed events.
        for old in [
            logged[2].log_cursor.as_str(),
            logged[0].log_cursor.as_str(),
            "3",
            "1",
        ] {
            let e = refusal(store, old);
            assert!(
                matches!(e, CursorError::Pruned { pruned: 4, .. }),
                "{old}: {e}"
            );
            assert!(e.to_string().contains("event_retention"), "{e}");
        }
        // The kept tag still tells a restored copy's event 4 from this one.
        let wrong_tag = format!("{id}-4-{START_TAG}");
        assert!(matches!(
            refusal(store, &wrong_tag),
            CursorError::OtherEvent { seq: 4, .. }
        ));
        // 0 is "everything the log holds".
        assert_eq!(store.resolve_since("0").unwrap(), 0);
        assert_eq!(store.events_after(0, 10).unwrap().len(), 1);
    };
    check(&store);
    store.commit_all().await.unwrap();
    drop(store);
    let store = open_in_test(tmp.path());
    check(&store);

    // A large backlog goes in several changes, and the mark follows the newest removed.
    for i in 0..(2 * events::PRUNE_BATCH + 10) {
        store
            .insert_incoming(incoming(&format!("n{i}"), "carol", "t"), None)
            .unwrap();
    }
    store.commit().await.unwrap();
    let last = store.last_cursor();
    let newest = store.last_log_cursor().unwrap();
    assert_eq!(
        store.prune_events(now_ms() + 1000).unwrap(),
        2 * events::PRUNE_BATCH + 10
    );
    assert_eq!(store.events_after(0, 10).unwrap().len(), 1);
    assert_eq!(store.last_log_cursor().unwrap(), newest);
    assert!(matches!(
        refusal(&store, &logged[3].log_cursor),
        CursorError::Pruned { pruned, .. } if pruned == last - 1
    ));
    assert_eq!(
        store.resolve_since(&(last - 1).to_string()).unwrap(),
        last - 1
    );
}

#[tokio::test]
async fn a_restored_older_copy_refuses_cursors_it_never_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let (live_dir, backup) = (tmp.path().join("store"), tmp.path().join("backup"));
    {
        let store = open_in_test(&live_dir);
        store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap();
        store.commit().await.unwrap();
    }
    copy_dir(&live_dir, &backup);
    let (shared, third, fourth) = {
        let store = open_in_test(&live_dir);
        store
            .insert_incoming(incoming("b", "bob", "2"), None)
            .unwrap();
        store
            .insert_incoming(incoming("c", "bob", "3"), None)
            .unwrap();
        store
            .insert_incoming(incoming("d", "bob", "4"), None)
            .unwrap();
        store.commit().await.unwrap();
        let e = store.events_after(0, 10).unwrap();
        (
            e[0].log_cursor.clone(),
            e[2].log_cursor.clone(),
            e[3].log_cursor.clone(),
        )
    };
    // The backup comes back in place of the store.
    std::fs::remove_dir_all(&live_dir).unwrap();
    copy_dir(&backup, &live_dir);
    let store = open_in_test(&live_dir);
    assert_eq!(store.last_cursor(), 1);
    assert!(
        shared.starts_with(store.store_id()),
        "the same store, so the same id"
    );
    assert_eq!(
        store.resolve_since(&shared).unwrap(),
        1,
        "history both copies share still resumes"
    );
    assert!(matches!(
        refusal(&store, &fourth),
        CursorError::Beyond { last: 1, .. }
    ));
    // It logs other events under the numbers the lost ones had.
    store
        .insert_incoming(incoming("e", "carol", "other 2"), None)
        .unwrap();
    store
        .insert_incoming(incoming("f", "carol", "other 3"), None)
        .unwrap();
    store.commit().await.unwrap();
    let e = refusal(&store, &third);
    assert!(matches!(e, CursorError::OtherEvent { seq: 3, .. }), "{e}");
    assert!(e.to_string().contains("restored from an older copy"), "{e}");
    assert!(matches!(
        refusal(&store, &fourth),
        CursorError::Beyond { last: 3, .. }
    ));
}

#[tokio::test]
async fn a_store_from_before_store_ids_gets_one_and_keeps_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap();
        store.commit().await.unwrap();
        // As a store written by a daemon that had no store id.
        store.inner.data.remove(K_STORE_ID).unwrap();
        store.flush().unwrap();
    }
    let store = open_in_test(tmp.path());
    let id = store.store_id().to_owned();
    assert_eq!(store.history("bob", 0, None).unwrap()[0].text(), "1");
    assert_eq!(store.last_cursor(), 1);
    assert_eq!(
        store.resolve_since("1").unwrap(),
        1,
        "a number saved before still resumes"
    );
    let old = store.events_after(0, 10).unwrap();
    assert!(
        old[0].log_cursor.starts_with(&format!("{id}-1-")),
        "old events have log cursors too"
    );
    assert_eq!(store.resolve_since(&old[0].log_cursor).unwrap(), 1);
    drop(store);
    assert_eq!(open_in_test(tmp.path()).store_id(), id, "made once");
}

/// Every record of every tree, as sled holds it.
fn records(path: &Path) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let db = retry_locked(|| Ok(sled::open(path)?)).unwrap();
    let mut out = Vec::new();
    for name in db.tree_names() {
        for kv in db.open_tree(&name).unwrap().iter() {
            let (k, v) = kv.unwrap();
            out.push((name.to_vec(), k.to_vec(), v.to_vec()));
        }
    }
    out
}

#[tokio::test]
async fn a_store_of_a_newer_format_is_refused_and_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        assert_eq!(store.format_version(), FORMAT_VERSION);
        store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap();
        store.commit().await.unwrap();
        // As a later release would have written it.
        store
            .inner
            .data
            .insert(K_FORMAT, &(FORMAT_VERSION + 1).to_be_bytes())
            .unwrap();
        store.flush().unwrap();
    }
    let before = records(tmp.path());
    assert!(before.iter().any(|(_, k, _)| k == K_STORE_ID));
    for _ in 0..2 {
        let e = match retry_locked(|| Store::open(tmp.path())) {
            Ok(_) => panic!("a store of a newer format was opened"),
            Err(e) => e,
        };
        assert!(
            matches!(e, StoreError::TooNew { found, supported: FORMAT_VERSION } if found == FORMAT_VERSION + 1),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("format 2") && text.contains("later release"),
            "{text}"
        );
        assert_eq!(records(tmp.path()), before, "nothing was written");
    }
}

#[tokio::test]
async fn a_store_without_a_format_version_is_format_1_and_gets_one() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        store
            .insert_incoming(incoming("a", "bob", "1"), None)
            .unwrap();
        store.commit().await.unwrap();
        // As release 0.1.0 wrote it.
        store.inner.data.remove(K_FORMAT).unwrap();
        // Format 1's outgoing states: 2 "handed to MQTT", 3 "acknowledged by the broker",
        // written as the values that have those numbers.
        for (id, old, number) in [
            ("o-handed", MessageState::Sent, 2),
            ("o-acked", MessageState::Delivered, 3),
            ("o-failed", MessageState::Failed, 4),
            ("o-queued", MessageState::Queued, 1),
        ] {
            assert_eq!(old.number(), number);
            let (mut m, o) = outgoing(id, "bob");
            store.insert_outgoing(m.clone(), o).unwrap();
            let seq = store.seq_of("bob", id).unwrap().unwrap();
            m.state = old;
            store
                .inner
                .data
                .insert(
                    peer_key(P_MSG, "bob", &seq.to_be_bytes()),
                    encode_message(&m),
                )
                .unwrap();
        }
        store.flush().unwrap();
    }
    let store = open_in_test(tmp.path());
    // Format 1, converted to format 2 at once.
    assert_eq!(store.format_version(), 2);
    assert_eq!(
        store.inner.data.get(K_FORMAT).unwrap().as_deref(),
        Some(&2u64.to_be_bytes()[..])
    );
    assert_eq!(store.history("bob", 0, None).unwrap()[0].text(), "1");
    let state = |id: &str| store.message("bob", id).unwrap().unwrap().state;
    assert_eq!(state("o-handed"), MessageState::Queued);
    assert_eq!(state("o-acked"), MessageState::Sent);
    assert_eq!(state("o-failed"), MessageState::Failed);
    assert_eq!(state("o-queued"), MessageState::Queued);
    assert_eq!(
        store.message("bob", "a").unwrap().unwrap().state,
        MessageState::Received,
        "incoming messages keep their state"
    );
    // A damaged record is refused, not taken for a version.
    store.inner.data.insert(K_FORMAT, &[1u8][..]).unwrap();
    store.flush().unwrap();
    drop(store);
    assert!(matches!(
        retry_locked(|| Store::open(tmp.path())),
        Err(StoreError::DamagedFormat(_))
    ));
}

#[tokio::test]
async fn receipts_are_owed_with_the_message_and_the_read_mark_and_queued_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let asks = |id: &str| Message {
        wants_receipts: true,
        ..incoming(id, "bob", "hi")
    };
    store.insert_incoming(asks("b1"), None).unwrap();
    store.insert_incoming(asks("b2"), None).unwrap();
    store
        .insert_incoming(incoming("b3", "bob", "no receipts asked"), None)
        .unwrap();
    store.insert_incoming(asks("c1"), None).unwrap().unwrap();
    let held = Message {
        state: MessageState::Held,
        ..asks("h1")
    };
    store
        .insert_incoming(held, Some(b"frame".to_vec()))
        .unwrap();
    // A duplicate owes nothing more.
    assert!(store.insert_incoming(asks("b1"), None).unwrap().is_none());
    let due = store.receipts_due(10).unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        (due[0].peer.as_str(), due[0].state, due[0].ids.clone()),
        (
            "bob",
            ReceiptState::Delivered,
            vec!["b1".to_string(), "b2".into(), "c1".into()]
        )
    );
    store
        .queue_receipt(
            &due[0],
            OutboxRecord {
                peer: "bob".into(),
                id: "r1".into(),
                exactly_once: false,
                frame: b"receipt".to_vec(),
            },
        )
        .unwrap();
    assert!(!store.receipts_owed());
    assert_eq!(store.outbox_len(), 1);
    let (seq, record) = store.outbox_after(0, 10).unwrap().remove(0);
    assert_eq!(record.id, "r1");
    // Its acknowledgement moves no message and takes it out.
    assert!(store
        .set_outgoing_state("bob", "r1", MessageState::Sent, "")
        .unwrap()
        .is_none());
    store.outbox_forget(seq).unwrap();
    assert_eq!(store.outbox_len(), 0);
    assert!(store.outbox_after(0, 10).unwrap().is_empty());

    // Read with read receipts off: nothing owed; on: the ones that asked.
    assert_eq!(store.mark_read("bob", Some("b1"), false).unwrap(), 1);
    assert!(!store.receipts_owed());
    assert_eq!(store.mark_read("bob", None, true).unwrap(), 3);
    let due = store.receipts_due(10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].state, ReceiptState::Read);
    assert_eq!(due[0].ids, ["b2", "c1"]);
    store.drop_receipts(&due[0]).unwrap();
    assert!(!store.receipts_owed());
}

#[tokio::test]
async fn many_owed_receipts_go_in_groups_of_at_most_max_receipt_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    for i in 0..MAX_RECEIPT_IDS + 10 {
        let m = Message {
            wants_receipts: true,
            ..incoming(&format!("m{i:04}"), "bob", "hi")
        };
        store.insert_incoming(m, None).unwrap();
    }
    let m = Message {
        wants_receipts: true,
        ..incoming("x", "carol", "hi")
    };
    store.insert_incoming(m, None).unwrap();
    let due = store.receipts_due(10).unwrap();
    assert_eq!(due.len(), 2, "bob's first group, then carol's");
    assert_eq!(due[0].ids.len(), MAX_RECEIPT_IDS);
    assert_eq!((due[1].peer.as_str(), due[1].ids.len()), ("carol", 1));
    assert_eq!(store.receipts_due(1).unwrap().len(), 1);
    store.drop_receipts(&due[0]).unwrap();
    let rest = store.receipts_due(10).unwrap();
    assert_eq!(rest[0].ids.len(), 10);
    assert_eq!(rest[0].ids[0], format!("m{MAX_RECEIPT_IDS:04}"));
}

#[tokio::test]
async fn receipts_move_only_the_peers_messages_and_only_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let (m, o) = outgoing("o1", "bob");
    store.insert_outgoing(m, o).unwrap();
    store
        .insert_incoming(incoming("i1", "bob", "in"), None)
        .unwrap();
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // carol cannot acknowledge alice's message to bob; an incoming one cannot move.
    assert_eq!(
        store
            .apply_receipt("carol", ReceiptState::Read, &ids(&["o1"]))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .apply_receipt("bob", ReceiptState::Read, &ids(&["i1", "nope"]))
            .unwrap(),
        0
    );
    // A receipt may overtake the broker's acknowledgement: out of the outbox.
    assert_eq!(
        store
            .apply_receipt("bob", ReceiptState::Delivered, &ids(&["o1"]))
            .unwrap(),
        1
    );
    assert_eq!(store.outbox_len(), 0);
    assert!(store
        .set_outgoing_state("bob", "o1", MessageState::Sent, "")
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .apply_receipt("bob", ReceiptState::Read, &ids(&["o1"]))
            .unwrap(),
        1
    );
    // Replays: nothing moves back.
    assert_eq!(
        store
            .apply_receipt("bob", ReceiptState::Delivered, &ids(&["o1"]))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .apply_receipt("bob", ReceiptState::Read, &ids(&["o1"]))
            .unwrap(),
        0
    );
    assert!(store
        .set_outgoing_state("bob", "o1", MessageState::Failed, "late")
        .unwrap()
        .is_none());
    let m = store.message("bob", "o1").unwrap().unwrap();
    assert_eq!(m.state, MessageState::Read);
    store.commit().await.unwrap();
    let events = store.events_after(0, 100).unwrap();
    let states: Vec<MessageState> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StateChanged(c) => Some(c.state),
            _ => None,
        })
        .collect();
    assert_eq!(states, [MessageState::Delivered, MessageState::Read]);
}

#[tokio::test]
async fn presence_keeps_the_newest_expires_once_and_marks_capable_peers() {
    use PresenceStatus as P;
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    assert!(store.capable_peers().unwrap().is_empty());
    let asks = Message {
        wants_receipts: true,
        ..incoming("m1", "carol", "hi")
    };
    store.insert_incoming(asks, None).unwrap();
    store
        .insert_incoming(incoming("m2", "dave", "hi"), None)
        .unwrap();
    assert_eq!(store.capable_peers().unwrap(), ["carol"]);

    let now = now_ms();
    let p = store
        .set_peer_presence("bob", P::Away, "lunch", now - 10, now + 60_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.status, p.note.as_str(), p.expired),
        (P::Away, "lunch", false)
    );
    assert_eq!(store.capable_peers().unwrap(), ["bob", "carol"]);
    // An older one (a replay) changes nothing; a newer one does.
    assert!(store
        .set_peer_presence("bob", P::Online, "", now - 20, now + 60_000)
        .unwrap()
        .is_none());
    assert_eq!(store.peer_presence("bob").unwrap().unwrap().status, P::Away);
    // A refresh with the same status logs no event.
    store.commit().await.unwrap();
    let before = store.last_cursor();
    store
        .set_peer_presence("bob", P::Away, "lunch", now - 5, now + 60_000)
        .unwrap()
        .unwrap();
    store.commit().await.unwrap();
    assert_eq!(store.last_cursor(), before);
    // Running out: offline, expired, one event, once.
    store
        .set_peer_presence("bob", P::Busy, "", now - 1, now + 1)
        .unwrap()
        .unwrap();
    let later = now + 5;
    let gone = store.expire_presences(later).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!((gone[0].status, gone[0].expired), (P::Offline, true));
    assert!(store.expire_presences(later + 1).unwrap().is_empty());
    let shown = store.peer_presence("bob").unwrap().unwrap();
    assert_eq!(shown.last_seen_ms, now - 1);
    assert!(store.peer_presence("zed").unwrap().is_none());

    // Own presence: online until set, kept across a reopen.
    assert_eq!(store.own_presence().unwrap().status, P::Online);
    store
        .set_own_presence(&OwnPresence {
            status: P::Invisible,
            note: "x".into(),
        })
        .unwrap();
    store.commit().await.unwrap();
    drop(store);
    let store = open_in_test(tmp.path());
    assert_eq!(store.own_presence().unwrap().status, P::Invisible);
}

#[tokio::test]
async fn held_messages_are_released_or_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_in_test(tmp.path());
    let mut m = incoming("h1", "carol", "");
    m.state = MessageState::Held;
    store.insert_incoming(m, Some(b"frame1".to_vec())).unwrap();
    let mut m = incoming("h2", "carol", "");
    m.state = MessageState::Held;
    store.insert_incoming(m, Some(b"frame2".to_vec())).unwrap();
    assert_eq!(
        store.unread_total().unwrap(),
        0,
        "held messages are not unread"
    );
    let held = store.held("carol").unwrap();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0].frame, b"frame1");
    let released = store
        .release_held("carol", held[0].seq, "hello".into())
        .unwrap()
        .unwrap();
    assert_eq!(released.state, MessageState::Received);
    store.drop_held("carol", held[1].seq).unwrap();
    assert!(store.held("carol").unwrap().is_empty());
    let h = store.history("carol", 0, None).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].text(), "hello");
    assert_eq!(store.unread_total().unwrap(), 1);
    assert_eq!(store.conversations().unwrap()[0].total, 1);
}

#[tokio::test]
async fn a_contact_and_the_events_it_logs_are_one_change_that_survives_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        assert!(store.contact_records().unwrap().is_empty());
        let before = store.last_cursor();
        let event = EventKind::MarkedRead(MarkedRead {
            peer: "carol".into(),
            unread: 0,
        });
        store
            .save_contact("carol", b"record one".to_vec(), vec![event.clone()])
            .unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_cursor(), before + 1);
        // A save without events logs nothing; the record is replaced.
        store
            .save_contact("carol", b"record two".to_vec(), Vec::new())
            .unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_cursor(), before + 1);
        let events = store.events_after(before, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, event);
    }
    let store = open_in_test(tmp.path());
    assert_eq!(
        store.contact_records().unwrap(),
        vec![("carol".to_string(), b"record two".to_vec())]
    );
    assert_eq!(store.events_after(0, 10).unwrap().len(), 1);
}

/// The rows of the data tree as sled holds them, the pending group aside.
fn in_sled(store: &Store) -> usize {
    store.inner.data.iter().count()
}

#[tokio::test]
async fn changes_wait_in_one_group_that_reads_see_and_a_commit_applies_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        store.commit_all().await.unwrap();
        let rows = in_sled(&store);
        // Three messages of one conversation, and a copy of the first: nothing reaches
        // sled, yet each change sees the ones before it (the duplicate, the counters).
        for id in ["m1", "m2", "m3"] {
            let stored = store
                .insert_incoming(incoming(id, "alice", id), None)
                .unwrap();
            assert!(stored.is_some(), "{id} stored");
        }
        assert!(store
            .insert_incoming(incoming("m1", "alice", "again"), None)
            .unwrap()
            .is_none());
        let (m, o) = outgoing("o1", "alice");
        store.insert_outgoing(m, o).unwrap();
        assert!(matches!(
            store.insert_outgoing(outgoing("o1", "alice").0, outgoing("o1", "alice").1),
            Err(StoreError::IdTaken(_))
        ));
        assert_eq!(in_sled(&store), rows, "the group waits in memory");
        assert_eq!(
            store.last_cursor(),
            0,
            "no event is released before the commit"
        );
        // A read outside a change applies the group first, as one batch.
        let conversations = store.conversations().unwrap();
        assert_eq!(conversations[0].total, 4);
        assert_eq!(conversations[0].unread, 3);
        assert!(in_sled(&store) > rows);
        // The next changes wait again until the commit, which releases all events.
        store.mark_read("alice", Some("m2"), false).unwrap();
        store
            .set_outgoing_state("alice", "o1", MessageState::Sent, "")
            .unwrap()
            .expect("moved");
        assert_eq!(store.outbox_len(), 0);
        store.commit().await.unwrap();
        assert_eq!(store.last_cursor(), 6, "4 messages, a read mark, a state");
    }
    let store = open_in_test(tmp.path());
    let history = store.history("alice", 0, None).unwrap();
    let ids: Vec<&str> = history.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3", "o1"]);
    assert_eq!(history[3].state, MessageState::Sent);
    assert_eq!(store.conversations().unwrap()[0].unread, 1);
    assert!(store.outbox_after(0, 10).unwrap().is_empty());
    assert_eq!(store.events_after(0, 100).unwrap().len(), 6);
}

#[tokio::test]
async fn a_group_nobody_commits_reaches_sled_when_old_or_when_the_store_closes() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        store.commit_all().await.unwrap();
        let rows = in_sled(&store);
        store
            .insert_incoming(incoming("m1", "alice", "one"), None)
            .unwrap();
        assert_eq!(in_sled(&store), rows);
        std::thread::sleep(PENDING_MAX_AGE);
        // The next change finds the group old enough and applies it with itself.
        store
            .insert_incoming(incoming("m2", "alice", "two"), None)
            .unwrap();
        assert!(in_sled(&store) > rows, "applied once old");
        store
            .insert_incoming(incoming("m3", "alice", "three"), None)
            .unwrap();
        // Dropped without a commit: what reads saw is not thrown away.
    }
    let store = open_in_test(tmp.path());
    assert_eq!(store.history("alice", 0, None).unwrap().len(), 3);
}

#[tokio::test]
async fn a_contact_saved_after_waiting_changes_lands_after_them() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open_in_test(tmp.path());
        store
            .insert_incoming(incoming("m1", "carol", "hi"), None)
            .unwrap();
        // The contact's transaction applies the waiting group first, then itself.
        store
            .save_contact("carol", b"pinned".to_vec(), Vec::new())
            .unwrap();
        assert_eq!(store.history("carol", 0, None).unwrap().len(), 1);
        store.commit().await.unwrap();
    }
    let store = open_in_test(tmp.path());
    assert_eq!(store.history("carol", 0, None).unwrap().len(), 1);
    assert_eq!(store.contact_records().unwrap().len(), 1);
}
