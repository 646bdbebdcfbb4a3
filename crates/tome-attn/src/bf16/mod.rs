//! bfloat16 matrix products with f32 accumulation, for [`Precision::Bf16`](crate::Precision)
//! runs: weights packed once into bf16 panels, activations rounded to bf16 (nearest even) as
//! they are packed, products accumulated in f32 in one fixed order per output element, so a row's
//! result does not depend on which rows share its product (P ranks give one rank's bits).
//!
//! The kernel is chosen at run time: AVX512-BF16 dot products (`vdpbf16ps`) where the CPU has
//! them, else a portable loop that accumulates in the same order (clearly slower, same results
//! up to the instruction's flushing of subnormals).

/// The bf16 product kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// Scalar f32 arithmetic on bf16 values: correct, several times slower.
    Portable,
}

impl Bf16Kernel {
    /// The kernel of this CPU, detected once.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
                return Bf16Kernel::Avx512Bf16;
            }
        }
        Bf16Kernel::Portable
    }

    /// Its name in `Info` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Avx512Bf16 => "avx512_bf16",
            Bf16Kernel::Portable => "portable",
        }
    }
}
