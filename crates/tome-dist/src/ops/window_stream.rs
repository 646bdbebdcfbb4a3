//! `window_stream`: a window layer's keys and values made a chunk of query rows at a time, for a
//! shard that is one run of positions (Beltagy et al. 2020, "Longformer").
//!
//! A window query sees only the keys within w of it, so a shard's keys and values never need to
//! exist whole. The rows the neighbours need are projected first, alone, and the halo is
//! exchanged once. Then each chunk of query rows gets the keys and values it can see: its own
//! rows projected, the rows it shares with the previous chunk carried over by a copy, and halo
//! rows copied in. Every own row is projected exactly once. A layer holds keys and values for one
//! chunk and the window around it instead of for its shard: at book scale that is two
//! shard-sized tensors less per layer.
//!
//! The keys a query tile sees are the same rows at the same positions as in the whole shard's
//! keys, and the kernel walks them from the first one the tile can see. So the results equal
//! those of [`window_keys`](super::window_keys)' joined keys to the bit, as long as a row's
//! projection does not depend on which rows are projected with it.

use std::ops::Range;

use candle_core::Tensor;

use super::exchange::{exchange_needed_from, rows_others_need};
use super::keys::KeyBlock;
use super::window::{needed, window_margins, WindowKeys, WindowSpec};
use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

/// Which of a layer's two projections a [`WindowKeyStream`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysOrValues {
    Keys,
    Values,
}

/// The keys and values of a window layer, made as its query rows advance ([`window_key_stream`]).
///
/// Rows are indexed in the *extended* shard: the halo ahead of the shard (`before` rows), the
/// shard's own `n` rows, then the halo behind (`after` rows).
pub struct WindowKeyStream<P> {
    project: P,
    spec: WindowSpec,
    /// Position of extended row 0.
    first: usize,
    before: usize,
    n: usize,
    after: usize,
    /// Own rows' validity.
    valid: Vec<bool>,
    /// Rows not projected again: the halo received, and the own rows projected for the
    /// neighbours. Each is a block with its extended rows.
    kept: Vec<(Range<usize>, KeyBlock)>,
    /// Query rows made ahead at a time.
    chunk: usize,
    /// The chunk held now, with its extended rows.
    current: Option<(Range<usize>, WindowKeys)>,
}

/// Opens the key stream of this rank's shard (every rank of `group` calls this together, or
/// [`window_keys`](super::window_keys) on ranks whose shard is not one run: it takes part in the
/// same exchange).
///
/// `project(which, rows, [before, after])` returns the keys or values of the shard's rows `rows`
/// (offsets into the shard) between the rows of the pieces `before` and `after` (each
/// `[kv_heads, rows, d]`, in order; views into rows made before):
/// `[kv_heads, before rows + rows.len() + after rows, d]`. The rows other ranks need
/// are projected here, and the halo is exchanged. Then [`WindowKeyStream::keys_for`] projects
/// the other rows `chunk` query rows at a time.
pub fn window_key_stream<P>(group: &dyn Group, plan: &ShardPlan, valid: &[bool], spec: WindowSpec, chunk: usize, mut project: P) -> Result<WindowKeyStream<P>>
where
    P: FnMut(KeysOrValues, Range<usize>, [&[Tensor]; 2]) -> Result<Tensor>,
{
    let me = group.rank();
    let (before, after) = window_margins(plan, me, spec).ok_or_else(|| DistError::Plan(format!("rank {me}'s shard is not one run of positions: its keys cannot stream")))?;
    let own = plan.ranges(me)[0].clone();
    let n = own.len();
    if valid.len() != n {
        return Err(DistError::Plan(format!("{} validity flags for a shard of {n} rows", valid.len())));
    }
    let halo_of = |r: usize| needed(plan.ranges(r), spec.one_sided, spec.causal, plan.len());
    let mut edges = Vec::new();
    for rows in rows_others_need(plan, me, &halo_of) {
        let block = KeyBlock {
            k: project(KeysOrValues::Keys, rows.clone(), [&[], &[]])?,
            v: project(KeysOrValues::Values, rows.clone(), [&[], &[]])?,
            pos: rows.clone().map(|i| (own.start + i) as i64).collect(),
            valid: valid[rows.clone()].to_vec(),
        };
        check_rows(&block, rows.len())?;
        edges.push((rows, block));
    }
    let edge_rows = |offset: usize, len: usize| -> Result<KeyBlock> {
        let (rows, block) = edges
            .iter()
            .find(|(rows, _)| rows.start <= offset && offset + len <= rows.end)
            .ok_or_else(|| DistError::Plan(format!("rows {offset}..{} of rank {me}'s shard were not projected for its neighbours", offset + len)))?;
        block.rows(offset - rows.start, len)
    };
    let halo = exchange_needed_from(group, plan, &edge_rows, &halo_of)?;

    let first = own.start - before;
    let mut kept = Vec::with_capacity(halo.len() + edges.len());
    let mut received = 0;
    for piece in halo {
        let at = usize::try_from(piece.pos[0]).ok().and_then(|p| p.checked_sub(first));
        let rows = at.map(|at| at..at + piece.len());
        let rows = rows.filter(|r| r.end <= before || (r.start >= before + n && r.end <= before + n + after));
        let rows = rows.ok_or_else(|| DistError::Plan(format!("rank {me} received halo rows at {:?}, outside its window", piece.pos.first())))?;
        received += piece.len();
        kept.push((rows, piece));
    }
    if received != before + after {
        return Err(DistError::Plan(format!("rank {me} received {received} halo rows for margins of {before} and {after}")));
    }
    kept.extend(edges.into_iter().map(|(rows, block)| (before + rows.start..before + rows.end, block)));
    Ok(WindowKeyStream { project, spec, first, before, n, after, valid: valid.to_vec(), kept, chunk: chunk.max(1), current: None })
}

/// A projection that does not hold the rows asked for is an error, not a wrong answer.
fn check_rows(block: &KeyBlock, rows: usize) -> Result<()> {
    if block.k.dim(1)? != rows || block.v.dim(1)? != rows {
        return Err(DistError::Plan(format!("keys {:?} and values {:?} projected for {rows} rows", block.k.dims(), block.v.dims())));
    }
    Ok(())
}

impl<P> WindowKeyStream<P>
where
    P: FnMut(KeysOrValues, Range<usize>, [&[Tensor]; 2]) -> Result<Tensor>,
{
    /// The keys the query rows `rows` (offsets into the shard) see under the window. A new chunk
    /// is made when the one held does not cover them: the keys of the next `chunk` query rows (at
    /// least `rows`; at the shard's edges, as many more as the window misses there). Rows asked
    /// for in ascending order carry the previous chunk's rows over.
    pub fn keys_for(&mut self, rows: Range<usize>) -> Result<&WindowKeys> {
        if rows.is_empty() || rows.end > self.n {
            return Err(DistError::Plan(format!("query rows {rows:?} of a shard of {} rows", self.n)));
        }
        let seen = self.seen_by(&rows);
        if !self.current.as_ref().is_some_and(|(held, _)| held.start <= seen.start && seen.end <= held.end) {
            // The next `chunk` query rows, and more where the shard's edge leaves their keys
            // short: every chunk but the last then has the same size, and each new chunk reuses
            // the heap blocks the last one freed instead of growing the heap.
            let reach = if self.spec.causal { self.spec.one_sided } else { 2 * self.spec.one_sided };
            let mut end = (rows.start + self.chunk).clamp(rows.end, self.n);
            end = (end + (self.chunk + reach).saturating_sub(self.seen_by(&(rows.start..end)).len())).min(self.n);
            let ahead = self.seen_by(&(rows.start..end));
            let keys = WindowKeys::from_keys(self.make(ahead.clone())?, self.spec)?;
            self.current = Some((ahead, keys));
        }
        let (_, keys) = self.current.as_ref().ok_or_else(|| DistError::Plan("the window stream holds no keys".into()))?;
        Ok(keys)
    }

    /// The extended rows that the queries at own rows `rows` can see.
    fn seen_by(&self, rows: &Range<usize>) -> Range<usize> {
        let w = self.spec.one_sided;
        let end = if self.spec.causal { self.before + rows.end } else { (self.before + rows.end + w).min(self.before + self.n + self.after) };
        (self.before + rows.start).saturating_sub(w)..end
    }

    /// The keys and values of the extended rows `want`.
    fn make(&mut self, want: Range<usize>) -> Result<KeyBlock> {
        let own = self.before..self.before + self.n;
        let own_wanted = want.start.max(own.start)..want.end.min(own.end);
        // The chunk held now is dropped as soon as each of its tensors has been copied from.
        let (held, k_held, v_held) = match self.current.take().and_then(|(held, keys)| Some((held, keys.into_block()?))) {
            Some((held, block)) => (held, Some(block.k), Some(block.v)),
            None => (0..0, None, None),
        };
        // Own rows are projected only where neither the held chunk nor a kept block has them:
        // held rows and the leading edge cover a prefix of `own_wanted`, the trailing edge a
        // suffix.
        let covering = |at: usize| std::iter::once(&held).chain(self.kept.iter().map(|(r, _)| r)).filter(move |r| r.contains(&at));
        let mut lo = own_wanted.start;
        while let Some(end) = covering(lo).map(|r| r.end).max().filter(|_| lo < own_wanted.end) {
            lo = end.min(own_wanted.end);
        }
        let mut hi = own_wanted.end;
        while let Some(start) = covering(hi.wrapping_sub(1)).map(|r| r.start).min().filter(|_| hi > lo) {
            hi = start.max(lo);
        }
        let margins = (lo - want.start, want.end - hi);
        let shard_rows = lo - own.start..hi - own.start;
        let k = self.fill(KeysOrValues::Keys, &want, shard_rows.clone(), margins, (&held, k_held))?;
        let v = self.fill(KeysOrValues::Values, &want, shard_rows, margins, (&held, v_held))?;
        let valid = want
            .clone()
            .map(|e| if own.contains(&e) { self.valid[e - own.start] } else { self.kept.iter().find(|(r, _)| r.contains(&e)).is_some_and(|(r, b)| b.valid[e - r.start]) })
            .collect();
        let pos = want.clone().map(|e| (self.first + e) as i64).collect();
        Ok(KeyBlock { k, v, pos, valid })
    }

    /// One tensor of the extended rows `want`: the shard's rows `shard_rows` projected, between
    /// rows taken from the held chunk's tensor (consumed here) and the kept blocks.
    fn fill(&mut self, which: KeysOrValues, want: &Range<usize>, shard_rows: Range<usize>, margins: (usize, usize), held: (&Range<usize>, Option<Tensor>)) -> Result<Tensor> {
        let (held_rows, held) = held;
        let pick = |b: &KeyBlock| match which {
            KeysOrValues::Keys => b.k.clone(),
            KeysOrValues::Values => b.v.clone(),
        };
        let sources = held.iter().map(|t| (held_rows.clone(), t.clone())).chain(self.kept.iter().map(|(r, b)| (r.clone(), pick(b))));
        let sources: Vec<(Range<usize>, Tensor)> = sources.collect();
        let mut around = [Vec::new(), Vec::new()];
        for (pieces, gap) in around.iter_mut().zip([want.start..want.start + margins.0, want.end - margins.1..want.end]) {
            let mut at = gap.start;
            while at < gap.end {
                let (rows, src) = sources
                    .iter()
                    .filter(|(r, _)| r.contains(&at))
                    .max_by_key(|(r, _)| r.end)
                    .ok_or_else(|| DistError::Plan(format!("no {which:?} for extended row {at} of the window stream")))?;
                let end = rows.end.min(gap.end);
                pieces.push(src.narrow(1, at - rows.start, end - at)?);
                at = end;
            }
        }
        let len = shard_rows.len();
        let t = (self.project)(which, shard_rows, [&around[0], &around[1]])?;
        if t.dim(1)? != want.len() {
            return Err(DistError::Plan(format!("{which:?} {:?} projected for {len} rows between {margins:?} rows", t.dims())));
        }
        Ok(t)
    }
}
