//! [`Feed`]: nesd's event stream, kept alive across daemon restarts.
//!
//! Every event in the daemon's log has a cursor that only grows. The feed remembers the
//! cursor of the last event it handed out; when the stream breaks (the daemon restarts,
//! or drops a client that fell behind with RESOURCE_EXHAUSTED) it reconnects with
//! `EventsRequest.since = cursor`, so the caller sees every event once: no gap, no repeat.
//!
//! Opening without a cursor ("live from now") still asks the daemon for its newest cursor
//! first and subscribes after it, so even a live-only feed has a position to resume from.

use crate::client::Client;
use crate::error::Error;
use nes_proto::rpc::Event;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What [`Feed::next`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum FeedItem {
    /// The next event of the log.
    Event(Event),
    /// The daemon went away; the feed keeps trying to reconnect (reported once per outage).
    Disconnected(Error),
    /// The daemon is back; events continue after the last cursor handed out.
    Reconnected,
}

/// A resumable event stream (see the module docs).
#[derive(Debug)]
pub struct Feed {
    socket: PathBuf,
    cursor: u64,
    stream: Option<tonic::Streaming<Event>>,
    delay: Duration,
}

/// First wait before reconnecting; doubled after each failure up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const MAX_DELAY: Duration = Duration::from_secs(2);

impl Feed {
    /// Subscribes to the daemon on `socket`, replaying every event after `since`, or live
    /// from now when `None`. Fails with [`Error::NotRunning`] when no daemon answers now:
    /// a frontend started without a daemon should say so rather than wait silently.
    pub async fn open(socket: &Path, since: Option<u64>) -> Result<Self, Error> {
        let mut client = Client::connect(socket).await?;
        let cursor = match since {
            Some(cursor) => cursor,
            None => client.status().await?.last_cursor,
        };
        let stream = client.events(Some(cursor)).await?;
        Ok(Feed { socket: socket.to_path_buf(), cursor, stream: Some(stream), delay: FIRST_DELAY })
    }

    /// The cursor of the last event handed out (or the starting point).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The next item. Errors only for refusals that retrying cannot fix (the daemon
    /// rejected the subscription); a daemon that is away is waited for.
    pub async fn next(&mut self) -> Result<FeedItem, Error> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                match self.reconnect().await {
                    Ok(()) => return Ok(FeedItem::Reconnected),
                    Err(err) if err.is_not_running() => {
                        tokio::time::sleep(self.delay).await;
                        self.delay = (self.delay * 2).min(MAX_DELAY);
                        continue;
                    }
                    Err(err) => return Err(err),
                }
            };
            match stream.message().await {
                Ok(Some(event)) => {
                    // The log only grows; an old cursor can only be a repeat.
                    if event.cursor <= self.cursor {
                        continue;
                    }
                    self.cursor = event.cursor;
                    return Ok(FeedItem::Event(event));
                }
                Ok(None) => {
                    self.stream = None;
                    return Ok(FeedItem::Disconnected(Error::NotRunning {
                        socket: self.socket.clone(),
                        reason: "nesd closed the event stream".into(),
                    }));
                }
                Err(status) => {
                    self.stream = None;
                    match Error::from_status(status, &self.socket) {
                        // Fell behind: the daemon dropped us; catch up from the log at once.
                        Error::Rpc { code: tonic::Code::ResourceExhausted, .. } => {
                            self.delay = std::time::Duration::ZERO;
                            continue;
                        }
                        err if err.is_not_running() => return Ok(FeedItem::Disconnected(err)),
                        Error::Rpc { code: tonic::Code::Unavailable, .. } => {
                            // The daemon is shutting down and said so.
                            return Ok(FeedItem::Disconnected(Error::NotRunning {
                                socket: self.socket.clone(),
                                reason: "nesd is shutting down".into(),
                            }));
                        }
                        err => return Err(err),
                    }
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), Error> {
        let mut client = Client::connect(&self.socket).await?;
        let stream = client.events(Some(self.cursor)).await?;
        self.stream = Some(stream);
        self.delay = FIRST_DELAY;
        Ok(())
    }
}
