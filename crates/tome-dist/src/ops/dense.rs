//! `dense`: full (bidirectional or causal) attention across ranks as ring attention
//! (Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context").
//!
//! Each rank keeps its queries and passes its key/value block around the ring: P-1 steps, at
//! each step the block in hand is forwarded to the next rank *before* this rank computes on it,
//! so the transfer overlaps the compute. Partials merge in f32 as (output, log-sum-exp). Under a
//! causal mask a block wholly after this rank's last query is forwarded without being computed.
//! Works with any layout; zigzag balances the causal work.

use candle_core::Tensor;
use tome_attn::relative_bias::{self, RelativeBias};
use tome_attn::{attention_in, Mask, Partial, Precision};

use super::keys::KeyBlock;
use crate::error::Result;
use crate::group::Group;

#[derive(Clone, Copy, Debug)]
pub struct DenseSpec {
    pub causal: bool,
    pub scale: f32,
    /// The arithmetic of each block's attention (`attention_in`); partials merge in f32.
    pub precision: Precision,
}

/// This rank's output rows of dense attention; `q` is `[heads, shard, d]` at positions `q_pos`,
/// `own` this rank's keys and values.
pub fn ring_attention(group: &dyn Group, q: &Tensor, q_pos: &[i64], own: KeyBlock, spec: DenseSpec) -> Result<Tensor> {
    let q_max = q_pos.iter().copied().max();
    ring(group, q, own, &mut |block| {
        let visible = !spec.causal || matches!((q_max, block.pos.first()), (Some(qm), Some(&k0)) if k0 <= qm);
        if !visible {
            return Ok(None);
        }
        let mask = Mask::full(q_pos, &block.pos).with_causal(spec.causal).with_key_valid(Some(&block.valid));
        Ok(Some(attention_in(spec.precision, q, &block.k, &block.v, &mask, spec.scale)?))
    })
}

/// As [`ring_attention`] (bidirectional, unscaled) with T5's learned relative position bias
/// added to every score (Switch Transformers): the bias follows from the positions each block
/// carries, so the ring is unchanged.
pub fn ring_attention_with_bias(group: &dyn Group, q: &Tensor, q_pos: &[i64], own: KeyBlock, bias: &RelativeBias) -> Result<Tensor> {
    ring(group, q, own, &mut |block| Ok(Some(relative_bias::attention(q, &block.k, &block.v, q_pos, &block.pos, &block.valid, bias)?)))
}

/// Passes key blocks around the ring — each forwarded before it is computed on, so transfer
/// overlaps compute — and merges what `score` makes of each (`None`: nothing visible).
fn ring(group: &dyn Group, q: &Tensor, own: KeyBlock, score: &mut dyn FnMut(&KeyBlock) -> Result<Option<Partial>>) -> Result<Tensor> {
    let (heads, n, _) = q.dims3()?;
    let dv = own.v.dim(2)?;
    let p = group.size();
    let mut acc = Partial::empty(heads, n, dv)?;
    let mut block = own;
    for step in 0..p {
        let last = step + 1 == p;
        if !last {
            group.send(group.next_rank(), block.to_frame()?)?;
        }
        if !block.is_empty() && n > 0 {
            if let Some(part) = score(&block)? {
                acc = acc.merge(&part)?;
            }
        }
        if !last {
            block = KeyBlock::from_frame(group.recv(group.prev_rank())?)?;
        }
    }
    Ok(acc.out)
}
