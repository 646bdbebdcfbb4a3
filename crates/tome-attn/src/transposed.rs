//! The contracts of the transposed tile's vector kernels (`avx2`, `avx512`), checked on entry on
//! every instruction set, in release builds too: a call that breaks one is an error naming the
//! kernel and the lengths, never a silent return that would leave the tile's scores or
//! accumulators stale. Each check is a few compares per call against a panel loop of thousands of
//! FMAs.

use crate::error::{AttnError, Result};

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
