//! FAVOR+ linear attention (Choromanski et al. 2021, "Rethinking Attention with Performers"),
//! with the formulas of the public reference implementations (performer-pytorch's
//! `softmax_kernel`, `linear_attention`, `causal_linear_attention`; google-research
//! `performer/fast_attention`).
//!
//! Positive orthogonal random features: `phi(x) = m^-1/2 (exp(w·x' - |x'|²/2 - c) + 1e-4)` with
//! `x' = x · d^-1/4`, `w` the rows of a Gaussian orthogonal projection (`m × d`), and the
//! stabiliser `c` the row maximum for queries and the maximum over every key and feature of a
//! head for keys (which is why keys need a global max when sharded). Bidirectional:
//! `out = phi(q)(phi(K)ᵀV) / (phi(q)·Σ phi(K))`. Causal: the same with prefix sums, computed in
//! chunks (a masked C×C product inside a chunk plus the running state), and `1e-6` added to the
//! running key sum as the reference does.
//!
//! Bidirectional attention streams: [`key_stabilizer`], [`key_state`] and [`bidirectional`] each
//! take a shard's rows once, a step of a few hundred rows at a time (the step's `w·x'` by GEMM,
//! its features in one vectorised pass with the attention kernels' exp, then the step's share of
//! the state or its output rows), so no feature map larger than a step exists and the output is
//! written in place. Tasks of a fixed number of rows run in parallel and their sums are added in
//! task order, so the thread count does not change the result. The causal path keeps whole row
//! blocks' feature maps ([`query_features`], [`key_features`], [`causal`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::projection::gemm_into;
use crate::rng::SplitMix64;
use crate::simd::{dot, exp, row_max, Plain};
use crate::tensor::{dims3, with_f32};

/// Added to every feature (keeps features positive and denominators away from zero).
pub const FEATURE_EPS: f32 = 1e-4;
/// Added to the causal running key sum.
pub const CAUSAL_EPS: f32 = 1e-6;

/// A Gaussian orthogonal random projection `[features, head_dim]` drawn from a seeded generator:
/// blocks of `head_dim` orthonormal rows (Gram–Schmidt on Gaussian blocks), each row scaled by
/// the norm of an independent Gaussian row (the chi-distributed norms of performer-pytorch's
/// `scaling = 0`).
pub fn orthogonal_projection(features: usize, head_dim: usize, seed: u64) -> Result<Tensor> {
    let mut rng = SplitMix64::new(seed);
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(features);
    while rows.len() < features {
        let mut block: Vec<Vec<f64>> = Vec::with_capacity(head_dim);
        while block.len() < head_dim {
            let mut v: Vec<f64> = (0..head_dim).map(|_| rng.normal()).collect();
            for b in &block {
                let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
                v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-6 {
                block.push(v.into_iter().map(|x| x / norm).collect());
            }
        }
        rows.extend(block.into_iter().take(features - rows.len()));
    }
    let data: Vec<f32> = rows
        .into_iter()
        .flat_map(|row| {
            let scale = (0..head_dim).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt();
            row.into_iter().map(move |x| (x * scale) as f32)
        })
        .collect();
    Ok(Tensor::from_vec(data, (features, head_dim), &Device::Cpu)?)
}

/// `w·x'` (`[heads, n, m]`) for `x` (`[heads, n, d]`) under `proj` (`[m, d]`), `x' = x · d^-1/4`:
/// the scale is folded into the small projection rather than applied to every row of `x`.
fn dash(x: &Tensor, proj: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let scaled = (proj * (d as f64).powf(-0.25))?;
    Ok(x.contiguous()?.broadcast_matmul(&scaled.t()?)?)
}

/// `|x'|²/2` of every row of `x` (`[heads, n, d]`), in one pass over `x`.
fn half_square_norms(x: &Tensor) -> Result<Vec<f32>> {
    let d = x.dim(D::Minus1)?;
    let (rows, half_sq) = (x.elem_count() / d.max(1), 0.5 / (d as f32).sqrt());
    if d == 0 {
        return Ok(vec![0.0; rows]);
    }
    with_f32(x, FEATURES, |x| x.chunks_exact(d).map(|row| half_sq * row.iter().map(|a| a * a).sum::<f32>()).collect())
}

/// The maximum of each `width`-element run of `dash` (`-inf` for an empty run).
fn run_maxima(dash: &Tensor, width: usize) -> Result<Vec<f32>> {
    if width == 0 {
        return Ok(Vec::new());
    }
    with_f32(dash, FEATURES, |dash| dash.chunks_exact(width).map(|run| run.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect())
}

/// The keys' stabiliser of one shard: per head, the maximum of `w·k'` over its keys and features
/// (`[heads]`; `-inf` for no keys). The global stabiliser is the maximum over shards. Computed a
/// step of rows at a time; `w·k'` of the whole shard never exists.
pub fn key_stabilizer(k: &Tensor, proj: &Tensor) -> Result<Tensor> {
    const OP: &str = "favor::key_stabilizer";
    let (heads, n, d) = dims3(k, OP, "k")?;
    let w = Projection::scaled(proj, d, OP)?;
    let k = k.contiguous()?;
    let maxima = with_f32(&k, OP, |k| {
        let keys = HeadRows { data: k, n, width: d };
        let task_max = |(h, rows): (usize, Range<usize>)| {
            let mut scratch = Scratch::default();
            steps(rows).map(|step| row_max(w.dash(&mut scratch, keys.rows(h, step)))).fold(f32::NEG_INFINITY, f32::max)
        };
        let task_list = tasks(heads, n, TASK_ROWS);
        let task_maxima: Vec<f32> = task_list.par_iter().cloned().map(task_max).collect();
        let mut maxima = vec![f32::NEG_INFINITY; heads];
        for ((h, _), m) in task_list.iter().zip(task_maxima) {
            maxima[*h] = maxima[*h].max(m);
        }
        maxima
    })?;
    Ok(Tensor::from_vec(maxima, heads, &Device::Cpu)?)
}

/// Query features `[heads, n, m]` (each row stabilised by its own maximum).
pub fn query_features(q: &Tensor, proj: &Tensor) -> Result<Tensor> {
    // One contiguous copy of a row block's view, read by both the product and the norms.
    let q = q.contiguous()?;
    let dash = dash(&q, proj)?;
    let stab = run_maxima(&dash, proj.dim(0)?)?;
    features(&dash, &half_square_norms(&q)?, &stab, 1)
}

/// Key features `[heads, n, m]` under the (global) per-head stabiliser `[heads]`.
pub fn key_features(k: &Tensor, proj: &Tensor, stabilizer: &Tensor) -> Result<Tensor> {
    let stab = stabilizer.to_vec1::<f32>()?;
    if stab.len() != k.dim(0)? {
        return Err(shape_err(FEATURES, format!("{} stabilisers for {} heads", stab.len(), k.dim(0)?)));
    }
    let k = k.contiguous()?;
    features(&dash(&k, proj)?, &half_square_norms(&k)?, &stab, k.dim(1)?)
}

const FEATURES: &str = "favor::features";

/// Rows of `w·x'` per parallel piece of [`features`].
const FEATURE_ROWS: usize = 256;

/// `m^-1/2 (exp(w·x' - |x'|²/2 - c) + eps)` from `dash` (`w·x'`, `[heads, n, m]`) and `diag`
/// (`|x'|²/2`, one per row), with the stabiliser `c = stab[row / rows_per_stab]` of each
/// of the `heads · n` rows: one pass, where tensor ops would make five, each through memory.
fn features(dash: &Tensor, diag: &[f32], stab: &[f32], rows_per_stab: usize) -> Result<Tensor> {
    let (heads, n, m) = dash.dims3()?;
    let len = heads * n * m;
    if len == 0 {
        return Ok(Tensor::zeros((heads, n, m), DType::F32, &Device::Cpu)?);
    }
    if diag.len() != heads * n || stab.len() * rows_per_stab != heads * n {
        return Err(shape_err(FEATURES, format!("{} norms and {} stabilisers for {heads} × {n} rows", diag.len(), stab.len())));
    }
    let shape = FeatureShape { m, ratio: (m as f64).powf(-0.5) as f32, rows_per_stab };
    // Not zeroed first: every element is written below.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    with_f32(dash, FEATURES, |dash| {
        dst.par_chunks_mut(FEATURE_ROWS * m)
            .zip(dash.par_chunks(FEATURE_ROWS * m))
            .enumerate()
            .for_each(|(piece, (out, dash))| feature_rows(out, dash, piece * FEATURE_ROWS, diag, stab, shape))
    })?;
    // SAFETY: the pieces cover `dst`, the first `len` elements, and `feature_rows` writes every
    // element of its piece.
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (heads, n, m), &Device::Cpu)?)
}

#[derive(Clone, Copy)]
struct FeatureShape {
    m: usize,
    ratio: f32,
    rows_per_stab: usize,
}

/// [`features`] of whole rows from row `first` on, on the widest vectors the CPU has (the same
/// arithmetic on every path, so every machine computes the same features).
fn feature_rows(out: &mut [MaybeUninit<f32>], dash: &[f32], first: usize, diag: &[f32], stab: &[f32], s: FeatureShape) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reported AVX-512F.
            unsafe { feature_rows_avx512(out, dash, first, diag, stab, s) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU reported AVX2.
            unsafe { feature_rows_avx2(out, dash, first, diag, stab, s) };
            return;
        }
    }
    feature_rows_portable(out, dash, first, diag, stab, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn feature_rows_avx512(out: &mut [MaybeUninit<f32>], dash: &[f32], first: usize, diag: &[f32], stab: &[f32], s: FeatureShape) {
    feature_rows_portable(out, dash, first, diag, stab, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn feature_rows_avx2(out: &mut [MaybeUninit<f32>], dash: &[f32], first: usize, diag: &[f32], stab: &[f32], s: FeatureShape) {
    feature_rows_portable(out, dash, first, diag, stab, s)
}

/// Inlined into each `target_feature` caller, where the row loop becomes vector code.
#[inline(always)]
fn feature_rows_portable(out: &mut [MaybeUninit<f32>], dash: &[f32], first: usize, diag: &[f32], stab: &[f32], s: FeatureShape) {
    for (r, (out, dash)) in out.chunks_exact_mut(s.m).zip(dash.chunks_exact(s.m)).enumerate() {
        let row = first + r;
        let (norm, c) = (diag[row], stab[row / s.rows_per_stab]);
        for (o, &x) in out.iter_mut().zip(dash) {
            o.write((exp::<Plain>((x - norm) - c) + FEATURE_EPS) * s.ratio);
        }
    }
}

/// The state of a shard's keys and values (`[heads, n, d]`, `[heads, n, dv]`) under the (global)
/// per-head stabiliser, `(phi(K)ᵀV [heads, m, dv], Σ phi(K) [heads, m])`: its share of the
/// bidirectional state, or what later shards start from under causal attention. One pass
/// over the rows, a step at a time: no feature map larger than a step exists. Tasks of
/// `task_rows` rows of one head run in parallel and their sums are added in task order, so the
/// result does not depend on the thread count.
pub fn key_state(k: &Tensor, v: &Tensor, proj: &Tensor, stabilizer: &Tensor, task_rows: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "favor::key_state";
    let ((heads, n, d), (v_heads, v_n, dv)) = (dims3(k, OP, "k")?, dims3(v, OP, "v")?);
    let stab = stabilizer.to_vec1::<f32>()?;
    if (v_heads, v_n) != (heads, n) || stab.len() != heads {
        return Err(shape_err(OP, format!("k {:?}, v {:?} and {} stabilisers", k.dims(), v.dims(), stab.len())));
    }
    let w = Projection::scaled(proj, d, OP)?;
    let m = w.features;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let task_list = tasks(heads, n, task_rows);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = with_f32(&k, OP, |k| {
        with_f32(&v, OP, |v| {
            let (keys, values) = (HeadRows { data: k, n, width: d }, HeadRows { data: v, n, width: dv });
            task_list
                .par_iter()
                .map(|(h, rows)| {
                    let (mut context, mut ksum) = (vec![0f32; m * dv], vec![0f32; m]);
                    let mut scratch = Scratch::default();
                    for step in steps(rows.clone()) {
                        let phi = w.features(&mut scratch, keys.rows(*h, step.clone()), Stabiliser::Shared(stab[*h]));
                        for row in phi.chunks_exact(m) {
                            ksum.iter_mut().zip(row).for_each(|(s, f)| *s += f);
                        }
                        // context += phiᵀ · v over the step's rows.
                        // SAFETY: `context` is m × dv row-major; phi (rows × m row-major) read as
                        // its transpose has columns m apart; the step's values are rows × dv.
                        unsafe {
                            gemm_into(
                                m,
                                dv,
                                step.len(),
                                (context.as_mut_ptr(), 1, dv as isize),
                                true,
                                (phi.as_ptr(), m as isize, 1),
                                (values.rows(*h, step).as_ptr(), 1, dv as isize),
                                gemm::Parallelism::None,
                            )
                        }
                    }
                    (context, ksum)
                })
                .collect()
        })
    })??;
    let (mut context, mut ksum) = (vec![0f32; heads * m * dv], vec![0f32; heads * m]);
    for ((h, _), (c, s)) in task_list.iter().zip(partials) {
        context[h * m * dv..(h + 1) * m * dv].iter_mut().zip(c).for_each(|(a, b)| *a += b);
        ksum[h * m..(h + 1) * m].iter_mut().zip(s).for_each(|(a, b)| *a += b);
    }
    Ok((Tensor::from_vec(context, (heads, m, dv), &Device::Cpu)?, Tensor::from_vec(ksum, (heads, m), &Device::Cpu)?))
}

/// Bidirectional output of a shard's queries (`[heads, n, d]`) from the (global) state:
/// `phi(q)·context / phi(q)·ksum`, `[heads, n, dv]`, a step of rows at a time, each step's
/// product written straight into the output and divided there.
pub fn bidirectional(q: &Tensor, proj: &Tensor, context: &Tensor, ksum: &Tensor, task_rows: usize) -> Result<Tensor> {
    const OP: &str = "favor::bidirectional";
    let (heads, n, d) = dims3(q, OP, "q")?;
    let w = Projection::scaled(proj, d, OP)?;
    let m = w.features;
    let (c_heads, c_m, dv) = dims3(context, OP, "context")?;
    if (c_heads, c_m) != (heads, m) || ksum.dims() != [heads, m] {
        return Err(shape_err(OP, format!("q {:?} with a context {:?} and key sum {:?} for {m} features", q.dims(), context.dims(), ksum.dims())));
    }
    let (q, context, ksum) = (q.contiguous()?, context.contiguous()?, ksum.contiguous()?);
    let len = heads * n * dv;
    // Not zeroed first: every element is written below.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let task_list = tasks(heads, n, task_rows);
    let mut pieces: Vec<&mut [MaybeUninit<f32>]> = Vec::with_capacity(task_list.len());
    let mut rest = &mut out.spare_capacity_mut()[..len];
    for (_, rows) in &task_list {
        let (piece, tail) = rest.split_at_mut(rows.len() * dv);
        pieces.push(piece);
        rest = tail;
    }
    with_f32(&q, OP, |q| {
        with_f32(&context, OP, |context| {
            with_f32(&ksum, OP, |ksum| {
                let queries = HeadRows { data: q, n, width: d };
                pieces.into_par_iter().zip(task_list.par_iter()).for_each(|(piece, (h, rows))| {
                    let (context, ksum) = (&context[h * m * dv..(h + 1) * m * dv], &ksum[h * m..(h + 1) * m]);
                    let mut scratch = Scratch::default();
                    let mut at = 0;
                    for step in steps(rows.clone()) {
                        let phi = w.features(&mut scratch, queries.rows(*h, step.clone()), Stabiliser::PerRow);
                        let dst = &mut piece[at * dv..(at + step.len()) * dv];
                        at += step.len();
                        // SAFETY: `dst` is rows × dv row-major, phi rows × m, the head's context
                        // m × dv; without `read_dst` the GEMM writes every element of `dst`.
                        unsafe {
                            gemm_into(
                                step.len(),
                                dv,
                                m,
                                (dst.as_mut_ptr().cast(), 1, dv as isize),
                                false,
                                (phi.as_ptr(), 1, m as isize),
                                (context.as_ptr(), 1, dv as isize),
                                gemm::Parallelism::None,
                            )
                        }
                        // SAFETY: the GEMM above wrote every element of `dst`.
                        let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
                        for (row, features) in dst.chunks_exact_mut(dv.max(1)).zip(phi.chunks_exact(m)) {
                            let den = dot(features, ksum);
                            row.iter_mut().for_each(|x| *x /= den);
                        }
                    }
                })
            })
        })
    })???;
    // SAFETY: the pieces cover the first `len` elements, each written whole by its GEMM.
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (heads, n, dv), &Device::Cpu)?)
}

/// Causal output for a run of consecutive tokens, starting from the running state of every
/// earlier token (`context0`, `ksum0`: zeros at the start of the sequence), in chunks of
/// `chunk` tokens. Returns the output and the state after the run.
pub fn causal(phi_q: &Tensor, phi_k: &Tensor, v: &Tensor, context0: &Tensor, ksum0: &Tensor, chunk: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, n, _) = phi_q.dims3()?;
    if chunk == 0 {
        return Err(shape_err("favor::causal", "chunk must be positive"));
    }
    let (mut context, mut ksum) = (context0.clone(), ksum0.clone());
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let (q, k, vv) = (phi_q.narrow(1, start, c)?, phi_k.narrow(1, start, c)?, v.narrow(1, start, c)?);
        let tril = Tensor::tril2(c, DType::F32, &Device::Cpu)?;
        let scores = q.matmul(&k.t()?)?.broadcast_mul(&tril)?;
        let num = (q.matmul(&context)? + scores.matmul(&vv)?)?;
        // Running key sum at each token, plus the reference's epsilon on every feature.
        let running = (k.cumsum(1)?.broadcast_add(&ksum.unsqueeze(1)?)? + CAUSAL_EPS as f64)?;
        let den = (q * running)?.sum_keepdim(D::Minus1)?;
        outs.push(num.broadcast_div(&den)?);
        context = (context + k.t()?.matmul(&vv)?)?;
        ksum = (ksum + k.sum(1)?)?;
    }
    let heads = phi_q.dim(0)?;
    let out = if outs.is_empty() { Tensor::zeros((heads, 0, v.dim(2)?), DType::F32, &Device::Cpu)? } else { Tensor::cat(&outs, 1)? };
    Ok((out, context, ksum))
}

/// Rows of one head per parallel task of [`key_stabilizer`].
const TASK_ROWS: usize = 4096;
/// Rows per step of the fused passes: a step's `w·x'` and features (`STEP_ROWS × m` each) stay
/// in cache while its rows stream through.
const STEP_ROWS: usize = 256;

/// The (head, rows) tasks of a `[heads, n, _]` tensor: `task_rows` rows of one head each, in
/// head-major order.
fn tasks(heads: usize, n: usize, task_rows: usize) -> Vec<(usize, Range<usize>)> {
    let task_rows = task_rows.max(1);
    (0..heads).flat_map(|h| (0..n).step_by(task_rows).map(move |s| (h, s..(s + task_rows).min(n)))).collect()
}

/// A task's rows in steps of [`STEP_ROWS`].
fn steps(rows: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = rows.end;
    rows.step_by(STEP_ROWS).map(move |s| s..(s + STEP_ROWS).min(end))
}

/// The rows of a contiguous `[heads, n, width]` tensor's elements.
struct HeadRows<'a> {
    data: &'a [f32],
    n: usize,
    width: usize,
}

impl HeadRows<'_> {
    fn rows(&self, head: usize, rows: Range<usize>) -> &[f32] {
        &self.data[(head * self.n + rows.start) * self.width..(head * self.n + rows.end) * self.width]
    }
}

/// Which stabiliser a step's features take.
#[derive(Clone, Copy)]
enum Stabiliser {
    /// The keys': one for the head.
    Shared(f32),
    /// The queries': each row's own maximum of `w·q'`.
    PerRow,
}

/// A task's buffers for one step at a time, reused from step to step.
#[derive(Default)]
struct Scratch {
    /// `w·x'` of the step's rows, `[rows, m]`.
    dash: Vec<f32>,
    /// Their features, `[rows, m]`.
    phi: Vec<f32>,
    /// `|x'|²/2` of each row.
    diag: Vec<f32>,
    /// The queries' per-row stabilisers.
    stab: Vec<f32>,
}

/// The projection as the fused passes use it: `w · d^-1/4` (`[m, d]`, row-major).
/// `features` and `d` are never 0 (`scaled` refuses them), so rows chunk by either.
struct Projection {
    scaled: Vec<f32>,
    features: usize,
    d: usize,
}

impl Projection {
    fn scaled(proj: &Tensor, d: usize, op: &'static str) -> Result<Self> {
        let (features, proj_d) = proj.dims2()?;
        if proj_d != d || features == 0 || d == 0 {
            return Err(shape_err(op, format!("a projection [{features}, {proj_d}] for head width {d}: it needs features, and the heads' width")));
        }
        let scale = (d as f32).powf(-0.25);
        let scaled = with_f32(&proj.contiguous()?, op, |w| w.iter().map(|x| x * scale).collect())?;
        Ok(Projection { scaled, features, d })
    }

    /// `w·x'` of the rows of `x` (`[rows, d]`), into the scratch (`[rows, m]`).
    fn dash<'s>(&self, s: &'s mut Scratch, x: &[f32]) -> &'s [f32] {
        let (m, d) = (self.features, self.d);
        let rows = x.len().checked_div(d).unwrap_or(0);
        s.dash.resize(rows * m, 0.0);
        // SAFETY: `dash` is rows × m row-major, `x` rows × d row-major, and the scaled
        // projection (m × d row-major), read as the d × m matrix wᵀ, has columns d apart.
        unsafe { gemm_into(rows, m, d, (s.dash.as_mut_ptr(), 1, m as isize), false, (x.as_ptr(), 1, d as isize), (self.scaled.as_ptr(), d as isize, 1), gemm::Parallelism::None) }
        &s.dash
    }

    /// The features of the rows of `x` (`[rows, d]`), into the scratch (`[rows, m]`).
    fn features<'s>(&self, s: &'s mut Scratch, x: &[f32], stabiliser: Stabiliser) -> &'s [f32] {
        let (m, d) = (self.features, self.d);
        let rows = x.len().checked_div(d).unwrap_or(0);
        self.dash(s, x);
        let half_sq = 0.5 / (d as f32).sqrt();
        s.diag.clear();
        s.diag.extend(x.chunks_exact(d).map(|row| half_sq * dot(row, row)));
        s.stab.clear();
        let rows_per_stab = match stabiliser {
            Stabiliser::Shared(c) => {
                s.stab.push(c);
                rows.max(1)
            }
            Stabiliser::PerRow => {
                s.stab.extend(s.dash.chunks_exact(m).map(row_max));
                1
            }
        };
        s.phi.resize(rows * m, 0.0);
        let shape = FeatureShape { m, ratio: (m as f64).powf(-0.5) as f32, rows_per_stab };
        // SAFETY: MaybeUninit<f32> has f32's layout, and `feature_rows` writes only initialised values.
        let out = unsafe { &mut *(s.phi.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>]) };
        feature_rows(out, &s.dash, 0, &s.diag, &s.stab, shape);
        &s.phi
    }
}

/// Naive FAVOR+ over a whole sequence, written out token by token in f64: the reference.
pub fn reference(q: &[Vec<Vec<f32>>], k: &[Vec<Vec<f32>>], v: &[Vec<Vec<f32>>], proj: &[Vec<f32>], causal: bool) -> Vec<Vec<Vec<f32>>> {
    let d = q[0].first().map_or(1, |r| r.len());
    let m = proj.len();
    let norm = (d as f64).powf(-0.25);
    let dash = |x: &[f32]| -> Vec<f64> { proj.iter().map(|w| w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64 * norm).sum()).collect() };
    let half_sq = |x: &[f32]| -> f64 { x.iter().map(|a| (*a as f64 * norm).powi(2)).sum::<f64>() / 2.0 };
    let ratio = (m as f64).powf(-0.5);
    let mut out = Vec::new();
    for h in 0..q.len() {
        let kd: Vec<Vec<f64>> = k[h].iter().map(|x| dash(x)).collect();
        let kmax = kd.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
        let phik: Vec<Vec<f64>> = kd.iter().zip(&k[h]).map(|(row, x)| row.iter().map(|a| ratio * ((a - half_sq(x) - kmax).exp() + 1e-4)).collect()).collect();
        let mut rows = Vec::new();
        for (i, x) in q[h].iter().enumerate() {
            let qd = dash(x);
            let qmax = qd.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let phiq: Vec<f64> = qd.iter().map(|a| ratio * ((a - half_sq(x) - qmax).exp() + 1e-4)).collect();
            let keys = if causal { 0..=i } else { 0..=k[h].len() - 1 };
            let weight = |j: usize| phiq.iter().zip(&phik[j]).map(|(a, b)| a * b).sum::<f64>();
            let den: f64 = if causal {
                // Σ_f phiq_f (Σ_j phik_jf + eps)
                keys.clone().map(weight).sum::<f64>() + 1e-6 * phiq.iter().sum::<f64>()
            } else {
                keys.clone().map(weight).sum()
            };
            let dv = v[h][0].len();
            rows.push((0..dv).map(|c| (keys.clone().map(|j| weight(j) * v[h][j][c] as f64).sum::<f64>() / den) as f32).collect());
        }
        out.push(rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn run_on(threads: usize, f: impl FnOnce() -> Tensor + Send) -> Tensor {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    #[test]
    fn fused_passes_match_the_reference_across_tasks_and_steps_on_any_thread_count() {
        // 700 rows: tasks of 300 rows take a full step of 256 and a partial one, and end in a
        // partial task; one-row tasks are all edges.
        let (heads, n, d, dv, m) = (2, 700, 8, 5, 12);
        let dev = Device::Cpu;
        let (q, k, v) = (
            Tensor::randn(0f32, 1.0, (heads, n, d), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (heads, n, d), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (heads, n, dv), &dev).unwrap(),
        );
        let proj = orthogonal_projection(m, d, 7).unwrap();
        let want = Tensor::new(reference(&q.to_vec3().unwrap(), &k.to_vec3().unwrap(), &v.to_vec3().unwrap(), &proj.to_vec2().unwrap(), false), &dev).unwrap();
        // The stabiliser is the maximum of the whole shard's w·k'.
        let dash_max = dash(&k, &proj).unwrap().max_keepdim(2).unwrap().max_keepdim(1).unwrap().flatten_all().unwrap();
        let stab = key_stabilizer(&k, &proj).unwrap();
        let diff = (&stab - &dash_max).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "stabiliser off by {diff}");
        for task_rows in [1, 300, 4096] {
            let fused = || {
                let stab = key_stabilizer(&k, &proj).unwrap();
                let (context, ksum) = key_state(&k, &v, &proj, &stab, task_rows).unwrap();
                bidirectional(&q, &proj, &context, &ksum, task_rows).unwrap()
            };
            let one = run_on(1, fused);
            assert_eq!(one.dims(), &[heads, n, dv]);
            let diff = (&one - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "tasks of {task_rows} rows: {diff} from the reference");
            let three = run_on(3, fused);
            assert_eq!(
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                three.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "tasks of {task_rows} rows on 1 and 3 threads"
            );
        }
    }

    #[test]
    fn fused_passes_take_empty_shards_and_refuse_mismatched_shapes() {
        let dev = Device::Cpu;
        let proj = orthogonal_projection(4, 3, 1).unwrap();
        let empty = Tensor::zeros((2, 0, 3), candle_core::DType::F32, &dev).unwrap();
        let stab = key_stabilizer(&empty, &proj).unwrap();
        assert_eq!(stab.to_vec1::<f32>().unwrap(), vec![f32::NEG_INFINITY; 2]);
        let (context, ksum) = key_state(&empty, &empty, &proj, &stab, 8).unwrap();
        assert_eq!((context.dims(), ksum.dims()), (&[2, 4, 3][..], &[2, 4][..]));
        assert_eq!(context.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(bidirectional(&empty, &proj, &context, &ksum, 8).unwrap().dims(), &[2, 0, 3]);
        let wide = Tensor::zeros((2, 5, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(key_stabilizer(&wide, &proj).is_err());
        let featureless = Tensor::zeros((0, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(key_stabilizer(&empty, &featureless).is_err());
        assert!(key_state(&empty, &wide, &proj, &stab, 8).is_err());
        assert!(bidirectional(&empty, &proj, &context.narrow(1, 0, 3).unwrap(), &ksum, 8).is_err());
    }
}
