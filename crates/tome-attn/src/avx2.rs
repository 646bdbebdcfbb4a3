//! The hot loops in AVX2 + FMA intrinsics: the two micro-kernels (4 query rows × 16 lanes, eight
//! ymm accumulators) and the vectorised exp/max/sum of the online softmax. Only called from
//! code compiled with these features after the CPU reported them (see `flash::has_fma`).
//!
//! Shapes are guaranteed by the packing in `flash`: every length is checked on entry, and the
//! functions do nothing when a check fails, so no out-of-bounds access is possible.

use std::arch::x86_64::*;

/// `s[r][c] = Σ_t q[r][t] · kᵀ[t][c]` over packed 4-row query panels and a `dqk × bk` Kᵀ tile.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn scores(q_panels: &[f32], kt: &[f32], s: &mut [f32], rows_p: usize, dqk: usize, bk: usize) {
    if rows_p % 4 != 0 || bk % 16 != 0 || q_panels.len() < rows_p * dqk || kt.len() < dqk * bk || s.len() < rows_p * bk {
        return;
    }
    // SAFETY: the checks above bound every pointer offset below.
    unsafe {
        for p in 0..rows_p / 4 {
            let panel = q_panels.as_ptr().add(p * dqk * 4);
            for c0 in (0..bk).step_by(16) {
                let mut acc = [_mm256_setzero_ps(); 8];
                for t in 0..dqk {
                    let k = kt.as_ptr().add(t * bk + c0);
                    let (k0, k1) = (_mm256_loadu_ps(k), _mm256_loadu_ps(k.add(8)));
                    let q = panel.add(t * 4);
                    for r in 0..4 {
                        let b = _mm256_broadcast_ss(&*q.add(r));
                        acc[2 * r] = _mm256_fmadd_ps(b, k0, acc[2 * r]);
                        acc[2 * r + 1] = _mm256_fmadd_ps(b, k1, acc[2 * r + 1]);
                    }
                }
                for r in 0..4 {
                    let out = s.as_mut_ptr().add((p * 4 + r) * bk + c0);
                    _mm256_storeu_ps(out, acc[2 * r]);
                    _mm256_storeu_ps(out.add(8), acc[2 * r + 1]);
                }
            }
        }
    }
}

/// `acc[r][c] += Σ_j p[r][j] · v[j][c]` for a `rows_p × dv_p` accumulator and a `bk × dv_p` V tile.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn weighted_values(p: &[f32], vt: &[f32], acc: &mut [f32], rows_p: usize, bk: usize, dv_p: usize) {
    if rows_p % 4 != 0 || dv_p % 16 != 0 || p.len() < rows_p * bk || vt.len() < bk * dv_p || acc.len() < rows_p * dv_p {
        return;
    }
    // SAFETY: the checks above bound every pointer offset below.
    unsafe {
        for r0 in (0..rows_p).step_by(4) {
            for c0 in (0..dv_p).step_by(16) {
                let mut a = [_mm256_setzero_ps(); 8];
                for r in 0..4 {
                    let src = acc.as_ptr().add((r0 + r) * dv_p + c0);
                    a[2 * r] = _mm256_loadu_ps(src);
                    a[2 * r + 1] = _mm256_loadu_ps(src.add(8));
                }
                for j in 0..bk {
                    let v = vt.as_ptr().add(j * dv_p + c0);
                    let (v0, v1) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
                    for r in 0..4 {
                        let b = _mm256_broadcast_ss(&*p.as_ptr().add((r0 + r) * bk + j));
                        a[2 * r] = _mm256_fmadd_ps(b, v0, a[2 * r]);
                        a[2 * r + 1] = _mm256_fmadd_ps(b, v1, a[2 * r + 1]);
                    }
                }
                for r in 0..4 {
                    let dst = acc.as_mut_ptr().add((r0 + r) * dv_p + c0);
                    _mm256_storeu_ps(dst, a[2 * r]);
                    _mm256_storeu_ps(dst.add(8), a[2 * r + 1]);
                }
            }
        }
    }
}

/// Eight lanes of `e^x` with the same reduction and polynomial as `simd::exp`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::excessive_precision)] // Cephes expf's coefficients, as published
fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.336_54);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.376_26));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    _mm256_andnot_ps(below, _mm256_mul_ps(y, pow2))
}

fn hsum(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// Replaces each `x` by `e^(x - m)` and returns the sum; `row.len()` must be a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 {
    let mut sum = _mm256_setzero_ps();
    let shift = _mm256_set1_ps(m);
    for chunk in row.chunks_exact_mut(8) {
        // SAFETY: each chunk holds exactly eight f32.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift));
            _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
    }
    hsum(sum)
}

/// Maximum of a row whose length is a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for chunk in row.chunks_exact(8) {
        // SAFETY: each chunk holds exactly eight f32.
        m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(chunk.as_ptr()) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}
