//! `window_stream`: a window layer's keys and values made a chunk of query rows at a time, for a
//! shard that is one run of positions (Beltagy et al. 2020, "Longformer").
//!
//! A window query sees only the keys within w of it, so a shard's keys and values never need to
//! exist whole. The rows the neighbours need are projected first, alone, and the halo is
//! exchanged once. Then each chunk of query rows gets the keys and values it can see, in two
//! buffers made once and rewritten in place: the rows it shares with the previous chunk move to
//! the front, its own new rows are projected straight behind them, and halo rows are copied in.
//! Every own row is projected exactly once, and a layer holds keys and values for one chunk and
//! the window around it instead of for its shard: at book scale two shard-sized tensors less per
//! layer, and no heap block allocated per chunk.
//!
//! The keys a query tile sees are the same rows at the same positions as in the whole shard's
//! keys, and the kernel walks them from the first one the tile can see (a buffer's unused rows
//! sit at positions no query reaches). So the results equal those of
//! [`window_keys`](super::window_keys)' joined keys to the bit, as long as a row's projection
//! does not depend on which rows are projected with it.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

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

/// Where a projection writes: rows `at..` of every head of `buffer`, a `[heads, rows, d]`
/// row-major buffer whose other rows it leaves alone.
pub struct HeadRows<'a> {
    pub buffer: &'a mut [f32],
    pub rows: usize,
    pub at: usize,
}

/// The shapes of a layer's keys and values: `[kv_heads, rows, key_dim]`, `[kv_heads, rows, value_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct KeyShape {
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
}

/// Rows the stream copies instead of projecting: the halo received, and the own rows projected
/// for the neighbours. `rows` are extended rows; `k` and `v` hold them head-major.
struct Kept {
    rows: Range<usize>,
    k: Vec<f32>,
    v: Vec<f32>,
    valid: Vec<bool>,
}

/// The buffers and the extended rows they hold now, in rows `0..rows.len()` of each head.
struct Held {
    rows: Range<usize>,
    capacity: usize,
    keys: WindowKeys,
}

/// Where a chunk's rows after those carried over come from.
enum Source {
    /// Extended rows of the kept block `index`.
    Kept { index: usize, rows: Range<usize> },
    /// The shard's rows (offsets into it).
    Project(Range<usize>),
}

/// The keys and values of a window layer, made as its query rows advance ([`window_key_stream`]).
///
/// Rows are indexed in the *extended* shard: the halo ahead of the shard (`before` rows), the
/// shard's own `n` rows, then the halo behind (`after` rows).
pub struct WindowKeyStream<P> {
    project: P,
    spec: WindowSpec,
    shape: KeyShape,
    /// Position of extended row 0.
    first: usize,
    before: usize,
    n: usize,
    after: usize,
    /// Own rows' validity.
    valid: Vec<bool>,
    kept: Vec<Kept>,
    /// Query rows made ahead at a time.
    chunk: usize,
    held: Option<Held>,
}

/// Opens the key stream of this rank's shard (every rank of `group` calls this together, or
/// [`window_keys`](super::window_keys) on ranks whose shard is not one run: it takes part in the
/// same exchange).
///
/// `project(which, rows, into)` writes the keys or values of the shard's rows `rows` (offsets
/// into it) into `into`. The rows other ranks need are projected here, and the halo is
/// exchanged. Then [`WindowKeyStream::keys_for`] projects the other rows `chunk` query rows at
/// a time.
pub fn window_key_stream<P>(group: &dyn Group, plan: &ShardPlan, valid: &[bool], spec: WindowSpec, shape: KeyShape, chunk: usize, mut project: P) -> Result<WindowKeyStream<P>>
where
    P: FnMut(KeysOrValues, Range<usize>, HeadRows<'_>) -> Result<()>,
{
    let me = group.rank();
    let (before, after) = window_margins(plan, me, spec).ok_or_else(|| DistError::Plan(format!("rank {me}'s shard is not one run of positions: its keys cannot stream")))?;
    let own = plan.ranges(me)[0].clone();
    let n = own.len();
    if valid.len() != n {
        return Err(DistError::Plan(format!("{} validity flags for a shard of {n} rows", valid.len())));
    }
    let halo_of = |r: usize| needed(plan.ranges(r), spec.one_sided, spec.causal, plan.len());
    let mut kept = Vec::new();
    let mut edges = Vec::new();
    for rows in rows_others_need(plan, me, &halo_of) {
        let len = rows.len();
        let mut k = vec![0f32; shape.kv_heads * len * shape.key_dim];
        let mut v = vec![0f32; shape.kv_heads * len * shape.value_dim];
        project(KeysOrValues::Keys, rows.clone(), HeadRows { buffer: &mut k, rows: len, at: 0 })?;
        project(KeysOrValues::Values, rows.clone(), HeadRows { buffer: &mut v, rows: len, at: 0 })?;
        let tensor = |data: &[f32], dim| Tensor::from_slice(data, (shape.kv_heads, len, dim), &Device::Cpu);
        let pos = rows.clone().map(|i| (own.start + i) as i64).collect();
        edges.push((rows.start, KeyBlock { k: tensor(&k, shape.key_dim)?, v: tensor(&v, shape.value_dim)?, pos, valid: valid[rows.clone()].to_vec() }));
        kept.push(Kept { rows: before + rows.start..before + rows.end, k, v, valid: valid[rows].to_vec() });
    }
    let edge_rows = |offset: usize, len: usize| -> Result<KeyBlock> {
        let (start, block) = edges
            .iter()
            .find(|(start, block)| *start <= offset && offset + len <= start + block.len())
            .ok_or_else(|| DistError::Plan(format!("rows {offset}..{} of rank {me}'s shard were not projected for its neighbours", offset + len)))?;
        block.rows(offset - start, len)
    };
    let halo = exchange_needed_from(group, plan, &edge_rows, &halo_of)?;
    drop(edges);

    let first = own.start - before;
    let mut received = 0;
    for piece in halo {
        let at = piece.pos.first().and_then(|&p| usize::try_from(p).ok()).and_then(|p| p.checked_sub(first));
        let rows = at.map(|at| at..at + piece.len()).filter(|r| piece.valid.len() == r.len());
        let rows = rows.filter(|r| r.end <= before || (r.start >= before + n && r.end <= before + n + after));
        let rows = rows.ok_or_else(|| DistError::Plan(format!("rank {me} received halo rows at {:?}, outside its window", piece.pos.first())))?;
        let values = |t: &Tensor, dim: usize| -> Result<Vec<f32>> {
            if t.dims() != [shape.kv_heads, rows.len(), dim] {
                return Err(DistError::Plan(format!("rank {me} received halo rows shaped {:?}", t.dims())));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        received += rows.len();
        kept.push(Kept { k: values(&piece.k, shape.key_dim)?, v: values(&piece.v, shape.value_dim)?, valid: piece.valid, rows });
    }
    if received != before + after {
        return Err(DistError::Plan(format!("rank {me} received {received} halo rows for margins of {before} and {after}")));
    }
    Ok(WindowKeyStream { project, spec, shape, first, before, n, after, valid: valid.to_vec(), kept, chunk: chunk.max(1), held: None })
}

impl<P> WindowKeyStream<P>
where
    P: FnMut(KeysOrValues, Range<usize>, HeadRows<'_>) -> Result<()>,
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
        if !self.held.as_ref().is_some_and(|h| h.rows.start <= seen.start && seen.end <= h.rows.end) {
            // Every chunk but the last sees as many keys as one in the middle of the shard, so
            // that, with blocks of one size, the buffers made for the first one hold them all.
            let reach = if self.spec.causal { self.spec.one_sided } else { 2 * self.spec.one_sided };
            let keys = self.chunk.max(rows.len()) + reach;
            let mut end = (rows.start + self.chunk).clamp(rows.end, self.n);
            end = (end + keys.saturating_sub(self.seen_by(&(rows.start..end)).len())).min(self.n);
            let ahead = self.seen_by(&(rows.start..end));
            self.make(ahead)?;
        }
        let held = self.held.as_ref().ok_or_else(|| DistError::Plan("the window stream holds no keys".into()))?;
        Ok(&held.keys)
    }

    /// The extended rows that the queries at own rows `rows` can see.
    fn seen_by(&self, rows: &Range<usize>) -> Range<usize> {
        let w = self.spec.one_sided;
        let end = if self.spec.causal { self.before + rows.end } else { (self.before + rows.end + w).min(self.before + self.n + self.after) };
        (self.before + rows.start).saturating_sub(w)..end
    }

    /// Rewrites the buffers to hold the extended rows `want`.
    fn make(&mut self, want: Range<usize>) -> Result<()> {
        let KeyShape { kv_heads, key_dim, value_dim } = self.shape;
        // Rows held now and wanted again move to the front of the buffers they are in; the
        // buffers are made anew only when they are too small (the first chunk, or a block of
        // query rows longer than any before), the carried rows then copied across.
        let (buffers, capacity, carried, old) = match self.held.take() {
            Some(held) => {
                let carried = if held.rows.start <= want.start { want.start..held.rows.end.min(want.end).max(want.start) } else { want.start..want.start };
                let from = if carried.is_empty() { 0..0 } else { carried.start - held.rows.start..carried.end - held.rows.start };
                let block = held.keys.into_block().ok_or_else(|| DistError::Plan("the window stream's buffers are gone".into()))?;
                if held.capacity >= want.len() {
                    ([block.k, block.v], held.capacity, carried, Carry::InPlace(from))
                } else {
                    let rows = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, from.start, from.len())?.contiguous()?) };
                    let old = Carry::From([rows(&block.k)?, rows(&block.v)?]);
                    drop(block);
                    (self.buffers(want.len())?, want.len(), carried, old)
                }
            }
            None => (self.buffers(want.len())?, want.len(), want.start..want.start, Carry::Nothing),
        };
        let sources = self.sources(carried.end..want.end)?;
        for (which, buffer) in [KeysOrValues::Keys, KeysOrValues::Values].into_iter().zip(&buffers) {
            let d = if which == KeysOrValues::Keys { key_dim } else { value_dim };
            let head = capacity * d;
            let carry = &old;
            let (kept, project) = (&self.kept, &mut self.project);
            in_place(buffer, |all| {
                match carry {
                    Carry::InPlace(from) => (0..kv_heads).for_each(|h| all.copy_within(h * head + from.start * d..h * head + from.end * d, h * head)),
                    Carry::From(rows) => {
                        let rows = rows[usize::from(which == KeysOrValues::Values)].flatten_all()?.to_vec1::<f32>()?;
                        let len = rows.len() / kv_heads.max(1);
                        (0..kv_heads).for_each(|h| all[h * head..h * head + len].copy_from_slice(&rows[h * len..(h + 1) * len]));
                    }
                    Carry::Nothing => {}
                }
                let mut at = carried.len();
                for source in &sources {
                    match source {
                        Source::Kept { index, rows } => {
                            let block = &kept[*index];
                            let data = if which == KeysOrValues::Keys { &block.k } else { &block.v };
                            let (from, len) = (rows.start - block.rows.start, rows.len());
                            for h in 0..kv_heads {
                                let src = &data[(h * block.rows.len() + from) * d..][..len * d];
                                all[h * head + at * d..][..len * d].copy_from_slice(src);
                            }
                            at += len;
                        }
                        Source::Project(rows) => {
                            project(which, rows.clone(), HeadRows { buffer: &mut *all, rows: capacity, at })?;
                            at += rows.len();
                        }
                    }
                }
                Ok(())
            })?;
        }
        // Unused rows sit at positions beyond every query's reach, and are padding.
        let own = self.before..self.before + self.n;
        let mut pos: Vec<i64> = want.clone().map(|e| (self.first + e) as i64).collect();
        pos.extend((want.len()..capacity).map(|i| i64::MAX / 2 + i as i64));
        let mut valid: Vec<bool> = want
            .clone()
            .map(|e| if own.contains(&e) { self.valid[e - own.start] } else { self.kept.iter().find(|b| b.rows.contains(&e)).is_some_and(|b| b.valid[e - b.rows.start]) })
            .collect();
        valid.resize(capacity, false);
        let [k, v] = buffers;
        let keys = WindowKeys::from_keys(KeyBlock { k, v, pos, valid }, self.spec)?;
        self.held = Some(Held { rows: want, capacity, keys });
        Ok(())
    }

    /// Zeroed key and value buffers of `rows` rows per head.
    fn buffers(&self, rows: usize) -> Result<[Tensor; 2]> {
        let KeyShape { kv_heads, key_dim, value_dim } = self.shape;
        let zeros = |d: usize| Tensor::zeros((kv_heads, rows, d), DType::F32, &Device::Cpu);
        Ok([zeros(key_dim)?, zeros(value_dim)?])
    }

    /// Where each of the extended rows `rows` comes from, in order: a kept block where one holds
    /// it, else the projection of the shard's row.
    fn sources(&self, rows: Range<usize>) -> Result<Vec<Source>> {
        let own = self.before..self.before + self.n;
        let mut out = Vec::new();
        let mut at = rows.start;
        while at < rows.end {
            if let Some((index, block)) = self.kept.iter().enumerate().find(|(_, b)| b.rows.contains(&at)) {
                let end = block.rows.end.min(rows.end);
                out.push(Source::Kept { index, rows: at..end });
                at = end;
            } else if own.contains(&at) {
                let next_kept = self.kept.iter().map(|b| b.rows.start).filter(|&s| s > at).min().unwrap_or(usize::MAX);
                let end = rows.end.min(own.end).min(next_kept);
                out.push(Source::Project(at - own.start..end - own.start));
                at = end;
            } else {
                return Err(DistError::Plan(format!("no keys for extended row {at} of the window stream")));
            }
        }
        Ok(out)
    }
}

/// The rows a new chunk takes from the one before it.
enum Carry {
    Nothing,
    /// Rows `from` of the same buffers, moved to the front.
    InPlace(Range<usize>),
    /// Rows of the old buffers, copied out before they were freed: keys and values.
    From([Tensor; 2]),
}

/// Runs `f` on the elements of the contiguous f32 CPU tensor `t`, in place.
fn in_place(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    struct Op<F> {
        f: RefCell<Option<F>>,
        result: RefCell<Option<Result<()>>>,
    }
    impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "window-stream-rows"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            let (CpuStorage::F32(all), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
                return Err(candle_core::Error::Msg("the window stream's buffers are contiguous f32".into()));
            };
            if let Some(f) = self.f.borrow_mut().take() {
                *self.result.borrow_mut() = Some(f(&mut all[start..end]));
            }
            Ok(())
        }
    }
    let op = Op { f: RefCell::new(Some(f)), result: RefCell::new(None) };
    t.inplace_op1(&op)?;
    op.result.into_inner().unwrap_or_else(|| Err(DistError::Plan("the window stream's buffers were not written".into())))
}
