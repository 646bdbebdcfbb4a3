//! The transposed tile's vector kernels (`Sᵀ`: keys × queries), written once over [`Lanes`], a
//! vector of f32 lanes that each instruction set implements (`avx2`: 8 lanes, `avx512`: 16):
//! score panels and value panels (`M` keys or value columns × two vectors of queries, read from
//! key and value rows in place), and the online softmax down the columns. Each instruction set's
//! module keeps what differs: its lanes (the exp among them), its panel schedule (how many
//! accumulators its registers hold) and its `#[target_feature]` entry points, into which
//! everything here is inlined.
//!
//! The kernels' contracts (slice lengths, the lane multiple) are checked on entry on every
//! instruction set, in release builds too: a call that breaks one is an error naming the kernel
//! and the lengths, never a silent return that would leave the tile's scores or accumulators
//! stale. Each check is a few compares per call against a panel loop of thousands of FMAs.

use crate::error::{AttnError, Result};

/// A vector of `N` f32 lanes and the operations the kernels are built from.
///
/// # Safety
/// Every method needs the implementation's instruction set: call them only from code compiled
/// with it (a `#[target_feature]` function they are inlined into) on a CPU that has it.
pub(crate) trait Lanes: Copy {
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// Every lane `*p`.
    unsafe fn broadcast(p: *const f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a · b + c`, fused.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// `e^x` for `x <= 0`, as `simd::exp` computes it; 0 below `EXP_LO` (`-inf` included), NaN
    /// stays NaN.
    unsafe fn exp_nonpositive(x: Self) -> Self;
    /// `x` with its `-inf` lanes made 0.
    unsafe fn zero_neg_inf(x: Self) -> Self;
    /// Every lane of `a` equals `b`'s.
    unsafe fn all_eq(a: Self, b: Self) -> bool;
}

/// `M`-row panel of `st[j][r] = Σ_t k[j][t] · qᵀ[t][r]`, keys `j0..j0 + M`, two vectors of
/// queries at a time.
///
/// # Safety
/// `L`'s instruction set present; `k` holds rows `j0..j0 + M` of `dqk`, `qt` `dqk × rows_p`, `st`
/// rows `j0..j0 + M` of `rows_p`; `rows_p` a multiple of `2 · L::N`.
#[inline(always)]
pub(crate) unsafe fn scores_panel<L: Lanes, const M: usize>(qt: *const f32, k: *const f32, st: *mut f32, j0: usize, dqk: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        let kp = k.add(j0 * dqk);
        for r0 in (0..rows_p).step_by(2 * L::N) {
            let mut acc = [[L::zero(); 2]; M];
            for t in 0..dqk {
                let q = qt.add(t * rows_p + r0);
                let (q0, q1) = (L::load(q), L::load(q.add(L::N)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let b = L::broadcast(kp.add(i * dqk + t));
                    a[0] = L::mul_add(b, q0, a[0]);
                    a[1] = L::mul_add(b, q1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let out = st.add((j0 + i) * rows_p + r0);
                a[0].store(out);
                a[1].store(out.add(L::N));
            }
        }
    }
}

/// `M`-column panel of `accᵀ[c][r] += Σ_j v[j][c] · pᵀ[j][r]`, columns `c0..c0 + M`.
///
/// # Safety
/// `L`'s instruction set present; `pt` holds `cols × rows_p`, `v` `cols × dv` with
/// `c0 + M <= dv`, `acc` `dv × rows_p`; `rows_p` a multiple of `2 · L::N`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn values_panel<L: Lanes, const M: usize>(pt: *const f32, v: *const f32, acc: *mut f32, c0: usize, cols: usize, dv: usize, rows_p: usize) {
    // SAFETY: bounds as the caller guarantees.
    unsafe {
        for r0 in (0..rows_p).step_by(2 * L::N) {
            let mut a = [[L::zero(); 2]; M];
            for (i, a) in a.iter_mut().enumerate() {
                let src = acc.add((c0 + i) * rows_p + r0);
                a[0] = L::load(src);
                a[1] = L::load(src.add(L::N));
            }
            for j in 0..cols {
                let p = pt.add(j * rows_p + r0);
                let (p0, p1) = (L::load(p), L::load(p.add(L::N)));
                let vr = v.add(j * dv + c0);
                for (i, a) in a.iter_mut().enumerate() {
                    let b = L::broadcast(vr.add(i));
                    a[0] = L::mul_add(b, p0, a[0]);
                    a[1] = L::mul_add(b, p1, a[1]);
                }
            }
            for (i, a) in a.iter().enumerate() {
                let dst = acc.add((c0 + i) * rows_p + r0);
                a[0].store(dst);
                a[1].store(dst.add(L::N));
            }
        }
    }
}

/// The online-softmax step of a key block, `L::N` queries per lane group: with `st` (`cols ×
/// rows_p` scores, `-inf` where masked) it updates each query's running max `m` and sum `l`,
/// rescales its accumulator column (`acc`: `dv × rows_p`) and leaves `e^(s - m)` in `st`.
///
/// # Safety
/// `L`'s instruction set present; the lengths are [`check_softmax`]'s with `L::N` lanes.
#[inline(always)]
pub(crate) unsafe fn softmax<L: Lanes>(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) {
    // SAFETY: the lengths as the caller guarantees bound every pointer offset below.
    unsafe {
        let neg_inf = L::splat(f32::NEG_INFINITY);
        for r0 in (0..rows_p).step_by(L::N) {
            // Four running maxima: one would chain every load through the max's latency.
            let mut maxima = [neg_inf; 4];
            let mut j = 0;
            while j + 4 <= cols {
                for (i, mx) in maxima.iter_mut().enumerate() {
                    *mx = L::max(*mx, L::load(st.as_ptr().add((j + i) * rows_p + r0)));
                }
                j += 4;
            }
            for j in j..cols {
                maxima[0] = L::max(maxima[0], L::load(st.as_ptr().add(j * rows_p + r0)));
            }
            let block_max = L::max(L::max(maxima[0], maxima[1]), L::max(maxima[2], maxima[3]));
            let m_old = L::load(m.as_ptr().add(r0));
            let m_new = L::max(m_old, block_max);
            // A query that has seen no visible key yet keeps m = -inf; shift by 0 so that its
            // masked scores give e^-inf = 0 rather than NaN.
            let shift = L::zero_neg_inf(m_new);
            let correction = L::exp_nonpositive(L::sub(m_old, shift));
            let mut sum = L::zero();
            for j in 0..cols {
                let p = st.as_mut_ptr().add(j * rows_p + r0);
                let e = L::exp_nonpositive(L::sub(L::load(p), shift));
                e.store(p);
                sum = L::add(sum, e);
            }
            let l_old = L::load(l.as_ptr().add(r0));
            L::mul_add(l_old, correction, sum).store(l.as_mut_ptr().add(r0));
            m_new.store(m.as_mut_ptr().add(r0));
            // Where no query's max moved the correction is exactly 1 (e^0): skip the rescale.
            if !L::all_eq(m_new, m_old) {
                for c in 0..dv {
                    let a = acc.as_mut_ptr().add(c * rows_p + r0);
                    L::mul(L::load(a), correction).store(a);
                }
            }
        }
    }
}

#[cold]
#[inline(never)]
fn broken(kernel: &'static str, msg: String) -> AttnError {
    AttnError::Precondition { kernel, msg }
}

/// `len` holds an `a × b` matrix (false when the product overflows).
#[inline(always)]
fn holds(len: usize, a: usize, b: usize) -> bool {
    a.checked_mul(b).is_some_and(|n| n <= len)
}

/// `scores_t`: `rows_p` a multiple of `lanes`, `qt` holds `dqk × rows_p`, `k` `cols × dqk`, `st`
/// `cols × rows_p`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_scores(kernel: &'static str, lanes: usize, qt: &[f32], k: &[f32], st: &[f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()> {
    if rows_p.is_multiple_of(lanes) && holds(qt.len(), dqk, rows_p) && holds(k.len(), cols, dqk) && holds(st.len(), cols, rows_p) {
        return Ok(());
    }
    Err(broken(kernel, format!("{} queries (a multiple of {lanes}), {cols} keys of {dqk}: Qᵀ has {}, K {}, Sᵀ {} elements", rows_p, qt.len(), k.len(), st.len())))
}

/// `values_t`: `rows_p` a multiple of `lanes`, `pt` holds `cols × rows_p`, `v` `cols × dv`, `acc`
/// `dv × rows_p`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_values(kernel: &'static str, lanes: usize, pt: &[f32], v: &[f32], acc: &[f32], cols: usize, dv: usize, rows_p: usize) -> Result<()> {
    if rows_p.is_multiple_of(lanes) && holds(pt.len(), cols, rows_p) && holds(v.len(), cols, dv) && holds(acc.len(), dv, rows_p) {
        return Ok(());
    }
    Err(broken(kernel, format!("{} queries (a multiple of {lanes}), {cols} keys, {dv} value columns: Pᵀ has {}, V {}, Oᵀ {} elements", rows_p, pt.len(), v.len(), acc.len())))
}

/// `softmax_t`: `rows_p` a multiple of `lanes`, `st` holds `cols × rows_p`, `m` and `l` `rows_p`,
/// `acc` `dv × rows_p`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_softmax(kernel: &'static str, lanes: usize, st: &[f32], m: &[f32], l: &[f32], acc: &[f32], cols: usize, rows_p: usize, dv: usize) -> Result<()> {
    if rows_p.is_multiple_of(lanes) && holds(st.len(), cols, rows_p) && m.len() >= rows_p && l.len() >= rows_p && holds(acc.len(), dv, rows_p) {
        return Ok(());
    }
    Err(broken(
        kernel,
        format!(
            "{} queries (a multiple of {lanes}), {cols} keys, {dv} value columns: Sᵀ has {}, the maxima {}, the sums {}, Oᵀ {} elements",
            rows_p,
            st.len(),
            m.len(),
            l.len(),
            acc.len()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Scores<'a> = &'a dyn Fn(&[f32], &[f32], &mut [f32], usize, usize, usize) -> Result<()>;
    type Values<'a> = &'a dyn Fn(&[f32], &[f32], &mut [f32], usize, usize, usize) -> Result<()>;
    type Softmax<'a> = &'a dyn Fn(&mut [f32], usize, usize, &mut [f32], &mut [f32], &mut [f32], usize) -> Result<()>;

    /// One instruction set's kernels: in contract they compute, out of it they refuse by name.
    fn refuse_outside_the_contract(isa: &str, nq: usize, softmax_lanes: usize, scores: Scores, values: Values, softmax: Softmax) {
        let (cols, d) = (3, 4);
        let named = |e: AttnError, kernel: &str| {
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("{isa}::{kernel}: broken precondition")), "{msg}");
        };
        // Scores: Qᵀ d × nq, K cols × d, Sᵀ cols × nq.
        let (qt, k) = (vec![1f32; d * nq], vec![0.5f32; cols * d]);
        let mut st = vec![0f32; cols * nq];
        scores(&qt, &k, &mut st, cols, d, nq).unwrap();
        assert!(st.iter().all(|&x| x == 2.0), "in contract it computes");
        named(scores(&qt, &k, &mut st[1..], cols, d, nq).unwrap_err(), "scores_t");
        named(scores(&qt, &k[1..], &mut st, cols, d, nq).unwrap_err(), "scores_t");
        named(scores(&qt[1..], &k, &mut st, cols, d, nq).unwrap_err(), "scores_t");
        let mut wide = vec![0f32; cols * (nq + 1)];
        named(scores(&vec![1f32; d * (nq + 1)], &k, &mut wide, cols, d, nq + 1).unwrap_err(), "scores_t");
        named(scores(&qt, &k, &mut st, usize::MAX, d, nq).unwrap_err(), "scores_t");
        // Values: Pᵀ cols × nq, V cols × d, Oᵀ d × nq.
        let (pt, v) = (vec![1f32; cols * nq], vec![0.5f32; cols * d]);
        let mut acc = vec![1f32; d * nq];
        values(&pt, &v, &mut acc, cols, d, nq).unwrap();
        assert!(acc.iter().all(|&x| x == 2.5), "in contract it accumulates");
        named(values(&pt, &v, &mut acc[1..], cols, d, nq).unwrap_err(), "values_t");
        named(values(&pt, &v[1..], &mut acc, cols, d, nq).unwrap_err(), "values_t");
        named(values(&pt[1..], &v, &mut acc, cols, d, nq).unwrap_err(), "values_t");
        named(values(&pt, &v, &mut acc, cols, d, nq - 1).unwrap_err(), "values_t");
        // Softmax: Sᵀ cols × rows, maxima and sums rows, Oᵀ d × rows.
        let rows = softmax_lanes;
        let (mut m, mut l, mut o) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows], vec![0f32; d * rows]);
        let mut s = vec![0f32; cols * rows];
        softmax(&mut s, cols, rows, &mut m, &mut l, &mut o, d).unwrap();
        assert!(l.iter().all(|&x| x == 3.0), "in contract it sums");
        named(softmax(&mut s[1..], cols, rows, &mut m, &mut l, &mut o, d).unwrap_err(), "softmax_t");
        named(softmax(&mut s, cols, rows, &mut m[1..], &mut l, &mut o, d).unwrap_err(), "softmax_t");
        named(softmax(&mut s, cols, rows, &mut m, &mut l[1..], &mut o, d).unwrap_err(), "softmax_t");
        named(softmax(&mut s, cols, rows, &mut m, &mut l, &mut o[1..], d).unwrap_err(), "softmax_t");
        named(softmax(&mut s, cols, rows - 1, &mut m, &mut l, &mut o, d).unwrap_err(), "softmax_t");
    }

    #[test]
    fn a_kernel_called_outside_its_contract_refuses_on_every_instruction_set() {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            use crate::avx2::{scores_t, softmax_t, values_t, NQ};
            // SAFETY (each call): the CPU reported AVX2 and FMA.
            refuse_outside_the_contract(
                "avx2",
                NQ,
                8,
                &|a, b, c, d, e, f| unsafe { scores_t(a, b, c, d, e, f) },
                &|a, b, c, d, e, f| unsafe { values_t(a, b, c, d, e, f) },
                &|a, b, c, d, e, f, g| unsafe { softmax_t(a, b, c, d, e, f, g) },
            );
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            use crate::avx512::{scores_t, softmax_t, values_t, NQ};
            // SAFETY (each call): the CPU reported AVX-512F.
            refuse_outside_the_contract(
                "avx512",
                NQ,
                16,
                &|a, b, c, d, e, f| unsafe { scores_t(a, b, c, d, e, f) },
                &|a, b, c, d, e, f| unsafe { values_t(a, b, c, d, e, f) },
                &|a, b, c, d, e, f, g| unsafe { softmax_t(a, b, c, d, e, f, g) },
            );
        }
    }
}
