//! tome-attn: the attention math, on candle tensors.
//!
//! Every kernel here returns a mergeable [`Partial`] — the attention output together with the
//! log-sum-exp of each query's scores — so that attention over a set of keys can be computed in
//! pieces (blocks, ranks, global and local key sets) and combined exactly afterwards
//! (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao et al. 2022,
//! "FlashAttention"; Liu et al. 2023, "Ring Attention").
//!
//! This crate knows nothing of ranks, networks, async or files: it is pure math over slices and
//! tensors. `reference` holds the naive O(n²) versions the kernels are tested against.

mod aligned;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod bf16;
pub mod blocksparse;
mod error;
pub mod favor;
mod flash;
pub mod lsh;
mod mask;
pub mod moe;
mod partial;
mod precision;
pub mod projection;
pub mod reference;
pub mod relative;
pub mod relative_bias;
mod rng;
mod simd;
mod tensor;
#[cfg(target_arch = "x86_64")]
mod transposed;

pub use error::{AttnError, Result};
pub use flash::{attention, attention_in};
pub use mask::Mask;
pub use partial::Partial;
pub use precision::Precision;
