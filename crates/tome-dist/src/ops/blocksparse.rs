//! `blocksparse`: BigBird block-sparse attention across ranks (Zaheer et al. 2020).
//!
//! Each rank fetches, from their owners, exactly the key blocks its query blocks list: the
//! sliding neighbours (a halo), the first and last blocks (global keys, which every rank
//! fetches: an all-gather of those blocks), and the random blocks (a targeted fetch by block
//! index). The first and last query blocks see every key: they are global queries, merged over
//! ranks as (output, lse). Shards may cut blocks anywhere.
//!
//! Reformer's chunked local attention is the same plan with other lists
//! ([`BlockSparsePlan::local`]): the look-back and look-ahead chunks are a halo that wraps
//! around from the last rank to the first.

use candle_core::Tensor;
use rayon::prelude::*;
use tome_attn::blocksparse::BlockSparsePlan;
use tome_attn::{attention, Mask};

use super::exchange::gather_needed;
use super::global::{global_queries, overwrite_rows};
use super::keys::{select_rows, KeyBlock};
use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

/// This rank's output rows of block-sparse attention under `pattern` (built for the whole
/// sequence, the same on every rank).
pub fn blocksparse_attention(group: &dyn Group, plan: &ShardPlan, q: &Tensor, own: KeyBlock, pattern: &BlockSparsePlan, scale: f32) -> Result<Tensor> {
    let (heads, n, _) = q.dims3()?;
    let dv = own.v.dim(2)?;
    if pattern.len != plan.len() || pattern.heads != heads {
        return Err(DistError::Plan(format!(
            "the block pattern covers {} tokens and {} heads; the shard plan {} tokens, the queries {heads} heads",
            pattern.len,
            pattern.heads,
            plan.len()
        )));
    }
    let query_blocks = |r: usize| -> Vec<usize> {
        let mut b: Vec<usize> = plan.positions(r).iter().map(|&p| p as usize / pattern.block).collect();
        b.dedup();
        b
    };
    let needs = |r: usize| {
        query_blocks(r)
            .into_iter()
            .filter(|&qb| !pattern.is_global_query_block(qb))
            .flat_map(|qb| (0..pattern.heads).flat_map(move |h| pattern.key_blocks(h, qb).iter().map(|&b| pattern.block_range(b))))
            .collect()
    };
    let keys = gather_needed(group, plan, &own, &needs)?;
    let q_pos = own.pos.clone();
    // Where each block's rows sit among the gathered keys (one pass; lookups are then O(1)).
    let mut block_rows_at: Vec<std::ops::Range<usize>> = vec![0..0; pattern.num_blocks()];
    if let Some(keys) = &keys {
        let mut i = 0;
        while i < keys.len() {
            let b = keys.pos[i] as usize / pattern.block;
            let j = i + keys.pos[i..].iter().take_while(|&&p| p as usize / pattern.block == b).count();
            block_rows_at[b] = i..j;
            i = j;
        }
    }

    // Per-head key tensors, split once (heads attend to different random blocks).
    let per_head: Vec<(Tensor, Tensor)> = match (&keys, pattern.uniform_across_heads()) {
        (Some(keys), false) => (0..heads).map(|h| Ok((keys.k.narrow(0, h, 1)?.contiguous()?, keys.v.narrow(0, h, 1)?.contiguous()?))).collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    // Query blocks (runs of this shard's rows in one block), computed in parallel: each is a
    // small attention call, too small to parallelise well inside.
    let mut runs = Vec::new();
    let mut start = 0;
    while start < n {
        let qb = q_pos[start] as usize / pattern.block;
        let end = start + q_pos[start..].iter().take_while(|&&p| p as usize / pattern.block == qb).count();
        runs.push((qb, start..end));
        start = end;
    }
    let global_rows: Vec<usize> = runs.iter().filter(|(qb, _)| pattern.is_global_query_block(*qb)).flat_map(|(_, r)| r.clone()).collect();
    let local: Vec<(std::ops::Range<usize>, Vec<f32>)> = match &keys {
        None => Vec::new(),
        Some(keys) => runs
            .par_iter()
            .filter(|(qb, _)| !pattern.is_global_query_block(*qb))
            .map(|(qb, rows)| Ok((rows.clone(), block_rows(q, &q_pos, rows.clone(), keys, &block_rows_at, &per_head, pattern, *qb, scale)?.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<_>>()?,
    };
    let mut out = vec![0f32; heads * n * dv];
    for (rows, values) in local {
        let len = rows.len() * dv;
        for h in 0..heads {
            out[(h * n + rows.start) * dv..(h * n + rows.start) * dv + len].copy_from_slice(&values[h * len..(h + 1) * len]);
        }
    }
    let out = Tensor::from_vec(out, (heads, n, dv), &candle_core::Device::Cpu)?;
    if !pattern.global_queries {
        return Ok(out);
    }
    // Global query blocks: every rank takes part, whether or not it owns one.
    let (gpos, merged) = global_queries(group, q, &q_pos, &global_rows, &own, scale)?;
    overwrite_rows(&out, &q_pos, &global_rows, &gpos, &merged.out)
}

/// Output rows `rows` (all in query block `qb`) over the listed key blocks, repeats included.
#[allow(clippy::too_many_arguments)]
fn block_rows(
    q: &Tensor,
    q_pos: &[i64],
    rows: std::ops::Range<usize>,
    keys: &KeyBlock,
    block_rows_at: &[std::ops::Range<usize>],
    per_head: &[(Tensor, Tensor)],
    pattern: &BlockSparsePlan,
    qb: usize,
    scale: f32,
) -> Result<Tensor> {
    let qs = q.narrow(1, rows.start, rows.len())?;
    let qp = &q_pos[rows];
    // Repeated blocks (HF's eval plan lists block 0 several times) stay repeated; sorting the
    // rows keeps positions non-decreasing, as the kernel needs, without changing the multiset.
    let key_rows = |h: usize| -> Vec<usize> {
        let mut rows: Vec<usize> = pattern.key_blocks(h, qb).iter().flat_map(|&b| block_rows_at[b].clone()).collect();
        rows.sort_unstable();
        rows
    };
    let one = |qs: &Tensor, kb: &KeyBlock| -> Result<Tensor> {
        let mask = Mask::full(qp, &kb.pos).with_key_valid(Some(&kb.valid)).with_causal(pattern.causal);
        Ok(attention(qs, &kb.k, &kb.v, &mask, scale)?.out)
    };
    if pattern.uniform_across_heads() {
        return one(&qs, &keys.select(&key_rows(0))?);
    }
    let outs = (0..pattern.heads)
        .map(|h| {
            let sel = key_rows(h);
            let (k, v) = &per_head[h];
            let kb = KeyBlock {
                k: select_rows(k, &sel)?,
                v: select_rows(v, &sel)?,
                pos: sel.iter().map(|&i| keys.pos[i]).collect(),
                valid: sel.iter().map(|&i| keys.valid[i]).collect(),
            };
            one(&qs.narrow(0, h, 1)?, &kb)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outs, 0)?)
}
