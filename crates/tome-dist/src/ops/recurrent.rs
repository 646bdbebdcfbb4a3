//! `recurrent` and `compressive`: segment-level recurrence across ranks (Dai et al. 2019,
//! Transformer-XL; Rae et al. 2019, Compressive Transformer).
//!
//! The sequence is processed in segments of `segment_len`; each segment attends to a memory of
//! the layer inputs that came before it (Transformer-XL: the last `mem_len` of them; Compressive:
//! plus a FIFO of older ones, compressed). Ranks own whole segments in order. The memory a
//! rank's first segment needs at layer l is the fold of every earlier segment's layer-l input —
//! which the previous rank can compute as soon as *it* has its layer-l inputs. So each rank
//! receives its incoming memory, folds its own segments into the outgoing memory and passes it
//! on *before* computing the layer: layer l of a rank starts once the previous rank has finished
//! layer l-1 — a wavefront in which all P ranks work at once.

use candle_core::{Device, Tensor};

use crate::error::{DistError, Result};
use crate::group::{Frame, Group};
use crate::layout::ShardPlan;

/// What a segment remembers of the segments before it.
pub trait Memory: Sized + Clone {
    /// The memory after a segment whose layer input is `segment` (`[tokens, width]`).
    fn advance(&self, segment: &Tensor) -> Result<Self>;
    fn to_frame(&self) -> Frame;
    /// The same kind of memory, with the state carried by `frame`.
    fn with_frame(&self, frame: Frame) -> Result<Self>;
}

/// Transformer-XL memory: the last `mem_len` layer inputs (`[≤ mem_len, width]`).
#[derive(Clone, Debug)]
pub struct XlMemory {
    pub mem: Tensor,
    pub mem_len: usize,
}

impl XlMemory {
    /// The empty memory of the first segment.
    pub fn empty(mem_len: usize, width: usize) -> Result<Self> {
        Ok(XlMemory { mem: Tensor::zeros((0, width), candle_core::DType::F32, &Device::Cpu)?, mem_len })
    }
}

/// The last `n` rows of `t`.
fn last_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    Ok(t.narrow(0, rows - n.min(rows), n.min(rows))?)
}

impl Memory for XlMemory {
    fn advance(&self, segment: &Tensor) -> Result<Self> {
        let all = Tensor::cat(&[&self.mem, segment], 0)?;
        Ok(XlMemory { mem: last_rows(&all, self.mem_len)?, mem_len: self.mem_len })
    }

    fn to_frame(&self) -> Frame {
        vec![self.mem.clone()]
    }

    fn with_frame(&self, mut frame: Frame) -> Result<Self> {
        let mem = frame.pop().filter(|_| frame.is_empty()).ok_or_else(|| DistError::Plan("a memory frame has one tensor".into()))?;
        Ok(XlMemory { mem, mem_len: self.mem_len })
    }
}

/// How evicted memories are compressed, `rate` rows into one.
#[derive(Clone, Debug)]
pub enum Compression {
    Mean,
    Max,
    /// 1-D convolution with kernel = stride = rate: weight `[width_out, width, rate]`, bias `[width_out]`.
    Conv {
        weight: Tensor,
        bias: Tensor,
    },
}

/// Compressive Transformer memory: `mem` (the last `mem_len` inputs) and `cmem` (the last
/// `cmem_len` compressed ones); inputs that leave `mem` are compressed at `rate` into `cmem`.
#[derive(Clone, Debug)]
pub struct CompressiveMemory {
    pub mem: Tensor,
    pub cmem: Tensor,
    pub mem_len: usize,
    pub cmem_len: usize,
    pub rate: usize,
    pub compression: Compression,
}

impl CompressiveMemory {
    pub fn empty(mem_len: usize, cmem_len: usize, rate: usize, compression: Compression, width: usize) -> Result<Self> {
        if rate == 0 {
            return Err(DistError::Plan("the compression rate must be positive".into()));
        }
        let z = Tensor::zeros((0, width), candle_core::DType::F32, &Device::Cpu)?;
        Ok(CompressiveMemory { mem: z.clone(), cmem: z, mem_len, cmem_len, rate, compression })
    }

    /// `rows` (`[k·rate, width]`) compressed to `[k, width]`.
    pub fn compress(&self, rows: &Tensor) -> Result<Tensor> {
        let (n, width) = rows.dims2()?;
        if n % self.rate != 0 {
            return Err(DistError::Unsupported(format!(
                "{n} evicted memories do not compress at rate {}: choose segment and memory lengths that are multiples of the rate",
                self.rate
            )));
        }
        let groups = rows.reshape((n / self.rate, self.rate, width))?;
        Ok(match &self.compression {
            Compression::Mean => groups.mean(1)?,
            Compression::Max => groups.max(1)?,
            Compression::Conv { weight, bias } => {
                // out[g, o] = Σ_{c,t} w[o, c, t] · x[g·rate + t, c] + b[o]
                let (out_w, _, _) = weight.dims3()?;
                let flat = groups.transpose(1, 2)?.reshape((n / self.rate, width * self.rate))?;
                flat.matmul(&weight.reshape((out_w, width * self.rate))?.t()?)?.broadcast_add(bias)?
            }
        })
    }
}

impl Memory for CompressiveMemory {
    fn advance(&self, segment: &Tensor) -> Result<Self> {
        let all = Tensor::cat(&[&self.mem, segment], 0)?;
        let rows = all.dim(0)?;
        let evicted = rows.saturating_sub(self.mem_len);
        let cmem = if evicted > 0 {
            let squeezed = self.compress(&all.narrow(0, 0, evicted)?)?;
            last_rows(&Tensor::cat(&[&self.cmem, &squeezed], 0)?, self.cmem_len)?
        } else {
            self.cmem.clone()
        };
        Ok(CompressiveMemory { mem: last_rows(&all, self.mem_len)?, cmem, ..self.clone() })
    }

    fn to_frame(&self) -> Frame {
        vec![self.mem.clone(), self.cmem.clone()]
    }

    fn with_frame(&self, frame: Frame) -> Result<Self> {
        let [mem, cmem]: [Tensor; 2] = frame.try_into().map_err(|_| DistError::Plan("a compressive memory frame has two tensors".into()))?;
        Ok(CompressiveMemory { mem, cmem, ..self.clone() })
    }
}

/// Runs one layer of a segment-recurrent model on this rank's shard. `input` is the layer's
/// input for the shard (`[shard, width]`); `step(memory, segment)` computes the layer for one
/// segment from the memory before it. `first` is the memory of the sequence's first segment.
pub fn segment_recurrence<M: Memory>(
    group: &dyn Group,
    plan: &ShardPlan,
    input: &Tensor,
    segment_len: usize,
    first: &M,
    step: &dyn Fn(&M, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (me, p) = (group.rank(), group.size());
    check_plan(plan, p, segment_len)?;
    let n = input.dim(0)?;
    let segments: Vec<Tensor> = (0..n).step_by(segment_len.max(1)).map(|s| input.narrow(0, s, segment_len.min(n - s))).collect::<candle_core::Result<_>>()?;
    let incoming = if me == 0 { first.clone() } else { first.with_frame(group.recv(me - 1)?)? };
    if me + 1 < p {
        let mut outgoing = incoming.clone();
        for seg in &segments {
            outgoing = outgoing.advance(seg)?;
        }
        group.send(me + 1, outgoing.to_frame())?;
    }
    let mut memory = incoming;
    let mut outs = Vec::with_capacity(segments.len());
    for seg in &segments {
        outs.push(step(&memory, seg)?);
        memory = memory.advance(seg)?;
    }
    match outs.is_empty() {
        true => Ok(input.clone()),
        false => Ok(Tensor::cat(&outs, 0)?),
    }
}

/// Recurrent families keep tokens in order and segments whole on one rank.
fn check_plan(plan: &ShardPlan, ranks: usize, segment_len: usize) -> Result<()> {
    if plan.ranks() != ranks {
        return Err(DistError::Plan(format!("the plan has {} shards for a group of {ranks} ranks", plan.ranks())));
    }
    if segment_len == 0 {
        return Err(DistError::Plan("the segment length must be positive".into()));
    }
    if !plan.is_contiguous() {
        return Err(DistError::Unsupported("segment recurrence needs contiguous shards in rank order (a zigzag layout would reorder segments)".into()));
    }
    for r in 0..ranks {
        if let Some(first) = plan.ranges(r).first() {
            if first.start % segment_len != 0 {
                return Err(DistError::Unsupported(format!(
                    "rank {r}'s shard starts at token {}, inside a segment of {segment_len}: shards must hold whole segments (ShardPlan::aligned)",
                    first.start
                )));
            }
        }
    }
    Ok(())
}
