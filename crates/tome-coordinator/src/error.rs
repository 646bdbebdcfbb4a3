//! The coordinator's errors, each mapped once to the gRPC status a caller can act on.

use tome_worker::WorkerError;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The request is valid but over a configured limit.
    #[error("{0}")]
    Exhausted(String),
    /// The server is busy now; the same request may succeed later (the status carries a
    /// `retry-after` header, in seconds).
    #[error("{0}")]
    Busy(String),
    #[error("no model named `{0}` is loaded")]
    UnknownModel(String),
    /// No worker can take the job now (none live, one failed mid-job, shutting down).
    #[error("{0}")]
    Unavailable(String),
    #[error("the job ran past its deadline")]
    DeadlineExceeded,
    #[error("the job was cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<WorkerError> for CoordError {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        if e.is_busy() {
            return CoordError::Busy(msg);
        }
        match e.code() {
            Code::InvalidArgument => CoordError::Invalid(msg),
            Code::Cancelled => CoordError::Cancelled,
            Code::DeadlineExceeded => CoordError::DeadlineExceeded,
            Code::ResourceExhausted => CoordError::Exhausted(msg),
            Code::Unavailable => CoordError::Unavailable(msg),
            Code::NotFound => CoordError::Unavailable(format!("a worker refused the job: {msg}")),
            _ => CoordError::Internal(msg),
        }
    }
}

impl From<tome_model::ModelError> for CoordError {
    fn from(e: tome_model::ModelError) -> Self {
        WorkerError::from(e).into()
    }
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::Invalid(_) => tonic::Status::invalid_argument(msg),
            CoordError::Exhausted(_) => tonic::Status::resource_exhausted(msg),
            CoordError::Busy(_) => {
                let mut s = tonic::Status::resource_exhausted(msg);
                s.metadata_mut().insert(tome_worker::RETRY_AFTER, tonic::metadata::MetadataValue::from_static("1"));
                s
            }
            CoordError::UnknownModel(_) => tonic::Status::not_found(msg),
            CoordError::Unavailable(_) => tonic::Status::unavailable(msg),
            CoordError::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            CoordError::Cancelled => tonic::Status::cancelled(msg),
            CoordError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
