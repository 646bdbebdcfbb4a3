//! GELU with the exact error function (Hendrycks & Gimpel 2016; transformers' `"gelu"`,
//! `x · Φ(x) = x/2 · (1 + erf(x/√2))`), over a whole tensor at once.
//!
//! The feed-forward block's intermediate activation is four times the model width, so a libm
//! `erf` per element costs more than a tenth of an encoder's time. Here erf is a rational
//! minimax approximation on `[-4, 4]` (odd numerator of degree 13 over an even denominator of
//! degree 8; beyond ±4 erf is 1 to within f32 rounding, and the input is clamped there), within 5e-7 of the exact function: straight-line
//! code that compiles to AVX2 + FMA where the CPU has it, split over the thread pool.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use crate::config::Activation;

impl Activation {
    /// Its name in transformers' configs.
    pub fn name(self) -> &'static str {
        match self {
            Activation::GeluErf => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluErf => gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

const NUM: [f32; 7] = [-1.609_603_3e-2, -2.954_6e-3, -7.349_906_3e-4, -5.692_506_4e-5, -2.101_024e-6, 2.770_681_4e-8, -2.726_142_3e-10];
const DEN: [f32; 5] = [-1.426_473_9e-2, -7.373_329e-3, -1.682_827e-3, -2.133_740_6e-4, -1.456_607_2e-5];

#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = NUM[6];
    for c in NUM[..6].iter().rev() {
        p = p.mul_add(x2, *c);
    }
    let mut q = DEN[4];
    for c in DEN[..4].iter().rev() {
        q = q.mul_add(x2, *c);
    }
    x * p / q
}

#[inline(always)]
fn gelu_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_slice_avx2(xs: &mut [f32]) {
    gelu_slice(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_slice_avx512(xs: &mut [f32]) {
    gelu_slice(xs)
}

/// Exact-erf GELU in place, on the widest vectors the CPU has.
fn gelu_chunk(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reported AVX-512F.
            unsafe { gelu_slice_avx512(xs) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU reported AVX2 and FMA.
            unsafe { gelu_slice_avx2(xs) };
            return;
        }
    }
    gelu_slice(xs)
}

impl Activation {
    /// The activation over a slice, in place, element by element: the epilogue of the
    /// feed-forward GEMM (`tome_attn::projection::linear`). The same functions as [`Activation::apply`].
    pub(crate) fn apply_in_place(self, xs: &mut [f32]) {
        match self {
            Activation::GeluErf => gelu_chunk(xs),
            Activation::GeluTanh => {
                // candle's `gelu`: the tanh approximation.
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                for x in xs.iter_mut() {
                    *x = 0.5 * *x * (1.0 + (SQRT_TWO_OVER_PI * *x * (1.0 + 0.044_715 * *x * *x)).tanh());
                }
            }
            Activation::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            // candle's `silu`.
            Activation::Silu => xs.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
        }
    }
}

/// `gelu(x)` elementwise for an f32 tensor on the CPU.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("gelu runs on CPU tensors");
    };
    let n = layout.shape().elem_count();
    let data = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n];
    let mut out = data.to_vec();
    out.par_chunks_mut(CHUNK).for_each(gelu_chunk);
    Tensor::from_vec(out, layout.shape().clone(), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e7_of_the_exact_function() {
        // Abramowitz & Stegun 7.1.26 is too coarse to check against; use the series and the
        // continued fraction in f64 instead.
        fn exact(x: f64) -> f64 {
            if x.abs() < 2.5 {
                let (mut term, mut sum, mut k) = (x, x, 0.0);
                while term.abs() > 1e-17 {
                    k += 1.0;
                    term *= -x * x / k;
                    sum += term / (2.0 * k + 1.0);
                }
                2.0 / std::f64::consts::PI.sqrt() * sum
            } else {
                let (z, mut f) = (x.abs(), 0.0);
                for k in (1..60).rev() {
                    f = (k as f64 / 2.0) / (z + f);
                }
                x.signum() * (1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f))
            }
        }
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf(x) as f64 - exact(x as f64)).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert!((erf(9.0) - 1.0).abs() < 5e-7 && (erf(-9.0) + 1.0).abs() < 5e-7);
    }

    #[test]
    fn gelu_of_a_strided_tensor() {
        let x = Tensor::arange(-40f32, 40.0, &Device::Cpu).unwrap().affine(0.25, 0.0).unwrap().reshape((8, 10)).unwrap().t().unwrap();
        let got: Vec<f32> = gelu_erf(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = x.gelu_erf().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let d = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 5e-6, "{d}");
    }

    /// The feed-forward GEMM's epilogue computes what the tensor path computes, for every activation.
    #[test]
    fn in_place_activations_match_the_tensor_ones() {
        let x = Tensor::arange(-300f32, 300.0, &Device::Cpu).unwrap().affine(0.02, 0.0).unwrap();
        for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            let want: Vec<f32> = act.apply(&x).unwrap().to_vec1().unwrap();
            let mut got: Vec<f32> = x.to_vec1().unwrap();
            act.apply_in_place(&mut got);
            let d = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d < 1e-6, "{act:?}: {d}");
        }
    }
}
