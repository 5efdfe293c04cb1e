//! What a file message carries.

use super::FileState;

/// A file message's file, with its transfer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The file id: the message's id.
    pub id: String,
    /// Its name as the sender gave it (no directories).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, lower-case hex (what the sender signed).
    pub sha256: String,
    /// Its media type (`application/octet-stream` when not known).
    pub media_type: String,
    /// Where the transfer is.
    pub state: FileState,
    /// Where nesd keeps it, once complete; empty before.
    pub path: String,
    /// Bytes the receiver has (incoming: stored; outgoing: reported by the recipient).
    pub transferred: u64,
    /// Why it was cancelled or failed.
    pub error: String,
}
