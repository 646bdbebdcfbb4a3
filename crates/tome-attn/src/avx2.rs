//! The hot loops in AVX2 + FMA intrinsics, in the transposed layout (`Sᵀ`: keys × queries): the
//! two micro-kernels (6 keys or value columns × 16 queries, twelve ymm accumulators) reading key
//! and value rows in place, and the online softmax down the columns with a vectorised exp. Only called from
//! code compiled with these features after the CPU reported them (see `flash::Isa`).
//!
//! Shapes are guaranteed by the packing in `flash`: every length is checked on entry, and the
//! functions return an error when a check fails (`transposed`), so no out-of-bounds access and no
//! silently skipped step is possible.

use std::arch::x86_64::*;

use crate::error::Result;
use crate::simd::{EXP_LO, EXP_POLY, LN2_HI, LN2_LO, ROUNDING_MAGIC};
use crate::transposed::{check_scores, check_softmax, check_values};

/// Eight lanes of `e^x` for `x <= 0` (the softmax's shifted scores), with the same reduction and
/// polynomial as `simd::exp`: `n = round(x log2 e)` by [`ROUNDING_MAGIC`], whose sum also holds
/// `n` as an integer in its low bits, shifted from there into the exponent of `2^n`. Lanes below
/// `EXP_LO`, `-inf` included, are zeroed; NaN stays NaN.
#[target_feature(enable = "avx2,fma")]
fn exp8_nonpositive(x: __m256) -> __m256 {
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

/// Queries per micro-kernel of the transposed path: two ymm registers.
pub(crate) const NQ: usize = 16;
/// Keys per score panel and value columns per value panel: with `NQ` lanes, twelve
/// accumulators — enough independent FMAs to cover the latency of both FMA ports — plus two
/// operand registers and a broadcast, 15 of the 16 ymm registers, so nothing spills.
const MK: usize = 6;

/// `MK`-row panel of `st[j][r] = Σ_t k[j][t] · qᵀ[t][r]`, keys `j0..j0 + M`.
///
/// # Safety
/// AVX2 and FMA present; `k` holds rows `j0..j0 + M` of `dqk`, `qt` `dqk × rows_p`, `st` rows
/// `j0..j0 + M` of `rows_p`; `rows_p` a multiple of `NQ`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scores_panel<const M: usize>(qt: *const f32, k: *const f32, st: *mut f32, j0: usize, dqk: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        let kp = k.add(j0 * dqk);
        for r0 in (0..rows_p).step_by(NQ) {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for t in 0..dqk {
                let q = qt.add(t * rows_p + r0);
                let (q0, q1) = (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*kp.add(i * dqk + t));
                    a[0] = _mm256_fmadd_ps(b, q0, a[0]);
                    a[1] = _mm256_fmadd_ps(b, q1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let out = st.add((j0 + i) * rows_p + r0);
                _mm256_storeu_ps(out, a[0]);
                _mm256_storeu_ps(out.add(8), a[1]);
            }
        }
    }
}

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
            scores_panel::<MK>(qt, k, st, j, dqk, rows_p);
            j += MK;
        }
        while j + 2 <= cols {
            scores_panel::<2>(qt, k, st, j, dqk, rows_p);
            j += 2;
        }
        if j < cols {
            scores_panel::<1>(qt, k, st, j, dqk, rows_p);
        }
    }
    Ok(())
}

/// `M`-column panel of `accᵀ[c][r] += Σ_j v[j][c] · pᵀ[j][r]`, columns `c0..c0 + M`.
///
/// # Safety
/// AVX2 and FMA present; `pt` holds `cols × rows_p`, `v` `cols × dv` with `c0 + M <= dv`, `acc`
/// `dv × rows_p`; `rows_p` a multiple of `NQ`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn values_panel<const M: usize>(pt: *const f32, v: *const f32, acc: *mut f32, c0: usize, cols: usize, dv: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        for r0 in (0..rows_p).step_by(NQ) {
            let mut a = [[_mm256_setzero_ps(); 2]; M];
            for (i, a) in a.iter_mut().enumerate() {
                let src = acc.add((c0 + i) * rows_p + r0);
                a[0] = _mm256_loadu_ps(src);
                a[1] = _mm256_loadu_ps(src.add(8));
            }
            for j in 0..cols {
                let p = pt.add(j * rows_p + r0);
                let (p0, p1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                let vr = v.add(j * dv + c0);
                for (i, a) in a.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*vr.add(i));
                    a[0] = _mm256_fmadd_ps(b, p0, a[0]);
                    a[1] = _mm256_fmadd_ps(b, p1, a[1]);
                }
            }
            for (i, a) in a.iter().enumerate() {
                let dst = acc.add((c0 + i) * rows_p + r0);
                _mm256_storeu_ps(dst, a[0]);
                _mm256_storeu_ps(dst.add(8), a[1]);
            }
        }
    }
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
            values_panel::<MK>(pt, v, acc, c, cols, dv, rows_p);
            c += MK;
        }
        while c + 2 <= dv {
            values_panel::<2>(pt, v, acc, c, cols, dv, rows_p);
            c += 2;
        }
        if c < dv {
            values_panel::<1>(pt, v, acc, c, cols, dv, rows_p);
        }
    }
    Ok(())
}

/// The online-softmax step of a key block in the transposed layout, eight queries per lane
/// group: with `st` (`cols × rows_p` scores, `-inf` where masked) it updates each query's
/// running max `m` and sum `l`, rescales its accumulator column (`acc`: `dv × rows_p`) and
/// leaves `e^(s - m)` in `st`.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
    check_softmax("avx2::softmax_t", 8, st, m, l, acc, cols, rows_p, dv)?;
    // SAFETY: the checks above bound every pointer offset below.
    unsafe {
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        for r0 in (0..rows_p).step_by(8) {
            // Four running maxima: one would chain every load through the max's latency.
            let mut maxima = [neg_inf; 4];
            let mut j = 0;
            while j + 4 <= cols {
                for (i, mx) in maxima.iter_mut().enumerate() {
                    *mx = _mm256_max_ps(*mx, _mm256_loadu_ps(st.as_ptr().add((j + i) * rows_p + r0)));
                }
                j += 4;
            }
            for j in j..cols {
                maxima[0] = _mm256_max_ps(maxima[0], _mm256_loadu_ps(st.as_ptr().add(j * rows_p + r0)));
            }
            let block_max = _mm256_max_ps(_mm256_max_ps(maxima[0], maxima[1]), _mm256_max_ps(maxima[2], maxima[3]));
            let m_old = _mm256_loadu_ps(m.as_ptr().add(r0));
            let m_new = _mm256_max_ps(m_old, block_max);
            // A query that has seen no visible key yet keeps m = -inf; shift by 0 so that its
            // masked scores give e^-inf = 0 rather than NaN.
            let unseen = _mm256_cmp_ps::<_CMP_EQ_OQ>(m_new, neg_inf);
            let shift = _mm256_andnot_ps(unseen, m_new);
            let correction = exp8_nonpositive(_mm256_sub_ps(m_old, shift));
            let mut sum = _mm256_setzero_ps();
            for j in 0..cols {
                let p = st.as_mut_ptr().add(j * rows_p + r0);
                let e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p), shift));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            let l_old = _mm256_loadu_ps(l.as_ptr().add(r0));
            _mm256_storeu_ps(l.as_mut_ptr().add(r0), _mm256_fmadd_ps(l_old, correction, sum));
            _mm256_storeu_ps(m.as_mut_ptr().add(r0), m_new);
            // Where no query's max moved the correction is exactly 1 (e^0): skip the rescale.
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(m_new, m_old)) != 0xff {
                for c in 0..dv {
                    let a = acc.as_mut_ptr().add(c * rows_p + r0);
                    _mm256_storeu_ps(a, _mm256_mul_ps(_mm256_loadu_ps(a), correction));
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
