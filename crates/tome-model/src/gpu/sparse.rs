//! Attention on the device that singles out some queries or keys: Longformer's global tokens
//! over window attention, and BigBird's block-sparse attention with its global first and last
//! blocks. The exchanges are tome-dist's, the same frames in the same order as its CPU
//! operators (`window_attention`, `blocksparse_attention`), so GPU and CPU ranks agree on the
//! wire; every partial is computed on the device. Everything crosses as device frames: the
//! window's halo, the global tokens' keys, BigBird's listed blocks, the global queries and their
//! partials (merged on the device, in f32 and rank order). With one rank nothing leaves the
//! device.

use std::sync::Arc;

use candle_core::DType;
use cudarc::driver::CudaSlice;
use tome_attn::blocksparse::{BlockSparsePlan, RandomBlocks};
use tome_dist::ops::{blocksparse_exchange, query_block_runs, BlockRows, WindowSpec};
use tome_dist::{DeviceData, DeviceFrame, DeviceTensor, Group, ShardPlan};
use tome_gpu::attention::{Dims, Inputs};

use super::attention::{fetch_rows, key_block, own_frame, upload_flags, window_halo, Accumulator, BlockRef, DeviceBlock, Held, Shard};
use super::{gpu_err, operands, GpuRank};
use crate::error::{ModelError, Result};

/// Longformer's global tokens of a window layer: their positions (ascending, the same on every
/// rank) and this shard's global projections `[q, k, v]` (`[heads, n, d]`), or `None` to reuse
/// the local ones.
#[derive(Clone, Copy)]
pub(crate) struct Globals<'a> {
    pub positions: &'a [usize],
    pub projections: Option<[&'a CudaSlice<f32>; 3]>,
}

/// Row indices as the row-copy kernel takes them (shards are far below 2³² rows).
fn indices(rows: impl IntoIterator<Item = usize>) -> Vec<u32> {
    rows.into_iter().map(|r| r as u32).collect()
}

/// Rows `rows` of `[heads, n, d]` heads, gathered into a new `[heads, rows.len(), d]` buffer
/// (`rows` not empty).
pub(super) fn gather(rank: &GpuRank, src: &CudaSlice<f32>, rows: &[usize], heads: usize, d: usize) -> Result<CudaSlice<f32>> {
    let mut out = rank.zeros(heads * rows.len() * d)?;
    rank.layers.copy_rows(src, &indices(rows.iter().copied()), &mut out, &indices(0..rows.len()), heads, d)?;
    Ok(out)
}

/// The partial `(out, lse)` of `nq` queries `q` (`[heads, nq, d]`, positions `q_pos`) over
/// `block`, with no window and no causal mask, in new buffers.
fn partial(rank: &GpuRank, shard: &Shard<'_>, q: &CudaSlice<f32>, q_pos: &CudaSlice<i64>, nq: usize, block: BlockRef<'_>, scale: f32) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (heads, d) = (shard.heads, shard.head_dim);
    let dims = Dims { heads, kv_heads: shard.kv_heads, queries: nq, keys: block.len, head_dim: d, value_dim: d };
    let inputs = Inputs { q, k: block.k, v: block.v, q_pos, k_pos: block.pos, key_valid: Some(block.valid), causal: false, window: None, scale };
    let (mut out, mut lse) = (rank.zeros(heads * nq * d)?, rank.zeros(heads * nq)?);
    rank.attention.launch_in(dims, &inputs, operands(shard.precision), &mut out, &mut lse)?;
    Ok((out, lse))
}

/// Window attention with global tokens (as `tome_dist::ops::window_attention`): the window's
/// keys with the global tokens' columns masked (they count once, through the global keys), the
/// global keys all-gathered, and the global queries over every key replacing their rows.
/// `own` is the shard's own keys with its positions and validity on the device.
#[allow(clippy::too_many_arguments)]
pub(super) fn window_with_globals(
    rank: &GpuRank,
    group: &dyn Group,
    plan: &ShardPlan,
    shard: &Shard<'_>,
    own: BlockRef<'_>,
    one_sided: usize,
    globals: &Globals<'_>,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let (heads, kv_heads, d, n) = (shard.heads, shard.kv_heads, shard.head_dim, shard.pos.len());
    let is_global = |p: i64| usize::try_from(p).is_ok_and(|p| globals.positions.binary_search(&p).is_ok());
    let local_only = |pos: &[i64], valid: &[bool]| -> Vec<bool> { pos.iter().zip(valid).map(|(&p, &v)| v && !is_global(p)).collect() };
    let mut acc = Accumulator::new(rank, heads, n, d)?;

    // The window, without the global tokens' keys: the shard's own and its halo's, the halo
    // as device frames.
    if n > 0 {
        let valid = upload_flags(rank, &local_only(shard.pos, shard.valid))?;
        acc.add(rank, shard, own.pos, BlockRef { valid: &valid, ..own }, false, Some(one_sided), scale)?;
    }
    if group.size() > 1 {
        for (halo, pos) in window_halo(rank, group, plan, shard, WindowSpec { one_sided, causal: false, scale, precision: shard.precision })? {
            let Some(block) = key_block(&halo.frame, kv_heads, d)? else { continue };
            if n == 0 {
                continue;
            }
            if pos.iter().any(|&p| is_global(p)) {
                let flags = rank.stream.clone_dtoh(block.valid).map_err(|e| gpu_err("copy from the GPU", e))?;
                let valid = upload_flags(rank, &local_only(&pos, &flags.iter().map(|&f| f != 0).collect::<Vec<_>>()))?;
                acc.add(rank, shard, own.pos, BlockRef { valid: &valid, ..block }, false, Some(one_sided), scale)?;
            } else {
                acc.add(rank, shard, own.pos, block, false, Some(one_sided), scale)?;
            }
        }
    }

    // Every query over the global tokens' keys (local projections): this shard's, and every
    // other rank's as device frames (`tome_dist::ops::gather_global_keys`'s all-gather).
    let mine: Vec<usize> = (0..n).filter(|&i| is_global(shard.pos[i])).collect();
    let mine_pos: Vec<i64> = mine.iter().map(|&i| shard.pos[i]).collect();
    let mine_valid: Vec<bool> = mine.iter().map(|&i| shard.valid[i]).collect();
    let own_globals = (!mine.is_empty())
        .then(|| DeviceBlock::from_parts(rank, gather(rank, shard.k, &mine, kv_heads, d)?, gather(rank, shard.v, &mine, kv_heads, d)?, &mine_pos, &mine_valid))
        .transpose()?;
    if group.size() > 1 {
        let frame = match &own_globals {
            Some(block) => own_frame(rank, shard, block.as_ref())?,
            None => own_frame(rank, shard, BlockRef { len: 0, ..own })?,
        };
        for dst in (0..group.size()).filter(|&r| r != group.rank()) {
            group.send_device(dst, frame.clone())?;
        }
    }
    if let (Some(keys), true) = (&own_globals, n > 0) {
        acc.add(rank, shard, own.pos, keys.as_ref(), false, None, scale)?;
    }
    if group.size() > 1 {
        for src in (0..group.size()).filter(|&r| r != group.rank()) {
            let theirs = Held::new(group.recv_device(src, &rank.stream)?, rank);
            if let (Some(keys), true) = (key_block(&theirs.frame, kv_heads, d)?, n > 0) {
                acc.add(rank, shard, own.pos, keys, false, None, scale)?;
            }
        }
    }

    // The global queries (global projections) over every key, in place of their rows.
    let (q, k, v) = match globals.projections {
        Some([q, k, v]) => (q, k, v),
        None => (shard.q, shard.k, shard.v),
    };
    let global_shard = Shard { q, k, v, ..*shard };
    global_queries(rank, group, &global_shard, BlockRef { k, v, ..own }, &mine, scale, &mut acc.out)?;
    Ok(acc.out)
}

/// The global queries among the shard's rows (`mine`) over every key of the sequence, written
/// over their rows of `out` (`[heads, n, d]`), as `tome_dist::ops`' global queries make them.
/// Every rank takes part, whether or not it owns a global query: each computes every global
/// query's partial over the keys it owns (`own`: keys, values, positions and validity of the
/// shard), and the partials merge in rank order.
fn global_queries(rank: &GpuRank, group: &dyn Group, shard: &Shard<'_>, own: BlockRef<'_>, mine: &[usize], scale: f32, out: &mut CudaSlice<f32>) -> Result<()> {
    let (heads, d) = (shard.heads, shard.head_dim);
    let mine_pos: Vec<i64> = mine.iter().map(|&i| shard.pos[i]).collect();
    if group.size() == 1 {
        if mine.is_empty() {
            return Ok(());
        }
        let q = gather(rank, shard.q, mine, heads, d)?;
        let (merged, _) = partial(rank, shard, &q, &rank.upload(&mine_pos)?, mine.len(), own, scale)?;
        rank.layers.copy_rows(&merged, &indices(0..mine.len()), out, &indices(mine.iter().copied()), heads, d)?;
        return Ok(());
    }
    // Every rank's global queries, as device frames (`gather_global_queries`' all-gather),
    // joined ascending by position.
    let m = mine.len();
    let frame = vec![
        if m == 0 {
            DeviceTensor::empty(DType::F32, &[heads, 0, d])?
        } else {
            DeviceTensor::new(DeviceData::F32(Arc::new(gather(rank, shard.q, mine, heads, d)?)), &[heads, m, d])?
        },
        if m == 0 { DeviceTensor::empty(DType::I64, &[0])? } else { DeviceTensor::new(DeviceData::I64(Arc::new(rank.upload(&mine_pos)?)), &[m])? },
    ];
    let gathered = all_gather_device(rank, group, frame)?;
    let mut sources: Vec<(&CudaSlice<f32>, Vec<i64>)> = Vec::new();
    for (src, held) in gathered.iter().enumerate() {
        let [q, pos] = held.frame.as_slice() else {
            return Err(frame_error(src, "global query", held.frame.len(), 2));
        };
        let count = pos.elem_count();
        match (f32_of(q, &[heads, count, d], src)?, pos.data()) {
            (Some(q), Some(DeviceData::I64(p))) if pos.dims() == [count] => sources.push((q, rank.stream.clone_dtoh(p.as_ref()).map_err(|e| gpu_err("copy from the GPU", e))?)),
            (None, None) => {}
            _ => return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("rank {src}'s global query frame holds no i64 positions of its {count} queries")))),
        }
    }
    let order = ascending(sources.iter().map(|(_, pos)| pos.as_slice()));
    let positions: Vec<i64> = order.iter().map(|&(p, _, _)| p).collect();
    let g = positions.len();

    // This rank's partial of every global query over its keys, then the partials of every
    // rank merged in rank order (`merge_global_partials`).
    let local = if g == 0 {
        vec![DeviceTensor::empty(DType::F32, &[heads, 0, d])?, DeviceTensor::empty(DType::F32, &[heads, 0])?]
    } else {
        let (o, l) = if own.len == 0 {
            (rank.zeros(heads * g * d)?, rank.upload(&vec![f32::NEG_INFINITY; heads * g])?)
        } else {
            let mut all_q = rank.zeros(heads * g * d)?;
            for (s, (q, _)) in sources.iter().enumerate() {
                let (src, dst) = taken_from(&order, s);
                rank.layers.copy_rows(q, &src, &mut all_q, &dst, heads, d)?;
            }
            partial(rank, shard, &all_q, &rank.upload(&positions)?, g, own, scale)?
        };
        vec![DeviceTensor::new(DeviceData::F32(Arc::new(o)), &[heads, g, d])?, DeviceTensor::new(DeviceData::F32(Arc::new(l)), &[heads, g])?]
    };
    drop(gathered);
    let partials = all_gather_device(rank, group, local)?;
    if g == 0 {
        return Ok(());
    }
    let mut merged: Option<(CudaSlice<f32>, CudaSlice<f32>)> = None;
    for (src, held) in partials.iter().enumerate() {
        let [o, l] = held.frame.as_slice() else {
            return Err(frame_error(src, "global partial", held.frame.len(), 2));
        };
        let (Some(o), Some(l)) = (f32_of(o, &[heads, g, d], src)?, f32_of(l, &[heads, g], src)?) else {
            return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("rank {src} sent no partial of the {g} global queries"))));
        };
        match &mut merged {
            None => merged = Some((rank.stream.clone_dtod(o).map_err(|e| gpu_err("copy", e))?, rank.stream.clone_dtod(l).map_err(|e| gpu_err("copy", e))?)),
            Some((acc_o, acc_l)) => rank.layers.merge_partials(acc_o, acc_l, o, l, d)?,
        }
    }
    let Some((merged, _)) = merged else { return Ok(()) };
    if mine.is_empty() {
        return Ok(());
    }
    let at: Vec<usize> = mine_pos.iter().map(|p| positions.partition_point(|x| x < p)).collect();
    rank.layers.copy_rows(&merged, &indices(at), out, &indices(mine.iter().copied()), heads, d)?;
    Ok(())
}

/// Every rank's `frame`, in rank order (this rank's own among them), as device frames: sent to
/// every other rank, then taken from each (`Group::all_gather`'s order).
fn all_gather_device<'r>(rank: &'r GpuRank, group: &dyn Group, frame: DeviceFrame) -> Result<Vec<Held<'r>>> {
    let me = group.rank();
    for dst in (0..group.size()).filter(|&r| r != me) {
        group.send_device(dst, frame.clone())?;
    }
    let mut all = Vec::with_capacity(group.size());
    for src in 0..group.size() {
        all.push(Held::new(if src == me { frame.clone() } else { group.recv_device(src, &rank.stream)? }, rank));
    }
    Ok(all)
}

/// An f32 tensor of a peer's frame, checked against the shape this layer expects (`None` when
/// it is empty).
fn f32_of<'a>(t: &'a DeviceTensor, dims: &[usize], src: usize) -> Result<Option<&'a CudaSlice<f32>>> {
    if t.dims() != dims {
        return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("rank {src} sent a tensor of shape {:?} where this layer takes {dims:?}", t.dims()))));
    }
    match t.data() {
        Some(DeviceData::F32(x)) => Ok(Some(x.as_ref())),
        None if t.dtype() == DType::F32 => Ok(None),
        _ => Err(ModelError::Dist(tome_dist::DistError::Plan(format!("rank {src} sent {:?} values where this layer takes f32", t.dtype())))),
    }
}

fn frame_error(src: usize, what: &str, got: usize, want: usize) -> ModelError {
    ModelError::Dist(tome_dist::DistError::Plan(format!("a {what} frame from rank {src} has {got} tensors, not {want}")))
}

/// Every row of the sources whose positions are `positions`, ascending by position, as
/// `(position, source, row in it)`.
fn ascending<'a>(positions: impl IntoIterator<Item = &'a [i64]>) -> Vec<(i64, usize, usize)> {
    let mut order: Vec<(i64, usize, usize)> = positions.into_iter().enumerate().flat_map(|(s, pos)| pos.iter().enumerate().map(move |(row, &p)| (p, s, row))).collect();
    order.sort_by_key(|&(p, _, _)| p);
    order
}

/// The rows source `s` gives a join in `order`, and the rows they take there, as the row-copy
/// kernel takes them.
fn taken_from(order: &[(i64, usize, usize)], s: usize) -> (Vec<u32>, Vec<u32>) {
    order.iter().enumerate().filter(|(_, e)| e.1 == s).map(|(at, e)| (e.2 as u32, at as u32)).unzip()
}

/// Keys on the device with their positions and validity on the host.
type Joined = (DeviceBlock, Vec<i64>, Vec<bool>);

/// The shard's own keys (`own`) and the fetched `pieces` as one block ascending by position
/// (`tome_dist::ops::blocksparse_keys`'s result), on the device, with its positions and
/// validity on the host; `None` when there is no key at all.
fn join_ascending(rank: &GpuRank, shard: &Shard<'_>, own: BlockRef<'_>, pieces: &[(Held<'_>, Vec<i64>)]) -> Result<Option<Joined>> {
    let (heads, d) = (shard.kv_heads, shard.head_dim);
    // Each source block with its positions and validity on the host: the shard, then the pieces.
    let mut sources: Vec<(BlockRef<'_>, &[i64], Vec<bool>)> = vec![(own, shard.pos, shard.valid.to_vec())];
    for (held, pos) in pieces {
        if let Some(block) = key_block(&held.frame, heads, d)? {
            let flags = rank.stream.clone_dtoh(block.valid).map_err(|e| gpu_err("copy from the GPU", e))?;
            sources.push((block, pos, flags.iter().map(|&f| f != 0).collect()));
        }
    }
    let order = ascending(sources.iter().map(|(_, pos, _)| *pos));
    let total = order.len();
    if total == 0 {
        return Ok(None);
    }
    let (mut k, mut v) = (rank.zeros(heads * total * d)?, rank.zeros(heads * total * d)?);
    for (s, (block, _, _)) in sources.iter().enumerate() {
        let (src, dst) = taken_from(&order, s);
        rank.layers.copy_rows(block.k, &src, &mut k, &dst, heads, d)?;
        rank.layers.copy_rows(block.v, &src, &mut v, &dst, heads, d)?;
    }
    let pos: Vec<i64> = order.iter().map(|&(p, _, _)| p).collect();
    let valid: Vec<bool> = order.iter().map(|&(_, s, row)| sources[s].2[row]).collect();
    Ok(Some((DeviceBlock::from_parts(rank, k, v, &pos, &valid)?, pos, valid)))
}

/// BigBird's block-sparse attention (as `tome_dist::ops::blocksparse_attention`): each run of
/// the shard's rows in one query block attends to its listed key blocks, gathered on the device
/// (repeats kept); the first and last blocks' queries see every key. `own` is the shard's own
/// keys with its positions and validity on the device.
#[allow(clippy::too_many_arguments)]
pub(super) fn block_sparse(
    rank: &GpuRank,
    group: &dyn Group,
    plan: &ShardPlan,
    shard: &Shard<'_>,
    own: BlockRef<'_>,
    block: usize,
    random: usize,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let (heads, kv_heads, d, n) = (shard.heads, shard.kv_heads, shard.head_dim, shard.pos.len());
    let pattern = BlockSparsePlan::new(plan.len(), block, heads, &RandomBlocks::AllZero(random))?;
    if heads != kv_heads || !pattern.uniform_across_heads() {
        return Err(ModelError::Unsupported("block-sparse attention on a GPU rank takes one key head per query head, every head seeing the same blocks".into()));
    }
    // The keys the shard's query blocks list: its own when it is alone, else fetched (none for
    // a shard whose blocks list nothing).
    if group.size() == 1 && shard.pos.windows(2).any(|w| w[1] < w[0]) {
        return Err(ModelError::Input("a lone rank's positions must ascend".into()));
    }
    let fetched = if group.size() == 1 {
        None
    } else {
        if plan.ranks() != group.size() {
            return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("the plan has {} shards for a group of {} ranks", plan.ranks(), group.size()))));
        }
        let pieces = fetch_rows(rank, group, shard, &blocksparse_exchange(plan, group.rank(), &pattern))?;
        join_ascending(rank, shard, own, &pieces)?
    };
    let keys: Option<(BlockRef<'_>, &[i64], &[bool])> = match &fetched {
        Some((block, pos, valid)) => Some((block.as_ref(), pos, valid)),
        None if group.size() == 1 => Some((own, shard.pos, shard.valid)),
        None => None,
    };

    let mut out = rank.zeros(heads * n * d)?;
    let runs = query_block_runs(shard.pos, &pattern);
    if let Some((keys, key_pos, key_valid)) = keys {
        let rows_of_block = BlockRows::new(key_pos, &pattern);
        for (qb, rows) in runs.iter().filter(|(qb, _)| !pattern.is_global_query_block(*qb)) {
            let key_rows = rows_of_block.key_rows(&pattern, 0, *qb);
            if key_rows.is_empty() {
                continue;
            }
            let pos: Vec<i64> = key_rows.iter().map(|&i| key_pos[i]).collect();
            let valid: Vec<bool> = key_rows.iter().map(|&i| key_valid[i]).collect();
            let listed = DeviceBlock::from_parts(rank, gather(rank, keys.k, &key_rows, heads, d)?, gather(rank, keys.v, &key_rows, heads, d)?, &pos, &valid)?;
            let query_rows: Vec<usize> = rows.clone().collect();
            let q = gather(rank, shard.q, &query_rows, heads, d)?;
            let (o, _) = partial(rank, shard, &q, &rank.upload(&shard.pos[rows.clone()])?, query_rows.len(), listed.as_ref(), scale)?;
            rank.layers.copy_rows(&o, &indices(0..query_rows.len()), &mut out, &indices(rows.clone()), heads, d)?;
        }
    }
    let global_rows: Vec<usize> = runs.iter().filter(|(qb, _)| pattern.is_global_query_block(*qb)).flat_map(|(_, r)| r.clone()).collect();
    global_queries(rank, group, shard, own, &global_rows, scale, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zigzag shard's two runs and two fetched pieces join ascending, and each source's rows
    /// go to the places their positions take.
    #[test]
    fn rows_of_several_sources_join_ascending_by_position() {
        let (own, before, between): (Vec<i64>, Vec<i64>, Vec<i64>) = (vec![4, 5, 10, 11], vec![2, 3], vec![6, 7]);
        let order = ascending([own.as_slice(), before.as_slice(), between.as_slice()]);
        assert_eq!(order.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3, 4, 5, 6, 7, 10, 11]);
        assert_eq!(taken_from(&order, 0), (vec![0, 1, 2, 3], vec![2, 3, 6, 7]));
        assert_eq!(taken_from(&order, 1), (vec![0, 1], vec![0, 1]));
        assert_eq!(taken_from(&order, 2), (vec![0, 1], vec![4, 5]));
        assert_eq!(taken_from(&order, 3), (vec![], vec![]));
    }
}
