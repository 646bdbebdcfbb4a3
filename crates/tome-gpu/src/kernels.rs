//! tome's CUDA kernels: each source in `kernels/` with the entry points it defines. NVRTC
//! compiles them at run time for the GPU present; tests compile every one for sm_80 and sm_90.

/// One CUDA C source file and its `extern "C"` entry points.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

/// Attention partials of a key block (f32, and bf16 inputs widened to f32).
pub const ATTENTION: KernelSource =
    KernelSource { name: "attention.cu", source: include_str!("../kernels/attention.cu"), entry_points: &["tome_attention_f32", "tome_attention_bf16"] };

/// A layer's per-token pieces: embeddings, layer and RMS norms, rotary positions, SwiGLU, bias
/// with activation or residual, heads split and merged, partials merged.
pub const LAYERS: KernelSource = KernelSource {
    name: "layers.cu",
    source: include_str!("../kernels/layers.cu"),
    entry_points: &[
        "tome_embed",
        "tome_layer_norm",
        "tome_rms_norm",
        "tome_rope",
        "tome_silu_mul",
        "tome_to_bf16",
        "tome_round_bf16",
        "tome_bias_activation",
        "tome_bias_residual",
        "tome_split_heads",
        "tome_merge_heads",
        "tome_merge_partials",
    ],
};

/// Every kernel source.
pub const ALL: &[KernelSource] = &[ATTENTION, LAYERS];

/// The architectures CI compiles every kernel for: A100 and H100 class.
pub const CI_ARCHES: &[&str] = &["sm_80", "sm_90"];
