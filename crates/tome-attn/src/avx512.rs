//! The hot loops of `avx2` at twice the width, in AVX-512F intrinsics: the same transposed
//! layout (`Sᵀ`: keys × queries) and the same three steps — score panels, value panels, the
//! online softmax down the columns — with 32 queries per micro-kernel (two zmm registers) and 12
//! keys or value columns, 24 accumulators of the 32 registers. On cores with full-width 512-bit
//! FMA units this doubles the arithmetic per instruction. Only called from code compiled with
//! AVX-512F after the CPU reported it (see `flash::Isa`).
//!
//! Shapes are guaranteed by the packing in `flash`: every length is checked on entry, and the
//! functions return an error when a check fails (`transposed`), so no out-of-bounds access and no
//! silently skipped step is possible.

use std::arch::x86_64::*;

use crate::error::Result;
use crate::simd::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO, ROUNDING_MAGIC};
use crate::transposed::{check_scores, check_softmax, check_values};

/// Sixteen lanes of `e^x` for `x <= 0` (the softmax's shifted scores), with the same reduction
/// and polynomial as `simd::exp`: `n = round(x log2 e)` by [`ROUNDING_MAGIC`] (no clamp is needed
/// from above), the power of two applied by one `vscalefps`. Lanes below `EXP_LO`, `-inf`
/// included, whose reduction gives NaN, are zeroed by the mask; NaN stays NaN. Eleven vector
/// instructions of one µop each.
#[target_feature(enable = "avx512f")]
fn exp16_nonpositive(x: __m512) -> __m512 {
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

/// Queries per micro-kernel: two zmm registers.
pub(crate) const NQ: usize = 32;
/// Keys per score panel and value columns per value panel: 24 accumulators, two operand
/// registers and a broadcast, 27 of the 32 zmm registers, so nothing spills.
const MK: usize = 12;

/// `MK`-row panel of `st[j][r] = Σ_t k[j][t] · qᵀ[t][r]`, keys `j0..j0 + M`.
///
/// # Safety
/// AVX-512F present; `k` holds rows `j0..j0 + M` of `dqk`, `qt` `dqk × rows_p`, `st` rows
/// `j0..j0 + M` of `rows_p`; `rows_p` a multiple of `NQ`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_panel<const M: usize>(qt: *const f32, k: *const f32, st: *mut f32, j0: usize, dqk: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        let kp = k.add(j0 * dqk);
        for r0 in (0..rows_p).step_by(NQ) {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for t in 0..dqk {
                let q = qt.add(t * rows_p + r0);
                let (q0, q1) = (_mm512_loadu_ps(q), _mm512_loadu_ps(q.add(16)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*kp.add(i * dqk + t));
                    a[0] = _mm512_fmadd_ps(b, q0, a[0]);
                    a[1] = _mm512_fmadd_ps(b, q1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let out = st.add((j0 + i) * rows_p + r0);
                _mm512_storeu_ps(out, a[0]);
                _mm512_storeu_ps(out.add(16), a[1]);
            }
        }
    }
}

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
            scores_panel::<MK>(qt, k, st, j, dqk, rows_p);
            j += MK;
        }
        while j + 4 <= cols {
            scores_panel::<4>(qt, k, st, j, dqk, rows_p);
            j += 4;
        }
        while j < cols {
            scores_panel::<1>(qt, k, st, j, dqk, rows_p);
            j += 1;
        }
    }
    Ok(())
}

/// `M`-column panel of `accᵀ[c][r] += Σ_j v[j][c] · pᵀ[j][r]`, columns `c0..c0 + M`.
///
/// # Safety
/// AVX-512F present; `pt` holds `cols × rows_p`, `v` `cols × dv` with `c0 + M <= dv`, `acc`
/// `dv × rows_p`; `rows_p` a multiple of `NQ`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn values_panel<const M: usize>(pt: *const f32, v: *const f32, acc: *mut f32, c0: usize, cols: usize, dv: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        for r0 in (0..rows_p).step_by(NQ) {
            let mut a = [[_mm512_setzero_ps(); 2]; M];
            for (i, a) in a.iter_mut().enumerate() {
                let src = acc.add((c0 + i) * rows_p + r0);
                a[0] = _mm512_loadu_ps(src);
                a[1] = _mm512_loadu_ps(src.add(16));
            }
            for j in 0..cols {
                let p = pt.add(j * rows_p + r0);
                let (p0, p1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                let vr = v.add(j * dv + c0);
                for (i, a) in a.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*vr.add(i));
                    a[0] = _mm512_fmadd_ps(b, p0, a[0]);
                    a[1] = _mm512_fmadd_ps(b, p1, a[1]);
                }
            }
            for (i, a) in a.iter().enumerate() {
                let dst = acc.add((c0 + i) * rows_p + r0);
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(16), a[1]);
            }
        }
    }
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
            values_panel::<MK>(pt, v, acc, c, cols, dv, rows_p);
            c += MK;
        }
        while c + 8 <= dv {
            values_panel::<8>(pt, v, acc, c, cols, dv, rows_p);
            c += 8;
        }
        while c + 4 <= dv {
            values_panel::<4>(pt, v, acc, c, cols, dv, rows_p);
            c += 4;
        }
        while c < dv {
            values_panel::<1>(pt, v, acc, c, cols, dv, rows_p);
            c += 1;
        }
    }
    Ok(())
}

/// The online-softmax step of a key block in the transposed layout, sixteen queries per lane
/// group: with `st` (`cols × rows_p` scores, `-inf` where masked) it updates each query's
/// running max `m` and sum `l`, rescales its accumulator column (`acc`: `dv × rows_p`) and
/// leaves `e^(s - m)` in `st`.
#[target_feature(enable = "avx512f")]
pub(crate) fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
    check_softmax("avx512::softmax_t", 16, st, m, l, acc, cols, rows_p, dv)?;
    // SAFETY: the checks above bound every pointer offset below.
    unsafe {
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        for r0 in (0..rows_p).step_by(16) {
            // Four running maxima: one would chain every load through the max's latency.
            let mut maxima = [neg_inf; 4];
            let mut j = 0;
            while j + 4 <= cols {
                for (i, mx) in maxima.iter_mut().enumerate() {
                    *mx = _mm512_max_ps(*mx, _mm512_loadu_ps(st.as_ptr().add((j + i) * rows_p + r0)));
                }
                j += 4;
            }
            for j in j..cols {
                maxima[0] = _mm512_max_ps(maxima[0], _mm512_loadu_ps(st.as_ptr().add(j * rows_p + r0)));
            }
            let block_max = _mm512_max_ps(_mm512_max_ps(maxima[0], maxima[1]), _mm512_max_ps(maxima[2], maxima[3]));
            let m_old = _mm512_loadu_ps(m.as_ptr().add(r0));
            let m_new = _mm512_max_ps(m_old, block_max);
            // A query that has seen no visible key yet keeps m = -inf; shift by 0 so that its
            // masked scores give e^-inf = 0 rather than NaN.
            let seen = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(m_new, neg_inf);
            let shift = _mm512_maskz_mov_ps(seen, m_new);
            let correction = exp16_nonpositive(_mm512_sub_ps(m_old, shift));
            let mut sum = _mm512_setzero_ps();
            for j in 0..cols {
                let p = st.as_mut_ptr().add(j * rows_p + r0);
                let e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p), shift));
                _mm512_storeu_ps(p, e);
                sum = _mm512_add_ps(sum, e);
            }
            let l_old = _mm512_loadu_ps(l.as_ptr().add(r0));
            _mm512_storeu_ps(l.as_mut_ptr().add(r0), _mm512_fmadd_ps(l_old, correction, sum));
            _mm512_storeu_ps(m.as_mut_ptr().add(r0), m_new);
            // Where no query's max moved the correction is exactly 1 (e^0): skip the rescale.
            if _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, m_old) != 0xffff {
                for c in 0..dv {
                    let a = acc.as_mut_ptr().add(c * rows_p + r0);
                    _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), correction));
                }
            }
        }
    }
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
