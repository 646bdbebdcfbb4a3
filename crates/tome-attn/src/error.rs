//! Errors of the attention kernels: each names the operation and the offending shapes.

/// What can go wrong when calling a kernel: always a caller mistake, never a numeric failure.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: key positions must be sorted ascending (position {at} is {got}, after {prev})")]
    UnsortedKeys { op: &'static str, at: usize, got: i64, prev: i64 },
    /// A vector kernel was called outside its contract (slice lengths, lane multiples): a bug in
    /// the caller's packing, reported instead of computing from stale scratch.
    #[error("{kernel}: broken precondition: {msg}")]
    Precondition { kernel: &'static str, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AttnError>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> AttnError {
    AttnError::Shape { op, msg: msg.into() }
}
