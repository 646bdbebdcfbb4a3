//! Attention of a shard held on the GPU, across ranks: dense (ring) and window (halo) attention
//! with the plans of `tome_dist::ops`, their key blocks crossing ranks as device frames in the
//! CPU operators' layout (`Group::send_device`: no host copy where the Group moves device
//! buffers), and every partial computed and merged on the device. With one rank nothing leaves
//! the device. Global tokens and block-sparse attention,
//! which single out some queries, are `super::sparse`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::blocksparse::{BlockSparsePlan, RandomBlocks};
use tome_attn::Precision;
use tome_dist::ops::{blocksparse_attention, window_attention, window_exchange, window_keys, GlobalTokens, KeyBlock, RowExchange, WindowSpec};
use tome_dist::{DeviceData, DeviceFrame, DeviceTensor, Group, ShardPlan};
use tome_gpu::attention::{Dims, Inputs};

pub(crate) use super::sparse::Globals;
use super::{operands, sparse, GpuRank};
use crate::error::{ModelError, Result};

/// Which keys a layer's queries see.
#[derive(Clone, Copy)]
pub(crate) enum Pattern<'a> {
    /// Every key (`causal`: up to the query's own position), through the ring.
    Dense { causal: bool },
    /// Keys within `one_sided` positions, the halo fetched from the neighbours.
    Window { one_sided: usize, causal: bool },
    /// Longformer's window with global tokens (bidirectional): every query also sees the global
    /// tokens' keys, and a global token's query sees every key.
    Global { one_sided: usize, globals: Globals<'a> },
    /// BigBird's block-sparse attention: `block`-token blocks, each seeing the first and last
    /// blocks, its neighbours and `random` random blocks (all block 0: transformers' eval plan);
    /// the first and last blocks' queries see every key.
    BlockSparse { block: usize, random: usize },
}

/// A shard's queries (`[heads, n, d]`), keys and values (`[kv_heads, n, d]`) on the device, at
/// `pos` (ascending).
pub(crate) struct Shard<'a> {
    pub q: &'a CudaSlice<f32>,
    pub k: &'a CudaSlice<f32>,
    pub v: &'a CudaSlice<f32>,
    pub pos: &'a [i64],
    pub valid: &'a [bool],
    pub heads: usize,
    /// Key/value heads: fewer than `heads` under grouped-query attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The run's precision: bf16 and f16 runs attend on tensor cores where the head sizes fit.
    pub precision: Precision,
}

/// Keys and values on the device with their positions and validity, borrowed.
#[derive(Clone, Copy)]
pub(super) struct BlockRef<'a> {
    pub k: &'a CudaSlice<f32>,
    pub v: &'a CudaSlice<f32>,
    pub pos: &'a CudaSlice<i64>,
    pub valid: &'a CudaSlice<u8>,
    pub len: usize,
}

/// A block copied to the device (never an empty one: the driver allocates no zero-sized
/// buffer).
pub(super) struct DeviceBlock {
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    pos: CudaSlice<i64>,
    valid: CudaSlice<u8>,
    len: usize,
}

impl DeviceBlock {
    /// Keys and values already on the device, with their positions and validity copied over.
    pub(super) fn from_parts(rank: &GpuRank, k: CudaSlice<f32>, v: CudaSlice<f32>, pos: &[i64], valid: &[bool]) -> Result<Self> {
        Ok(DeviceBlock { k, v, pos: rank.upload(pos)?, valid: upload_flags(rank, valid)?, len: pos.len() })
    }

    pub(super) fn as_ref(&self) -> BlockRef<'_> {
        BlockRef { k: &self.k, v: &self.v, pos: &self.pos, valid: &self.valid, len: self.len }
    }
}

/// Validity flags on the device, as the kernel reads them.
pub(super) fn upload_flags(rank: &GpuRank, flags: &[bool]) -> Result<CudaSlice<u8>> {
    rank.upload(&flags.iter().map(|&b| u8::from(b)).collect::<Vec<_>>())
}

/// The shard's attention under `pattern` merged back into rows `[n, heads · d]`, on the device.
pub(crate) fn attend_rows(rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, shard: &Shard<'_>, pattern: Pattern<'_>, scale: f32) -> Result<CudaSlice<f32>> {
    let context = attend(rank, group, plan, shard, pattern, scale)?;
    let n = shard.pos.len();
    let mut rows = rank.zeros(n * shard.heads * shard.head_dim)?;
    rank.layers.merge_heads(&context, n, shard.heads, shard.head_dim, &mut rows)?;
    Ok(rows)
}

/// A rank without rows through `layers` (each layer's pattern and scale): its part in each
/// layer's exchanges, no device work; returns its (empty) hidden rows of `width`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn without_rows<'a>(
    group: &dyn Group,
    plan: &ShardPlan,
    layers: impl IntoIterator<Item = Result<(Pattern<'a>, f32)>>,
    kv_heads: usize,
    head_dim: usize,
    width: usize,
    after_layer: &mut dyn FnMut(usize) -> bool,
) -> Result<Tensor> {
    for (l, layer) in layers.into_iter().enumerate() {
        let (pattern, scale) = layer?;
        exchange_only(group, plan, pattern, kv_heads, head_dim, scale)?;
        if !after_layer(l) {
            return Err(crate::error::ModelError::Cancelled);
        }
    }
    Ok(Tensor::zeros((0, width), candle_core::DType::F32, &Device::Cpu)?)
}

/// The shard's attention output `[heads, n, d]` under `pattern`, on the device.
pub(super) fn attend(rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, shard: &Shard<'_>, pattern: Pattern<'_>, scale: f32) -> Result<CudaSlice<f32>> {
    let (heads, d, n) = (shard.heads, shard.head_dim, shard.pos.len());
    let q_pos = rank.upload(shard.pos)?;
    let own_valid = upload_flags(rank, shard.valid)?;
    let own = BlockRef { k: shard.k, v: shard.v, pos: &q_pos, valid: &own_valid, len: n };
    match pattern {
        Pattern::Global { one_sided, globals } => return sparse::window_with_globals(rank, group, plan, shard, own, one_sided, &globals, scale),
        Pattern::BlockSparse { block, random } => return sparse::block_sparse(rank, group, plan, shard, own, block, random, scale),
        Pattern::Dense { .. } | Pattern::Window { .. } => {}
    }
    let mut acc = Accumulator::new(rank, heads, n, d)?;
    match pattern {
        Pattern::Window { one_sided, causal } => {
            if n > 0 {
                acc.add(rank, shard, &q_pos, own, causal, Some(one_sided), scale)?;
            }
            if group.size() > 1 {
                for (halo, _) in window_halo(rank, group, plan, shard, WindowSpec { one_sided, causal, scale, precision: shard.precision })? {
                    if let (Some(block), true) = (key_block(&halo.frame, shard.kv_heads, shard.head_dim)?, n > 0) {
                        acc.add(rank, shard, &q_pos, block, causal, Some(one_sided), scale)?;
                    }
                }
            }
        }
        Pattern::Dense { causal } => {
            if group.size() == 1 {
                if n > 0 {
                    acc.add(rank, shard, &q_pos, own, causal, None, scale)?;
                }
            } else {
                ring(rank, group, plan, shard, own, &mut acc, causal, scale)?;
            }
        }
        Pattern::Global { .. } | Pattern::BlockSparse { .. } => {}
    }
    Ok(acc.out)
}

/// Ring attention (as `tome_dist::ops::ring_attention`), its blocks device frames: each block
/// is forwarded to the next rank before this rank computes on it, and a block wholly after this
/// rank's last query is passed on without being computed under a causal mask. A block is a
/// rank's shard, at the positions the plan gives it.
#[allow(clippy::too_many_arguments)]
fn ring(rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, shard: &Shard<'_>, own: BlockRef<'_>, acc: &mut Accumulator, causal: bool, scale: f32) -> Result<()> {
    let (me, p) = (group.rank(), group.size());
    let q_max = shard.pos.iter().copied().max();
    let mut frame = Held::new(own_frame(rank, shard, own)?, rank);
    for step in 0..p {
        let last = step + 1 == p;
        if !last {
            group.send_device(group.next_rank(), frame.frame.clone())?;
        }
        let k0 = plan.ranges((me + p - step) % p).first().map(|x| x.start as i64);
        let visible = !causal || matches!((q_max, k0), (Some(qm), Some(k0)) if k0 <= qm);
        if visible && !shard.pos.is_empty() {
            if let Some(block) = key_block(&frame.frame, shard.kv_heads, shard.head_dim)? {
                acc.add(rank, shard, own.pos, block, causal, None, scale)?;
            }
        }
        if !last {
            frame = Held::new(group.recv_device(group.prev_rank(), &rank.stream)?, rank);
        }
    }
    Ok(())
}

/// The halo of the shard under `spec` (`tome_dist::ops::window_keys`'s exchange), as
/// [`fetch_rows`] gives it.
pub(super) fn window_halo<'r>(rank: &'r GpuRank, group: &dyn Group, plan: &ShardPlan, shard: &Shard<'_>, spec: WindowSpec) -> Result<Vec<(Held<'r>, Vec<i64>)>> {
    if plan.ranks() != group.size() {
        return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("the plan has {} shards for a group of {} ranks", plan.ranks(), group.size()))));
    }
    fetch_rows(rank, group, shard, &window_exchange(plan, group.rank(), spec))
}

/// The rows of `exchange` as device frames: the rows each peer needs of this shard go to it,
/// gathered on the device, in tome-dist's frames (`[keys, values, validity]`); what peers send
/// here comes back as one block of keys, values, positions and validity per peer, with its
/// positions on the host.
pub(super) fn fetch_rows<'r>(rank: &'r GpuRank, group: &dyn Group, shard: &Shard<'_>, exchange: &RowExchange) -> Result<Vec<(Held<'r>, Vec<i64>)>> {
    let (heads, d) = (shard.kv_heads, shard.head_dim);
    // Every row asked is checked before anything is sent, so that no peer waits on a frame that
    // will not come.
    let sends: Vec<(usize, Vec<usize>)> = exchange.sends.iter().map(|(peer, parts)| (*peer, parts.iter().flat_map(|(x, offset)| *offset..*offset + x.len()).collect())).collect();
    if let Some(&bad) = sends.iter().flat_map(|(_, rows)| rows).find(|&&r| r >= shard.valid.len()) {
        return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("row {bad} asked of a shard of {}", shard.valid.len()))));
    }
    for (peer, rows) in &sends {
        let kv_dims = [heads, rows.len(), d];
        let valid: Vec<u8> = rows.iter().map(|&r| u8::from(shard.valid[r])).collect();
        let frame = vec![
            DeviceTensor::new(DeviceData::F32(Arc::new(sparse::gather(rank, shard.k, rows, heads, d)?)), &kv_dims)?,
            DeviceTensor::new(DeviceData::F32(Arc::new(sparse::gather(rank, shard.v, rows, heads, d)?)), &kv_dims)?,
            DeviceTensor::new(DeviceData::U8(Arc::new(rank.upload(&valid)?)), &[rows.len()])?,
        ];
        group.send_device(*peer, frame)?;
    }
    let mut fetched = Vec::with_capacity(exchange.receives.len());
    for (peer, parts) in &exchange.receives {
        let mut frame = group.recv_device(*peer, &rank.stream)?;
        let m = RowExchange::rows(parts);
        let pos: Vec<i64> = parts.iter().flat_map(|(x, _)| x.clone()).map(|p| p as i64).collect();
        if frame.len() != 3 {
            return Err(ModelError::Dist(tome_dist::DistError::Plan(format!("a key frame from rank {peer} has {} tensors, not 3", frame.len()))));
        }
        let valid = frame.pop().into_iter();
        let on_device = if m == 0 { DeviceTensor::empty(DType::I64, &[0])? } else { DeviceTensor::new(DeviceData::I64(Arc::new(rank.upload(&pos)?)), &[m])? };
        fetched.push((Held::new(frame.into_iter().chain([on_device]).chain(valid).collect(), rank), pos));
    }
    Ok(fetched)
}

/// A device frame this rank reads on its stream, retired when dropped
/// ([`GpuRank::retire`]): kept until its reads are done, so that no buffer it shares with
/// other ranks is freed under this rank's kernels.
pub(super) struct Held<'r> {
    pub(super) frame: DeviceFrame,
    rank: &'r GpuRank,
}

impl<'r> Held<'r> {
    pub(super) fn new(frame: DeviceFrame, rank: &'r GpuRank) -> Self {
        Held { frame, rank }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.rank.retire(std::mem::take(&mut self.frame));
    }
}

/// The shard's keys, values, positions and validity as a device frame (a copy: the frame's
/// buffers outlive the layer's), in `KeyBlock::to_frame`'s layout.
pub(super) fn own_frame(rank: &GpuRank, shard: &Shard<'_>, own: BlockRef<'_>) -> Result<DeviceFrame> {
    let (n, kv_dims) = (own.len, [shard.kv_heads, own.len, shard.head_dim]);
    if n == 0 {
        return Ok(vec![
            DeviceTensor::empty(DType::F32, &kv_dims)?,
            DeviceTensor::empty(DType::F32, &kv_dims)?,
            DeviceTensor::empty(DType::I64, &[0])?,
            DeviceTensor::empty(DType::U8, &[0])?,
        ]);
    }
    let copy = |what| move |e| super::gpu_err(what, e);
    Ok(vec![
        DeviceTensor::new(DeviceData::F32(Arc::new(rank.stream.clone_dtod(own.k).map_err(copy("copy keys"))?)), &kv_dims)?,
        DeviceTensor::new(DeviceData::F32(Arc::new(rank.stream.clone_dtod(own.v).map_err(copy("copy values"))?)), &kv_dims)?,
        DeviceTensor::new(DeviceData::I64(Arc::new(rank.stream.clone_dtod(own.pos).map_err(copy("copy positions"))?)), &[n])?,
        DeviceTensor::new(DeviceData::U8(Arc::new(rank.stream.clone_dtod(own.valid).map_err(copy("copy flags"))?)), &[n])?,
    ])
}

/// The key block a device frame holds (`None` when it has no row), checked against the layer's
/// shape before any kernel reads it: keys and values `[kv_heads, n, head_dim]` f32, n i64
/// positions, n u8 flags.
pub(super) fn key_block(frame: &[DeviceTensor], kv_heads: usize, head_dim: usize) -> Result<Option<BlockRef<'_>>> {
    let bad = |why: String| ModelError::Dist(tome_dist::DistError::Plan(format!("a key frame {why}")));
    let [k, v, pos, valid] = frame else {
        return Err(bad(format!("has {} tensors, not 4", frame.len())));
    };
    let n = pos.elem_count();
    let kv_dims = [kv_heads, n, head_dim];
    if k.dims() != kv_dims || v.dims() != kv_dims || pos.dims() != [n] || valid.dims() != [n] {
        return Err(bad(format!("of shapes {:?}, {:?}, {:?}, {:?} where this layer takes {kv_dims:?} keys and values", k.dims(), v.dims(), pos.dims(), valid.dims())));
    }
    match (k.data(), v.data(), pos.data(), valid.data()) {
        (Some(DeviceData::F32(k)), Some(DeviceData::F32(v)), Some(DeviceData::I64(pos)), Some(DeviceData::U8(valid))) => Ok(Some(BlockRef { k, v, pos, valid, len: n })),
        _ if n == 0 && [k.dtype(), v.dtype(), pos.dtype(), valid.dtype()] == [DType::F32, DType::F32, DType::I64, DType::U8] => Ok(None),
        _ => Err(bad("whose tensors are not f32 keys and values, i64 positions and u8 flags".into())),
    }
}

/// The ring's exchanges: each block in hand is forwarded to the next rank, then `compute` sees
/// it, then the next block comes from the previous rank.
fn pass_around(group: &dyn Group, own: KeyBlock, compute: &mut dyn FnMut(&KeyBlock) -> Result<()>) -> Result<()> {
    let p = group.size();
    let mut block = own;
    for step in 0..p {
        let last = step + 1 == p;
        if !last {
            group.send(group.next_rank(), block.to_frame()?)?;
        }
        compute(&block)?;
        if !last {
            block = KeyBlock::from_frame(group.recv(group.prev_rank())?)?;
        }
    }
    Ok(())
}

/// A rank without rows in a layer of `pattern`: no device work, only its part in the other
/// ranks' exchanges (the same frames as [`attend`] sends and receives, made by the CPU
/// operators on empty shards where those exchange more than keys). `kv_heads` are the layer's
/// query heads too wherever queries cross ranks (global tokens, block-sparse: BERT-family
/// layers, where they are equal).
fn exchange_only(group: &dyn Group, plan: &ShardPlan, pattern: Pattern<'_>, kv_heads: usize, head_dim: usize, scale: f32) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    // No query row is attended here, so the calls' arithmetic is moot.
    let precision = Precision::F32;
    let empty = || Tensor::zeros((kv_heads, 0, head_dim), candle_core::DType::F32, &Device::Cpu);
    let own = KeyBlock { k: empty()?, v: empty()?, pos: Vec::new(), valid: Vec::new() };
    match pattern {
        Pattern::Window { one_sided, causal } => {
            window_keys(group, plan, &own, WindowSpec { one_sided, causal, scale, precision })?;
        }
        Pattern::Dense { .. } => pass_around(group, own, &mut |_| Ok(()))?,
        Pattern::Global { one_sided, globals } => {
            let globals = GlobalTokens { positions: globals.positions.to_vec(), projections: None };
            window_attention(group, plan, &empty()?, own, WindowSpec { one_sided, causal: false, scale, precision }, Some(&globals))?;
        }
        Pattern::BlockSparse { block, random } => {
            let pattern = BlockSparsePlan::new(plan.len(), block, kv_heads, &RandomBlocks::AllZero(random))?;
            blocksparse_attention(group, plan, &empty()?, own, &pattern, scale, precision)?;
        }
    }
    Ok(())
}

/// The running partial of the shard's queries: output and log-sum-exp, on the device.
pub(super) struct Accumulator {
    pub out: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    /// A second partial, for each block after the first.
    scratch: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    blocks: usize,
}

impl Accumulator {
    pub(super) fn new(rank: &GpuRank, heads: usize, n: usize, d: usize) -> Result<Self> {
        Ok(Accumulator { out: rank.zeros(heads * n * d)?, lse: rank.upload(&vec![f32::NEG_INFINITY; heads * n])?, scratch: None, blocks: 0 })
    }

    /// Attends the shard's queries to `block` and merges the partial in.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add(&mut self, rank: &GpuRank, shard: &Shard<'_>, q_pos: &CudaSlice<i64>, block: BlockRef<'_>, causal: bool, window: Option<usize>, scale: f32) -> Result<()> {
        let n = shard.pos.len();
        let dims = Dims { heads: shard.heads, kv_heads: shard.kv_heads, queries: n, keys: block.len, head_dim: shard.head_dim, value_dim: shard.head_dim };
        let inputs = Inputs { q: shard.q, k: block.k, v: block.v, q_pos, k_pos: block.pos, key_valid: Some(block.valid), causal, window, scale };
        if self.blocks == 0 {
            rank.attention.launch_in(dims, &inputs, operands(shard.precision), &mut self.out, &mut self.lse)?;
        } else {
            let (out, lse) = match self.scratch.take() {
                Some(s) => s,
                None => (rank.zeros(self.out.len())?, rank.zeros(self.lse.len())?),
            };
            let (mut out, mut lse) = (out, lse);
            rank.attention.launch_in(dims, &inputs, operands(shard.precision), &mut out, &mut lse)?;
            rank.layers.merge_partials(&mut self.out, &mut self.lse, &out, &lse, shard.head_dim)?;
            self.scratch = Some((out, lse));
        }
        self.blocks += 1;
        Ok(())
    }
}
