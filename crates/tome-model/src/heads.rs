//! Attention projections in head layout, and window self-attention run a row block at a time
//! (Beltagy et al. 2020, "Longformer", without global tokens).
//!
//! A window layer needs the whole shard's keys and values (neighbouring rows see them, and the
//! halo goes to other ranks), but each query row is used once: so queries are projected, attend
//! and are consumed one row block at a time. Neither the shard's queries nor its attention
//! output ever exist whole, which keeps a layer's memory at keys, values and its output, and
//! each block in cache from projection to whatever consumes it.

use candle_core::Tensor;
use candle_nn::Linear;
use tome_attn::projection::{project_to_heads, project_to_heads_padded};
use tome_dist::ops::{window_keys, window_keys_in_place, window_margins, KeyBlock, WindowSpec};
use tome_dist::{Group, ShardPlan};

use crate::error::Result;

/// `x` (`[n, hidden]`) through each of `projections`, as `[heads, n, hidden / heads]` each,
/// written straight into head layout.
pub fn project_heads<const P: usize>(x: &Tensor, projections: [&Linear; P], heads: usize) -> Result<[Tensor; P]> {
    let mut outs = Vec::with_capacity(P);
    for p in projections {
        outs.push(project_to_heads(x, p.weight(), p.bias(), heads)?);
    }
    Ok(std::array::from_fn(|i| outs[i].clone()))
}

/// Window self-attention of this rank's shard `x` (`[n, hidden]`, at `positions`, `valid`
/// marking padding) with the `query`, `key`, `value` projections: keys and values are projected
/// for the whole shard and the halo fetched (every rank of `group` calls this together); then
/// each block of `block` query rows is projected, attends, and is handed to
/// `consume(start, context)` with `context` as `[rows, heads·head_dim]`, in row order. Blocks
/// that are multiples of the kernel's window tile (96 rows) tile exactly as the whole shard
/// would; smaller blocks hold less memory, larger ones amortise per-call costs.
#[allow(clippy::too_many_arguments)]
pub fn window_rows(
    group: &dyn Group,
    plan: &ShardPlan,
    x: &Tensor,
    [query, key, value]: [&Linear; 3],
    heads: usize,
    positions: &[i64],
    valid: &[bool],
    spec: WindowSpec,
    block: usize,
    mut consume: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let (n, _) = x.dims2()?;
    let keys = match window_margins(plan, group.rank(), spec) {
        // A shard of one run: keys and values are projected with room for the halo, which
        // arrives in place, instead of being joined to it by a copy of the whole shard's.
        Some(margins) => {
            let [k, v] = [key, value].map(|p| project_to_heads_padded(x, p.weight(), p.bias(), heads, margins));
            window_keys_in_place(group, plan, k?, v?, valid, spec)?
        }
        None => {
            let [k, v] = project_heads(x, [key, value], heads)?;
            window_keys(group, plan, &KeyBlock { k, v, pos: positions.to_vec(), valid: valid.to_vec() }, spec)?
        }
    };
    let block = block.max(1);
    for start in (0..n).step_by(block) {
        let rows = block.min(n - start);
        let [q] = project_heads(&x.narrow(0, start, rows)?, [query], heads)?;
        let context = keys.attend(&q, &positions[start..start + rows])?;
        let width = context.dim(0)? * context.dim(2)?;
        consume(start, context.transpose(0, 1)?.reshape((rows, width))?)?;
    }
    Ok(())
}
