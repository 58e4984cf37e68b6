//! The manager's errors, and the one table that maps each to a gRPC code and an HTTP
//! status, so the gRPC face and the pfcon face report a failure the same way.

use dispatch_proto::FieldError;

use crate::backend::BackendError;

/// Everything the manager refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job spec is invalid; the error names the field.
    #[error(transparent)]
    InvalidSpec(#[from] FieldError),
    /// The manager has no such job.
    #[error("job `{0}` is not known to this manager")]
    NotFound(String),
    /// The backend cannot run the job as written (pfcon answers these with 400).
    #[error("{field}: {reason}")]
    Unsupported {
        /// The spec field at fault.
        field: String,
        /// Why, and what would work.
        reason: String,
    },
    /// The image is missing and cannot be pulled.
    #[error("image `{image}` is not available: {reason}")]
    ImageNotFound {
        /// The image.
        image: String,
        /// What the engine said.
        reason: String,
    },
    /// The job's directories could not be prepared.
    #[error("job area `{path}`: {reason}")]
    Storage {
        /// The directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The engine failed or cannot be reached.
    #[error("backend: {0}")]
    Backend(String),
    /// No credentials, or wrong ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// The server could not start or failed.
    #[error("server: {0}")]
    Server(String),
}

/// The manager's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code and HTTP status for this error: the single mapping both faces use.
    pub fn codes(&self) -> (tonic::Code, u16) {
        use tonic::Code;
        match self {
            Error::InvalidSpec(_) => (Code::InvalidArgument, 400),
            Error::NotFound(_) => (Code::NotFound, 404),
            Error::Unsupported { .. } => (Code::FailedPrecondition, 400),
            Error::ImageNotFound { .. } => (Code::FailedPrecondition, 500),
            Error::Storage { .. } => (Code::Internal, 500),
            Error::Backend(_) => (Code::Unavailable, 503),
            Error::Unauthenticated(_) => (Code::Unauthenticated, 401),
            Error::Server(_) => (Code::Internal, 500),
        }
    }
}

impl From<BackendError> for Error {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::ImageNotFound { image, reason } => Error::ImageNotFound { image, reason },
            BackendError::NotFound(id) => Error::NotFound(id),
            BackendError::Unsupported { field, reason } => Error::Unsupported {
                field: field.into(),
                reason,
            },
            other => Error::Backend(other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.codes().0, error.to_string())
    }
}
