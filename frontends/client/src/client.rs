//! [`Client`]: a connection to nesd over its Unix socket, with one method per RPC.
//!
//! Every method maps a failure to [`Error`] once, here, so frontends only decide how to
//! show it. The raw generated client is there too ([`Client::rpc`]) for streaming calls
//! that need more control.

use crate::error::Error;
use futures::stream::{BoxStream, StreamExt};
use nes_proto::rpc::messenger_client::MessengerClient;
use nes_proto::rpc::{
    send_file_request, Contact, ContactsRequest, Conversation, ConversationsRequest, Event,
    EventsRequest, FileData, FileHeader, FilesRequest, GetFileRequest, HistoryRequest,
    LookupContactRequest, MarkReadRequest, Message, RegisterReply, RegisterRequest,
    SendFileRequest, SendReply, SendRequest, SetContactLegacyRequest, StatusReply, StatusRequest,
    TrustContactRequest,
};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::transport::{Channel, Endpoint, Uri};

/// Messages asked for per `History` call by [`Client::history`].
pub const HISTORY_PAGE: u32 = 256;
/// The largest reply accepted: [`HISTORY_PAGE`] messages of 128 KiB text and their
/// fields fit with room to spare.
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// Bytes per `SendFile` data request made by [`Client::send_file`]: the size nesd's
/// `ReadFile` pieces have too, far below gRPC's message limit, and small enough that an
/// upload holds one piece in memory at a time whatever the file's size.
pub const FILE_PIECE: usize = 64 * 1024;

/// A connection to one nesd.
#[derive(Clone, Debug)]
pub struct Client {
    rpc: MessengerClient<Channel>,
    socket: PathBuf,
}

impl Client {
    /// Connects to the daemon listening on `socket`. A missing socket or a refused
    /// connection is [`Error::NotRunning`]; a socket that is not the user's own (see
    /// [`crate::paths::check_socket`]), or a listener running as another user, is
    /// [`Error::Untrusted`], found before any request is sent.
    pub async fn connect(socket: &Path) -> Result<Self, Error> {
        crate::paths::check_socket(socket)?;
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector ignores it and opens the
        // Unix socket instead.
        let channel = Endpoint::from_static("http://nesd.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    // The files were checked before; who listens is checked here, before
                    // the first byte goes out, so a socket swapped in between is refused too.
                    check_peer(&stream)?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| connect_error(&e, socket))?;
        // History pages (below) can hold HISTORY_PAGE messages of the largest text nesd
        // accepts (128 KiB): more than tonic's default 4 MiB.
        let rpc = MessengerClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES);
        Ok(Client {
            rpc,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The generated gRPC client, for calls not wrapped here.
    pub fn rpc(&mut self) -> &mut MessengerClient<Channel> {
        &mut self.rpc
    }

    /// Maps a status of a call made through [`Client::rpc`].
    pub fn error(&self, status: tonic::Status) -> Error {
        Error::from_status(status, &self.socket)
    }

    /// `Status`: who the daemon is and how it is doing.
    pub async fn status(&mut self) -> Result<StatusReply, Error> {
        let reply = self.rpc.status(StatusRequest {}).await;
        self.unpack(reply)
    }

    /// `Send`: seals and queues one message; returns it as stored (state QUEUED or later).
    pub async fn send(&mut self, to: &str, text: &str, legacy: bool) -> Result<Message, Error> {
        let request = SendRequest {
            to: to.into(),
            text: text.into(),
            legacy,
        };
        let reply = self.rpc.send(request).await;
        sent_message(self.unpack(reply)?, "the message")
    }

    /// `History`: the last `limit` messages (0: all) with `peer`, oldest first. Asks for
    /// [`HISTORY_PAGE`] messages at a time, newest page first, so that no single reply
    /// outgrows what gRPC carries however long the conversation is.
    pub async fn history(&mut self, peer: &str, limit: u32) -> Result<Vec<Message>, Error> {
        let mut pages: Vec<Vec<Message>> = Vec::new();
        let mut have = 0u32;
        let mut before_id = String::new();
        loop {
            let want = if limit == 0 {
                HISTORY_PAGE
            } else {
                (limit - have).min(HISTORY_PAGE)
            };
            let request = HistoryRequest {
                peer: peer.into(),
                limit: want,
                before_id: before_id.clone(),
            };
            let reply = self.rpc.history(request).await;
            let page = self.unpack(reply)?.messages;
            let full = page.len() as u32 == want;
            have += page.len() as u32;
            match page.first() {
                Some(oldest) => before_id = oldest.id.clone(),
                None => break,
            }
            pages.push(page);
            if !full || (limit != 0 && have >= limit) {
                break;
            }
        }
        Ok(pages.into_iter().rev().flatten().collect())
    }

    /// `Conversations`: most recent first, with unread counts.
    pub async fn conversations(&mut self) -> Result<Vec<Conversation>, Error> {
        let reply = self.rpc.conversations(ConversationsRequest {}).await;
        Ok(self.unpack(reply)?.conversations)
    }

    /// `MarkRead`: marks `peer`'s messages read (up to `up_to_id`, or all when empty);
    /// returns how many changed.
    pub async fn mark_read(&mut self, peer: &str, up_to_id: &str) -> Result<u64, Error> {
        let request = MarkReadRequest {
            peer: peer.into(),
            up_to_id: up_to_id.into(),
        };
        let reply = self.rpc.mark_read(request).await;
        Ok(self.unpack(reply)?.marked)
    }

    /// `Contacts`: every contact the daemon knows keys for.
    pub async fn contacts(&mut self) -> Result<Vec<Contact>, Error> {
        let reply = self.rpc.contacts(ContactsRequest {}).await;
        Ok(self.unpack(reply)?.contacts)
    }

    /// `LookupContact`: one contact, fetched from the key server when unknown or `refresh`.
    pub async fn lookup_contact(
        &mut self,
        username: &str,
        refresh: bool,
    ) -> Result<Contact, Error> {
        let request = LookupContactRequest {
            username: username.into(),
            refresh,
        };
        let reply = self.rpc.lookup_contact(request).await;
        self.unpack(reply)
    }

    /// `TrustContact`: accepts a contact's new keys; when fingerprints are given, only if
    /// the pending keys still have them.
    pub async fn trust_contact(
        &mut self,
        username: &str,
        message_key_fingerprint: &str,
        sign_key_fingerprint: &str,
    ) -> Result<Contact, Error> {
        let request = TrustContactRequest {
            username: username.into(),
            message_key_fingerprint: message_key_fingerprint.into(),
            sign_key_fingerprint: sign_key_fingerprint.into(),
        };
        let reply = self.rpc.trust_contact(request).await;
        self.unpack(reply)
    }

    /// `SetContactLegacy`: messages to `username` go out as v1 frames (or no longer do).
    pub async fn set_contact_legacy(
        &mut self,
        username: &str,
        legacy: bool,
    ) -> Result<Contact, Error> {
        let request = SetContactLegacyRequest {
            username: username.into(),
            legacy,
        };
        let reply = self.rpc.set_contact_legacy(request).await;
        self.unpack(reply)
    }

    /// `Register`: registers this identity's keys with the key server.
    pub async fn register(&mut self, email: &str) -> Result<RegisterReply, Error> {
        let reply = self
            .rpc
            .register(RegisterRequest {
                email: email.into(),
            })
            .await;
        self.unpack(reply)
    }

    /// `SetPresence`: sets this identity's presence and note.
    pub async fn set_presence(
        &mut self,
        status: nes_proto::rpc::PresenceStatus,
        note: &str,
    ) -> Result<nes_proto::rpc::Presence, Error> {
        let reply = self
            .rpc
            .set_presence(nes_proto::rpc::SetPresenceRequest {
                status: status as i32,
                note: note.into(),
            })
            .await;
        self.unpack(reply)
    }

    /// `GetPresence`: a contact's presence as last heard ("" for this identity's own).
    pub async fn presence(&mut self, username: &str) -> Result<nes_proto::rpc::Presence, Error> {
        let reply = self
            .rpc
            .get_presence(nes_proto::rpc::GetPresenceRequest {
                username: username.into(),
            })
            .await;
        self.unpack(reply)
    }

    /// `Events`: the raw event stream after `since` (live only when `None`). Most
    /// frontends want a [`crate::Feed`], which reconnects.
    pub async fn events(&mut self, since: Option<u64>) -> Result<tonic::Streaming<Event>, Error> {
        let reply = self
            .rpc
            .events(EventsRequest {
                since,
                ..Default::default()
            })
            .await;
        self.unpack(reply)
    }

    /// `Events` after a log cursor (an `Event.log_cursor`, or a bare number). A cursor
    /// that is not a position in this daemon's log is refused with FAILED_PRECONDITION
    /// (see [`crate::feed::is_refused_cursor`]).
    pub async fn events_after(&mut self, cursor: &str) -> Result<tonic::Streaming<Event>, Error> {
        let reply = self
            .rpc
            .events(EventsRequest {
                since: crate::feed::cursor_number(cursor),
                since_cursor: cursor.to_owned(),
            })
            .await;
        self.unpack(reply)
    }

    /// `SendFile`: sends `reader`'s bytes to `to` as a file called `name` (`media_type`
    /// empty: nesd guesses from the name) and returns the stored message (QUEUED, its
    /// transfer running in the daemon). The reader is streamed in pieces of
    /// [`FILE_PIECE`] bytes, never read whole; `on_progress` hears the total of bytes
    /// handed to nesd so far after each piece.
    ///
    /// A failure to read is [`Error::Read`], and the call is then abandoned rather than
    /// ended: an ended stream would make nesd store and send a truncated file.
    pub async fn send_file(
        &mut self,
        to: &str,
        name: &str,
        media_type: &str,
        reader: impl AsyncRead + Unpin + Send + 'static,
        mut on_progress: impl FnMut(u64),
    ) -> Result<Message, Error> {
        let header = SendFileRequest {
            part: Some(send_file_request::Part::Header(FileHeader {
                to: to.into(),
                name: name.into(),
                media_type: media_type.into(),
            })),
        };
        // The request stream runs inside the transport; it reports back through this
        // channel, so `on_progress` needs to be neither Send nor 'static.
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let requests = futures::stream::once(async move { header }).chain(pieces(reader, report));
        // A handle of its own (a clone shares the connection), so `self` stays free to map
        // the reply below.
        let mut rpc = self.rpc.clone();
        let call = rpc.send_file(requests);
        tokio::pin!(call);
        let reply = loop {
            tokio::select! {
                reply = &mut call => break reply,
                Some(upload) = reports.recv() => match upload {
                    Upload::Sent(total) => on_progress(total),
                    // Returning drops `call`: the stream is reset, nesd discards the part.
                    Upload::Failed(err) => return Err(Error::Read(err)),
                },
            }
        };
        // Pieces read before the reply came: the caller's total ends at the file's size.
        while let Ok(Upload::Sent(total)) = reports.try_recv() {
            on_progress(total);
        }
        sent_message(self.unpack(reply)?, "the file")
    }

    /// `Files`: the messages that carry a file, with `peer` (empty: everyone's), oldest
    /// first.
    pub async fn files(&mut self, peer: &str) -> Result<Vec<Message>, Error> {
        let reply = self.rpc.files(FilesRequest { peer: peer.into() }).await;
        Ok(self.unpack(reply)?.messages)
    }

    /// `GetFile`: one file message by its id, with its transfer's progress.
    pub async fn get_file(&mut self, id: &str) -> Result<Message, Error> {
        let reply = self.rpc.get_file(file_request(id)).await;
        self.unpack(reply)
    }

    /// `ReadFile`: the bytes of a complete file, in pieces of up to 64 KiB, each failure
    /// mapped like every other call's (FAILED_PRECONDITION while it is not complete).
    pub async fn read_file(
        &mut self,
        id: &str,
    ) -> Result<BoxStream<'static, Result<FileData, Error>>, Error> {
        let reply = self.rpc.read_file(file_request(id)).await;
        let socket = self.socket.clone();
        let stream = self.unpack(reply)?;
        Ok(stream
            .map(move |piece| piece.map_err(|s| Error::from_status(s, &socket)))
            .boxed())
    }

    /// `CancelFile`: stops a transfer in either direction; returns the message as it is
    /// now.
    pub async fn cancel_file(&mut self, id: &str) -> Result<Message, Error> {
        let reply = self.rpc.cancel_file(file_request(id)).await;
        self.unpack(reply)
    }

    fn unpack<T>(&self, reply: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Error> {
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s))
    }
}

fn file_request(id: &str) -> GetFileRequest {
    GetFileRequest { id: id.into() }
}

/// What the request stream of [`Client::send_file`] tells the caller.
#[derive(Debug)]
enum Upload {
    /// This many bytes in all have been handed to the transport.
    Sent(u64),
    /// Reading failed; the stream will never end.
    Failed(std::io::Error),
}

/// The data requests of an upload: `reader` in pieces of [`FILE_PIECE`] bytes, reading
/// the next one only when the transport asks for it (so memory stays at one piece).
/// The stream ends at the reader's end; after a read error it reports the error and
/// stays pending forever, so the upload is never taken as complete.
fn pieces(
    reader: impl AsyncRead + Unpin + Send + 'static,
    report: tokio::sync::mpsc::UnboundedSender<Upload>,
) -> impl futures::Stream<Item = SendFileRequest> + Send + 'static {
    futures::stream::unfold(
        (reader, report, 0u64),
        |(mut reader, report, total)| async move {
            let mut piece = vec![0u8; FILE_PIECE];
            let n = match read_piece(&mut reader, &mut piece).await {
                Ok(0) => return None,
                Ok(n) => n,
                Err(err) => {
                    let _ = report.send(Upload::Failed(err));
                    return std::future::pending().await;
                }
            };
            piece.truncate(n);
            let total = total + n as u64;
            // The caller may have stopped listening (it returned): nothing to tell then.
            let _ = report.send(Upload::Sent(total));
            let request = SendFileRequest {
                part: Some(send_file_request::Part::Data(piece)),
            };
            Some((request, (reader, report, total)))
        },
    )
}

/// Fills `buf` as far as the reader gives (a pipe hands out a few KiB per read), so
/// pieces are full-sized except the last; 0 only at the end. An interrupted read is
/// tried again.
async fn read_piece(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The message of a Send or SendFile reply, or the refusal it carries.
fn sent_message(reply: SendReply, what: &str) -> Result<Message, Error> {
    if !reply.error.is_empty() {
        return Err(Error::Rpc {
            code: tonic::Code::from_i32(reply.code),
            message: reply.error,
        });
    }
    reply.message.ok_or_else(|| Error::Rpc {
        code: tonic::Code::Internal,
        message: format!("nesd accepted {what} but did not return its message"),
    })
}

/// A listener that runs as another user (neither this user nor root).
#[derive(Debug, thiserror::Error)]
#[error("the program listening on it runs as {0}, not as {1}: it is not your nesd")]
struct UntrustedPeer(String, String);

/// Refuses a peer whose uid is neither ours nor root's (see [`crate::paths::check_socket`]).
fn check_peer(stream: &tokio::net::UnixStream) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    let me = crate::paths::current_uid();
    if peer == 0 || Some(peer) == me {
        return Ok(());
    }
    let me = me.map(crate::paths::you).unwrap_or_else(|| "you".into());
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        UntrustedPeer(crate::paths::user_name(peer), me),
    ))
}

/// Sorts a failed connect: no socket / refused means no daemon; permission denied means
/// the socket is not ours.
fn connect_error(err: &tonic::transport::Error, socket: &Path) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(peer) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<UntrustedPeer>())
            {
                return Error::Untrusted {
                    socket: socket.to_path_buf(),
                    reason: peer.to_string(),
                };
            }
            return match io.kind() {
                std::io::ErrorKind::PermissionDenied => Error::Socket {
                    socket: socket.to_path_buf(),
                    reason: io.to_string(),
                },
                std::io::ErrorKind::ConnectionRefused => Error::NotRunning {
                    socket: socket.to_path_buf(),
                    reason: "connection refused: a stale socket, the daemon has stopped".into(),
                },
                std::io::ErrorKind::NotFound => Error::NotRunning {
                    socket: socket.to_path_buf(),
                    reason: "no socket".into(),
                },
                _ => Error::NotRunning {
                    socket: socket.to_path_buf(),
                    reason: io.to_string(),
                },
            };
        }
        source = e.source();
    }
    Error::NotRunning {
        socket: socket.to_path_buf(),
        reason: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uploads_go_in_full_pieces_and_report_their_total() {
        let data: Vec<u8> = (0..(FILE_PIECE * 2 + 10)).map(|i| i as u8).collect();
        // A slow reader that hands out 1000 bytes at a time, as a pipe does.
        let reader = slow_reader(data.clone(), 1000);
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let requests: Vec<SendFileRequest> = pieces(reader, report).collect().await;
        let sizes: Vec<usize> = requests
            .iter()
            .map(|r| match &r.part {
                Some(send_file_request::Part::Data(d)) => d.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![FILE_PIECE, FILE_PIECE, 10]);
        let mut totals = Vec::new();
        while let Ok(Upload::Sent(t)) = reports.try_recv() {
            totals.push(t);
        }
        assert_eq!(totals.last(), Some(&(data.len() as u64)));
        let joined: Vec<u8> = requests
            .into_iter()
            .filter_map(|r| match r.part {
                Some(send_file_request::Part::Data(d)) => Some(d),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(joined, data);
    }

    #[tokio::test]
    async fn a_read_error_never_ends_the_upload() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")))
            }
        }
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = Box::pin(pieces(Broken, report));
        let next = tokio::time::timeout(std::time::Duration::from_millis(100), stream.next());
        assert!(next.await.is_err(), "the stream must stay pending, not end");
        assert!(matches!(reports.try_recv(), Ok(Upload::Failed(_))));
    }

    /// A reader over `data` that returns at most `step` bytes per read.
    fn slow_reader(data: Vec<u8>, step: usize) -> impl AsyncRead + Unpin + Send + 'static {
        struct Slow(std::io::Cursor<Vec<u8>>, usize);
        impl AsyncRead for Slow {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let step = self.1.min(buf.remaining());
                let mut chunk = vec![0u8; step];
                let n = std::io::Read::read(&mut self.0, &mut chunk)?;
                buf.put_slice(&chunk[..n]);
                std::task::Poll::Ready(Ok(()))
            }
        }
        Slow(std::io::Cursor::new(data), step)
    }

    #[tokio::test]
    async fn missing_socket_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let err = Client::connect(&dir.path().join("nesd.sock"))
            .await
            .unwrap_err();
        assert!(err.is_not_running(), "{err:?}");
        assert!(err.to_string().contains("no socket"), "{err}");
    }

    #[tokio::test]
    async fn stale_socket_is_not_running() {
        // A socket file whose listener is gone: what a killed daemon leaves behind.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nesd.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = Client::connect(&path).await.unwrap_err();
        assert!(err.is_not_running(), "{err:?}");
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn a_plain_file_is_not_a_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nesd.sock");
        std::fs::write(&path, b"").unwrap();
        let err = Client::connect(&path).await.unwrap_err();
        assert!(err.is_not_running(), "{err:?}");
    }
}
