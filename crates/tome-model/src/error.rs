//! Errors of model loading and running; each says what to fix (the field, the tensor, the limit).

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {dir}: {msg}")]
    Directory { dir: String, msg: String },
    #[error("config.json field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("checkpoint tensor `{name}`: {msg}")]
    Weights { name: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The input cannot be processed as asked (too long, ids out of range, bad spans...).
    #[error("{0}")]
    Input(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("the job was cancelled")]
    Cancelled,
    #[error(transparent)]
    Dist(#[from] tome_dist::DistError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A GPU rank's device, driver or kernel failed.
    #[error(transparent)]
    Gpu(#[from] tome_gpu::GpuError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A checkpoint tensor as loaded, its error naming the tensor.
pub(crate) fn weights<T>(r: candle_core::Result<T>, name: impl Into<String>) -> Result<T> {
    r.map_err(|e| ModelError::Weights { name: name.into(), msg: e.to_string() })
}

impl From<tome_attn::AttnError> for ModelError {
    fn from(e: tome_attn::AttnError) -> Self {
        ModelError::Dist(e.into())
    }
}

impl tome_dist::RankError for ModelError {
    fn is_peer_gone(&self) -> bool {
        matches!(self, ModelError::Dist(d) if d.is_peer_gone())
    }
}
