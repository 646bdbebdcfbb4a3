//! Point-to-point fetch of key rows by position: every rank knows from the plan alone which
//! positions each rank needs, so each owner sends exactly those rows, without positions (the
//! receiver derives them), and nothing is requested on the wire. Halos (windows, sliding blocks,
//! look-back chunks), global blocks and random blocks are all fetched this way.

use std::ops::Range;

use candle_core::Tensor;

use super::keys::KeyBlock;
use crate::error::{DistError, Result};
use crate::group::{flags_to_tensor, tensor_to_flags, Group};
use crate::layout::{subtract, union, ShardPlan};

/// Keys this rank holds after the exchange: its own rows plus the rows at the positions `needs(rank)`
/// names for it, in ascending position order (`None` when that is nothing). `needs` must give
/// the same answer on every rank; positions a rank owns are never sent to it.
pub(crate) fn gather_needed(group: &dyn Group, plan: &ShardPlan, own: &KeyBlock, needs: &dyn Fn(usize) -> Vec<Range<usize>>) -> Result<Option<KeyBlock>> {
    let mut pieces = exchange_needed(group, plan, own, needs)?;
    let mut offset = 0;
    for x in plan.ranges(group.rank()) {
        pieces.push(own.rows(offset, x.len())?);
        offset += x.len();
    }
    pieces.retain(|b| !b.is_empty());
    pieces.sort_by_key(|b| b.pos[0]);
    if pieces.is_empty() {
        return Ok(None);
    }
    KeyBlock::concat(&pieces).map(Some)
}

/// The exchange of [`gather_needed`] alone: sends other ranks the rows they need of `own`, and
/// returns the rows this rank needs from others, as runs of consecutive positions in ascending
/// order.
pub(crate) fn exchange_needed(group: &dyn Group, plan: &ShardPlan, own: &KeyBlock, needs: &dyn Fn(usize) -> Vec<Range<usize>>) -> Result<Vec<KeyBlock>> {
    exchange_needed_from(group, plan, &|offset, len| own.rows(offset, len), needs)
}

/// The rows of this rank's shard (as offsets into it, merged and ascending) that some other rank
/// needs under `needs`: all that [`exchange_needed_from`] asks of its row source.
pub(crate) fn rows_others_need(plan: &ShardPlan, me: usize, needs: &dyn Fn(usize) -> Vec<Range<usize>>) -> Vec<Range<usize>> {
    let wanted = |r: usize| subtract(&union(needs(r)), plan.ranges(r));
    let parts = (0..plan.ranks()).filter(|&r| r != me).flat_map(|r| plan.owned_parts(me, &wanted(r)));
    union(parts.map(|(x, offset)| offset..offset + x.len()).collect())
}

/// [`exchange_needed`] for a rank whose own rows are made on demand: `own_rows(offset, len)`
/// gives the rows `offset..offset + len` of its shard, and is asked only for rows within one run
/// of [`rows_others_need`].
pub(crate) fn exchange_needed_from(
    group: &dyn Group,
    plan: &ShardPlan,
    own_rows: &dyn Fn(usize, usize) -> Result<KeyBlock>,
    needs: &dyn Fn(usize) -> Vec<Range<usize>>,
) -> Result<Vec<KeyBlock>> {
    let (me, p) = (group.rank(), group.size());
    if plan.ranks() != p {
        return Err(DistError::Plan(format!("the plan has {} shards for a group of {p} ranks", plan.ranks())));
    }
    let exchange = row_exchange(plan, me, needs);
    // Post every send, then take every receive.
    for (peer, parts) in &exchange.sends {
        let rows: Vec<KeyBlock> = parts.iter().map(|(x, off)| own_rows(*off, x.len())).collect::<Result<_>>()?;
        let b = KeyBlock::concat(&rows)?;
        // Frames own their rows: a receiver in this process keeps what it receives, which must
        // not share storage with buffers its sender goes on to rewrite in place.
        group.send(*peer, vec![owned(&b.k)?, owned(&b.v)?, flags_to_tensor(&b.valid)?])?;
    }
    let mut pieces = Vec::new();
    for (peer, parts) in &exchange.receives {
        let [k, v, valid]: [Tensor; 3] =
            group.recv(*peer)?.try_into().map_err(|f: Vec<Tensor>| DistError::Plan(format!("a key frame from rank {peer} has {} tensors, not 3", f.len())))?;
        let pos = parts.iter().flat_map(|(x, _)| x.clone()).map(|i| i as i64).collect();
        let fetched = KeyBlock { k, v, pos, valid: tensor_to_flags(&valid)? };
        let mut off = 0;
        for (x, _) in parts {
            pieces.push(fetched.rows(off, x.len())?);
            off += x.len();
        }
    }
    pieces.retain(|b| !b.is_empty());
    pieces.sort_by_key(|b| b.pos[0]);
    Ok(pieces)
}

/// The frames of a fetch of key rows by position, as every rank derives them from the plan
/// alone. To each peer of `sends`, in that order, this rank sends one frame
/// `[keys, values, validity]` of the runs of its shard listed with it (each run's positions and
/// its offset in the shard), rows in that order; from each peer of `receives`, in that order, it
/// takes one such frame of the runs of positions listed (with their offsets in the sender's
/// shard). No positions travel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowExchange {
    pub sends: Vec<(usize, Runs)>,
    pub receives: Vec<(usize, Runs)>,
}

/// Runs of positions of a frame, each with its offset in the shard of the rank that owns it.
pub type Runs = Vec<(Range<usize>, usize)>;

impl RowExchange {
    /// The rows a frame of `parts` holds.
    pub fn rows(parts: &[(Range<usize>, usize)]) -> usize {
        parts.iter().map(|(x, _)| x.len()).sum()
    }
}

/// The exchange of [`exchange_needed_from`] for rank `me`: the positions `needs(r)` names for
/// each rank r that it does not own come from their owners. `needs` must give the same answer
/// on every rank.
pub(crate) fn row_exchange(plan: &ShardPlan, me: usize, needs: &dyn Fn(usize) -> Vec<Range<usize>>) -> RowExchange {
    let wanted = |r: usize| subtract(&union(needs(r)), plan.ranges(r));
    let peers = || (0..plan.ranks()).filter(move |&r| r != me);
    let sends = peers().map(|peer| (peer, plan.owned_parts(me, &wanted(peer)))).filter(|(_, parts)| !parts.is_empty()).collect();
    let mine = wanted(me);
    let receives = peers().map(|peer| (peer, plan.owned_parts(peer, &mine))).filter(|(_, parts)| !parts.is_empty()).collect();
    RowExchange { sends, receives }
}

/// A contiguous copy of `t` that shares no storage with it.
fn owned(t: &Tensor) -> Result<Tensor> {
    Ok(if t.is_contiguous() { t.copy()? } else { t.contiguous()? })
}
