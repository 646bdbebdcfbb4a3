//! What can go wrong on the GPU side, each variant saying what is missing or wrong.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    /// No usable CUDA driver or GPU: asking for one here is an error, never a CPU run.
    #[error("no GPU: {0}")]
    Unavailable(String),
    /// NVRTC (the run-time CUDA compiler) could not be loaded.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// A kernel source did not compile; `log` is NVRTC's.
    #[error("kernel {kernel} does not compile for {arch}: {log}")]
    Compile { kernel: &'static str, arch: String, log: String },
    /// A driver call failed.
    #[error("CUDA {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    /// Arguments a kernel cannot take (shapes, head sizes, element types).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Attention(#[from] tome_attn::AttnError),
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// A driver error as a [`GpuError::Driver`], for `map_err`.
pub(crate) fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Driver { op, msg: format!("{e:?}") }
}
