//! The coordinator's errors, and the one table that maps each to a gRPC code and an HTTP
//! status, so the gRPC face and the pfcon REST face (which will reuse this) report a
//! failure the same way.

use dispatch_proto::FieldError;

use crate::state::Refusal;

/// Everything the coordinator refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid; the error names it (`spec.image: cannot be empty`).
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// No job with this id is stored.
    #[error("job `{0}` is not known")]
    NotFound(String),
    /// No site with this id is registered.
    #[error("site `{0}` is not known")]
    UnknownSite(String),
    /// A job with this id exists with another spec: a new job needs a new id.
    #[error(
        "job `{job_id}` already exists with a different spec ({}); submit it under another id, or purge the old one first",
        differs.join(", ")
    )]
    AlreadyExists {
        /// The job's id.
        job_id: String,
        /// The spec fields that differ (names only: values may be secrets).
        differs: Vec<&'static str>,
    },
    /// The state machine refused a change.
    #[error("job `{job_id}`: {refusal}")]
    IllegalTransition {
        /// The job's id.
        job_id: String,
        /// Why.
        refusal: Refusal,
    },
    /// The request is well-formed but cannot be done in the job's present condition.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A part of the API that a later step of the coordinator brings.
    #[error("{what} {comes_with}")]
    NotYet {
        /// What was asked for.
        what: &'static str,
        /// Which step brings it, and what to do meanwhile.
        comes_with: &'static str,
    },
    /// Events asked for are no longer (or not yet) in the event log.
    #[error("{0}")]
    OutOfRange(String),
    /// No credentials, or wrong ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// Concurrent writers kept changing the job; the client may try again.
    #[error("job `{0}` kept changing under concurrent updates; try again")]
    Contended(String),
    /// The coordinator is stopping, or its database cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error("job store: {0}")]
    Store(String),
    /// A stored record cannot be read back (a bug, or a database edited by hand).
    #[error("job store: corrupt record: {0}")]
    Corrupt(String),
    /// Env values could not be sealed or opened.
    #[error("{0}")]
    Sealing(String),
    /// The configuration cannot be used.
    #[error("configuration: {0}")]
    Config(String),
    /// The server could not start or failed.
    #[error("server: {0}")]
    Server(String),
}

/// The coordinator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code and HTTP status for this error: the single mapping both faces use.
    pub fn codes(&self) -> (tonic::Code, u16) {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) => (Code::InvalidArgument, 400),
            Error::NotFound(_) | Error::UnknownSite(_) => (Code::NotFound, 404),
            Error::AlreadyExists { .. } => (Code::AlreadyExists, 409),
            Error::IllegalTransition { .. } => (Code::FailedPrecondition, 409),
            Error::FailedPrecondition(_) => (Code::FailedPrecondition, 409),
            Error::NotYet { .. } => (Code::FailedPrecondition, 501),
            Error::OutOfRange(_) => (Code::OutOfRange, 410),
            Error::Unauthenticated(_) => (Code::Unauthenticated, 401),
            Error::Contended(_) => (Code::Aborted, 409),
            Error::Unavailable(_) => (Code::Unavailable, 503),
            Error::Store(_) | Error::Corrupt(_) | Error::Sealing(_) => (Code::Internal, 500),
            Error::Config(_) | Error::Server(_) => (Code::Internal, 500),
        }
    }
}

impl From<sqlx::Error> for Error {
    /// A database that cannot be reached is UNAVAILABLE (the client may retry); anything
    /// else is an internal failure.
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::Unavailable(format!("job store unavailable: {error}"))
            }
            other => Error::Store(other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.codes().0, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::JobState;
    use tonic::Code;

    #[test]
    fn every_kind_has_one_code_pair() {
        let cases = [
            (
                Error::InvalidArgument(FieldError::new("spec.image", "cannot be empty")),
                Code::InvalidArgument,
                400,
            ),
            (Error::NotFound("j".into()), Code::NotFound, 404),
            (
                Error::AlreadyExists {
                    job_id: "j".into(),
                    differs: vec!["image"],
                },
                Code::AlreadyExists,
                409,
            ),
            (
                Error::IllegalTransition {
                    job_id: "j".into(),
                    refusal: Refusal::NotRetryable {
                        state: JobState::Running,
                    },
                },
                Code::FailedPrecondition,
                409,
            ),
            (
                Error::NotYet {
                    what: "x",
                    comes_with: "later",
                },
                Code::FailedPrecondition,
                501,
            ),
            (Error::OutOfRange("x".into()), Code::OutOfRange, 410),
            (
                Error::Unauthenticated("x".into()),
                Code::Unauthenticated,
                401,
            ),
            (Error::Unavailable("x".into()), Code::Unavailable, 503),
            (Error::Store("x".into()), Code::Internal, 500),
        ];
        for (error, code, http) in cases {
            assert_eq!(error.codes(), (code, http), "{error}");
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
        }
        let status = tonic::Status::from(Error::InvalidArgument(FieldError::new(
            "spec.image",
            "cannot be empty",
        )));
        assert_eq!(status.message(), "spec.image: cannot be empty");
    }
}
