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
    #[error("this worker does not serve model `{}`", tome_server::status::echo(.0))]
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
    /// The request is sound, but this worker lacks what it needs (e.g. a GPU for NCCL).
    #[error("{0}")]
    Precondition(String),
    /// The caller does not hold the credential of the job it names.
    #[error("{0}")]
    Forbidden(String),
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

    /// Another rank of the job failed or left (the cause lies elsewhere): the rank it was.
    /// A worker's answer says so in its status (`tome_server::status::peer_failed`); an
    /// UNAVAILABLE without that mark — a worker shutting down, or one that died — is a cause.
    pub fn failed_peer(&self) -> Option<usize> {
        use tome_dist::DistError::{PeerGone, Transport};
        match self {
            WorkerError::Dist(PeerGone { peer, .. } | Transport { peer, .. })
            | WorkerError::Model(tome_model::ModelError::Dist(PeerGone { peer, .. } | Transport { peer, .. })) => Some(*peer),
            WorkerError::Remote(s) => tome_server::status::failed_peer(s),
            _ => None,
        }
    }

    /// Another rank of the job failed or left (the cause lies elsewhere).
    pub fn is_peer_failure(&self) -> bool {
        self.failed_peer().is_some()
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
            WorkerError::Precondition(_) => Code::FailedPrecondition,
            WorkerError::Forbidden(_) => Code::PermissionDenied,
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
        let code = e.code();
        if e.is_busy() {
            return tome_server::status::busy(e.to_string());
        }
        match e.failed_peer() {
            Some(peer) if code == Code::Unavailable => tome_server::status::peer_failed(e.to_string(), peer),
            _ if code == Code::Internal => tome_server::status::internal(&e.to_string()),
            _ => Status::new(code, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tome_dist::DistError;
    use tome_model::ModelError;

    use super::*;

    /// A worker's answer as the coordinator receives it.
    fn on_the_wire(e: WorkerError) -> WorkerError {
        WorkerError::Remote(Status::from(e))
    }

    #[test]
    fn a_rank_that_lost_its_peer_says_which_on_the_wire() {
        let gone = WorkerError::Model(ModelError::Dist(DistError::PeerGone { rank: 0, peer: 2, what: "receive" }));
        assert_eq!(gone.failed_peer(), Some(2));
        let remote = on_the_wire(gone);
        assert_eq!(remote.code(), Code::Unavailable);
        assert_eq!(remote.failed_peer(), Some(2), "{remote:?}");
        assert!(remote.is_peer_failure() && !remote.is_cancelled());
        let cut = on_the_wire(WorkerError::Dist(DistError::Transport { rank: 1, peer: 0, msg: "no frame within 600s".into() }));
        assert_eq!(cut.failed_peer(), Some(0));
    }

    #[test]
    fn an_unavailable_worker_is_a_cause_not_another_ranks_failure() {
        // Both are UNAVAILABLE to the caller, and neither is a consequence of a peer's failure.
        let draining = on_the_wire(WorkerError::ShuttingDown("w1".into()));
        assert_eq!(draining.code(), Code::Unavailable);
        assert!(!draining.is_peer_failure(), "{draining:?}");
        let died = WorkerError::Remote(Status::unavailable("a worker failed mid-job: connection reset"));
        assert_eq!(died.code(), Code::Unavailable);
        assert!(!died.is_peer_failure());
        assert!(!WorkerError::Dist(DistError::Plan("bad".into())).is_peer_failure());
    }

    #[test]
    fn a_cancellation_stays_a_cancellation_on_the_wire() {
        for e in [WorkerError::Cancelled, WorkerError::Model(ModelError::Cancelled), WorkerError::Dist(DistError::Cancelled)] {
            let remote = on_the_wire(e);
            assert!(remote.is_cancelled() && !remote.is_peer_failure(), "{remote:?}");
            assert_eq!(remote.code(), Code::Cancelled);
        }
    }
}
