//! The gRPC adapter: `nes.v1.Messenger` (tonic) on the Unix socket, over the service.
//!
//! Each method unpacks its request, calls [`Service`], converts what it answers from the
//! domain types (`convert`, the only place in nesd where they meet the API's generated
//! types) and maps [`ServiceError`] to a status code (see the conventions in
//! `messenger.proto`). No logic lives here beyond the streaming plumbing of SendStream
//! and Events.

mod convert;

use crate::error::ServiceError;
use crate::model::{self, PresenceStatus};
use crate::service::Service;
use convert::all;
use futures::{Stream, StreamExt};
use nes_proto::rpc::messenger_server::{Messenger, MessengerServer};
use nes_proto::rpc::{self, SendReply};
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Sends of a SendStream sealed together in one blocking task.
pub const SEND_CHUNK: usize = 16;
/// Chunks of a SendStream sealed in parallel (the replies stay in order).
pub const SEND_AHEAD: usize = 2;
/// Bytes per ReadFile reply.
pub const FILE_PIECE: usize = 64 * 1024;
/// Most sends stored per flush in a SendStream.
pub const SEND_BATCH: usize = 64;

/// The tonic service.
#[derive(Clone)]
pub struct GrpcApi {
    service: Service,
}

impl GrpcApi {
    /// Wraps the service.
    pub fn new(service: Service) -> Self {
        GrpcApi { service }
    }
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    service: Service,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(MessengerServer::new(GrpcApi::new(service)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// The status for a service error.
pub fn to_status(e: ServiceError) -> Status {
    let code = code_of(&e);
    Status::new(code, e.to_string())
}

fn code_of(e: &ServiceError) -> tonic::Code {
    use tonic::Code;
    match e {
        ServiceError::InvalidArgument(_) => Code::InvalidArgument,
        ServiceError::NotFound(_) => Code::NotFound,
        ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
        ServiceError::Unavailable(_) => Code::Unavailable,
        ServiceError::AlreadyExists(_) => Code::AlreadyExists,
        ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
        // Every class by name: a new ServiceError variant must choose its code here.
        ServiceError::Internal(_) => Code::Internal,
    }
}

fn send_reply(result: Result<model::Message, ServiceError>) -> SendReply {
    match result {
        Ok(m) => SendReply {
            message: Some(m.into()),
            error: String::new(),
            code: 0,
        },
        Err(e) => SendReply {
            message: None,
            code: code_of(&e) as i32,
            error: e.to_string(),
        },
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Messenger for GrpcApi {
    async fn status(
        &self,
        _: Request<rpc::StatusRequest>,
    ) -> Result<Response<rpc::StatusReply>, Status> {
        Ok(Response::new(
            self.service.status().await.map_err(to_status)?.into(),
        ))
    }

    async fn send(
        &self,
        request: Request<rpc::SendRequest>,
    ) -> Result<Response<SendReply>, Status> {
        let message = self
            .service
            .send(request.into_inner().into())
            .await
            .map_err(to_status)?;
        Ok(Response::new(send_reply(Ok(message))))
    }

    type SendStreamStream = BoxStream<SendReply>;

    async fn send_stream(
        &self,
        request: Request<Streaming<rpc::SendRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let inbound = request.into_inner();
        let service = self.service.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(SEND_BATCH);
        tokio::spawn(async move {
            let preparing = service.clone();
            // Requests that arrive together are sealed together, a couple of chunks in
            // parallel; `buffered` keeps them in request order; sealed chunks that are
            // ready together are stored with one flush. A broken request stream ends
            // the call.
            let mut prepared = inbound
                .take_while(|r| futures::future::ready(r.is_ok()))
                .filter_map(|r| futures::future::ready(r.ok()))
                .ready_chunks(SEND_CHUNK)
                .map(move |requests| {
                    let s = preparing.clone();
                    async move { s.prepare_sends(all(requests)).await }
                })
                .buffered(SEND_AHEAD)
                .ready_chunks(SEND_BATCH / SEND_CHUNK);
            while let Some(chunks) = prepared.next().await {
                let batch: Vec<_> = chunks.into_iter().flatten().collect();
                for result in service.commit_sends(batch).await {
                    if tx.send(Ok(send_reply(result))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type EventsStream = BoxStream<rpc::Event>;

    async fn events(
        &self,
        request: Request<rpc::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let r = request.into_inner();
        let since = match (r.since_cursor.trim(), r.since) {
            ("", None) => None,
            ("", Some(n)) => Some(n.to_string()),
            (cursor, _) => Some(cursor.to_owned()),
        };
        let rx = self
            .service
            .events_from(since.as_deref())
            .map_err(to_status)?;
        // An event goes to every client: each gets its own copy.
        let stream = ReceiverStream::new(rx)
            .map(|r| r.map(|e| Arc::unwrap_or_clone(e).into()).map_err(to_status));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn history(
        &self,
        request: Request<rpc::HistoryRequest>,
    ) -> Result<Response<rpc::HistoryReply>, Status> {
        let r = request.into_inner();
        let messages = self
            .service
            .history(&r.peer, r.limit, &r.before_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(rpc::HistoryReply {
            messages: all(messages),
        }))
    }

    async fn conversations(
        &self,
        _: Request<rpc::ConversationsRequest>,
    ) -> Result<Response<rpc::ConversationsReply>, Status> {
        let conversations = self.service.conversations().await.map_err(to_status)?;
        Ok(Response::new(rpc::ConversationsReply {
            conversations: all(conversations),
        }))
    }

    async fn mark_read(
        &self,
        request: Request<rpc::MarkReadRequest>,
    ) -> Result<Response<rpc::MarkReadReply>, Status> {
        let r = request.into_inner();
        let marked = self
            .service
            .mark_read(&r.peer, &r.up_to_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(rpc::MarkReadReply { marked }))
    }

    async fn contacts(
        &self,
        _: Request<rpc::ContactsRequest>,
    ) -> Result<Response<rpc::ContactsReply>, Status> {
        let contacts = self.service.contacts().await.map_err(to_status)?;
        Ok(Response::new(rpc::ContactsReply {
            contacts: all(contacts),
        }))
    }

    async fn lookup_contact(
        &self,
        request: Request<rpc::LookupContactRequest>,
    ) -> Result<Response<rpc::Contact>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.service
                .lookup_contact(&r.username, r.refresh)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }

    async fn trust_contact(
        &self,
        request: Request<rpc::TrustContactRequest>,
    ) -> Result<Response<rpc::Contact>, Status> {
        let r = request.into_inner();
        let contact = self
            .service
            .trust_contact(
                &r.username,
                &r.message_key_fingerprint,
                &r.sign_key_fingerprint,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(contact.into()))
    }

    async fn set_contact_legacy(
        &self,
        request: Request<rpc::SetContactLegacyRequest>,
    ) -> Result<Response<rpc::Contact>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.service
                .set_contact_legacy(&r.username, r.legacy)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }

    async fn register(
        &self,
        request: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterReply>, Status> {
        let r = request.into_inner();
        let message = self.service.register(&r.email).await.map_err(to_status)?;
        Ok(Response::new(rpc::RegisterReply {
            username: self.service.user().to_string(),
            message,
        }))
    }

    async fn set_presence(
        &self,
        request: Request<rpc::SetPresenceRequest>,
    ) -> Result<Response<rpc::Presence>, Status> {
        let r = request.into_inner();
        let status = PresenceStatus::from_api(r.status)
            .ok_or_else(|| Status::invalid_argument("unknown presence status"))?;
        Ok(Response::new(
            self.service
                .set_presence(status, &r.note)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }

    async fn get_presence(
        &self,
        request: Request<rpc::GetPresenceRequest>,
    ) -> Result<Response<rpc::Presence>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.service
                .get_presence(&r.username)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }

    async fn send_file(
        &self,
        request: Request<Streaming<rpc::SendFileRequest>>,
    ) -> Result<Response<SendReply>, Status> {
        use rpc::send_file_request::Part;
        let mut parts = request.into_inner();
        let header = match parts.message().await? {
            Some(rpc::SendFileRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "SendFile: the first request must be the header",
                ))
            }
        };
        let mut file = self
            .service
            .begin_file(&header.to, &header.name, &header.media_type)
            .await
            .map_err(to_status)?;
        // Written as it comes: the file is never whole in memory. Dropping `file` on an
        // error deletes what was written.
        while let Some(part) = parts.message().await? {
            match part.part {
                Some(Part::Data(data)) => file.upload.write(&data).map_err(to_status)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "SendFile: only data may follow the header",
                    ))
                }
            }
        }
        let message = self.service.finish_file(file).await.map_err(to_status)?;
        Ok(Response::new(send_reply(Ok(message))))
    }

    async fn files(
        &self,
        request: Request<rpc::FilesRequest>,
    ) -> Result<Response<rpc::FilesReply>, Status> {
        let r = request.into_inner();
        Ok(Response::new(rpc::FilesReply {
            messages: all(self.service.files(&r.peer).await.map_err(to_status)?),
        }))
    }

    async fn get_file(
        &self,
        request: Request<rpc::GetFileRequest>,
    ) -> Result<Response<rpc::Message>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.service
                .get_file(&r.id)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }

    type ReadFileStream = BoxStream<rpc::FileData>;

    async fn read_file(
        &self,
        request: Request<rpc::GetFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        use tokio::io::AsyncReadExt;
        let r = request.into_inner();
        let path = self.service.file_path(&r.id).await.map_err(to_status)?;
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::internal(format!("cannot open the file: {e}")))?;
        // A small channel: the file is read only as fast as the client takes it.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; FILE_PIECE];
                match f.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(rpc::FileData { data: buf })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("cannot read the file: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_file(
        &self,
        request: Request<rpc::GetFileRequest>,
    ) -> Result<Response<rpc::Message>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.service
                .cancel_file(&r.id)
                .await
                .map_err(to_status)?
                .into(),
        ))
    }
}
