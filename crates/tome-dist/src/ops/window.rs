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

use candle_core::Tensor;
use tome_attn::{attention_in, Mask, Partial, Precision};

use super::exchange::{gather_needed, row_exchange, RowExchange};
use super::global::{gather_global_keys, global_queries, overwrite_rows};
use super::keys::KeyBlock;
use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

#[derive(Clone, Copy, Debug)]
pub struct WindowSpec {
    /// One-sided window w (Longformer's `attention_window / 2`).
    pub one_sided: usize,
    pub causal: bool,
    pub scale: f32,
    /// The arithmetic of the attention calls (`attention_in`); partials merge in f32.
    pub precision: Precision,
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
pub(super) fn needed(ranges: &[Range<usize>], w: usize, causal: bool, len: usize) -> Vec<Range<usize>> {
    ranges.iter().map(|x| x.start.saturating_sub(w)..if causal { x.end } else { (x.end + w).min(len) }).collect()
}

/// The keys a shard's window queries see once the halo is in: the rank's own rows and its
/// neighbours', ascending by position. Made by [`window_keys`]; queries then attend in row
/// blocks of any size ([`WindowKeys::attend`]), so a layer can project and consume its queries a
/// block at a time instead of holding the whole shard's queries and output at once.
#[derive(Clone, Debug)]
pub struct WindowKeys {
    keys: Option<KeyBlock>,
    spec: WindowSpec,
    /// Value width, for the output of rows that see no key.
    dv: usize,
}

/// Fetches the halo of this rank's shard under `spec` (every rank of `group` calls this
/// together; with one rank it copies nothing).
pub fn window_keys(group: &dyn Group, plan: &ShardPlan, own: &KeyBlock, spec: WindowSpec) -> Result<WindowKeys> {
    let halo_of = |r: usize| needed(plan.ranges(r), spec.one_sided, spec.causal, plan.len());
    Ok(WindowKeys { keys: gather_needed(group, plan, own, &halo_of)?, spec, dv: own.v.dim(2)? })
}

/// The halo exchange [`window_keys`] makes for rank `me` under `spec`: which rows it sends to
/// and receives from whom (for ranks whose keys are elsewhere than in host tensors, such as on
/// a GPU, to make the same frames).
pub fn window_exchange(plan: &ShardPlan, me: usize, spec: WindowSpec) -> RowExchange {
    row_exchange(plan, me, &|r: usize| needed(plan.ranges(r), spec.one_sided, spec.causal, plan.len()))
}

/// Rows of halo a rank's window queries need ahead of and behind its shard, `(before, after)`,
/// when the shard is one run of positions (a contiguous plan); `None` otherwise. Such a shard's
/// keys and values can stream ([`window_key_stream`](super::window_key_stream)).
pub fn window_margins(plan: &ShardPlan, rank: usize, spec: WindowSpec) -> Option<(usize, usize)> {
    match plan.ranges(rank) {
        [x] if !x.is_empty() => {
            let need = needed(std::slice::from_ref(x), spec.one_sided, spec.causal, plan.len()).pop()?;
            Some((x.start - need.start, need.end - x.end))
        }
        _ => None,
    }
}

impl WindowKeys {
    /// Keys already holding every row the queries that will attend them can see.
    pub(super) fn from_keys(keys: KeyBlock, spec: WindowSpec) -> Result<Self> {
        let dv = keys.v.dim(2)?;
        Ok(WindowKeys { keys: Some(keys), spec, dv })
    }

    /// The keys held (own rows and the halo, ascending by position); `None` for an empty shard.
    pub fn keys(&self) -> Option<&KeyBlock> {
        self.keys.as_ref()
    }

    /// The keys and values held, given back to be reused.
    pub(super) fn into_block(self) -> Option<KeyBlock> {
        self.keys
    }

    /// Window attention of the queries `q` (`[heads, rows, d]`) at positions `q_pos`, any rows
    /// of the shard the keys were fetched for: `[heads, rows, dv]`.
    pub fn attend(&self, q: &Tensor, q_pos: &[i64]) -> Result<Tensor> {
        Ok(self.partial(q, q_pos)?.out)
    }

    fn partial(&self, q: &Tensor, q_pos: &[i64]) -> Result<Partial> {
        let (heads, n, _) = q.dims3()?;
        if q_pos.len() != n {
            return Err(DistError::Plan(format!("{n} query rows with {} positions", q_pos.len())));
        }
        match &self.keys {
            Some(keys) if n > 0 => {
                let mask = Mask::full(q_pos, &keys.pos).with_causal(self.spec.causal).with_window(Some(self.spec.one_sided)).with_key_valid(Some(&keys.valid));
                Ok(attention_in(self.spec.precision, q, &keys.k, &keys.v, &mask, self.spec.scale)?)
            }
            // No query, or no key at all (an empty shard).
            _ => Ok(Partial::empty(heads, n, self.dv)?),
        }
    }
}

/// This rank's output rows of window attention. `q`, `own.k`, `own.v` hold the rank's shard as
/// laid out by `plan`; `own.valid` marks padding.
pub fn window_attention(group: &dyn Group, plan: &ShardPlan, q: &Tensor, own: KeyBlock, spec: WindowSpec, globals: Option<&GlobalTokens>) -> Result<Tensor> {
    let globals = globals.filter(|g| !g.positions.is_empty());
    if spec.causal && globals.is_some() {
        return Err(DistError::Unsupported("global tokens with causal window attention".into()));
    }
    if let Some(g) = globals {
        if g.positions.windows(2).any(|w| w[1] <= w[0]) || g.positions.last().is_some_and(|&x| x >= plan.len()) {
            return Err(DistError::Plan(format!("global token positions must be ascending and below {}", plan.len())));
        }
    }
    let n = q.dim(1)?;
    let q_pos = own.pos.clone();

    // Halo exchange: the keys within the window of this rank's tokens, from whoever owns them.
    let mut keys = window_keys(group, plan, &own, spec)?;
    if let (Some(g), Some(keys)) = (globals, keys.keys.as_mut()) {
        // Global keys are attended through the global block below, never twice.
        for (valid, pos) in keys.valid.iter_mut().zip(&keys.pos) {
            *valid &= g.positions.binary_search(&(*pos as usize)).is_err();
        }
    }
    let mut acc = keys.partial(q, &q_pos)?;
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
    let global_keys = gather_global_keys(group, &own.select(&mine)?)?;
    if n > 0 {
        let mask = Mask::full(&q_pos, &global_keys.pos).with_key_valid(Some(&global_keys.valid));
        acc = acc.merge(&attention_in(spec.precision, q, &global_keys.k, &global_keys.v, &mask, spec.scale)?)?;
    }
    let global_own = KeyBlock { k: gk.clone(), v: gv.clone(), pos: own.pos.clone(), valid: own.valid.clone() };
    let (gpos, merged) = global_queries(group, gq, &q_pos, &mine, &global_own, spec.scale, spec.precision)?;
    overwrite_rows(&acc.out, &q_pos, &mine, &gpos, &merged.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    /// The halo exchange as ranks whose keys are not host tensors make it: what each rank sends
    /// a peer is what that peer expects from it, and with its own rows a rank then holds every
    /// key its window queries see.
    #[test]
    fn every_ranks_window_exchange_matches_its_peers_and_covers_its_window() {
        for (layout, len, ranks, one_sided, causal) in [
            (Layout::Contiguous, 37, 4, 3, false),
            (Layout::Contiguous, 37, 4, 3, true),
            (Layout::Zigzag, 50, 3, 4, false),
            (Layout::Contiguous, 9, 4, 6, false),
            (Layout::Contiguous, 3, 5, 2, true),
        ] {
            let plan = ShardPlan::new(layout, len, ranks).unwrap();
            let spec = WindowSpec { one_sided, causal, scale: 1.0, precision: Precision::F32 };
            let exchanges: Vec<RowExchange> = (0..ranks).map(|r| window_exchange(&plan, r, spec)).collect();
            let case = format!("{layout:?}, {len} tokens, {ranks} ranks, window {one_sided}, causal {causal}");
            for (me, ex) in exchanges.iter().enumerate() {
                for (peer, parts) in &ex.sends {
                    let expected = exchanges[*peer].receives.iter().find(|(src, _)| *src == me).map(|(_, p)| p);
                    assert_eq!(expected, Some(parts), "{case}: rank {me} to {peer}");
                    let runs: Vec<(Range<usize>, usize)> = plan
                        .ranges(me)
                        .iter()
                        .scan(0, |off, x| {
                            let at = *off;
                            *off += x.len();
                            Some((x.clone(), at))
                        })
                        .collect();
                    for (x, offset) in parts {
                        assert!(
                            runs.iter().any(|(run, at)| run.start <= x.start && x.end <= run.end && *offset == at + (x.start - run.start)),
                            "{case}: rank {me} sends {x:?} from offset {offset}"
                        );
                    }
                }
                assert_eq!(ex.receives.len(), exchanges.iter().filter(|e| e.sends.iter().any(|(p, _)| *p == me)).count(), "{case}: rank {me}");
                let mut held: Vec<usize> = plan.ranges(me).iter().flat_map(|x| x.clone()).collect();
                held.extend(ex.receives.iter().flat_map(|(_, parts)| parts.iter().flat_map(|(x, _)| x.clone())));
                for q in plan.ranges(me).iter().flat_map(|x| x.clone()) {
                    let lo = q.saturating_sub(one_sided);
                    let hi = if causal { q } else { (q + one_sided).min(len - 1) };
                    for k in lo..=hi {
                        assert!(held.contains(&k), "{case}: rank {me}'s query {q} misses key {k}");
                    }
                }
            }
        }
    }
}
