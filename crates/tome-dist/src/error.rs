//! Errors of the rank layer: a peer that went away, a plan that cannot hold, a kernel refusal.

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank {peer} left the group before rank {rank} could {what}")]
    PeerGone { rank: usize, peer: usize, what: &'static str },
    #[error("rank {rank} could not reach rank {peer}: {msg}")]
    Transport { rank: usize, peer: usize, msg: String },
    #[error("the job was cancelled")]
    Cancelled,
    #[error("rank {rank} does not exist in a group of {size}")]
    NoSuchRank { rank: usize, size: usize },
    #[error("{0}")]
    Plan(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("a rank thread panicked: {0}")]
    RankPanicked(String),
    #[error(transparent)]
    Attn(#[from] tome_attn::AttnError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DistError>;
