//! nesd end to end: the event stream. Every client gets every event; a client resumes
//! from a cursor without gap or repeat; a client that stops reading is dropped with
//! RESOURCE_EXHAUSTED (the daemon and the other clients go on) and resumes by cursor.

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use nes_e2e::*;
use nes_proto::rpc::{self, event::Kind, Direction, MessageState};

async fn wait_queue_empty(client: &Client) -> Result<()> {
    wait_status(client, "the outbox to empty", |s| s.queued == 0).await?;
    Ok(())
}

/// Waits until the event log has at least `n` events (events become visible once
/// flushed, a moment after the store changed) and returns the last cursor.
async fn wait_cursor(client: &Client, n: u64) -> Result<u64> {
    let s = wait_status(client, &format!("{n} events"), |s| s.last_cursor >= n).await?;
    Ok(s.last_cursor)
}

/// Reads `stream` until the event with cursor `last`, checking the cursors run
/// `first, first+1, ..., last`.
async fn read_through(stream: &mut EventStream, first: u64, last: u64) -> Result<()> {
    let mut expect = first;
    while expect <= last {
        let cursor = stream
            .next_matching(&format!("event {expect}"), |e| Some(e.cursor))
            .await?;
        ensure!(cursor == expect, "got cursor {cursor}, expected {expect}");
        expect += 1;
    }
    Ok(())
}

/// Reads `stream` from cursor 1, checking the cursors are gapless, until `n` outgoing
/// messages have moved to DELIVERED; returns the cursor of the last of those events.
/// How many events that takes is not fixed: under a burst bob's receipt can reach alice's
/// nesd before it handles the broker's acknowledgement, and a message then goes from
/// queued to delivered without a "sent" event (states only move forward).
async fn read_until_delivered(stream: &mut EventStream, n: usize) -> Result<u64> {
    let mut delivered = std::collections::HashSet::new();
    let mut expect = 1;
    while delivered.len() < n {
        let (cursor, id) = stream
            .next_matching(&format!("event {expect}"), |e| {
                let id = match &e.kind {
                    Some(Kind::StateChanged(s)) if s.state == MessageState::Delivered as i32 => {
                        Some(s.id.clone())
                    }
                    _ => None,
                };
                Some((e.cursor, id))
            })
            .await?;
        ensure!(cursor == expect, "got cursor {cursor}, expected {expect}");
        delivered.extend(id);
        expect += 1;
    }
    Ok(expect - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_every_event_and_resumes_without_gap() -> Result<()> {
    let w = World::start().await?;
    let (_alice_id, _alice, mut a) = w.connected_user("alice").await?;
    let (_bob_id, _bob, _) = w.connected_user("bob").await?;

    let mut one = EventStream::open(&a, Some(0)).await?;
    let mut two = EventStream::open(&a, Some(0)).await?;
    let mut live = EventStream::open(&a, None).await?;
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(send(&mut a, "bob", &format!("event test {i}")).await?.id);
    }
    wait_queue_empty(&a).await?;
    // 10 sends make 30 events (queued, sent by the broker's acknowledgement, delivered by
    // bob's receipt, which comes after it: bob gets the frame only once the broker has it),
    // after the connection event.
    let last = wait_cursor(&a, 31).await?;
    read_through(&mut one, 1, last).await?;
    read_through(&mut two, 1, last).await?;

    // The live-only client saw each message queued, sent and delivered, in that order.
    let mut states: std::collections::HashMap<String, Vec<i32>> = Default::default();
    while states.values().map(Vec::len).sum::<usize>() < 30 {
        live.next_matching("message events", |e| {
            match &e.kind {
                Some(Kind::Message(m)) if m.direction == Direction::Outgoing as i32 => {
                    states.entry(m.id.clone()).or_default().push(m.state)
                }
                Some(Kind::StateChanged(s)) => {
                    states.entry(s.id.clone()).or_default().push(s.state)
                }
                _ => {}
            }
            Some(())
        })
        .await?;
    }
    let want = vec![
        MessageState::Queued as i32,
        MessageState::Sent as i32,
        MessageState::Delivered as i32,
    ];
    for id in &sent {
        ensure!(
            states.get(id) == Some(&want),
            "states of {id}: {:?}",
            states.get(id)
        );
    }

    // Resume from the middle: exactly the rest.
    let mut resumed = EventStream::open(&a, Some(last / 2)).await?;
    read_through(&mut resumed, last / 2 + 1, last).await?;
    // And from the end: the next live event is the next cursor.
    let mut at_end = EventStream::open(&a, Some(last)).await?;
    send(&mut a, "bob", "one more").await?;
    read_through(&mut at_end, last + 1, last + 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_resumes_by_cursor() -> Result<()> {
    let w = World::start().await?;
    let (_alice_id, _alice, mut a) = w.connected_user("alice").await?;
    let (_bob_id, bob, _) = w.connected_user("bob").await?;

    // A client that subscribes and then does not read.
    let mut slow = a
        .clone()
        .events(rpc::EventsRequest {
            since: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    // A client that keeps up.
    let mut fast = EventStream::open(&a, Some(0)).await?;

    // Enough events to overflow the daemon's buffers and the HTTP/2 windows.
    let n = 2500;
    let text = "y".repeat(2000);
    let requests = futures::stream::iter((0..n).map(move |i| rpc::SendRequest {
        to: "bob".into(),
        text: format!("{i:05} {text}"),
        legacy: false,
    }));
    let mut replies = a.send_stream(requests).await?.into_inner();
    let mut count = 0;
    while let Some(reply) = replies.next().await {
        ensure!(reply?.error.is_empty());
        count += 1;
    }
    ensure!(count == n);
    wait_queue_empty(&a).await?;
    let last = read_until_delivered(&mut fast, n).await?;
    wait_cursor(&a, last).await?;

    // The slow client: a gapless prefix, then RESOURCE_EXHAUSTED.
    let mut seen = 0u64;
    let code = loop {
        match tokio::time::timeout(TIMEOUT, slow.message())
            .await
            .context("slow stream stalled")?
        {
            Ok(Some(e)) => {
                ensure!(e.cursor == seen + 1, "gap: {} after {seen}", e.cursor);
                seen = e.cursor;
            }
            Ok(None) => bail!("the slow stream ended without an error after {seen}"),
            Err(status) => break status.code(),
        }
    };
    ensure!(
        code == tonic::Code::ResourceExhausted,
        "slow client got {code:?}"
    );
    ensure!(seen < last, "the slow client was not behind");

    // It resumes from its last cursor and gets the rest.
    let mut resumed = EventStream::open(&a, Some(seen)).await?;
    read_through(&mut resumed, seen + 1, last).await?;
    // The daemon kept serving throughout.
    let b = bob.client().await?;
    eventually("bob to receive everything", TIMEOUT, || {
        let mut b = b.clone();
        async move { Ok((status(&mut b).await?.received == n as u64).then_some(())) }
    })
    .await?;
    Ok(())
}
