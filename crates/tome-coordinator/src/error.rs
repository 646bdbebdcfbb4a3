//! The coordinator's errors, each mapped once to the gRPC status a caller can act on.

use tome_dist::DistError;
use tome_model::ModelError;
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
    #[error("no model named `{}` is loaded", tome_server::status::echo(.0))]
    UnknownModel(String),
    /// No worker can take the job now (none live, one failed mid-job, shutting down).
    #[error("{0}")]
    Unavailable(String),
    #[error("the job ran past its deadline")]
    DeadlineExceeded,
    /// The caller went away.
    #[error("the job was cancelled")]
    Cancelled,
    /// A worker stopped a rank of the job (an operator's cancel, or a failure it saw first); the
    /// message says which rank, where, and why.
    #[error("{0}")]
    CancelledOnWorker(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A job's failure, as the job runner (embedded ranks or workers) reports it.
impl From<WorkerError> for CoordError {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        if e.is_busy() {
            return CoordError::Busy(msg);
        }
        match e.code() {
            Code::InvalidArgument => CoordError::Invalid(msg),
            Code::Cancelled if matches!(e, WorkerError::Remote(_)) => CoordError::CancelledOnWorker(msg),
            Code::Cancelled => CoordError::Cancelled,
            Code::DeadlineExceeded => CoordError::DeadlineExceeded,
            Code::ResourceExhausted => CoordError::Exhausted(msg),
            Code::Unavailable => CoordError::Unavailable(msg),
            Code::NotFound => CoordError::Unavailable(format!("a worker refused the job: {msg}")),
            _ => CoordError::Internal(msg),
        }
    }
}

/// A model's refusal while a request is admitted (tokenizing, preparing, planning).
impl From<ModelError> for CoordError {
    fn from(e: ModelError) -> Self {
        let msg = e.to_string();
        match e {
            ModelError::Input(_) | ModelError::Unsupported(_) => CoordError::Invalid(msg),
            ModelError::Cancelled | ModelError::Dist(DistError::Cancelled) => CoordError::Cancelled,
            ModelError::Dist(DistError::PeerGone { .. } | DistError::Transport { .. }) => CoordError::Unavailable(msg),
            _ => CoordError::Internal(msg),
        }
    }
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::Invalid(_) => tonic::Status::invalid_argument(msg),
            CoordError::Exhausted(_) => tonic::Status::resource_exhausted(msg),
            CoordError::Busy(_) => tome_server::status::busy(msg),
            CoordError::UnknownModel(_) => tonic::Status::not_found(msg),
            CoordError::Unavailable(_) => tonic::Status::unavailable(msg),
            CoordError::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            CoordError::Cancelled | CoordError::CancelledOnWorker(_) => tonic::Status::cancelled(msg),
            CoordError::Internal(_) => tome_server::status::internal(&msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancellation_from_a_worker_keeps_its_rank_and_reason() {
        let remote = WorkerError::Remote(tonic::Status::cancelled("rank 2 on worker 10.0.0.7:7001: the job was cancelled"));
        let status = tonic::Status::from(CoordError::from(remote));
        assert_eq!(status.code(), Code::Cancelled);
        assert!(status.message().contains("rank 2 on worker 10.0.0.7:7001"), "{}", status.message());
        let local = tonic::Status::from(CoordError::from(WorkerError::Cancelled));
        assert_eq!((local.code(), local.message()), (Code::Cancelled, "the job was cancelled"));
    }
}
