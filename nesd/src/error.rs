//! The errors the service answers its adapters with.
//!
//! Each variant is one class of gRPC status (see the conventions at the top of
//! `messenger.proto`); the D-Bus adapter maps the same classes to D-Bus error names. The
//! message is one line meant for the user.

/// Why a service call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// Bad input: a bad username, an empty text, ... (INVALID_ARGUMENT)
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown peer or message id. (NOT_FOUND)
    #[error("{0}")]
    NotFound(String),
    /// A peer whose keys changed and are not trusted yet, or a request that does not fit
    /// the current state. (FAILED_PRECONDITION)
    #[error("{0}")]
    FailedPrecondition(String),
    /// The key server cannot be reached and nothing is cached, or the daemon is stopping.
    /// (UNAVAILABLE)
    #[error("{0}")]
    Unavailable(String),
    /// The name is already taken at the key server. (ALREADY_EXISTS)
    #[error("{0}")]
    AlreadyExists(String),
    /// A client fell too far behind the event stream. (RESOURCE_EXHAUSTED)
    #[error("{0}")]
    ResourceExhausted(String),
    /// Something broke inside the daemon (the store). (INTERNAL)
    #[error("{0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for ServiceError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::UnknownId { .. } => ServiceError::NotFound(e.to_string()),
            // Ids are random: a taken one is a fault inside the daemon, not the caller's.
            StoreError::IdTaken(_)
            | StoreError::Sled(_)
            | StoreError::Decode(_)
            | StoreError::Record(_)
            | StoreError::TooNew { .. }
            | StoreError::DamagedFormat(_) => ServiceError::Internal(e.to_string()),
        }
    }
}
