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

use candle_core::{DType, Device, Tensor, D};

use crate::error::{shape_err, Result};
use crate::rng::SplitMix64;

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

/// `w·x'` and `|x'|²/2` for `x` (`[heads, n, d]`) under `proj` (`[m, d]`).
fn projections(x: &Tensor, proj: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    let normalizer = (d as f64).powf(-0.25);
    let xs = (x * normalizer)?;
    let dash = xs.broadcast_matmul(&proj.t()?)?;
    let diag = (xs.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?;
    Ok((dash, diag))
}

/// The keys' stabiliser of one shard: per head, the maximum of `w·k'` over its keys and features
/// (`[heads]`; `-inf` for no keys). The global stabiliser is the maximum over shards.
pub fn key_stabilizer(k: &Tensor, proj: &Tensor) -> Result<Tensor> {
    let (heads, n, _) = k.dims3()?;
    if n == 0 {
        return Ok(Tensor::full(f32::NEG_INFINITY, heads, &Device::Cpu)?);
    }
    let (dash, _) = projections(k, proj)?;
    Ok(dash.max(D::Minus1)?.max(D::Minus1)?)
}

/// Query features `[heads, n, m]` (each row stabilised by its own maximum).
pub fn query_features(q: &Tensor, proj: &Tensor) -> Result<Tensor> {
    let (dash, diag) = projections(q, proj)?;
    let stab = dash.max_keepdim(D::Minus1)?;
    features(&dash, &diag, &stab, proj)
}

/// Key features `[heads, n, m]` under the (global) per-head stabiliser `[heads]`.
pub fn key_features(k: &Tensor, proj: &Tensor, stabilizer: &Tensor) -> Result<Tensor> {
    let (dash, diag) = projections(k, proj)?;
    let heads = k.dim(0)?;
    features(&dash, &diag, &stabilizer.reshape((heads, 1, 1))?, proj)
}

fn features(dash: &Tensor, diag: &Tensor, stab: &Tensor, proj: &Tensor) -> Result<Tensor> {
    let ratio = (proj.dim(0)? as f64).powf(-0.5);
    let e = dash.broadcast_sub(diag)?.broadcast_sub(stab)?.exp()?;
    Ok(((e + FEATURE_EPS as f64)? * ratio)?)
}

/// The bidirectional state of a set of keys: `(phi(K)ᵀV [heads, m, dv], Σ phi(K) [heads, m])`.
pub fn state(phi_k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((phi_k.t()?.matmul(v)?, phi_k.sum(1)?))
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
