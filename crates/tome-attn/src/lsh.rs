//! Reformer LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer"; Hugging
//! Face `LSHSelfAttention`, eval mode): the hashing, the per-chunk attention, and a naive
//! whole-sequence reference.
//!
//! Queries and keys share one projection; keys are the query vectors normalised
//! (`x · rsqrt(mean(x²) + 1e-6) / sqrt(d)`). Each of `n_hashes` rounds hashes every vector with
//! random rotations: `bucket = argmax(cat[xR, -xR])`; padding tokens get a bucket of their own.
//! Items (round, token) are stably sorted by `(round · buckets + bucket, position)` and cut into
//! chunks of `chunk_len`; a chunk's queries attend to the keys of chunks `c - before ..= c +
//! after` of that sorted sequence, wrapping around (across rounds, as the reference's
//! concatenation does). A token attending to itself scores `-1e5`, a padding key `-1e9`. Each
//! round yields (output, lse); rounds are merged by log-sum-exp.

use candle_core::Tensor;

use crate::error::{shape_err, Result};
use crate::simd::{self, Plain};

/// Score of a query with its own key.
pub const SELF_SCORE: f32 = -1e5;
/// Score of a padding key.
pub const PAD_SCORE: f32 = -1e9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LshSpec {
    pub n_hashes: usize,
    /// Buckets per round (even).
    pub n_buckets: usize,
    pub chunk_len: usize,
    pub chunks_before: usize,
    pub chunks_after: usize,
}

impl LshSpec {
    pub fn check(&self, len: usize) -> Result<()> {
        if self.n_hashes == 0 || self.n_buckets < 2 || !self.n_buckets.is_multiple_of(2) || self.chunk_len == 0 {
            return Err(shape_err("lsh", format!("{self:?}: hashes and chunk length must be positive, buckets even and at least 2")));
        }
        if !len.is_multiple_of(self.chunk_len) {
            return Err(shape_err("lsh", format!("{len} tokens are not a multiple of the chunk length {}: pad the sequence", self.chunk_len)));
        }
        Ok(())
    }

    /// Buckets per round including the padding bucket (when there is padding).
    pub fn buckets_with_padding(&self, padded: bool) -> usize {
        self.n_buckets + usize::from(padded)
    }
}

/// Random rotations `[heads, head_dim, n_hashes, n_buckets / 2]` from tome's seeded Gaussian
/// generator, for checkpoints that do not carry their own.
pub fn seeded_rotations(heads: usize, head_dim: usize, spec: &LshSpec, seed: u64) -> Result<Tensor> {
    let len = heads * head_dim * spec.n_hashes * (spec.n_buckets / 2);
    let mut rng = crate::rng::SplitMix64::new(seed);
    let data: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(data, (heads, head_dim, spec.n_hashes, spec.n_buckets / 2), &candle_core::Device::Cpu)?)
}

/// The bucket of every vector: `qk` is `[heads, n, d]`, `rotations` `[heads, d, n_hashes,
/// n_buckets / 2]`. Returns `[head][round][token]`; invalid tokens get bucket `n_buckets`.
pub fn buckets(qk: &Tensor, rotations: &Tensor, valid: &[bool], spec: &LshSpec) -> Result<Vec<Vec<Vec<usize>>>> {
    let (heads, n, d) = qk.dims3()?;
    let half = spec.n_buckets / 2;
    if rotations.dims() != [heads, d, spec.n_hashes, half] {
        return Err(shape_err("lsh", format!("rotations must be {:?}, got {:?}", [heads, d, spec.n_hashes, half], rotations.dims())));
    }
    let mut out = vec![vec![vec![0; n]; spec.n_hashes]; heads];
    if n == 0 {
        return Ok(out);
    }
    // Row (h, t) of the rotations holds every round's `half` projections.
    let rotated = qk.matmul(&rotations.reshape((heads, d, spec.n_hashes * half))?)?.flatten_all()?.to_vec1::<f32>()?;
    let row_len = spec.n_hashes * half;
    for (h, per_head) in out.iter_mut().enumerate() {
        for (round, per_round) in per_head.iter_mut().enumerate() {
            for (t, bucket) in per_round.iter_mut().enumerate() {
                if !valid[t] {
                    *bucket = spec.n_buckets;
                    continue;
                }
                let at = (h * n + t) * row_len + round * half;
                let row = &rotated[at..at + half];
                // argmax over [row, -row], first maximum wins.
                let (mut best, mut arg) = (f32::NEG_INFINITY, 0);
                for (i, x) in row.iter().copied().chain(row.iter().map(|x| -x)).enumerate() {
                    if x > best {
                        best = x;
                        arg = i;
                    }
                }
                *bucket = arg;
            }
        }
    }
    Ok(out)
}

/// A key from a shared query-key vector: `x · rsqrt(mean(x²) + 1e-6) / sqrt(d)`.
pub fn normalize_key(x: &[f32]) -> Vec<f32> {
    let mut key = vec![0.0; x.len()];
    normalize_key_into(x, &mut key);
    key
}

/// [`normalize_key`] written into `key` (as long as `x`).
pub fn normalize_key_into(x: &[f32], key: &mut [f32]) {
    let var = x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (var + 1e-6).sqrt() / (x.len() as f32).sqrt();
    key.iter_mut().zip(x).for_each(|(k, a)| *k = a * inv);
}

/// One query's attention over listed keys with Reformer's masks: `(output, lse)`.
/// Keys are `(token, valid, key row, value row)`.
pub fn attend(query_token: i64, q: &[f32], keys: &[(i64, bool, &[f32], &[f32])], out: &mut [f32]) -> f32 {
    let scores: Vec<f32> = keys
        .iter()
        .map(|&(tok, valid, k, _)| {
            if tok == query_token {
                SELF_SCORE
            } else if !valid {
                PAD_SCORE
            } else {
                q.iter().zip(k).map(|(a, b)| a * b).sum()
            }
        })
        .collect();
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = scores.iter().map(|s| (s - m).exp()).sum();
    let lse = m + z.ln();
    out.fill(0.0);
    for (s, &(_, _, _, v)) in scores.iter().zip(keys) {
        let w = (s - lse).exp();
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
    lse
}

/// Chunks of queries attending to their key windows, batched on matrix products (the kernel the
/// plan runs; [`attend`] is its scalar reference). `q`: `[chunks, L, d]` query-key vectors;
/// `k`: `[chunks, W, d]` normalised keys; `v`: `[chunks, W, dv]`; `q_tok` (`chunks·L`) and
/// `k_tok`, `k_valid` (`chunks·W`) the tokens' positions and validity. Returns the outputs
/// `[chunks, L, dv]` and each query's lse, with Reformer's self and padding scores.
pub fn chunk_attention(q: &Tensor, k: &Tensor, v: &Tensor, q_tok: &[i64], k_tok: &[i64], k_valid: &[bool]) -> Result<(Tensor, Vec<f32>)> {
    let (chunks, l, _) = q.dims3()?;
    let w = k.dim(1)?;
    if chunks == 0 || l == 0 || w == 0 {
        return Ok((Tensor::zeros((chunks, l, v.dim(2)?), candle_core::DType::F32, &candle_core::Device::Cpu)?, vec![f32::NEG_INFINITY; chunks * l]));
    }
    if q_tok.len() != chunks * l || k_tok.len() != chunks * w || k_valid.len() != chunks * w {
        return Err(shape_err("lsh::chunk_attention", format!("{chunks} chunks of {l} queries and {w} keys, but {} / {} / {} tokens", q_tok.len(), k_tok.len(), k_valid.len())));
    }
    let mut scores = q.matmul(&k.transpose(1, 2)?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut lse = vec![0f32; chunks * l];
    for (row, (scores, lse)) in scores.chunks_exact_mut(w).zip(lse.iter_mut()).enumerate() {
        let (c, qt) = (row / l, q_tok[row]);
        let (toks, valid) = (&k_tok[c * w..(c + 1) * w], &k_valid[c * w..(c + 1) * w]);
        for ((s, &t), &ok) in scores.iter_mut().zip(toks).zip(valid) {
            if t == qt {
                *s = SELF_SCORE;
            } else if !ok {
                *s = PAD_SCORE;
            }
        }
        *lse = softmax_row(scores);
    }
    let probs = Tensor::from_vec(scores, (chunks, l, w), &candle_core::Device::Cpu)?;
    Ok((probs.matmul(v)?, lse))
}

/// A row of scores replaced by its softmax weights `e^(s - m) / z` (one exp per score); returns
/// its log-sum-exp `m + ln z`. On the widest vectors the CPU has, with the same arithmetic on
/// every path (the attention kernels' polynomial exp, no fused multiply-adds), so every machine
/// computes the same weights.
fn softmax_row(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reported AVX-512F.
            return unsafe { softmax_row_avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU reported AVX2.
            return unsafe { softmax_row_avx2(row) };
        }
    }
    softmax_row_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_row_avx512(row: &mut [f32]) -> f32 {
    softmax_row_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_row_avx2(row: &mut [f32]) -> f32 {
    softmax_row_portable(row)
}

/// Inlined into each `target_feature` caller, where the row loops become vector code.
#[inline(always)]
fn softmax_row_portable(row: &mut [f32]) -> f32 {
    let m = simd::row_max(row);
    let z = simd::exp_shift_sum_scalar::<Plain>(row, m);
    simd::scale_row(row, 1.0 / z);
    m + z.ln()
}

/// Naive LSH attention over a whole sequence: `qk`, `v` as `[heads][n][d]`, buckets from
/// [`buckets`]. Returns `[heads][n][dv]`.
pub fn reference(qk: &[Vec<Vec<f32>>], v: &[Vec<Vec<f32>>], valid: &[bool], buckets: &[Vec<Vec<usize>>], spec: &LshSpec) -> Vec<Vec<Vec<f32>>> {
    let n = valid.len();
    let nb = spec.buckets_with_padding(valid.contains(&false));
    let keys: Vec<Vec<Vec<f32>>> = qk.iter().map(|head| head.iter().map(|x| normalize_key(x)).collect()).collect();
    let mut out = Vec::new();
    for h in 0..qk.len() {
        // Sorted items (round, token).
        let mut items: Vec<(usize, usize)> = (0..spec.n_hashes).flat_map(|r| (0..n).map(move |t| (r, t))).collect();
        items.sort_by_key(|&(r, t)| (r * nb + buckets[h][r][t], t));
        let total_chunks = items.len() / spec.chunk_len;
        let dv = v[h].first().map_or(0, |x| x.len());
        let mut partials = vec![Vec::new(); n]; // per token: (lse, out) per round
        for c in 0..total_chunks {
            let key_items: Vec<(usize, usize)> = (0..=spec.chunks_before + spec.chunks_after)
                .flat_map(|o| {
                    let kc = (c + total_chunks * (spec.chunks_before + 1) + o - spec.chunks_before) % total_chunks;
                    items[kc * spec.chunk_len..(kc + 1) * spec.chunk_len].to_vec()
                })
                .collect();
            let key_rows: Vec<(i64, bool, &[f32], &[f32])> = key_items.iter().map(|&(_, t)| (t as i64, valid[t], &keys[h][t][..], &v[h][t][..])).collect();
            for &(_, t) in &items[c * spec.chunk_len..(c + 1) * spec.chunk_len] {
                let mut o = vec![0f32; dv];
                let lse = attend(t as i64, &qk[h][t], &key_rows, &mut o);
                partials[t].push((lse, o));
            }
        }
        out.push(
            partials
                .into_iter()
                .map(|rounds| {
                    let m = rounds.iter().map(|r| r.0).fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = rounds.iter().map(|r| (r.0 - m).exp()).sum();
                    let mut o = vec![0f32; dv];
                    for (lse, x) in &rounds {
                        let w = (lse - m).exp() / z;
                        o.iter_mut().zip(x).for_each(|(a, b)| *a += w * b);
                    }
                    o
                })
                .collect(),
        );
    }
    out
}
