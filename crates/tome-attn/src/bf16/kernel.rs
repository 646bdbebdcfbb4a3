//! Which bf16 product kernel runs: the CPU's kernels, the fastest of them chosen once, and one
//! tile dispatched to it. AMX tiles, where the process may use them, are chosen outright. The
//! vector kernels and the portable loop give the same bits up to subnormal values (`vdpbf16ps`
//! and the portable loop flush subnormal sums to zero, FMAs keep them), so the choice among
//! them is one of speed alone; AMX sums each 16 pairs' even and odd products apart, so its
//! bits are its own (within f32 rounding of the others').

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::packed::PANEL;
use super::portable;
#[cfg(target_arch = "x86_64")]
use super::{amx, dpbf16, fma};
use super::{MR, NR};

/// The bf16 product kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles: `tdpbf16ps` on 32 rows × 32 columns a tile.
    Amx,
    /// The AMX tile loop on a scalar model of the tile instructions: the tests' stand-in for AMX
    /// on CPUs without it.
    #[cfg(any(test, feature = "tile-model"))]
    AmxModel,
    /// `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// f32 FMAs on 512-bit registers, on the bf16 values widened.
    Avx512Fma,
    /// Scalar f32 arithmetic on bf16 values: correct, several times slower.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel of this CPU, chosen once: AMX where the process may use it (several
    /// times the vector kernels' rate on any CPU that has it), else the faster vector kernel as
    /// timed here.
    pub fn detect() -> Self {
        // A `tile-model` build (tests only) runs every bf16 product on the model of AMX.
        #[cfg(all(feature = "tile-model", target_arch = "x86_64"))]
        return Bf16Kernel::AmxModel;
        #[cfg(not(all(feature = "tile-model", target_arch = "x86_64")))]
        Self::fastest()
    }

    #[cfg_attr(feature = "tile-model", allow(dead_code))]
    fn fastest() -> Self {
        static CHOSEN: OnceLock<Bf16Kernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Self::available();
            match available.as_slice() {
                [Bf16Kernel::Amx, ..] => Bf16Kernel::Amx,
                [only] => *only,
                kernels => *kernels.iter().min_by_key(|&&k| k.time_a_product()).unwrap_or(&Bf16Kernel::Portable),
            }
        })
    }

    /// The kernels this CPU can run: AMX first, then the vector ones.
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if amx::usable() {
                kernels.push(Bf16Kernel::Amx);
            }
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
            Bf16Kernel::Amx => "amx_bf16",
            #[cfg(any(test, feature = "tile-model"))]
            Bf16Kernel::AmxModel => "amx_model",
            Bf16Kernel::Avx512Bf16 => "avx512_bf16",
            Bf16Kernel::Avx512Fma => "avx512_fma",
            Bf16Kernel::Portable => "portable",
        }
    }

    /// 32-bit lanes of packed activations per input pair: a bf16 pair in one lane, or two f32.
    pub(super) fn lanes_per_pair(self) -> usize {
        match self {
            Bf16Kernel::Avx512Fma => 2,
            _ => 1,
        }
    }

    /// Rows and panels of one tile.
    pub(super) fn tile_shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Amx => (amx::ROWS, amx::PANELS),
            #[cfg(all(any(test, feature = "tile-model"), target_arch = "x86_64"))]
            Bf16Kernel::AmxModel => (amx::ROWS, amx::PANELS),
            _ => (MR, NR),
        }
    }

    /// Whether its sums are the vector kernels' (per pair, the odd product then the even one).
    pub fn sums_pair_by_pair(self) -> bool {
        match self {
            Bf16Kernel::Amx => false,
            #[cfg(any(test, feature = "tile-model"))]
            Bf16Kernel::AmxModel => false,
            _ => true,
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
                    // SAFETY: `self` is one of `available` other than AMX (`detect` times no
                    // other), on a whole tile of `NR` panels.
                    unsafe { run_tile(self, NR, &x, &w, pairs, pairs, &mut tile) };
                }
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
    }
}

/// One tile of `np` panels on `kernel`, `pairs` input pairs deep, into `tile` (the kernel's
/// [`tile_shape`](Bf16Kernel::tile_shape) rows of `np · 16`, overwritten).
///
/// # Safety
/// `kernel` is [`Bf16Kernel::Portable`] or one of [`Bf16Kernel::available`], AMX with an
/// [`amx::Session`] live on this thread; `stride` ≥ `pairs` (a multiple of 16 for AMX); `x`
/// holds the tile's rows of `stride · kernel.lanes_per_pair()` lanes, `w` `np` panels of
/// `stride · 16` lanes; `np` is at most the tile's panels.
pub(super) unsafe fn run_tile(kernel: Bf16Kernel, np: usize, x: &[u32], w: &[u32], pairs: usize, stride: usize, tile: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's session configured this thread's tiles; the lanes past `pairs`
        // are zero in both operands (the packing's), so whole steps of 16 give the product.
        Bf16Kernel::Amx => unsafe {
            match np {
                1 => amx::tile::<_, 1>(&mut amx::Amx, x, w, stride, tile),
                _ => amx::tile::<_, 2>(&mut amx::Amx, x, w, stride, tile),
            }
        },
        #[cfg(all(any(test, feature = "tile-model"), target_arch = "x86_64"))]
        // SAFETY: the model needs no configuration; the lengths as above.
        Bf16Kernel::AmxModel => unsafe {
            let mut model = amx::model::Model::new();
            match np {
                1 => amx::tile::<_, 1>(&mut model, x, w, stride, tile),
                _ => amx::tile::<_, 2>(&mut model, x, w, stride, tile),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's kernel is available, so the CPU has AVX512F and AVX512-BF16; the
        // caller hands whole tiles of rows and `np` whole panels.
        Bf16Kernel::Avx512Bf16 => unsafe {
            match np {
                1 => dpbf16::tile::<1>(x, w, pairs, stride, tile),
                2 => dpbf16::tile::<2>(x, w, pairs, stride, tile),
                _ => dpbf16::tile::<NR>(x, w, pairs, stride, tile),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX512F; the lanes are f32 bits (two per pair), and `u32` and
        // `f32` share size and alignment.
        Bf16Kernel::Avx512Fma => unsafe {
            let x: &[f32] = std::slice::from_raw_parts(x.as_ptr().cast(), x.len());
            match np {
                1 => fma::tile::<1>(x, w, pairs, stride, tile),
                2 => fma::tile::<2>(x, w, pairs, stride, tile),
                _ => fma::tile::<NR>(x, w, pairs, stride, tile),
            }
        },
        _ => match np {
            1 => portable::tile::<1>(x, w, pairs, stride, tile),
            2 => portable::tile::<2>(x, w, pairs, stride, tile),
            _ => portable::tile::<NR>(x, w, pairs, stride, tile),
        },
    }
}
