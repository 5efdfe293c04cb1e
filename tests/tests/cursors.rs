//! Cursors that do not belong to the daemon's log are refused, never waited on (issue 17):
//! a cursor of a store that was re-created, a cursor beyond the last event, and a cursor
//! of a store that was restored from an older copy, and a cursor older than the event
//! log keeps (`event_retention`). Each goes through the gRPC stream
//! (FAILED_PRECONDITION and a message), `nes listen --since` (exit 1, a message that says
//! what happened and what to do) and nes-notify (it says so once and shows the next
//! message, seen in dunst's history). After each, no message is hidden: the next one
//! arrives on every path. A replay that retention cuts while it runs ends the same way
//! (`nes_client::Feed`, both the feed that stops and the one that recovers).

use anyhow::{ensure, Context, Result};
use nes_client::{Feed, FeedItem};
use nes_e2e::frontends::{
    json_lines, nes, nes_notify, run_nes, Dunst, Lines, Outcome, SessionBus, Xvfb,
};
use nes_e2e::{
    copy_dir, eventually, send, status, wait_history, wait_status, Client, EventStream, Nesd,
    World, TIMEOUT,
};
use nes_proto::rpc::{self, EventsRequest};
use std::path::Path;

/// The desktop nes-notify shows on.
struct Desktop {
    bus: SessionBus,
    _x: Xvfb,
    dunst: Dunst,
}

impl Desktop {
    async fn start() -> Result<Desktop> {
        let bus = SessionBus::start().await?;
        let x = Xvfb::start().await?;
        let dunst = Dunst::start(&bus, &x).await?;
        Ok(Desktop { bus, _x: x, dunst })
    }

    /// Waits until dunst has shown a notification from `from` with body `body`.
    async fn wait_shown(&self, from: &str, body: &str) -> Result<()> {
        eventually(&format!("dunst to show {body:?}"), TIMEOUT, || async {
            let history = self.dunst.history().await?;
            Ok(history
                .iter()
                .any(|(app, s, b)| app == "NES" && s == from && b == body)
                .then_some(()))
        })
        .await
    }

    /// How many notifications with `body` dunst has shown.
    async fn count_shown(&self, body: &str) -> Result<usize> {
        Ok(self
            .dunst
            .history()
            .await?
            .iter()
            .filter(|(_, _, b)| b == body)
            .count())
    }
}

/// nes-notify on bob's daemon with this cursor file.
fn notifier(nesd: &Nesd, home: &Path, desktop: &Desktop, state: &Path) -> Result<Lines> {
    let mut cmd = nes_notify(&nesd.socket(), home, &desktop.bus)?;
    cmd.arg("--state-file").arg(state);
    Lines::spawn(cmd)
}

/// Waits until nes-notify's log has `needle`.
async fn wait_log(lines: &Lines, needle: &str) -> Result<String> {
    eventually(
        &format!("nes-notify to log {needle:?}"),
        TIMEOUT,
        || async {
            let log = lines.stderr();
            Ok(log.contains(needle).then_some(log))
        },
    )
    .await
}

/// Waits until nes-notify has subscribed (it logs where it starts).
async fn subscribed(lines: &Lines) -> Result<String> {
    eventually("nes-notify to subscribe", TIMEOUT, || async {
        let log = lines.stderr();
        Ok((log.contains("starting with new messages")
            || log.contains("resuming after the stored cursor"))
        .then_some(log))
    })
    .await
}

/// `nes listen --json --since SINCE` for one message, as a script resumes.
async fn listen_since(nesd: &Nesd, home: &Path, since: &str) -> Result<Outcome> {
    run_nes(
        &nesd.socket(),
        home,
        &[
            "listen",
            "--json",
            "--since",
            since,
            "--count",
            "1",
            "--timeout",
            "100",
        ],
        b"",
    )
    .await
}

/// Checks that `nes listen --since` refused the cursor: exit 1 (at once, not after the
/// timeout), what happened (`why`) and what to do.
fn refused(out: Outcome, why: &str) -> Result<()> {
    let out = out.expect_code(1)?;
    ensure!(out.stdout.is_empty(), "nothing printed: {}", out.stdout);
    ensure!(
        out.stderr.contains(why),
        "says what happened ({why}): {}",
        out.stderr
    );
    ensure!(
        !out.stderr.contains("timed out"),
        "refused, not waited on: {}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("without --since") && out.stderr.contains("--since 0"),
        "says what to do: {}",
        out.stderr
    );
    Ok(())
}

/// Checks that the gRPC Events call refuses `request` with FAILED_PRECONDITION saying `why`.
async fn grpc_refuses(client: &Client, request: EventsRequest, why: &str) -> Result<()> {
    match EventStream::open_request(client, request.clone()).await {
        Ok(_) => anyhow::bail!("Events accepted {request:?}"),
        Err(status) => {
            ensure!(
                status.code() == tonic::Code::FailedPrecondition,
                "{request:?}: {status:?}"
            );
            ensure!(
                status.message().contains(why),
                "{request:?}: the message says why ({why}): {}",
                status.message()
            );
            ensure!(
                status.message().contains("from 0"),
                "and what to do: {}",
                status.message()
            );
        }
    }
    Ok(())
}

fn since_cursor(cursor: &str) -> EventsRequest {
    EventsRequest {
        since: None,
        since_cursor: cursor.to_owned(),
    }
}

/// The `cursor` of the one line `nes listen --json` printed.
fn line_cursor(out: &Outcome) -> Result<String> {
    let lines = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    ensure!(lines.len() == 1, "one line: {}", out.stdout);
    Ok(lines[0]["cursor"]
        .as_str()
        .context("the cursor is a string")?
        .to_owned())
}

/// alice sends `text`; bob's `nes listen` from `since` (a cursor it accepts) prints it.
async fn arrives(
    alice: &mut Client,
    bob: &Nesd,
    home: &Path,
    since: &str,
    text: &str,
) -> Result<String> {
    let mut cmd = nes(&bob.socket(), home)?;
    cmd.args([
        "listen", "--json", "--from", "alice", "--count", "1", "--since", since,
    ]);
    let mut listener = Lines::spawn(cmd)?;
    let sent = send(alice, "bob", text).await?;
    let line = json_lines(listener.until(1).await?)?.remove(0);
    ensure!(
        line["message"] == text && line["id"] == sent.id.as_str(),
        "{line}"
    );
    ensure!(listener.wait().await? == 0);
    Ok(line["cursor"].as_str().context("cursor")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_a_re_created_store_is_refused_and_nothing_is_hidden() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (bob, mut bob_d) = world.user("bob").await?;
    let desktop = Desktop::start().await?;
    let home = tempfile::tempdir()?;
    let (h, state) = (home.path(), home.path().join("notify.cursor"));
    let mut alice = alice_d.client().await?;

    // A script and nes-notify each keep the cursor of the last message they handled.
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    subscribed(&notify).await?;
    let old = arrives(&mut alice, &bob_d, h, "0", "before the re-creation").await?;
    assert!(notify.next().await?.ends_with(": before the re-creation"));
    desktop
        .wait_shown("alice", "before the re-creation")
        .await?;
    notify.kill().await?;
    let old_store = status(&mut bob_d.client().await?).await?.store_id;
    assert_eq!(old_store.len(), 16, "status reports the store id");
    assert!(
        old.starts_with(&old_store),
        "the cursor names its store: {old}"
    );

    // Bob's store is re-created (a new, empty store under the same identity).
    bob_d.stop().await?;
    std::fs::remove_dir_all(bob.store_dir())?;
    bob_d.start_again().await?;
    let mut bob_c = bob_d.client().await?;
    let new_store = status(&mut bob_c).await?.store_id;
    assert_ne!(new_store, old_store, "a new store has a new id");

    // gRPC: refused, saying why.
    grpc_refuses(
        &bob_c,
        since_cursor(&old),
        "belongs to another message store",
    )
    .await?;
    // nes listen --since: exit 1 at once, saying why and what to do.
    refused(
        listen_since(&bob_d, h, &old).await?,
        "belongs to another message store",
    )?;
    let out = run_nes(&bob_d.socket(), h, &["status", "--json"], b"")
        .await?
        .expect_code(0)?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(v["store_id"], new_store.as_str());

    // nes-notify with the old cursor: says so once, starts from now, shows the next one.
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    let log = subscribed(&notify).await?;
    assert!(
        log.contains("nesd refused the stored cursor") && log.contains("another message store"),
        "{log}"
    );
    let after = send(&mut alice, "bob", "after the re-creation").await?;
    assert_eq!(
        notify.next().await?,
        format!("shown alice {}: after the re-creation", after.id)
    );
    desktop.wait_shown("alice", "after the re-creation").await?;
    assert_eq!(
        notify.stderr().matches("refused").count(),
        1,
        "said once: {}",
        notify.stderr()
    );
    // Its cursor file now holds a cursor of the new store.
    let saved = std::fs::read_to_string(&state)?;
    assert!(saved.trim().starts_with(&new_store), "{saved}");

    // Nothing hidden: from the start of the new store, the message is there.
    let out = listen_since(&bob_d, h, "0").await?.expect_code(0)?;
    assert!(
        out.stdout.contains("after the re-creation"),
        "{}",
        out.stdout
    );
    let next = line_cursor(&out)?;
    assert!(next.starts_with(&new_store), "{next}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_beyond_the_last_event_is_refused_and_nothing_is_hidden() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let desktop = Desktop::start().await?;
    let home = tempfile::tempdir()?;
    let h = home.path();
    let mut alice = alice_d.client().await?;
    let mut bob_c = bob_d.client().await?;
    let s = status(&mut bob_c).await?;
    assert!(s.last_cursor < 1000);
    let store = s.store_id;

    // The case: a bare number beyond the last event, and a log cursor of this
    // store with such a number. Before, listen waited and timed out with "0 of 1".
    for cursor in ["1000".to_string(), format!("{store}-1000-0badc0de")] {
        refused(
            listen_since(&bob_d, h, &cursor).await?,
            "is beyond the last event",
        )?;
        grpc_refuses(&bob_c, since_cursor(&cursor), "is beyond the last event").await?;
    }
    grpc_refuses(
        &bob_c,
        EventsRequest {
            since: Some(1000),
            ..Default::default()
        },
        "is beyond the last event",
    )
    .await?;
    // Not a cursor at all: bad usage.
    run_nes(&bob_d.socket(), h, &["listen", "--since", "yesterday"], b"")
        .await?
        .expect_code(2)?;

    // Today's numbers of this store still work, and so does 0 (everything).
    let last = status(&mut bob_c).await?.last_cursor.to_string();
    arrives(&mut alice, &bob_d, h, &last, "one").await?;
    let out = listen_since(&bob_d, h, "0").await?.expect_code(0)?;
    assert!(out.stdout.contains("\"message\":\"one\""), "{}", out.stdout);

    // nes-notify whose file holds a number from the future: says so, shows the next one.
    let state = h.join("notify.cursor");
    std::fs::write(&state, "1000\n")?;
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    let log = subscribed(&notify).await?;
    assert!(
        log.contains("nesd refused the stored cursor") && log.contains("is beyond the last event"),
        "{log}"
    );
    let two = send(&mut alice, "bob", "two").await?;
    assert_eq!(notify.next().await?, format!("shown alice {}: two", two.id));
    desktop.wait_shown("alice", "two").await?;
    notify.kill().await?;

    // Its default cursor file is keyed by the store, and holds a cursor of that store.
    let mut cmd = nes_notify(&bob_d.socket(), h, &desktop.bus)?;
    let mut notify = Lines::spawn({
        cmd.arg("--since").arg("0");
        cmd
    })?;
    let file = h
        .join(".local/state/nes")
        .join(format!("notify-bob-{store}.cursor"));
    eventually("the cursor file of bob's store", TIMEOUT, || async {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        Ok(text.contains(&format!("{store}-")).then_some(()))
    })
    .await?;
    // From 0 it showed both stored messages again (asked for), and goes on with new ones.
    let three = send(&mut alice, "bob", "three").await?;
    let line = format!("shown alice {}: three", three.id);
    while notify.next().await? != line {}
    assert_eq!(
        desktop.count_shown("two").await?,
        2,
        "once with the refused cursor, once from 0"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_older_copy_of_the_store_refuses_cursors_it_never_logged() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (bob, mut bob_d) = world.user("bob").await?;
    let desktop = Desktop::start().await?;
    let home = tempfile::tempdir()?;
    let (h, state) = (home.path(), home.path().join("notify.cursor"));
    let mut alice = alice_d.client().await?;

    // A message, then a backup of bob's store (nesd stopped).
    send(&mut alice, "bob", "m1 in the backup").await?;
    wait_history(&bob_d.client().await?, "alice", 1, |_| true).await?;
    bob_d.stop().await?;
    let backup = tempfile::tempdir()?;
    copy_dir(&bob.store_dir(), backup.path())?;
    bob_d.start_again().await?;

    // More messages after the backup, seen by a listener, nes-notify and a gRPC stream.
    let mut listener = Lines::spawn({
        let mut cmd = nes(&bob_d.socket(), h)?;
        cmd.args(["listen", "--json", "--since", "0"]);
        cmd
    })?;
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    subscribed(&notify).await?;
    for text in ["m2 lost with the restore", "m3 lost with the restore"] {
        let sent = send(&mut alice, "bob", text).await?;
        assert_eq!(
            notify.next().await?,
            format!("shown alice {}: {text}", sent.id)
        );
    }
    let seen = json_lines(listener.until(3).await?)?;
    let lost = seen[2]["cursor"].as_str().context("cursor")?.to_owned();
    let kept = seen[0]["cursor"].as_str().context("cursor")?.to_owned();
    let mut bob_c = bob_d.client().await?;
    let mut stream = EventStream::open(&bob_c, Some(0)).await?;
    let grpc_lost = stream
        .next_matching("m3 on the gRPC stream", |e| match &e.kind {
            Some(rpc::event::Kind::Message(m)) if m.text.starts_with("m3") => {
                Some(e.log_cursor.clone())
            }
            _ => None,
        })
        .await?;
    assert_eq!(
        grpc_lost, lost,
        "the stream and listen show the same cursor"
    );

    // The older copy comes back in place of the store.
    bob_d.stop().await?;
    std::fs::remove_dir_all(bob.store_dir())?;
    copy_dir(backup.path(), &bob.store_dir())?;
    bob_d.start_again().await?;
    bob_c = bob_d.client().await?;

    // The running listener's reconnect is refused: it ends with exit 1 and says why.
    assert_eq!(listener.wait().await?, 1, "{}", listener.stderr());
    let err = listener.stderr();
    assert!(
        err.contains("restored from an older copy") && err.contains("--since 0"),
        "{err}"
    );
    // nes-notify says so once and goes on with new messages.
    wait_log(&notify, "refused the cursor").await?;
    let m4 = send(&mut alice, "bob", "m4 after the restore").await?;
    assert_eq!(
        notify.next().await?,
        format!("shown alice {}: m4 after the restore", m4.id)
    );
    desktop.wait_shown("alice", "m4 after the restore").await?;
    assert_eq!(
        notify.stderr().matches("refused").count(),
        1,
        "said once: {}",
        notify.stderr()
    );

    // The restored store has logged other events under the numbers the lost ones had:
    // the lost cursor names an event it does not have.
    let lost_number: u64 = lost.split('-').nth(1).context("number")?.parse()?;
    let mut n = 5;
    while status(&mut bob_c).await?.last_cursor < lost_number {
        arrives(
            &mut alice,
            &bob_d,
            h,
            &status(&mut bob_c).await?.last_cursor.to_string(),
            &format!("m{n}"),
        )
        .await?;
        n += 1;
    }
    grpc_refuses(&bob_c, since_cursor(&lost), "restored from an older copy").await?;
    refused(listen_since(&bob_d, h, &lost).await?, "does not have")?;
    // A cursor of what both copies share still resumes, and shows every message since.
    let out = run_nes(
        &bob_d.socket(),
        h,
        &[
            "listen",
            "--json",
            "--since",
            &kept,
            "--count",
            "1",
            "--timeout",
            "100",
        ],
        b"",
    )
    .await?
    .expect_code(0)?;
    assert!(
        out.stdout.contains("m4 after the restore"),
        "{}",
        out.stdout
    );
    // nes-notify restarted with its (restored store's) cursor resumes without a refusal.
    notify.kill().await?;
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    let log = subscribed(&notify).await?;
    assert!(
        log.contains("resuming after the stored cursor") && !log.contains("refused"),
        "{log}"
    );
    let last = send(&mut alice, "bob", "the last one").await?;
    let line = format!("shown alice {}: the last one", last.id);
    while notify.next().await? != line {}
    desktop.wait_shown("alice", "the last one").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_event_retention_is_refused_and_nothing_is_hidden() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    // Events older than 2 s are removed, checked every second.
    let (_bob, bob_d) = world.user_with("bob", ["--event-retention", "2s"]).await?;
    let desktop = Desktop::start().await?;
    let home = tempfile::tempdir()?;
    let (h, state) = (home.path(), home.path().join("notify.cursor"));
    let mut alice = alice_d.client().await?;
    let mut bob_c = bob_d.client().await?;

    // Two messages: a script keeps the cursor of the first, nes-notify of the second.
    let first = arrives(&mut alice, &bob_d, h, "0", "r1").await?;
    let start = status(&mut bob_c).await?.last_log_cursor;
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    subscribed(&notify).await?;
    let second = arrives(&mut alice, &bob_d, h, &start, "r2").await?;
    assert!(notify.next().await?.ends_with(": r2"));
    notify.kill().await?;
    // A third, so that the second is not the newest event (the newest always stays).
    send(&mut alice, "bob", "r3").await?;
    wait_history(&bob_c, "alice", 3, |_| true).await?;

    // The log keeps only its newest event once the retention has passed.
    eventually("the log to be pruned", TIMEOUT, || async {
        let out = listen_since(&bob_d, h, &first).await?;
        Ok((out.code == 1).then_some(out))
    })
    .await
    .and_then(|out| refused(out, "older than the event log keeps"))?;
    grpc_refuses(
        &bob_c,
        since_cursor(&first),
        "older than the event log keeps",
    )
    .await?;
    // The messages stay in the history.
    let out = run_nes(&bob_d.socket(), h, &["history", "alice", "--json"], b"")
        .await?
        .expect_code(0)?;
    for text in ["r1", "r2", "r3"] {
        assert!(
            out.stdout.contains(&format!("\"{text}\"")),
            "{}",
            out.stdout
        );
    }
    // nes-notify with the second message's cursor, once that is removed too: says so
    // once, starts from now, shows the next one.
    eventually(
        "the second message's event to be pruned",
        TIMEOUT,
        || async {
            let out = listen_since(&bob_d, h, &second).await?;
            Ok((out.code == 1).then_some(()))
        },
    )
    .await?;
    std::fs::write(&state, format!("{second}\n"))?;
    let mut notify = notifier(&bob_d, h, &desktop, &state)?;
    let log = subscribed(&notify).await?;
    assert!(
        log.contains("nesd refused the stored cursor") && log.contains("event_retention"),
        "{log}"
    );
    let four = send(&mut alice, "bob", "r4").await?;
    assert_eq!(notify.next().await?, format!("shown alice {}: r4", four.id));
    desktop.wait_shown("alice", "r4").await?;
    Ok(())
}

/// The next item of a feed, within [`TIMEOUT`].
async fn feed_next(
    feed: &mut Feed,
    what: &str,
) -> Result<std::result::Result<FeedItem, nes_client::Error>> {
    tokio::time::timeout(TIMEOUT, feed.next())
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// A replay that retention cuts while it runs (the client read slowly, and the events it
/// had not read yet were removed) ends with a refusal, never with a silent jump over the
/// removed events: a feed that stops on a refused cursor (`nes listen --since`) fails,
/// and a recovering one (nes-notify, `nes chat`) says so once and goes on from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_by_the_event_retention_ends_in_a_refusal_and_a_recovering_feed_goes_on_from_now(
) -> Result<()> {
    // More event bytes than one stream holds in flight (the daemon's buffer, a batch read
    // from the log, HTTP/2's windows: a few MiB), so that most of the replay is still in
    // the log when the clients stop reading.
    const BACKLOG: usize = 1500;
    let filler = "x".repeat(8 * 1024);
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, mut bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let mut alice = alice_d.client().await?;
    let batch: String = (0..BACKLOG)
        .map(|i| format!("{{\"to\":\"bob\",\"message\":\"backlog {i} {filler}\"}}\n"))
        .collect();
    run_nes(
        &alice_d.socket(),
        home.path(),
        &["send", "--batch"],
        batch.as_bytes(),
    )
    .await?
    .expect_code(0)?;
    let bob_c = bob_d.client().await?;
    wait_status(&bob_c, "bob to store the backlog", |s| {
        s.received >= BACKLOG as u64
    })
    .await?;
    // bob again, now keeping events for 10 s: its first pruning comes 5 s after the start
    // and removes the whole backlog, which is older than 10 s by then.
    bob_d.stop().await?;
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    bob_d.start_again_with(["--event-retention", "10s"]).await?;
    let socket = bob_d.socket();

    // Two clients replay the log from its start and read one event each.
    let mut stops = Feed::open(&socket, Some("0")).await?;
    let (mut recovers, refused) = Feed::open_or_now(&socket, Some("0")).await?;
    ensure!(refused.is_none(), "0 is accepted: {refused:?}");
    let mut first = 0;
    for feed in [&mut stops, &mut recovers] {
        match feed_next(feed, "the replay's first event").await?? {
            FeedItem::Event(e) => first = e.cursor,
            other => anyhow::bail!("the replay's first event, not {other:?}"),
        }
    }
    // The backlog goes while they do not read.
    eventually("bob to prune the backlog", TIMEOUT, || async {
        Ok(bob_d
            .log()
            .contains("removed events older than event_retention")
            .then_some(()))
    })
    .await?;

    // Each reads on: what was already on its way, in order, then the refusal.
    let mut handed = [1usize, 1];
    let mut outcome = Vec::new();
    for (i, feed) in [&mut stops, &mut recovers].into_iter().enumerate() {
        let mut last = first;
        loop {
            match feed_next(feed, &format!("feed {i} after cursor {last}")).await? {
                Ok(FeedItem::Event(e)) => {
                    ensure!(
                        e.cursor == last + 1,
                        "no gap and no repeat: {} after {last}",
                        e.cursor
                    );
                    last = e.cursor;
                    handed[i] += 1;
                }
                // The recovering feed says so and starts from now; the other one fails.
                Ok(FeedItem::Restarted(why)) if i == 1 => {
                    outcome.push(why);
                    break;
                }
                Err(e) if i == 0 => {
                    outcome.push(e.to_string());
                    break;
                }
                other => anyhow::bail!("feed {i}: {other:?} after cursor {last}"),
            }
        }
    }
    eprintln!("events handed out before the refusal: {handed:?} of {BACKLOG}");
    for (n, why) in handed.iter().zip(&outcome) {
        ensure!(
            *n < BACKLOG,
            "the replay was cut: {n} of {BACKLOG} events handed out"
        );
        ensure!(why.contains("event_retention"), "says why: {why}");
    }
    ensure!(
        outcome[0].contains("while this client replayed them"),
        "the stopping feed fails with the daemon's reason: {}",
        outcome[0]
    );

    // The recovering feed goes on with what comes next; the messages stay in the history.
    let after = send(&mut alice, "bob", "after the cut").await?;
    loop {
        match feed_next(&mut recovers, "the message after the cut").await?? {
            FeedItem::Event(e) => match e.kind {
                Some(rpc::event::Kind::Message(m)) if m.id == after.id => break,
                _ => continue,
            },
            other => anyhow::bail!("the next message, not {other:?}"),
        }
    }
    // (Read a page at a time, as the frontends do: the whole of it is over gRPC's 4 MiB.)
    let history = nes_client::Client::connect(&socket)
        .await?
        .history("alice", 0)
        .await?;
    ensure!(
        history.len() == BACKLOG + 1 && history.last().is_some_and(|m| m.id == after.id),
        "the history keeps all {} messages: {}",
        BACKLOG + 1,
        history.len()
    );
    Ok(())
}
