//! Errors of a job run and of the worker service, each mapped to one gRPC code.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] tome_model::ModelError),
    #[error(transparent)]
    Dist(#[from] tome_dist::DistError),
    #[error("the job was cancelled")]
    Cancelled,
    #[error("the job ran past its deadline")]
    DeadlineExceeded,
    #[error("could not start the job's compute thread: {0}")]
    Spawn(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this worker does not serve model `{0}`")]
    UnknownModel(String),
    /// Full now; the same shard may fit later.
    #[error("{0}")]
    Busy(String),
    /// Larger than this worker could ever take.
    #[error("{0}")]
    TooLarge(String),
    /// A fault of the server's own (not the request's).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("worker {0} is shutting down")]
    ShuttingDown(String),
    /// A worker's answer, passed on with its code.
    #[error("{}", .0.message())]
    Remote(Status),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl WorkerError {
    /// The user's input (not the server) is at fault.
    pub fn is_input(&self) -> bool {
        matches!(self, WorkerError::Invalid(_) | WorkerError::Model(tome_model::ModelError::Input(_)) | WorkerError::Model(tome_model::ModelError::Unsupported(_)))
            || matches!(self, WorkerError::Remote(s) if s.code() == Code::InvalidArgument)
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            WorkerError::Cancelled
                | WorkerError::Model(tome_model::ModelError::Cancelled)
                | WorkerError::Dist(tome_dist::DistError::Cancelled)
                | WorkerError::Model(tome_model::ModelError::Dist(tome_dist::DistError::Cancelled))
        ) || matches!(self, WorkerError::Remote(s) if s.code() == Code::Cancelled)
    }

    /// Another rank or worker failed or left (the cause lies elsewhere).
    pub fn is_peer_failure(&self) -> bool {
        use tome_dist::DistError::{PeerGone, Transport};
        matches!(self, WorkerError::Dist(PeerGone { .. } | Transport { .. }) | WorkerError::Model(tome_model::ModelError::Dist(PeerGone { .. } | Transport { .. })))
            || matches!(self, WorkerError::Remote(s) if s.code() == Code::Unavailable)
    }

    pub fn code(&self) -> Code {
        match self {
            _ if self.is_input() => Code::InvalidArgument,
            _ if self.is_cancelled() => Code::Cancelled,
            _ if self.is_peer_failure() => Code::Unavailable,
            WorkerError::DeadlineExceeded => Code::DeadlineExceeded,
            WorkerError::UnknownModel(_) => Code::NotFound,
            WorkerError::Busy(_) | WorkerError::TooLarge(_) => Code::ResourceExhausted,
            WorkerError::ShuttingDown(_) => Code::Unavailable,
            WorkerError::Remote(s) => s.code(),
            _ => Code::Internal,
        }
    }
}

impl WorkerError {
    /// Refused for now, not for good: worth retrying later (elsewhere or on the same worker).
    pub fn is_busy(&self) -> bool {
        match self {
            WorkerError::Busy(_) => true,
            WorkerError::Remote(s) => tome_server::status::is_busy(s),
            _ => false,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        if e.is_busy() {
            return tome_server::status::busy(e.to_string());
        }
        Status::new(e.code(), e.to_string())
    }
}
