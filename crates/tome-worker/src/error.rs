//! Errors of a job run.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] tome_model::ModelError),
    #[error(transparent)]
    Dist(#[from] tome_dist::DistError),
    #[error("the job was cancelled")]
    Cancelled,
    #[error("could not start the job's compute thread: {0}")]
    Spawn(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl WorkerError {
    /// The user's input (not the server) is at fault.
    pub fn is_input(&self) -> bool {
        matches!(self, WorkerError::Model(tome_model::ModelError::Input(_)) | WorkerError::Model(tome_model::ModelError::Unsupported(_)))
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, WorkerError::Cancelled | WorkerError::Model(tome_model::ModelError::Cancelled))
    }
}
