//! Transformer-XL relative multi-head attention for one segment (Dai et al. 2019,
//! "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context"; Hugging Face
//! `RelPartialLearnableMultiHeadAttn`), also used by the Compressive Transformer (Rae et al. 2019).
//!
//! A segment's `L` queries attend to `klen = M + L` keys — the memory (the `M` positions before
//! the segment, at this layer's input) followed by the segment itself — causally: query `i`
//! sees keys `j <= M + i`. The score is
//! `((q_i + u)·k_j + (q_i + v)·R[δ]) / sqrt(d)` with `δ = M + i - j` the distance,
//! `R[δ]` the projected sinusoid of `min(δ, clamp_len)`, and `u`, `v` the learned global content
//! and position biases (`r_w_bias`, `r_r_bias`). This is what the reference's `rel_shift` computes
//! for every unmasked entry.

use candle_core::{Device, Tensor};

use crate::error::{shape_err, Result};
use crate::partial::Partial;

/// Relative attention of one segment. `q`: `[heads, L, d]`; `k`, `v`: `[heads, M + L, d]`;
/// `r`: `[heads, R, d]` where row δ is the projected embedding of distance δ (rows beyond
/// `clamp` are never read: distances are clamped to `clamp` first); `u`, `v_bias`: `[heads, d]`.
/// With `horizon`, a query sees only keys at distance `< horizon` (Transformer-XL's
/// `same_length`, where every query sees the same number of keys: `horizon = mem_len`).
#[allow(clippy::too_many_arguments)]
pub fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, r: &Tensor, u: &Tensor, v_bias: &Tensor, clamp: usize, horizon: Option<usize>) -> Result<Partial> {
    const OP: &str = "relative";
    let (heads, l, d) = q.dims3()?;
    let (_, klen, _) = k.dims3()?;
    let dv = v.dim(2)?;
    if klen < l {
        return Err(shape_err(OP, format!("{klen} keys cannot hold a segment of {l} queries")));
    }
    let mem = klen - l;
    let rows_r = r.dim(1)?;
    let max_dist = (klen.saturating_sub(1)).min(clamp);
    if rows_r <= max_dist {
        return Err(shape_err(OP, format!("relative embeddings cover distances below {rows_r}; distance {max_dist} is needed")));
    }
    let scale = 1.0 / (d as f64).sqrt();
    let ac = q.broadcast_add(&u.unsqueeze(1)?)?.matmul(&k.t()?)?.to_vec3::<f32>()?;
    let bd = q.broadcast_add(&v_bias.unsqueeze(1)?)?.matmul(&r.t()?)?.to_vec3::<f32>()?;
    let vals = v.to_vec3::<f32>()?;
    let mut out = vec![0f32; heads * l * dv];
    let mut lse = vec![f32::NEG_INFINITY; heads * l];
    let mut scores = vec![0f32; klen];
    for h in 0..heads {
        for i in 0..l {
            // Keys first..=mem + i: causal, and within the horizon.
            let visible = mem + i + 1;
            let first = horizon.map_or(0, |w| visible.saturating_sub(w));
            for (j, s) in scores.iter_mut().enumerate().take(visible).skip(first) {
                let dist = (mem + i - j).min(clamp);
                *s = ((ac[h][i][j] + bd[h][i][dist]) as f64 * scale) as f32;
            }
            let m = scores[first..visible].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue; // a zero horizon: nothing visible
            }
            let mut z = 0f32;
            let o = &mut out[(h * l + i) * dv..(h * l + i + 1) * dv];
            for (j, s) in scores.iter().enumerate().take(visible).skip(first) {
                let w = (s - m).exp();
                z += w;
                for (acc, x) in o.iter_mut().zip(&vals[h][j]) {
                    *acc += w * x;
                }
            }
            o.iter_mut().for_each(|x| *x /= z);
            lse[h * l + i] = m + z.ln();
        }
    }
    Partial::from_vecs(out, lse, heads, l, dv)
}

/// Transformer-XL's sinusoid embedding of distances `0..n` (`[n, d_model]`, sines then cosines).
pub fn sinusoid(n: usize, d_model: usize) -> Result<Tensor> {
    let half = d_model / 2;
    let mut data = vec![0f32; n * d_model];
    for p in 0..n {
        for f in 0..half {
            let inv_freq = 1.0 / 10000f64.powf((2 * f) as f64 / d_model as f64);
            let x = p as f64 * inv_freq;
            data[p * d_model + f] = x.sin() as f32;
            data[p * d_model + half + f] = x.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(data, (n, d_model), &Device::Cpu)?)
}
