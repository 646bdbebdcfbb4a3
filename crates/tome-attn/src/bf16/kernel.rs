//! Which bf16 product kernel runs: the CPU's kernels, the fastest of them chosen once, and one
//! tile dispatched to it. Every kernel gives the same bits up to subnormal values (`vdpbf16ps`
//! and the portable loop flush subnormal sums to zero, FMAs keep them), so the choice is one of
//! speed alone.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::packed::PANEL;
use super::portable;
#[cfg(target_arch = "x86_64")]
use super::{dpbf16, fma};
use super::{MR, NR};

/// The bf16 product kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// f32 FMAs on 512-bit registers, on the bf16 values widened.
    Avx512Fma,
    /// Scalar f32 arithmetic on bf16 values: correct, several times slower.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel of this CPU, chosen once.
    pub fn detect() -> Self {
        static CHOSEN: OnceLock<Bf16Kernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Self::available();
            match available.as_slice() {
                [only] => *only,
                kernels => *kernels.iter().min_by_key(|&&k| k.time_a_product()).unwrap_or(&Bf16Kernel::Portable),
            }
        })
    }

    /// The kernels this CPU can run, the vector ones first.
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                if std::arch::is_x86_feature_detected!("avx512bf16") {
                    kernels.push(Bf16Kernel::Avx512Bf16);
                }
                kernels.push(Bf16Kernel::Avx512Fma);
            }
        }
        if kernels.is_empty() {
            kernels.push(Bf16Kernel::Portable);
        }
        kernels
    }

    /// Its name in `Info` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Avx512Bf16 => "avx512_bf16",
            Bf16Kernel::Avx512Fma => "avx512_fma",
            Bf16Kernel::Portable => "portable",
        }
    }

    /// 32-bit lanes of packed activations per input pair: a bf16 pair in one lane, or two f32.
    pub(super) fn lanes_per_pair(self) -> usize {
        match self {
            Bf16Kernel::Avx512Fma => 2,
            Bf16Kernel::Avx512Bf16 | Bf16Kernel::Portable => 1,
        }
    }

    /// The best of a few runs of one tile over 256 inputs, on this thread. `self` is one of
    /// [`Bf16Kernel::available`].
    fn time_a_product(self) -> Duration {
        let pairs = 128;
        let x = vec![0x3f80_3f80u32; MR * pairs * self.lanes_per_pair()];
        let w = vec![0x3f80_3f80u32; NR * pairs * PANEL];
        let mut tile = [0f32; MR * NR * PANEL];
        (0..5)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..50 {
                    // SAFETY: `self` is one of `available` (`detect` times no other), on a whole
                    // tile of `NR` panels.
                    unsafe { run_tile(self, NR, &x, &w, pairs, &mut tile) };
                }
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
    }
}

/// One tile of `np` panels on `kernel`.
///
/// # Safety
/// `kernel` is [`Bf16Kernel::Portable`] or one of [`Bf16Kernel::available`]; `x` holds `MR`
/// rows of `pairs · kernel.lanes_per_pair()` lanes, `w` `np` panels of `pairs · 16` lanes.
pub(super) unsafe fn run_tile(kernel: Bf16Kernel, np: usize, x: &[u32], w: &[u32], pairs: usize, tile: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's kernel is available, so the CPU has AVX512F and AVX512-BF16; the
        // caller hands whole tiles of rows and `np` whole panels.
        Bf16Kernel::Avx512Bf16 => unsafe {
            match np {
                1 => dpbf16::tile::<1>(x, w, pairs, tile),
                2 => dpbf16::tile::<2>(x, w, pairs, tile),
                _ => dpbf16::tile::<NR>(x, w, pairs, tile),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX512F; the lanes are f32 bits (two per pair), and `u32` and
        // `f32` share size and alignment.
        Bf16Kernel::Avx512Fma => unsafe {
            let x: &[f32] = std::slice::from_raw_parts(x.as_ptr().cast(), x.len());
            match np {
                1 => fma::tile::<1>(x, w, pairs, tile),
                2 => fma::tile::<2>(x, w, pairs, tile),
                _ => fma::tile::<NR>(x, w, pairs, tile),
            }
        },
        _ => match np {
            1 => portable::tile::<1>(x, w, pairs, tile),
            2 => portable::tile::<2>(x, w, pairs, tile),
            _ => portable::tile::<NR>(x, w, pairs, tile),
        },
    }
}
