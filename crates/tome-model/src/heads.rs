//! Attention projections in head layout, and window self-attention run a row block at a time
//! (Beltagy et al. 2020, "Longformer", without global tokens).
//!
//! Each query row is used once, so queries are projected, attend and are consumed one row
//! block at a time; keys and values stream a chunk of about a thousand query rows ahead
//! (`tome_dist::ops::window_key_stream`). Neither the shard's queries, nor its keys and values,
//! nor its attention output ever exist whole: a layer's memory is its output and a chunk's keys,
//! and each block stays in cache from projection to whatever consumes it.

use std::ops::Range;

use candle_core::Tensor;
use tome_attn::projection::Projection;
use tome_dist::ops::{window_key_stream, window_keys, window_margins, HeadRows, KeyBlock, KeyShape, KeysOrValues, WindowSpec};
use tome_dist::{Group, ShardPlan};

use crate::error::Result;

/// `x` (`[n, hidden]`) through each of `projections`, as `[heads, n, hidden / heads]` each,
/// written straight into head layout (rounded to bf16 where the projection is bf16).
pub fn project_heads<'a, L: Into<Projection<'a>>, const P: usize>(x: &Tensor, projections: [L; P], heads: usize) -> Result<[Tensor; P]> {
    let mut outs = Vec::with_capacity(P);
    for p in projections {
        outs.push(p.into().to_heads(x, heads)?);
    }
    Ok(std::array::from_fn(|i| outs[i].clone()))
}

/// Query rows a window layer makes keys and values for at a time: at least four one-sided
/// windows' worth, so that the rows one chunk carries over to the next (two windows) are at most
/// a third of its keys.
const KEY_CHUNK_ROWS: usize = 1024;

/// Window self-attention of this rank's shard `x` (`[n, hidden]`, at `positions`, `valid`
/// marking padding) with the `query`, `key`, `value` projections (every rank of `group` calls
/// this together): each block of `block` query rows is projected, attends, and is handed to
/// `consume(start, context)` with `context` as `[rows, heads·head_dim]`, in row order. Blocks
/// that are multiples of the kernel's window tile (96 rows) tile exactly as the whole shard
/// would; smaller blocks hold less memory, larger ones amortise per-call costs.
///
/// On a shard of one run of positions keys and values stream
/// ([`tome_dist::ops::window_key_stream`]): they exist for about a thousand query rows and the
/// window around them at a time, never for the whole shard. Otherwise (a zigzag shard) they are
/// projected for the whole shard and joined to the halo.
#[allow(clippy::too_many_arguments)]
pub fn window_rows<'a, L: Into<Projection<'a>>>(
    group: &dyn Group,
    plan: &ShardPlan,
    x: &Tensor,
    projections: [L; 3],
    heads: usize,
    positions: &[i64],
    valid: &[bool],
    spec: WindowSpec,
    block: usize,
    consume: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let key_chunk = KEY_CHUNK_ROWS.max(4 * spec.one_sided);
    window_rows_in_chunks(group, plan, x, projections.map(Into::into), heads, positions, valid, spec, block, key_chunk, consume)
}

/// [`window_rows`] with keys and values made `key_chunk` query rows at a time.
#[allow(clippy::too_many_arguments)]
fn window_rows_in_chunks(
    group: &dyn Group,
    plan: &ShardPlan,
    x: &Tensor,
    [query, key, value]: [Projection<'_>; 3],
    heads: usize,
    positions: &[i64],
    valid: &[bool],
    spec: WindowSpec,
    block: usize,
    key_chunk: usize,
    mut consume: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let (n, _) = x.dims2()?;
    let block = block.max(1);
    let mut attend_blocks = |attend: &mut dyn FnMut(Range<usize>, &Tensor) -> tome_dist::Result<Tensor>| -> Result<()> {
        for start in (0..n).step_by(block) {
            let rows = block.min(n - start);
            let [q] = project_heads(&x.narrow(0, start, rows)?, [query], heads)?;
            let context = attend(start..start + rows, &q)?;
            let width = context.dim(0)? * context.dim(2)?;
            consume(start, context.transpose(0, 1)?.reshape((rows, width))?)?;
        }
        Ok(())
    };
    if window_margins(plan, group.rank(), spec).is_some() {
        let project = |which: KeysOrValues, rows: Range<usize>, into: HeadRows<'_>| -> tome_dist::Result<()> {
            let p = match which {
                KeysOrValues::Keys => key,
                KeysOrValues::Values => value,
            };
            Ok(p.to_heads_into(&x.narrow(0, rows.start, rows.len())?, heads, into.buffer, into.rows, into.at)?)
        };
        let [key_dim, value_dim] = [key, value].map(|p| p.out_features().map(|w| w / heads.max(1)));
        let shape = KeyShape { kv_heads: heads, key_dim: key_dim?, value_dim: value_dim? };
        let mut stream = window_key_stream(group, plan, valid, spec, shape, key_chunk, project)?;
        attend_blocks(&mut |rows, q| stream.keys_for(rows.clone())?.attend(q, &positions[rows]))
    } else {
        let [k, v] = project_heads(x, [key, value], heads)?;
        let keys = window_keys(group, plan, &KeyBlock { k, v, pos: positions.to_vec(), valid: valid.to_vec() }, spec)?;
        attend_blocks(&mut |rows, q| keys.attend(q, &positions[rows]))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::Linear;
    use tome_attn::Precision;
    use tome_dist::ops::{window_keys, KeyBlock, WindowSpec};
    use tome_dist::{run_ranks, Layout, ShardPlan};

    use super::{project_heads, window_rows_in_chunks};
    use crate::error::Result;

    const HIDDEN: usize = 32;
    const HEADS: usize = 2;

    fn linear(seed: f64) -> Linear {
        let w: Vec<f32> = (0..HIDDEN * HIDDEN).map(|i| ((i as f64 * 0.37 + seed).sin() * 0.3) as f32).collect();
        let b: Vec<f32> = (0..HIDDEN).map(|i| ((i as f64 + seed) * 0.11).cos() as f32).collect();
        Linear::new(Tensor::from_vec(w, (HIDDEN, HIDDEN), &Device::Cpu).unwrap(), Some(Tensor::from_vec(b, HIDDEN, &Device::Cpu).unwrap()))
    }

    /// A shard's window context, `block` query rows at a time, with keys and values made
    /// `key_chunk` query rows at a time (`None`: projected whole and joined to the halo).
    fn context(x: &Tensor, plan: &ShardPlan, spec: WindowSpec, block: usize, key_chunk: Option<usize>) -> Vec<f32> {
        let [q, k, v] = [linear(0.5), linear(1.5), linear(2.5)];
        let shards = run_ranks(plan.ranks(), |g| -> Result<Tensor> {
            let r = tome_dist::Group::rank(g);
            let (x, pos) = (plan.shard_of(x, 0, r)?, plan.positions(r));
            let valid: Vec<bool> = pos.iter().map(|&p| p % 11 != 4).collect();
            let out = Tensor::zeros((pos.len(), HIDDEN), DType::F32, &Device::Cpu)?;
            let consume = |start: usize, c: Tensor| -> Result<()> { Ok(out.slice_set(&c, 0, start)?) };
            match key_chunk {
                Some(chunk) => window_rows_in_chunks(g, plan, &x, [&q, &k, &v].map(Into::into), HEADS, &pos, &valid, spec, block, chunk, consume)?,
                None => {
                    let [kh, vh] = project_heads(&x, [&k, &v], HEADS)?;
                    let keys = window_keys(g, plan, &KeyBlock { k: kh, v: vh, pos: pos.clone(), valid }, spec)?;
                    for start in (0..pos.len()).step_by(block) {
                        let rows = block.min(pos.len() - start);
                        let [qh] = project_heads(&x.narrow(0, start, rows)?, [&q], HEADS)?;
                        let c = keys.attend(&qh, &pos[start..start + rows])?;
                        consume(start, c.transpose(0, 1)?.reshape((rows, HIDDEN))?)?;
                    }
                }
            }
            Ok(out)
        })
        .unwrap();
        plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn streamed_keys_and_values_give_the_whole_shards_context() {
        // Keys and values projected a chunk at a time, on one rank and across ranks, causal or
        // not, against those projected for the whole shard at once. The projection's GEMM sums
        // a row the same way whatever rows come with it, except for pieces of a few rows (a
        // matrix-vector path): the last piece of a chunk can be one, hence the P-ranks tolerance
        // (DESIGN §1) rather than equal bits.
        let n = 300;
        let x = Tensor::from_vec((0..n * HIDDEN).map(|i| ((i as f32) * 0.013).sin()).collect::<Vec<f32>>(), (n, HIDDEN), &Device::Cpu).unwrap();
        for causal in [false, true] {
            let spec = WindowSpec { one_sided: 9, causal, scale: 0.25, precision: Precision::F32 };
            for p in [1, 3] {
                let plan = ShardPlan::new(Layout::Contiguous, n, p).unwrap();
                let whole = context(&x, &plan, spec, 24, None);
                for chunk in [1, 24, 50, 1000] {
                    let streamed = context(&x, &plan, spec, 24, Some(chunk));
                    let diff = streamed.iter().zip(&whole).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-5, "causal={causal} p={p} chunk={chunk}: {diff}");
                }
            }
        }
    }
}
