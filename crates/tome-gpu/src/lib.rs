//! tome-gpu: the GPUs a process can use, and tome's CUDA kernels on them.
//!
//! Nothing CUDA is needed to build this crate: the driver and NVRTC are loaded at run time
//! (cudarc's dynamic loading), and the kernels are CUDA C sources in `kernels/`, compiled by
//! NVRTC to machine code (cubin) for the GPU at hand the first time a process needs them. A
//! machine without a driver, without NVRTC or without a GPU gets an error saying which, never a
//! panic and never a silent CPU run.
//!
//! - `device`: what `--device` names (`cpu`, `cuda`, `cuda:N`) and the GPUs present (name,
//!   memory, compute capability).
//! - `nvrtc`: the library's location and compilation to cubin for a named architecture.
//! - `kernels`: every kernel source, with the entry points it defines.
//! - `attention`: the attention partial (out, lse) of a key block on a GPU, the twin of
//!   `tome_attn::attention`.
//! - `layers`: a layer's per-token pieces (embeddings, layer norm, bias with activation or
//!   residual, heads split and merged, partials merged).
//! - `blas`: matrix products through cuBLAS, f32 without TF32, or from bf16 or f16 operands.
//! - `memory`: what a GPU's memory pool has handed out, now and at its peak.

pub mod attention;
pub mod blas;
pub mod device;
mod error;
pub mod kernels;
pub mod layers;
pub mod memory;
pub mod nvrtc;

pub use attention::GpuAttention;
pub use device::{gpus, present, DeviceSpec, Gpu, GpuInfo};
pub use error::{GpuError, Result};
pub use memory::PoolMeter;
