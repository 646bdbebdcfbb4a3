//! The transposed tile's kernels (`transposed`) on AVX-512F: 16-lane [`Lanes`] on zmm registers,
//! the exp among them, and the panel schedule — 12 keys or value columns × 32 queries, 24
//! accumulators of the 32 registers. On cores with full-width 512-bit FMA units this doubles the
//! arithmetic per instruction of `avx2`. Only called from code compiled with AVX-512F after the
//! CPU reported it (see `flash::Isa`).
//!
//! Every entry point checks its contract first (`transposed`) and returns an error when a check
//! fails, so no out-of-bounds access and no silently skipped step is possible.

use std::arch::x86_64::*;

use crate::error::Result;
use crate::simd::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO, ROUNDING_MAGIC};
use crate::transposed::{check_scores, check_softmax, check_values, scores_panel, softmax, values_panel, Lanes};

/// Sixteen lanes of `e^x` for `x <= 0` (the softmax's shifted scores), with the same reduction
/// and polynomial as `simd::exp`: `n = round(x log2 e)` by [`ROUNDING_MAGIC`] (no clamp is needed
/// from above), the power of two applied by one `vscalefps`. Lanes below `EXP_LO`, `-inf`
/// included, whose reduction gives NaN, are zeroed by the mask; NaN stays NaN. Eleven vector
/// instructions of one µop each.
#[inline(always)]
unsafe fn exp16_nonpositive(x: __m512) -> __m512 {
    // SAFETY: AVX-512F, as the caller guarantees.
    unsafe {
        let magic = _mm512_set1_ps(ROUNDING_MAGIC);
        let n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic), magic);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
        }
        let in_range = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_LO));
        _mm512_maskz_scalef_ps(in_range, y, n)
    }
}

// SAFETY (every method): AVX-512F, as `Lanes` requires of its callers.
impl Lanes for __m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn broadcast(p: *const f32) -> Self {
        unsafe { _mm512_set1_ps(*p) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp_nonpositive(x: Self) -> Self {
        unsafe { exp16_nonpositive(x) }
    }
    #[inline(always)]
    unsafe fn zero_neg_inf(x: Self) -> Self {
        unsafe { _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(x, _mm512_set1_ps(f32::NEG_INFINITY)), x) }
    }
    #[inline(always)]
    unsafe fn all_eq(a: Self, b: Self) -> bool {
        unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b) == 0xffff }
    }
}

/// Queries per micro-kernel: two zmm registers.
pub(crate) const NQ: usize = 2 * <__m512 as Lanes>::N;
/// Keys per score panel and value columns per value panel: 24 accumulators, two operand
/// registers and a broadcast, 27 of the 32 zmm registers, so nothing spills.
const MK: usize = 12;

/// `st[j][r] = Σ_t k[j][t] · qᵀ[t][r]` for keys `0..cols` of a row-major key block (`k`: `cols ×
/// dqk`, read in place) and a packed `dqk × rows_p` Qᵀ (`rows_p` a multiple of `NQ`).
#[target_feature(enable = "avx512f")]
pub(crate) fn scores_t(qt: &[f32], k: &[f32], st: &mut [f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()> {
    check_scores("avx512::scores_t", NQ, qt, k, st, cols, dqk, rows_p)?;
    let (qt, k, st) = (qt.as_ptr(), k.as_ptr(), st.as_mut_ptr());
    let mut j = 0;
    // SAFETY: the checks above bound every panel's rows.
    unsafe {
        while j + MK <= cols {
            scores_panel::<__m512, MK>(qt, k, st, j, dqk, rows_p);
            j += MK;
        }
        while j + 4 <= cols {
            scores_panel::<__m512, 4>(qt, k, st, j, dqk, rows_p);
            j += 4;
        }
        while j < cols {
            scores_panel::<__m512, 1>(qt, k, st, j, dqk, rows_p);
            j += 1;
        }
    }
    Ok(())
}

/// `accᵀ[c][r] += Σ_j v[j][c] · pᵀ[j][r]` for keys `0..cols` of a row-major value block (`v`:
/// `cols × dv`, read in place), weights `pᵀ` (`cols × rows_p`) and a `dv × rows_p` accumulator.
#[target_feature(enable = "avx512f")]
pub(crate) fn values_t(pt: &[f32], v: &[f32], acc: &mut [f32], cols: usize, dv: usize, rows_p: usize) -> Result<()> {
    check_values("avx512::values_t", NQ, pt, v, acc, cols, dv, rows_p)?;
    let (pt, v, acc) = (pt.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
    let mut c = 0;
    // SAFETY: the checks above bound every panel's columns.
    unsafe {
        // Full panels while what is left is not 13..=19 columns wide, which two 8-column panels
        // cover better than a full one and a narrow, load-bound one (dv = 64: 4 × 12 + 2 × 8).
        while c + MK == dv || c + MK + 8 <= dv {
            values_panel::<__m512, MK>(pt, v, acc, c, cols, dv, rows_p);
            c += MK;
        }
        while c + 8 <= dv {
            values_panel::<__m512, 8>(pt, v, acc, c, cols, dv, rows_p);
            c += 8;
        }
        while c + 4 <= dv {
            values_panel::<__m512, 4>(pt, v, acc, c, cols, dv, rows_p);
            c += 4;
        }
        while c < dv {
            values_panel::<__m512, 1>(pt, v, acc, c, cols, dv, rows_p);
            c += 1;
        }
    }
    Ok(())
}

/// The online-softmax step of a key block (`transposed::softmax`), sixteen queries per lane group.
#[target_feature(enable = "avx512f")]
pub(crate) fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
    check_softmax("avx512::softmax_t", <__m512 as Lanes>::N, st, m, l, acc, cols, rows_p, dv)?;
    // SAFETY: the checks above bound every offset.
    unsafe { softmax::<__m512>(st, cols, rows_p, m, l, acc, dv) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp16_matches_libm_on_nonpositive_inputs_and_vanishes_below_the_range() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| (x + 0.001 * i as f32).min(0.0));
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F was detected above; `got` holds sixteen f32.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16_nonpositive(_mm512_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                worst = worst.max(((g - x.exp()) / x.exp()).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        let mut got = [1f32; 16];
        let mut low = [0f32; 16];
        low[..5].copy_from_slice(&[f32::NEG_INFINITY, -100.0, -88.0, -1e30, f32::MIN]);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16_nonpositive(_mm512_loadu_ps(low.as_ptr()))) };
        assert_eq!(&got[..5], &[0.0; 5]);
        assert_eq!(&got[5..], &[1.0; 11]);
        let nan = [f32::NAN; 16];
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16_nonpositive(_mm512_loadu_ps(nan.as_ptr()))) };
        assert!(got.iter().all(|g| g.is_nan()));
    }
}
