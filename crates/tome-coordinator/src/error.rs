//! The coordinator's errors, each mapped once to the gRPC status a caller can act on.

use tome_worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The request is valid but over a configured limit or the server is busy.
    #[error("{0}")]
    Exhausted(String),
    #[error("no model named `{0}` is loaded")]
    UnknownModel(String),
    #[error("the job was cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<WorkerError> for CoordError {
    fn from(e: WorkerError) -> Self {
        if e.is_cancelled() {
            CoordError::Cancelled
        } else if e.is_input() {
            CoordError::Invalid(e.to_string())
        } else {
            CoordError::Internal(e.to_string())
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
            CoordError::UnknownModel(_) => tonic::Status::not_found(msg),
            CoordError::Cancelled => tonic::Status::cancelled(msg),
            CoordError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
