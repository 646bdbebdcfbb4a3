//! BigBird block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
//! Sequences"; Hugging Face `BigBirdBlockSparseAttention`): the pattern, and a naive reference.
//!
//! The sequence is cut into blocks of `block` tokens (the last may be shorter: padding to a
//! multiple of the block is masked, so it changes nothing for real tokens). The first and last
//! query blocks attend to every key. Every other query block `i` attends to the key blocks
//! {first, i-1, i, i+1, last} plus `r` random blocks — a *multiset*: Hugging Face's eval plan
//! draws every random block as block 0, so block 0's keys then count 1 + r times in the softmax,
//! and tome reproduces that by attending over the listed blocks concatenated, repeats included.
//!
//! The same machinery serves Reformer's chunked local attention (Kitaev et al. 2020, Hugging
//! Face `LocalSelfAttention`): query chunk `c` attends to chunks `c - before ..= c + after`,
//! wrapping around the sequence (chunk 0 also sees the last chunk), optionally causal, with no
//! global blocks — see [`BlockSparsePlan::local`].

use crate::error::{shape_err, Result};

/// The random blocks of each (head, query block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RandomBlocks {
    /// No random blocks.
    None,
    /// `r` random blocks per query block, every one block 0 (Hugging Face's eval-mode plan).
    AllZero(usize),
    /// `r` distinct random blocks per (head, query block), outside the block's sliding and
    /// global blocks, drawn from a generator seeded with `seed` (the same on every rank).
    Seeded { r: usize, seed: u64 },
    /// Given explicitly: `[head][query_block][r]` (e.g. dumped from a reference run).
    Given(Vec<Vec<Vec<usize>>>),
}

/// The block pattern of one layer over a sequence of `len` tokens.
#[derive(Clone, Debug)]
pub struct BlockSparsePlan {
    pub block: usize,
    pub len: usize,
    pub heads: usize,
    /// Whether the first and last query blocks attend to everything (BigBird) or follow their
    /// lists like every other block (local attention).
    pub global_queries: bool,
    /// Keys after the query are invisible.
    pub causal: bool,
    /// Every head attends to the same blocks (computed once: callers ask per block).
    uniform: bool,
    /// `[head][query_block]` → the key blocks it attends to, ascending, repeats allowed;
    /// empty for the global query blocks (first and last), which attend to everything.
    lists: Vec<Vec<Vec<usize>>>,
}

/// `r` distinct blocks of `0..nb` outside `fixed` (sorted): each draw takes a uniform index into
/// the remaining candidates and swap-removes it. The candidate list is never built — only the
/// few slots the swaps moved are remembered, the rest computed from `fixed` — so a plan costs
/// O(blocks) rather than O(blocks²).
fn draw_without_replacement(mut rng: crate::rng::SplitMix64, nb: usize, fixed: &[usize], r: usize) -> Vec<usize> {
    // The j-th block not in `fixed`.
    let nth = |j: usize| fixed.iter().fold(j, |b, &f| if f <= b { b + 1 } else { b });
    let mut moved: Vec<(usize, usize)> = Vec::with_capacity(r);
    let at = |moved: &[(usize, usize)], j: usize| moved.iter().rev().find(|(k, _)| *k == j).map_or_else(|| nth(j), |&(_, b)| b);
    let mut len = nb - fixed.len();
    (0..r)
        .map(|_| {
            let pick = (rng.next_u64() % len as u64) as usize;
            let (taken, last) = (at(&moved, pick), at(&moved, len - 1));
            moved.push((pick, last));
            len -= 1;
            taken
        })
        .collect()
}

impl BlockSparsePlan {
    pub fn new(len: usize, block: usize, heads: usize, random: &RandomBlocks) -> Result<Self> {
        const OP: &str = "blocksparse";
        if block == 0 || heads == 0 {
            return Err(shape_err(OP, "block size and heads must be positive"));
        }
        let nb = len.div_ceil(block);
        let last = nb.saturating_sub(1);
        let mut lists = vec![vec![Vec::new(); nb]; heads];
        for (h, per_head) in lists.iter_mut().enumerate() {
            for (i, list) in per_head.iter_mut().enumerate() {
                if i == 0 || i == last {
                    continue;
                }
                let mut fixed = vec![0, i - 1, i, i + 1, last];
                fixed.sort_unstable();
                fixed.dedup();
                let randoms: Vec<usize> = match random {
                    RandomBlocks::None => Vec::new(),
                    RandomBlocks::AllZero(r) => vec![0; *r],
                    RandomBlocks::Given(g) => {
                        let row =
                            g.get(h).and_then(|x| x.get(i)).ok_or_else(|| shape_err(OP, format!("the given random plan has no entry for head {h}, query block {i} (of {nb})")))?;
                        if let Some(&b) = row.iter().find(|&&b| b >= nb) {
                            return Err(shape_err(OP, format!("random block {b} for head {h}, query block {i} is beyond the {nb} blocks")));
                        }
                        row.clone()
                    }
                    RandomBlocks::Seeded { r, seed } => {
                        if nb - fixed.len() < *r {
                            return Err(shape_err(OP, format!("{r} random blocks need at least {} blocks besides the sliding and global ones; the sequence has {nb}", r)));
                        }
                        let rng = crate::rng::SplitMix64::new(seed ^ ((h as u64) << 32) ^ (i as u64));
                        draw_without_replacement(rng, nb, &fixed, *r)
                    }
                };
                fixed.extend(randoms);
                fixed.sort_unstable();
                *list = fixed;
            }
        }
        let uniform = lists.iter().all(|l| l == &lists[0]);
        Ok(BlockSparsePlan { block, len, heads, global_queries: true, causal: false, uniform, lists })
    }

    /// Reformer's chunked local attention: chunk `c` sees chunks `c - before ..= c + after`
    /// modulo the number of chunks (repeats kept when the sequence has few chunks).
    pub fn local(len: usize, chunk: usize, heads: usize, before: usize, after: usize, causal: bool) -> Result<Self> {
        if chunk == 0 || heads == 0 {
            return Err(shape_err("local", "chunk length and heads must be positive"));
        }
        let nb = len.div_ceil(chunk);
        let lists: Vec<Vec<usize>> = (0..nb)
            .map(|c| {
                let mut l: Vec<usize> = (0..=before + after).map(|o| (c + nb * (before + 1) + o - before) % nb).collect();
                l.sort_unstable();
                l
            })
            .collect();
        Ok(BlockSparsePlan { block: chunk, len, heads, global_queries: false, causal, uniform: true, lists: vec![lists; heads] })
    }

    pub fn num_blocks(&self) -> usize {
        self.len.div_ceil(self.block)
    }

    /// The first and last blocks' queries attend to every key.
    pub fn is_global_query_block(&self, qb: usize) -> bool {
        self.global_queries && (qb == 0 || qb + 1 == self.num_blocks())
    }

    /// Key blocks of a non-global query block, ascending, repeats allowed.
    pub fn key_blocks(&self, head: usize, qb: usize) -> &[usize] {
        &self.lists[head][qb]
    }

    /// Whether every head attends to the same blocks (then heads are computed together).
    pub fn uniform_across_heads(&self) -> bool {
        self.uniform
    }

    /// Token positions of block `b`.
    pub fn block_range(&self, b: usize) -> std::ops::Range<usize> {
        b * self.block..((b + 1) * self.block).min(self.len)
    }

    /// The key positions query position `i` of head `h` attends to, repeats included.
    pub fn keys_of(&self, h: usize, i: usize) -> Vec<usize> {
        let qb = i / self.block;
        if self.is_global_query_block(qb) {
            return (0..self.len).collect();
        }
        self.key_blocks(h, qb).iter().flat_map(|&b| self.block_range(b)).filter(|&j| !self.causal || j <= i).collect()
    }
}

/// Naive block-sparse attention over the whole sequence: `q`, `k`, `v` as `[heads][len][d]`,
/// returns `[heads][len][dv]` (rows that see no valid key are 0).
pub fn reference(q: &[Vec<Vec<f32>>], k: &[Vec<Vec<f32>>], v: &[Vec<Vec<f32>>], valid: &[bool], plan: &BlockSparsePlan, scale: f32) -> Vec<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(q.len());
    for h in 0..q.len() {
        let mut rows = Vec::with_capacity(plan.len);
        for (i, q_row) in q[h].iter().enumerate().take(plan.len) {
            let keys: Vec<usize> = plan.keys_of(h, i).into_iter().filter(|&j| valid[j]).collect();
            let dv = v[h].first().map_or(0, |r| r.len());
            if keys.is_empty() {
                rows.push(vec![0.0; dv]);
                continue;
            }
            let scores: Vec<f64> = keys.iter().map(|&j| scale as f64 * q_row.iter().zip(&k[h][j]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            rows.push((0..dv).map(|c| (keys.iter().zip(&e).map(|(&j, w)| w * v[h][j][c] as f64).sum::<f64>() / z) as f32).collect());
        }
        out.push(rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawing_without_the_candidate_list_draws_as_swap_removing_from_it() {
        for (nb, fixed, r) in [(40, vec![0, 4, 5, 6, 39], 3), (9, vec![0, 1, 2, 8], 5), (1000, vec![0, 500, 501, 502, 999], 7)] {
            for seed in 0..20u64 {
                let mut rng = crate::rng::SplitMix64::new(seed);
                let mut pool: Vec<usize> = (0..nb).filter(|b| !fixed.contains(b)).collect();
                let want: Vec<usize> = (0..r)
                    .map(|_| {
                        let at = (rng.next_u64() % pool.len() as u64) as usize;
                        pool.swap_remove(at)
                    })
                    .collect();
                assert_eq!(draw_without_replacement(crate::rng::SplitMix64::new(seed), nb, &fixed, r), want, "nb={nb} seed={seed}");
            }
        }
    }

    #[test]
    fn plans() {
        let p = BlockSparsePlan::new(70, 10, 2, &RandomBlocks::AllZero(2)).unwrap();
        assert_eq!(p.num_blocks(), 7);
        assert!(p.is_global_query_block(0) && p.is_global_query_block(6));
        assert_eq!(p.key_blocks(0, 1), &[0, 0, 0, 1, 2, 6]);
        assert_eq!(p.key_blocks(1, 3), &[0, 0, 0, 2, 3, 4, 6]);
        let s = BlockSparsePlan::new(200, 10, 3, &RandomBlocks::Seeded { r: 3, seed: 7 }).unwrap();
        for h in 0..3 {
            for qb in 1..19 {
                let l = s.key_blocks(h, qb);
                assert_eq!(l.len(), 8 - usize::from(qb == 1 || qb == 18));
                let mut d = l.to_vec();
                d.dedup();
                assert_eq!(d.len(), l.len(), "seeded random blocks are distinct from the fixed ones");
            }
        }
        assert!(!s.uniform_across_heads());
        assert!(BlockSparsePlan::new(40, 10, 1, &RandomBlocks::Seeded { r: 3, seed: 1 }).is_err());
        assert!(BlockSparsePlan::new(40, 10, 1, &RandomBlocks::Given(vec![vec![vec![9]; 4]])).is_err());
        let l = BlockSparsePlan::local(40, 10, 1, 1, 0, false).unwrap();
        assert_eq!(l.key_blocks(0, 0), &[0, 3], "chunk 0 looks back to the last chunk");
        assert_eq!(l.key_blocks(0, 2), &[1, 2]);
        assert!(!l.is_global_query_block(0));
        let one = BlockSparsePlan::local(8, 10, 1, 1, 1, false).unwrap();
        assert_eq!(one.key_blocks(0, 0), &[0, 0, 0], "one chunk sees itself three times, as the reference's concatenation does");
    }
}
