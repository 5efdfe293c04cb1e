//! [`Feed`]: nesd's event stream, kept alive across daemon restarts.
//!
//! Every event in the daemon's log has a cursor that only grows, and a *log cursor*: the
//! same position as an opaque string that also names the store it belongs to
//! (`Event.log_cursor`). The feed remembers the log cursor of the last event it handed
//! out; when the stream breaks (the daemon restarts, or drops a client that fell behind
//! with RESOURCE_EXHAUSTED) it reconnects with `EventsRequest.since_cursor` set to it, so
//! the caller sees every event once: no gap, no repeat.
//!
//! Opening without a cursor ("live from now") still asks the daemon for its newest cursor
//! first and subscribes after it, so even a live-only feed has a position to resume from.
//!
//! A cursor the daemon cannot place in its log (another store's, beyond its last event,
//! or of an event it does not have: the store was re-created or restored from an older
//! copy) is refused, never waited on ([`is_refused_cursor`]). [`Feed::open`] then fails,
//! as a reconnect does later; a feed made with [`Feed::open_or_now`] instead starts again
//! from the daemon's newest event and says so ([`FeedItem::Restarted`]).
//!
//! The feed hands out every kind of event alike, once each, by cursor (a file's `message`
//! event when it is stored, and its `file` events as its transfer ends, are distinct
//! entries of the log); which of them to show is each frontend's decision (an incoming
//! file is shown from its `file` event saying complete, never from its `message`).

use crate::client::Client;
use crate::error::Error;
use nes_proto::rpc::Event;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What [`Feed::next`] yields.
#[derive(Debug)]
#[non_exhaustive]
// Nearly every item is an event, moved once from the stream to its reader: boxing it to
// shrink the rare variants would add an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum FeedItem {
    /// The next event of the log.
    Event(Event),
    /// The daemon went away; the feed keeps trying to reconnect (reported once per outage).
    Disconnected(Error),
    /// The daemon is back; events continue after the last cursor handed out.
    Reconnected,
    /// The daemon came back with a store that refuses the feed's cursor (re-created, or
    /// restored from an older copy): a feed made with [`Feed::open_or_now`] goes on from
    /// the daemon's newest event. The text is the daemon's reason, to tell the user once.
    Restarted(String),
}

/// A resumable event stream (see the module docs).
#[derive(Debug)]
pub struct Feed {
    socket: PathBuf,
    cursor: u64,
    /// The log cursor to resume after (a bare number from a daemon without log cursors).
    position: String,
    stream: Option<tonic::Streaming<Event>>,
    delay: Duration,
    /// Start again from now when the daemon refuses the cursor, instead of failing.
    recover: bool,
}

/// First wait before reconnecting; doubled after each failure up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Whether `err` (from opening an event stream) is the daemon refusing the cursor: it is
/// not a position in its log (FAILED_PRECONDITION), or not a cursor (INVALID_ARGUMENT).
/// The message says which.
pub fn is_refused_cursor(err: &Error) -> bool {
    matches!(
        err.code(),
        Some(tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument)
    )
}

/// The event number in a cursor: a bare number, or the middle of a log cursor. `None`
/// when it is neither (the daemon then says what is wrong with it).
pub fn cursor_number(cursor: &str) -> Option<u64> {
    let cursor = cursor.trim();
    cursor
        .parse()
        .ok()
        .or_else(|| cursor.split('-').nth(1)?.parse().ok())
}

impl Feed {
    /// Subscribes to the daemon on `socket`, replaying every event after the cursor
    /// `since` (a log cursor, or a bare number), or live from now when `None`. Fails with
    /// [`Error::NotRunning`] when no daemon answers now (a frontend started without a
    /// daemon should say so rather than wait silently), and with the daemon's refusal
    /// when `since` is not a position in its log ([`is_refused_cursor`]).
    pub async fn open(socket: &Path, since: Option<&str>) -> Result<Self, Error> {
        let mut client = Client::connect(socket).await?;
        let mut feed = Feed {
            socket: socket.to_path_buf(),
            cursor: 0,
            position: String::new(),
            stream: None,
            delay: FIRST_DELAY,
            recover: false,
        };
        match since {
            Some(since) => {
                feed.stream = Some(client.events_after(since).await?);
                feed.cursor = cursor_number(since).unwrap_or(0);
                feed.position = since.trim().to_owned();
            }
            None => feed.start_now(&mut client).await?,
        }
        Ok(feed)
    }

    /// Like [`Feed::open`], but a refused `since` (a cursor of another store, or one the
    /// store cannot place any more) starts the feed from now; the daemon's reason comes
    /// back with it, to tell the user once. The feed recovers the same way when the
    /// daemon comes back later with a store that refuses its cursor
    /// ([`FeedItem::Restarted`]): for agents that must go on rather than stop.
    pub async fn open_or_now(
        socket: &Path,
        since: Option<&str>,
    ) -> Result<(Self, Option<String>), Error> {
        let (mut feed, refused) = match Self::open(socket, since).await {
            Ok(feed) => (feed, None),
            Err(err) if since.is_some() && is_refused_cursor(&err) => {
                (Self::open(socket, None).await?, Some(err.to_string()))
            }
            Err(err) => return Err(err),
        };
        feed.recover = true;
        Ok((feed, refused))
    }

    /// The cursor of the last event handed out (or the starting point).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The log cursor of the last event handed out (or the starting point): what to keep
    /// to resume with later.
    pub fn position(&self) -> &str {
        &self.position
    }

    /// Subscribes after the daemon's newest event.
    async fn start_now(&mut self, client: &mut Client) -> Result<(), Error> {
        let status = client.status().await?;
        // A daemon without log cursors answers none: its bare number resumes as before.
        let position = if status.last_log_cursor.is_empty() {
            status.last_cursor.to_string()
        } else {
            status.last_log_cursor
        };
        self.stream = Some(client.events_after(&position).await?);
        self.cursor = status.last_cursor;
        self.position = position;
        Ok(())
    }

    /// The next item. Errors only for refusals that retrying cannot fix (the daemon
    /// rejected the subscription, or, unless the feed recovers, its cursor); a daemon
    /// that is away is waited for.
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
                    Err(err) if self.recover && is_refused_cursor(&err) => {
                        let mut client = match Client::connect(&self.socket).await {
                            Ok(client) => client,
                            Err(e) if e.is_not_running() => {
                                tokio::time::sleep(self.delay).await;
                                continue;
                            }
                            Err(e) => return Err(e),
                        };
                        match self.start_now(&mut client).await {
                            Ok(()) => {
                                self.delay = FIRST_DELAY;
                                return Ok(FeedItem::Restarted(err.to_string()));
                            }
                            Err(e) if e.is_not_running() => {
                                tokio::time::sleep(self.delay).await;
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
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
                    self.position = if event.log_cursor.is_empty() {
                        event.cursor.to_string()
                    } else {
                        event.log_cursor.clone()
                    };
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
                        Error::Rpc {
                            code: tonic::Code::ResourceExhausted,
                            ..
                        } => {
                            self.delay = std::time::Duration::ZERO;
                            continue;
                        }
                        err if err.is_not_running() => return Ok(FeedItem::Disconnected(err)),
                        // The log lost events ahead of this replay (retention): resubscribing
                        // from here is refused the same way, and a recovering feed then
                        // starts from now and says so (the branch above).
                        err if self.recover && is_refused_cursor(&err) => continue,
                        Error::Rpc {
                            code: tonic::Code::Unavailable,
                            ..
                        } => {
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
        let stream = client.events_after(&self.position).await?;
        self.stream = Some(stream);
        self.delay = FIRST_DELAY;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_cursors() {
        assert_eq!(cursor_number("42"), Some(42));
        assert_eq!(cursor_number(" 0 "), Some(0));
        assert_eq!(cursor_number("0123456789abcdef-17-9c1e33ab"), Some(17));
        assert_eq!(cursor_number("garbage"), None);
    }

    #[test]
    fn refusals_of_a_cursor() {
        let refused = Error::from_status(
            tonic::Status::failed_precondition("another store"),
            Path::new("/s"),
        );
        assert!(is_refused_cursor(&refused));
        let gone = Error::from_status(tonic::Status::unavailable("stopping"), Path::new("/s"));
        assert!(!is_refused_cursor(&gone));
    }
}
