//! The transposed tile's kernels (`transposed`) on AVX2 + FMA: 8-lane [`Lanes`] on ymm registers,
//! the exp among them, and the panel schedule — 6 keys or value columns × 16 queries, twelve ymm
//! accumulators. Only called from code compiled with these features after the CPU reported them
//! (see `flash::Isa`).
//!
//! Every entry point checks its contract first (`transposed`) and returns an error when a check
//! fails, so no out-of-bounds access and no silently skipped step is possible.

use std::arch::x86_64::*;

use crate::error::Result;
use crate::simd::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO, ROUNDING_MAGIC};
use crate::transposed::{check_scores, check_softmax, check_values, scores_panel, softmax, values_panel, Lanes};

/// Eight lanes of `e^x` for `x <= 0` (the softmax's shifted scores), with the same reduction and
/// polynomial as `simd::exp`: `n = round(x log2 e)` by [`ROUNDING_MAGIC`], whose sum also holds
/// `n` as an integer in its low bits, shifted from there into the exponent of `2^n`. Lanes below
/// `EXP_LO`, `-inf` included, are zeroed; NaN stays NaN.
#[inline(always)]
unsafe fn exp8_nonpositive(x: __m256) -> __m256 {
    // SAFETY: AVX2 and FMA, as the caller guarantees.
    unsafe {
        let magic = _mm256_set1_ps(ROUNDING_MAGIC);
        let rounded = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(rounded, magic);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        // The low bits of `rounded` are n's two's complement; the bits above them shift out.
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_castps_si256(rounded), _mm256_set1_epi32(127))));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
        _mm256_andnot_ps(below, _mm256_mul_ps(y, pow2))
    }
}

// SAFETY (every method): AVX2 and FMA, as `Lanes` requires of its callers.
impl Lanes for __m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn broadcast(p: *const f32) -> Self {
        unsafe { _mm256_broadcast_ss(&*p) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp_nonpositive(x: Self) -> Self {
        unsafe { exp8_nonpositive(x) }
    }
    #[inline(always)]
    unsafe fn zero_neg_inf(x: Self) -> Self {
        unsafe { _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(f32::NEG_INFINITY)), x) }
    }
    #[inline(always)]
    unsafe fn all_eq(a: Self, b: Self) -> bool {
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, b)) == 0xff }
    }
}

/// Queries per micro-kernel of the transposed path: two ymm registers.
pub(crate) const NQ: usize = 2 * <__m256 as Lanes>::N;
/// Keys per score panel and value columns per value panel: with `NQ` lanes, twelve
/// accumulators — enough independent FMAs to cover the latency of both FMA ports — plus two
/// operand registers and a broadcast, 15 of the 16 ymm registers, so nothing spills.
const MK: usize = 6;

/// `st[j][r] = Σ_t k[j][t] · qᵀ[t][r]` for keys `0..cols` of a row-major key block (`k`: `cols ×
/// dqk`, read in place) and a packed `dqk × rows_p` Qᵀ (`rows_p` a multiple of `NQ`).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn scores_t(qt: &[f32], k: &[f32], st: &mut [f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()> {
    check_scores("avx2::scores_t", NQ, qt, k, st, cols, dqk, rows_p)?;
    let (qt, k, st) = (qt.as_ptr(), k.as_ptr(), st.as_mut_ptr());
    let mut j = 0;
    // SAFETY: the checks above bound every panel's rows.
    unsafe {
        while j + MK <= cols {
            scores_panel::<__m256, MK>(qt, k, st, j, dqk, rows_p);
            j += MK;
        }
        while j + 2 <= cols {
            scores_panel::<__m256, 2>(qt, k, st, j, dqk, rows_p);
            j += 2;
        }
        if j < cols {
            scores_panel::<__m256, 1>(qt, k, st, j, dqk, rows_p);
        }
    }
    Ok(())
}

/// `accᵀ[c][r] += Σ_j v[j][c] · pᵀ[j][r]` for keys `0..cols` of a row-major value block (`v`:
/// `cols × dv`, read in place), weights `pᵀ` (`cols × rows_p`) and a `dv × rows_p` accumulator.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn values_t(pt: &[f32], v: &[f32], acc: &mut [f32], cols: usize, dv: usize, rows_p: usize) -> Result<()> {
    check_values("avx2::values_t", NQ, pt, v, acc, cols, dv, rows_p)?;
    let (pt, v, acc) = (pt.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
    let mut c = 0;
    // SAFETY: the checks above bound every panel's columns.
    unsafe {
        while c + MK <= dv {
            values_panel::<__m256, MK>(pt, v, acc, c, cols, dv, rows_p);
            c += MK;
        }
        while c + 2 <= dv {
            values_panel::<__m256, 2>(pt, v, acc, c, cols, dv, rows_p);
            c += 2;
        }
        if c < dv {
            values_panel::<__m256, 1>(pt, v, acc, c, cols, dv, rows_p);
        }
    }
    Ok(())
}

/// The online-softmax step of a key block (`transposed::softmax`), eight queries per lane group.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
    check_softmax("avx2::softmax_t", <__m256 as Lanes>::N, st, m, l, acc, cols, rows_p, dv)?;
    // SAFETY: the checks above bound every offset.
    unsafe { softmax::<__m256>(st, cols, rows_p, m, l, acc, dv) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp8_matches_libm_on_nonpositive_inputs_and_vanishes_below_the_range() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| (x + 0.001 * i as f32).min(0.0));
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected above; `got` holds eight f32.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8_nonpositive(_mm256_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                worst = worst.max(((g - x.exp()) / x.exp()).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        let mut got = [1f32; 8];
        let low = [f32::NEG_INFINITY, -100.0, -88.0, -1e30, f32::MIN, 0.0, 0.0, -0.0];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8_nonpositive(_mm256_loadu_ps(low.as_ptr()))) };
        assert_eq!(&got[..5], &[0.0; 5]);
        assert_eq!(&got[5..], &[1.0; 3]);
        let nan = [f32::NAN; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8_nonpositive(_mm256_loadu_ps(nan.as_ptr()))) };
        assert!(got.iter().all(|g| g.is_nan()));
    }
}
