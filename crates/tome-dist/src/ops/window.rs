//! `window`: sliding-window attention with optional global tokens across ranks
//! (Beltagy et al. 2020, "Longformer: The Long-Document Transformer").
//!
//! A token at position i sees keys at `|i - j| <= w` (causal: `i - w <= j <= i`). Each rank
//! needs, beyond its own keys, the *halo*: the keys within w of its shard that other ranks own —
//! from more than one rank when shards are shorter than the window. Every rank derives from the
//! plan alone what it must send to and receive from whom, so halos carry no positions.
//!
//! Global tokens (Longformer semantics): every token also sees every global token's key, and a
//! global token's query sees every key. Global keys are all-gathered once; local scores exclude
//! global key columns so that no key counts twice. Each rank computes the global queries'
//! partial over its own keys and the partials are merged across ranks as (output, lse), in rank
//! order. Global queries may use their own projections (Longformer's `query_global`,
//! `key_global`, `value_global`); their output replaces the local result.

use std::ops::Range;

use candle_core::{Device, Tensor};
use tome_attn::{attention, Mask, Partial};

use super::keys::{select_rows, KeyBlock};
use crate::error::{DistError, Result};
use crate::group::{flags_to_tensor, tensor_to_flags, Group};
use crate::layout::{subtract, union, ShardPlan};

#[derive(Clone, Copy, Debug)]
pub struct WindowSpec {
    /// One-sided window w (Longformer's `attention_window / 2`).
    pub one_sided: usize,
    pub causal: bool,
    pub scale: f32,
}

/// The global tokens of a window layer: their positions (ascending, the same on every rank) and,
/// optionally, this rank's shard projected by separate global projections
/// (`q`, `k`, `v` as `[heads, shard, d]`); `None` reuses the local projections.
#[derive(Clone, Debug, Default)]
pub struct GlobalTokens {
    pub positions: Vec<usize>,
    pub projections: Option<(Tensor, Tensor, Tensor)>,
}

/// The positions whose keys `ranges` need under the window, clipped to the sequence.
fn needed(ranges: &[Range<usize>], w: usize, causal: bool, len: usize) -> Vec<Range<usize>> {
    let wanted = ranges.iter().map(|x| x.start.saturating_sub(w)..if causal { x.end } else { (x.end + w).min(len) }).collect();
    subtract(&union(wanted), ranges)
}

/// This rank's output rows of window attention. `q`, `own.k`, `own.v` hold the rank's shard as
/// laid out by `plan`; `own.valid` marks padding.
pub fn window_attention(
    group: &dyn Group,
    plan: &ShardPlan,
    q: &Tensor,
    own: KeyBlock,
    spec: WindowSpec,
    globals: Option<&GlobalTokens>,
) -> Result<Tensor> {
    let (me, p) = (group.rank(), group.size());
    if plan.ranks() != p {
        return Err(DistError::Plan(format!("the plan has {} shards for a group of {p} ranks", plan.ranks())));
    }
    let globals = globals.filter(|g| !g.positions.is_empty());
    if spec.causal && globals.is_some() {
        return Err(DistError::Unsupported("global tokens with causal window attention".into()));
    }
    if let Some(g) = globals {
        if g.positions.windows(2).any(|w| w[1] <= w[0]) || g.positions.last().is_some_and(|&x| x >= plan.len()) {
            return Err(DistError::Plan(format!("global token positions must be ascending and below {}", plan.len())));
        }
    }
    let (heads, n, _) = q.dims3()?;
    let dv = own.v.dim(2)?;
    let q_pos = own.pos.clone();

    // Halo exchange: post every send, then take every receive.
    let my_need = needed(plan.ranges(me), spec.one_sided, spec.causal, plan.len());
    for peer in (0..p).filter(|&s| s != me) {
        let theirs = needed(plan.ranges(peer), spec.one_sided, spec.causal, plan.len());
        let parts = plan.owned_parts(me, &theirs);
        if parts.is_empty() {
            continue;
        }
        let rows: Vec<KeyBlock> = parts.iter().map(|(x, off)| own.rows(*off, x.len())).collect::<Result<_>>()?;
        let b = KeyBlock::concat(&rows)?;
        group.send(peer, vec![b.k, b.v, flags_to_tensor(&b.valid)?])?;
    }
    let mut pieces: Vec<KeyBlock> = plan.ranges(me).iter().scan(0, |off, x| {
        let r = own.rows(*off, x.len());
        *off += x.len();
        Some(r)
    }).collect::<Result<_>>()?;
    for peer in (0..p).filter(|&s| s != me) {
        let parts = plan.owned_parts(peer, &my_need);
        if parts.is_empty() {
            continue;
        }
        let frame = group.recv(peer)?;
        let [k, v, valid]: [Tensor; 3] =
            frame.try_into().map_err(|f: Vec<Tensor>| DistError::Plan(format!("a halo frame has 3 tensors, got {}", f.len())))?;
        let halo = KeyBlock { k, v, pos: parts.iter().flat_map(|(x, _)| x.clone()).map(|i| i as i64).collect(), valid: tensor_to_flags(&valid)? };
        let mut off = 0;
        for (x, _) in &parts {
            pieces.push(halo.rows(off, x.len())?);
            off += x.len();
        }
    }
    pieces.retain(|b| !b.is_empty());
    pieces.sort_by_key(|b| b.pos[0]);

    let mut acc = Partial::empty(heads, n, dv)?;
    if !pieces.is_empty() && n > 0 {
        let mut keys = KeyBlock::concat(&pieces)?;
        if let Some(g) = globals {
            // Global keys are attended through the global block below, never twice.
            for (valid, pos) in keys.valid.iter_mut().zip(&keys.pos) {
                *valid &= g.positions.binary_search(&(*pos as usize)).is_err();
            }
        }
        let mask = Mask::full(&q_pos, &keys.pos).with_causal(spec.causal).with_window(Some(spec.one_sided)).with_key_valid(Some(&keys.valid));
        acc = attention(q, &keys.k, &keys.v, &mask, spec.scale)?;
    }
    let Some(g) = globals else {
        return Ok(acc.out);
    };

    // Every rank's global rows: local keys/values for everyone's local queries, global
    // projections' queries for the global queries' partials.
    let (gq, gk, gv) = match &g.projections {
        Some((gq, gk, gv)) => (gq, gk, gv),
        None => (q, &own.k, &own.v),
    };
    let mine: Vec<usize> = q_pos.iter().enumerate().filter(|(_, &x)| g.positions.binary_search(&(x as usize)).is_ok()).map(|(i, _)| i).collect();
    let local_global = own.select(&mine)?;
    let my_gq = select_rows(gq, &mine)?;
    let mut frame = local_global.to_frame()?;
    frame.push(my_gq);
    let gathered = group.all_gather(frame)?;
    let mut blocks = Vec::with_capacity(p);
    let mut queries = Vec::with_capacity(p);
    for mut f in gathered {
        let gq = f.pop().ok_or_else(|| DistError::Plan("a global frame lost its queries".into()))?;
        blocks.push(KeyBlock::from_frame(f)?);
        queries.push(gq);
    }
    // Ascending positions, whatever the layout.
    let all = KeyBlock::concat(&blocks)?;
    let all_q = Tensor::cat(&queries, 1)?;
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| all.pos[i]);
    let global_keys = all.select(&order)?;
    let global_q = select_rows(&all_q, &order)?;

    if n > 0 {
        let mask = Mask::full(&q_pos, &global_keys.pos).with_key_valid(Some(&global_keys.valid));
        acc = acc.merge(&attention(q, &global_keys.k, &global_keys.v, &mask, spec.scale)?)?;
    }

    // Global queries over this rank's keys, merged over ranks in rank order.
    let gpos = &global_keys.pos;
    let local = if n > 0 {
        let mask = Mask::full(gpos, &own.pos).with_key_valid(Some(&own.valid));
        attention(&global_q, gk, gv, &mask, spec.scale)?
    } else {
        Partial::empty(heads, gpos.len(), dv)?
    };
    let partials = group.all_gather(vec![local.out, local.lse])?;
    let mut merged: Option<Partial> = None;
    for f in partials {
        let [out, lse]: [Tensor; 2] = f.try_into().map_err(|_| DistError::Plan("a global partial frame has 2 tensors".into()))?;
        let part = Partial { out, lse };
        merged = Some(match merged {
            None => part,
            Some(m) => m.merge(&part)?,
        });
    }
    let merged = merged.ok_or_else(|| DistError::Plan("no global partials".into()))?;

    // Global rows take the global result.
    let mut out = acc.out.flatten_all()?.to_vec1::<f32>()?;
    let global_out = merged.out.flatten_all()?.to_vec1::<f32>()?;
    let g_count = gpos.len();
    for &i in &mine {
        let gi = gpos.partition_point(|&x| x < q_pos[i]);
        for h in 0..heads {
            let dst = (h * n + i) * dv;
            let src = (h * g_count + gi) * dv;
            out[dst..dst + dv].copy_from_slice(&global_out[src..src + dv]);
        }
    }
    Ok(Tensor::from_vec(out, (heads, n, dv), &Device::Cpu)?)
}
