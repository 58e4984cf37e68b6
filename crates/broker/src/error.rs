//! The broker's errors, and the one table that maps each to a gRPC code and an HTTP status
//! so the gRPC face and any REST face report the same failure the same way.

use std::io;

use crate::path::PathError;

/// Everything the broker can refuse or fail at, one variant per case a caller acts on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as the caller named it.
        field: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A path given through the API was refused.
    #[error("{field}: `{path}` is not a valid store path: {reason}")]
    InvalidPath {
        /// The request field that carried the path.
        field: String,
        /// The path as given (lossy for non-UTF-8).
        path: String,
        /// Why it was refused.
        reason: PathError,
    },
    /// An archive entry was refused; nothing of it was written.
    #[error("archive entry `{entry}` refused: {reason}")]
    EntryRefused {
        /// The entry's name as it appears in the archive (lossy for non-UTF-8).
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// An archive went past a configured limit (archive bomb protection).
    #[error("archive refused: {0}; raise the broker's limits if this tree is genuine")]
    LimitExceeded(String),
    /// The archive bytes are not a tar stream the broker understands.
    #[error("archive is malformed at byte {offset}: {reason}")]
    MalformedArchive {
        /// Offset in the tar stream.
        offset: u64,
        /// What was wrong there.
        reason: String,
    },
    /// A chunk failed its checksum or could not be decompressed; it was not applied.
    #[error("chunk at offset {offset} refused: {reason}; resend it")]
    CorruptChunk {
        /// The chunk's offset in the tar stream.
        offset: u64,
        /// What was wrong with it.
        reason: String,
    },
    /// A chunk arrived at an offset other than the next expected one.
    #[error("chunk at offset {got} is out of order: expected offset {expected}")]
    OutOfOrder {
        /// The offset the receiver needs next.
        expected: u64,
        /// The offset that arrived.
        got: u64,
    },
    /// The whole-tree digests of sender and receiver differ.
    #[error(
        "tree digest mismatch: sender {sender}, receiver {receiver}; the transfer was discarded"
    )]
    DigestMismatch {
        /// Hex digest the sender computed.
        sender: String,
        /// Hex digest the receiver computed.
        receiver: String,
    },
    /// The source tree changed between two attempts of one transfer.
    #[error("source `{0}` changed since the transfer began; start a new transfer")]
    SourceChanged(String),
    /// Nothing at that path.
    #[error("`{0}` does not exist")]
    NotFound(String),
    /// The destination is taken and the request did not ask to replace it.
    #[error("`{0}` already exists and is not empty; delete it or ask to replace it")]
    AlreadyExists(String),
    /// A `.chrislink` in the inputs is not acceptable.
    #[error("input link `{link}` refused: {reason}")]
    InvalidLink {
        /// Store-relative path of the link file.
        link: String,
        /// Why (e.g. it points at the job's output dir or an ancestor of it).
        reason: String,
    },
    /// No credentials, or credentials that do not verify.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials that do not cover this path or operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// The two stores were asked to link but do not share a filesystem.
    #[error("stores do not share a filesystem: {0}")]
    NotShared(String),
    /// The peer broker failed or could not be reached.
    #[error("peer broker: {0}")]
    Peer(String),
    /// The peer broker refused the request; its code and message are kept as they were.
    #[error("peer broker refused: {message}")]
    Remote {
        /// The peer's gRPC code.
        code: tonic::Code,
        /// The peer's message.
        message: String,
    },
    /// The operation was cancelled (the caller went away).
    #[error("cancelled")]
    Cancelled,
    /// The broker is stopping; the transfer can be resumed against it (or another broker
    /// on the same store) once it is back.
    #[error("the broker is shutting down; resume the transfer when it is back")]
    ShuttingDown,
    /// Another connection is working on the same transfer right now.
    #[error("transfer `{0}` is in progress on another connection; retry in a moment")]
    Busy(String),
    /// The gRPC server could not start or failed.
    #[error("server: {0}")]
    Server(String),
    /// A filesystem operation failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was being done (e.g. "create file").
        op: &'static str,
        /// The path involved.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// The broker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] with the operation and path it concerned.
    pub fn io(op: &'static str, path: impl std::fmt::Display, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::EntryRefused`].
    pub fn refused(entry: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::EntryRefused {
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    /// The gRPC code and HTTP status for this error: the single mapping both faces use.
    pub fn codes(&self) -> (tonic::Code, u16) {
        use tonic::Code;
        match self {
            Error::InvalidArgument { .. }
            | Error::InvalidPath { .. }
            | Error::EntryRefused { .. }
            | Error::MalformedArchive { .. }
            | Error::InvalidLink { .. } => (Code::InvalidArgument, 400),
            Error::LimitExceeded(_) => (Code::ResourceExhausted, 413),
            Error::CorruptChunk { .. } | Error::DigestMismatch { .. } => (Code::DataLoss, 422),
            Error::OutOfOrder { .. } | Error::SourceChanged(_) | Error::NotShared(_) => {
                (Code::FailedPrecondition, 409)
            }
            Error::NotFound(_) => (Code::NotFound, 404),
            Error::AlreadyExists(_) => (Code::AlreadyExists, 409),
            Error::Unauthenticated(_) => (Code::Unauthenticated, 401),
            Error::PermissionDenied(_) => (Code::PermissionDenied, 403),
            Error::Peer(_) => (Code::Unavailable, 503),
            Error::Remote { code, .. } => (*code, 502),
            Error::Cancelled => (Code::Cancelled, 499),
            Error::ShuttingDown => (Code::Unavailable, 503),
            Error::Busy(_) => (Code::Aborted, 409),
            Error::Server(_) => (Code::Internal, 500),
            Error::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => (Code::NotFound, 404),
                io::ErrorKind::PermissionDenied => (Code::PermissionDenied, 403),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                    (Code::ResourceExhausted, 507)
                }
                _ => (Code::Internal, 500),
            },
        }
    }

    /// True when trying again (resuming) can succeed: the link or the peer failed, not the
    /// data or the request.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Peer(_) | Error::CorruptChunk { .. } | Error::ShuttingDown | Error::Busy(_)
        )
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            // Relayed as the peer said it, so the caller sees the original refusal.
            Error::Remote { code, message } => tonic::Status::new(code, message),
            error => tonic::Status::new(error.codes().0, error.to_string()),
        }
    }
}
