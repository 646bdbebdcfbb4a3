//! Naive O(n²) attention, written as plainly as possible, for tests to compare kernels against.
//!
//! It materialises every score, masks with [`Mask::allows`] and takes the softmax in f64.

use candle_core::Tensor;

use crate::error::Result;
use crate::mask::Mask;
use crate::partial::Partial;
use crate::tensor::{dims3, with_f32};

/// The reference for [`crate::attention`]: same arguments, same result up to rounding.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Result<Partial> {
    let (hq, nq, d) = dims3(q, "reference", "q")?;
    let (hk, nk, _) = dims3(k, "reference", "k")?;
    let (_, _, dv) = dims3(v, "reference", "v")?;
    let q = with_f32(q, "reference", |s| s.to_vec())?;
    let k = with_f32(k, "reference", |s| s.to_vec())?;
    let v = with_f32(v, "reference", |s| s.to_vec())?;
    let mut out = vec![0f32; hq * nq * dv];
    let mut lse = vec![f32::NEG_INFINITY; hq * nq];
    for h in 0..hq {
        let kvh = h / (hq / hk);
        for i in 0..nq {
            let mut scores = vec![f64::NEG_INFINITY; nk];
            for (j, score) in scores.iter_mut().enumerate() {
                if mask.allows(i, j) {
                    let mut dot = 0f64;
                    for t in 0..d {
                        dot += q[(h * nq + i) * d + t] as f64 * k[(kvh * nk + j) * d + t] as f64;
                    }
                    *score = dot * scale as f64;
                }
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue;
            }
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..dv {
                let mut acc = 0f64;
                for (j, w) in weights.iter().enumerate() {
                    acc += w * v[(kvh * nk + j) * dv + c] as f64;
                }
                out[(h * nq + i) * dv + c] = (acc / total) as f32;
            }
            lse[h * nq + i] = (max + total.ln()) as f32;
        }
    }
    Partial::from_vecs(out, lse, hq, nq, dv)
}
