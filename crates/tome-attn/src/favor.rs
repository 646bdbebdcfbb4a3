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
//! The feature map is one fused pass per row block, with the exp of the attention kernels (a
//! polynomial under 2 ulp, in vector registers): as tensor ops it was five passes through memory
//! and a scalar libm call per feature, two thirds of the family's time.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::rng::SplitMix64;
use crate::simd::{exp, Plain};
use crate::tensor::with_f32;

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
/// (`[heads]`; `-inf` for no keys). The global stabiliser is the maximum over shards.
pub fn key_stabilizer(k: &Tensor, proj: &Tensor) -> Result<Tensor> {
    let (heads, n, _) = k.dims3()?;
    if n == 0 || proj.dim(0)? == 0 {
        return Ok(Tensor::full(f32::NEG_INFINITY, heads, &Device::Cpu)?);
    }
    let maxima = run_maxima(&dash(k, proj)?, n * proj.dim(0)?)?;
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

/// The bidirectional state of a set of keys: `(phi(K)ᵀV [heads, m, dv], Σ phi(K) [heads, m])`.
pub fn state(phi_k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (heads, n, m) = phi_k.dims3()?;
    // Row by row down each head (a sum over the middle dimension as a tensor op reads across
    // rows and was a fifth of the family's time).
    let ksum = with_f32(phi_k, "favor::state", |phi| {
        let mut sums = vec![0f32; heads * m];
        if n > 0 && m > 0 {
            for (sum, head) in sums.chunks_exact_mut(m).zip(phi.chunks_exact(n * m)) {
                for row in head.chunks_exact(m) {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
            }
        }
        sums
    })?;
    Ok((phi_k.t()?.matmul(v)?, Tensor::from_vec(ksum, (heads, m), &Device::Cpu)?))
}

/// Bidirectional output from query features and the (global) state.
pub fn bidirectional(phi_q: &Tensor, context: &Tensor, ksum: &Tensor) -> Result<Tensor> {
    let num = phi_q.matmul(context)?;
    let den = phi_q.matmul(&ksum.unsqueeze(D::Minus1)?)?;
    Ok(num.broadcast_div(&den)?)
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
