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

use std::ops::Range;

use candle_core::Tensor;
use rayon::prelude::*;
use tome_attn::blocksparse::BlockSparsePlan;
use tome_attn::{attention_in, Mask, Precision};

use super::exchange::{gather_needed, row_exchange, RowExchange};
use super::global::{global_queries, overwrite_rows};
use super::keys::{select_rows, KeyBlock};
use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

/// This rank's output rows of block-sparse attention under `pattern` (built for the whole
/// sequence, the same on every rank); `precision` the arithmetic of its attention calls
/// (`attention_in`).
pub fn blocksparse_attention(group: &dyn Group, plan: &ShardPlan, q: &Tensor, own: KeyBlock, pattern: &BlockSparsePlan, scale: f32, precision: Precision) -> Result<Tensor> {
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
    let keys = blocksparse_keys(group, plan, &own, pattern)?;
    let q_pos = own.pos.clone();
    let rows_of_block = keys.as_ref().map(|keys| BlockRows::new(&keys.pos, pattern));

    // Per-head key tensors, split once (heads attend to different random blocks).
    let per_head: Vec<(Tensor, Tensor)> = match (&keys, pattern.uniform_across_heads()) {
        (Some(keys), false) => (0..heads).map(|h| Ok((keys.k.narrow(0, h, 1)?.contiguous()?, keys.v.narrow(0, h, 1)?.contiguous()?))).collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    // Query blocks (runs of this shard's rows in one block), computed in parallel: each is a
    // small attention call, too small to parallelise well inside.
    let runs = query_block_runs(&q_pos, pattern);
    let global_rows: Vec<usize> = runs.iter().filter(|(qb, _)| pattern.is_global_query_block(*qb)).flat_map(|(_, r)| r.clone()).collect();
    let local: Vec<(Range<usize>, Vec<f32>)> = match (&keys, &rows_of_block) {
        (Some(keys), Some(rows_of_block)) => runs
            .par_iter()
            .filter(|(qb, _)| !pattern.is_global_query_block(*qb))
            .map(|(qb, rows)| {
                Ok((rows.clone(), block_rows(q, &q_pos, rows.clone(), keys, rows_of_block, &per_head, pattern, *qb, scale, precision)?.flatten_all()?.to_vec1::<f32>()?))
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
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
    let (gpos, merged) = global_queries(group, q, &q_pos, &global_rows, &own, scale, precision)?;
    overwrite_rows(&out, &q_pos, &global_rows, &gpos, &merged.out)
}

/// The keys this rank's query blocks list under `pattern`, fetched from their owners (every
/// rank calls this together): its own rows and the fetched ones, ascending by position; `None`
/// for an empty shard. Global query blocks list none: they see every key through
/// [`gather_global_queries`](super::gather_global_queries).
pub fn blocksparse_keys(group: &dyn Group, plan: &ShardPlan, own: &KeyBlock, pattern: &BlockSparsePlan) -> Result<Option<KeyBlock>> {
    gather_needed(group, plan, own, &|r| listed_keys(plan, pattern, r))
}

/// The exchange [`blocksparse_keys`] makes for rank `me`: which rows it sends to and receives
/// from whom (for ranks whose keys are elsewhere than in host tensors, such as on a GPU, to
/// make the same frames).
pub fn blocksparse_exchange(plan: &ShardPlan, me: usize, pattern: &BlockSparsePlan) -> RowExchange {
    row_exchange(plan, me, &|r| listed_keys(plan, pattern, r))
}

/// The key positions rank `r`'s query blocks list under `pattern` (global query blocks list
/// none).
fn listed_keys(plan: &ShardPlan, pattern: &BlockSparsePlan, r: usize) -> Vec<Range<usize>> {
    let mut query_blocks: Vec<usize> = plan.positions(r).iter().map(|&p| p as usize / pattern.block).collect();
    query_blocks.dedup();
    query_blocks
        .into_iter()
        .filter(|&qb| !pattern.is_global_query_block(qb))
        .flat_map(|qb| (0..pattern.heads).flat_map(move |h| pattern.key_blocks(h, qb).iter().map(|&b| pattern.block_range(b))))
        .collect()
}

/// A shard's rows (positions `q_pos`) as runs in one query block each: `(block, rows)`.
pub fn query_block_runs(q_pos: &[i64], pattern: &BlockSparsePlan) -> Vec<(usize, Range<usize>)> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < q_pos.len() {
        let qb = q_pos[start] as usize / pattern.block;
        let end = start + q_pos[start..].iter().take_while(|&&p| p as usize / pattern.block == qb).count();
        runs.push((qb, start..end));
        start = end;
    }
    runs
}

/// Where each block's rows sit among keys ascending by position (one pass; lookups are then
/// O(1)).
#[derive(Clone, Debug)]
pub struct BlockRows {
    at: Vec<Range<usize>>,
}

impl BlockRows {
    pub fn new(pos: &[i64], pattern: &BlockSparsePlan) -> Self {
        let mut at = vec![0..0; pattern.num_blocks()];
        let mut i = 0;
        while i < pos.len() {
            let b = pos[i] as usize / pattern.block;
            let j = i + pos[i..].iter().take_while(|&&p| p as usize / pattern.block == b).count();
            if let Some(slot) = at.get_mut(b) {
                *slot = i..j;
            }
            i = j;
        }
        BlockRows { at }
    }

    /// The key rows query block `qb` of head `h` attends to: its listed blocks' rows, repeats
    /// kept (Hugging Face's eval plan lists block 0 several times), in non-decreasing position
    /// order as the attention kernels need, which leaves the multiset unchanged.
    pub fn key_rows(&self, pattern: &BlockSparsePlan, h: usize, qb: usize) -> Vec<usize> {
        let mut rows: Vec<usize> = pattern.key_blocks(h, qb).iter().flat_map(|&b| self.at.get(b).cloned().unwrap_or(0..0)).collect();
        rows.sort_unstable();
        rows
    }
}

/// Output rows `rows` (all in query block `qb`) over the listed key blocks, repeats included.
#[allow(clippy::too_many_arguments)]
fn block_rows(
    q: &Tensor,
    q_pos: &[i64],
    rows: Range<usize>,
    keys: &KeyBlock,
    rows_of_block: &BlockRows,
    per_head: &[(Tensor, Tensor)],
    pattern: &BlockSparsePlan,
    qb: usize,
    scale: f32,
    precision: Precision,
) -> Result<Tensor> {
    let qs = q.narrow(1, rows.start, rows.len())?;
    let qp = &q_pos[rows];
    let key_rows = |h: usize| rows_of_block.key_rows(pattern, h, qb);
    let one = |qs: &Tensor, kb: &KeyBlock| -> Result<Tensor> {
        let mask = Mask::full(qp, &kb.pos).with_key_valid(Some(&kb.valid)).with_causal(pattern.causal);
        Ok(attention_in(precision, qs, &kb.k, &kb.v, &mask, scale)?.out)
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
