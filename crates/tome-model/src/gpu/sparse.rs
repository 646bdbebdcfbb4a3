//! Attention on the device that singles out some queries or keys: Longformer's global tokens
//! over window attention, and BigBird's block-sparse attention with its global first and last
//! blocks. The exchanges are tome-dist's, the same frames in the same order as its CPU
//! operators (`window_attention`, `blocksparse_attention`), so GPU and CPU ranks agree on the
//! wire; every partial is computed on the device. The window's halo and the global tokens' keys
//! cross as device frames; the global queries, their partials (merged across ranks on the host,
//! in f32 and rank order, as on the CPU) and BigBird's listed blocks cross through the host.
//! With one rank nothing leaves the device.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::blocksparse::{BlockSparsePlan, RandomBlocks};
use tome_attn::Partial;
use tome_dist::ops::{blocksparse_keys, gather_global_queries, merge_global_partials, query_block_runs, BlockRows, WindowSpec};
use tome_dist::{Group, ShardPlan};
use tome_gpu::attention::{Dims, Inputs};

use super::attention::{key_block, own_frame, to_host, upload_flags, window_halo, Accumulator, BlockRef, DeviceBlock, Held, Shard};
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
        for (halo, pos) in window_halo(rank, group, plan, shard, WindowSpec { one_sided, causal: false, scale })? {
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
/// over their rows of `out` (`[heads, n, d]`). Every rank takes part, whether or not it owns a
/// global query: each computes every global query's partial over the keys it owns (`own`:
/// keys, values, positions and validity of the shard), and the partials merge in rank order.
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
    let q_rows = if mine.is_empty() { Vec::new() } else { rank.download(&gather(rank, shard.q, mine, heads, d)?)? };
    let (positions, all_q) = gather_global_queries(group, Tensor::from_vec(q_rows, (heads, mine.len(), d), &Device::Cpu)?, mine_pos.clone())?;
    let g = positions.len();
    let local = if g == 0 || own.len == 0 {
        Partial::empty(heads, g, d)?
    } else {
        let q = rank.upload_tensor(&all_q)?;
        let (o, l) = partial(rank, shard, &q, &rank.upload(&positions)?, g, own, scale)?;
        Partial { out: Tensor::from_vec(rank.download(&o)?, (heads, g, d), &Device::Cpu)?, lse: Tensor::from_vec(rank.download(&l)?, (heads, g), &Device::Cpu)? }
    };
    let merged = merge_global_partials(group, local)?;
    if mine.is_empty() {
        return Ok(());
    }
    let at: Vec<usize> = mine_pos.iter().map(|p| positions.partition_point(|x| x < p)).collect();
    let merged = rank.upload_tensor(&merged.out)?;
    rank.layers.copy_rows(&merged, &indices(at), out, &indices(mine.iter().copied()), heads, d)?;
    Ok(())
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
        blocksparse_keys(group, plan, &to_host(rank, shard)?, &pattern)?
            .filter(|k| !k.is_empty())
            .map(|k| Ok::<_, ModelError>((DeviceBlock::upload(rank, &k)?, k.pos, k.valid)))
            .transpose()?
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
