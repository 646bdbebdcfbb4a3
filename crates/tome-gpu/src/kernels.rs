//! tome's CUDA kernels: each source in `kernels/` with the entry points it defines, preceded by
//! the shared headers it uses (`convert.cuh`, the 16-bit conversions; `key_range.cuh`, the keys
//! a block of queries can see). NVRTC compiles them at run time
//! for the GPU present; tests compile every one for sm_80 and sm_90.

/// One CUDA C source file and its `extern "C"` entry points.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

/// Attention partials of a key block (f32, and bf16 inputs widened to f32).
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention.cu",
    source: concat!(include_str!("../kernels/key_range.cuh"), include_str!("../kernels/attention.cu")),
    entry_points: &["tome_attention_f32", "tome_attention_bf16"],
};

/// Attention partials on tensor cores (`mma` on bf16 or f16 operands, f32 accumulation), from
/// f32 inputs a bf16 or f16 run has rounded, or from bf16 bits.
pub const ATTENTION_MMA: KernelSource = KernelSource {
    name: "attention_mma.cu",
    source: concat!(include_str!("../kernels/convert.cuh"), include_str!("../kernels/key_range.cuh"), include_str!("../kernels/attention_mma.cu")),
    entry_points: &["tome_attention_mma_bf16", "tome_attention_mma_f16", "tome_attention_mma_bf16_bits"],
};

/// A layer's per-token pieces: embeddings, layer and RMS norms, rotary positions, SwiGLU, bf16
/// and f16 rounding, bias with activation or residual, heads split and merged, partials
/// merged, rows of heads copied.
pub const LAYERS: KernelSource = KernelSource {
    name: "layers.cu",
    source: concat!(include_str!("../kernels/convert.cuh"), include_str!("../kernels/layers.cu")),
    entry_points: &[
        "tome_embed",
        "tome_layer_norm",
        "tome_rms_norm",
        "tome_rope",
        "tome_silu_mul",
        "tome_to_bf16",
        "tome_round_bf16",
        "tome_to_f16",
        "tome_round_f16",
        "tome_bias_activation",
        "tome_bias_residual",
        "tome_split_heads",
        "tome_merge_heads",
        "tome_merge_partials",
        "tome_copy_rows",
    ],
};

/// Every kernel source.
pub const ALL: &[KernelSource] = &[ATTENTION, ATTENTION_MMA, LAYERS];

/// The architectures CI compiles every kernel for: A100 and H100 class.
pub const CI_ARCHES: &[&str] = &["sm_80", "sm_90"];
