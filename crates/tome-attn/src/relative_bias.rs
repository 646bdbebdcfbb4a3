//! T5-style attention with a learned relative position bias (Raffel et al. 2020, "Exploring
//! the Limits of Transfer Learning with a Unified Text-to-Text Transformer"; used unchanged by
//! Switch Transformers, Fedus et al. 2021; Hugging Face `T5Attention` /
//! `SwitchTransformersAttention`).
//!
//! Scores are `q·k + bias[bucket(j - i), h]` — no 1/sqrt(d) scaling — where the bucket of a
//! distance is exact for small distances and logarithmic up to `max_distance`, beyond which all
//! distances share the last bucket of their direction. The bias depends only on positions, so a
//! block of keys from any rank is scored exactly as one rank would.

use candle_core::{Device, Tensor};

use crate::error::{shape_err, Result};
use crate::partial::Partial;
use crate::tensor::dims3;

/// Query rows scored at once (bounds the `[heads, rows, keys]` score tile).
const ROWS: usize = 128;

/// The relative-position buckets and their learned bias.
#[derive(Clone, Debug)]
pub struct RelativeBias {
    /// `[num_buckets, heads]` (`relative_attention_bias.weight`).
    pub table: Vec<Vec<f32>>,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl RelativeBias {
    /// The bucket of `key - query` (`T5Attention._relative_position_bucket`), in the same f32
    /// arithmetic so that distances at a bucket boundary land where the reference puts them.
    pub fn bucket(&self, relative: i64) -> usize {
        let mut buckets = self.num_buckets;
        let mut ret = 0;
        let n = if self.bidirectional {
            buckets /= 2;
            if relative > 0 {
                ret += buckets;
            }
            relative.unsigned_abs() as usize
        } else {
            (-relative).max(0) as usize
        };
        let max_exact = buckets / 2;
        if n < max_exact {
            return ret + n;
        }
        let log_ratio = (n as f32 / max_exact as f32).ln() / (self.max_distance as f32 / max_exact as f32).ln();
        let large = max_exact + (log_ratio * (buckets - max_exact) as f32) as usize;
        ret + large.min(buckets - 1)
    }

    /// The bias of every head for `key - query`.
    fn row(&self, relative: i64) -> &[f32] {
        &self.table[self.bucket(relative)]
    }
}

/// Attention of `q` (`[heads, nq, d]`, positions `q_pos`) over `k`, `v` (`[heads, nk, d]`,
/// positions `k_pos`, `k_valid` marking keys that may be attended to) with the relative bias.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, q_pos: &[i64], k_pos: &[i64], k_valid: &[bool], bias: &RelativeBias) -> Result<Partial> {
    const OP: &str = "relative_bias";
    let (heads, nq, d) = dims3(q, OP, "q")?;
    let (hk, nk, dk) = dims3(k, OP, "k")?;
    let (hv, nv, dv) = dims3(v, OP, "v")?;
    if hk != heads || hv != heads || nk != nv || dk != d || q_pos.len() != nq || k_pos.len() != nk || k_valid.len() != nk {
        return Err(shape_err(OP, format!("q {:?}, k {:?}, v {:?}, {} query and {} key positions do not fit together", q.dims(), k.dims(), v.dims(), q_pos.len(), k_pos.len())));
    }
    if bias.table.iter().any(|r| r.len() != heads) || bias.table.len() != bias.num_buckets {
        return Err(shape_err(OP, format!("the bias table must be [{}, {heads}]", bias.num_buckets)));
    }
    let mut out = vec![0f32; heads * nq * dv];
    let mut lse = vec![f32::NEG_INFINITY; heads * nq];
    if nq == 0 || nk == 0 {
        return Partial::from_vecs(out, lse, heads, nq, dv);
    }
    let values = v.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let kt = k.t()?.contiguous()?;
    let mut scores = vec![0f32; nk];
    for start in (0..nq).step_by(ROWS) {
        let rows = ROWS.min(nq - start);
        let qk = q.narrow(1, start, rows)?.contiguous()?.matmul(&kt)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..rows {
            let qi = start + i;
            for h in 0..heads {
                let dots = &qk[(h * rows + i) * nk..(h * rows + i + 1) * nk];
                let mut m = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = if k_valid[j] { dots[j] + bias.row(k_pos[j] - q_pos[qi])[h] } else { f32::NEG_INFINITY };
                    m = m.max(*s);
                }
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let o = &mut out[(h * nq + qi) * dv..(h * nq + qi + 1) * dv];
                let mut z = 0f32;
                for (j, s) in scores.iter().enumerate() {
                    if *s == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (s - m).exp();
                    z += w;
                    for (acc, x) in o.iter_mut().zip(&values[(h * nk + j) * dv..(h * nk + j + 1) * dv]) {
                        *acc += w * x;
                    }
                }
                o.iter_mut().for_each(|x| *x /= z);
                lse[h * nq + qi] = m + z.ln();
            }
        }
    }
    Partial::from_vecs(out, lse, heads, nq, dv)
}

/// The bias as a dense `[heads, nq, nk]` tensor (for the naive reference and tests).
pub fn dense_bias(q_pos: &[i64], k_pos: &[i64], bias: &RelativeBias, heads: usize) -> Result<Tensor> {
    let mut data = vec![0f32; heads * q_pos.len() * k_pos.len()];
    for h in 0..heads {
        for (i, &qi) in q_pos.iter().enumerate() {
            for (j, &kj) in k_pos.iter().enumerate() {
                data[(h * q_pos.len() + i) * k_pos.len() + j] = bias.row(kj - qi)[h];
            }
        }
    }
    Ok(Tensor::from_vec(data, (heads, q_pos.len(), k_pos.len()), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(num_buckets: usize, max_distance: usize) -> RelativeBias {
        RelativeBias { table: (0..num_buckets).map(|b| vec![b as f32]).collect(), num_buckets, max_distance, bidirectional: true }
    }

    #[test]
    fn buckets_follow_t5() {
        // Printed by transformers' T5Attention._relative_position_bucket(r, True, 8, 16) for
        // r = -20..=20, and (r, True, 32, 128) for the distances listed.
        let b = bias(8, 16);
        let got: Vec<usize> = (-20..=20).map(|r| b.bucket(r)).collect();
        let want = [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7];
        assert_eq!(got, want);
        let b = bias(32, 128);
        let r = [-1000, -200, -128, -127, -100, -64, -33, -32, -16, -9, -8, -7, -1, 0, 1, 7, 8, 9, 16, 31, 32, 64, 100, 127, 128, 129, 1000];
        let want = [15, 15, 15, 15, 15, 14, 12, 12, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 27, 28, 30, 31, 31, 31, 31, 31];
        assert_eq!(r.iter().map(|&r| b.bucket(r)).collect::<Vec<_>>(), want);
    }

    #[test]
    fn matches_softmax_of_biased_scores() {
        let dev = Device::Cpu;
        let (h, n, d) = (2, 9, 4);
        let q = Tensor::randn(0f32, 1.0, (h, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (h, n, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (h, n, d), &dev).unwrap();
        let pos: Vec<i64> = (0..n as i64).collect();
        let b = RelativeBias { table: (0..8).map(|i| vec![0.3 * i as f32, -0.2 * i as f32]).collect(), num_buckets: 8, max_distance: 6, bidirectional: true };
        let got = attention(&q, &k, &v, &pos, &pos, &vec![true; n], &b).unwrap().out;
        let scores = (q.matmul(&k.t().unwrap()).unwrap() + dense_bias(&pos, &pos, &b, h).unwrap()).unwrap();
        let want = candle_nn_softmax(&scores).matmul(&v).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    fn candle_nn_softmax(t: &Tensor) -> Tensor {
        let m = t.max_keepdim(2).unwrap();
        let e = t.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap()
    }
}
