//! The Group trait: P ranks passing tensor frames, and the collectives built on point-to-point.
//!
//! Every rank runs the same program (SPMD), so frames between a pair of ranks arrive in the
//! order they were sent; that order is the only tag the in-process backend needs. Collectives
//! have default implementations on `send`/`recv`, so any backend that can move a frame gets them,
//! and they reduce in rank order so that every rank obtains bit-identical results. Ranks that
//! compute on GPUs send and receive device frames (`send_device`, `recv_device`), which every
//! backend takes, moving the buffers where it can and staging them through the host otherwise.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use cudarc::driver::CudaStream;

use crate::device::{frame_to_device, frame_to_host, DeviceFrame};
use crate::error::{DistError, Result};

/// What travels between ranks: a few tensors (e.g. keys, values, validity flags).
pub type Frame = Vec<Tensor>;

/// Bytes a frame occupies on the wire (its tensors' raw element bytes).
pub fn frame_bytes(frame: &[Tensor]) -> u64 {
    frame.iter().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
}

/// P ranks that exchange frames. One rank alone is a Group of size 1.
pub trait Group: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Posts a frame to `dst`; returns once it is queued (bounded queues give backpressure).
    fn send(&self, dst: usize, frame: Frame) -> Result<()>;
    /// Takes the next frame `src` sent to this rank, waiting for it.
    fn recv(&self, src: usize) -> Result<Frame>;
    /// Bytes this rank has sent so far (frames' element bytes, excluding any framing).
    fn bytes_sent(&self) -> u64;

    /// Posts a frame whose tensors are on this rank's GPU to `dst`, as [`Group::send`]. The
    /// receiver may take it with either `recv` or `recv_device`. This default stages it through
    /// the host; backends that move device buffers (NCCL, ranks of one process) hand the buffers
    /// over instead.
    fn send_device(&self, dst: usize, frame: DeviceFrame) -> Result<()> {
        self.send(dst, frame_to_host(&frame)?)
    }

    /// Takes the next frame `src` sent to this rank, as [`Group::recv`], with its tensors on
    /// `stream`'s GPU, whichever kind of frame `src` sent. This default copies a host frame
    /// there.
    fn recv_device(&self, src: usize, stream: &Arc<CudaStream>) -> Result<DeviceFrame> {
        frame_to_device(&self.recv(src)?, stream)
    }

    fn next_rank(&self) -> usize {
        (self.rank() + 1) % self.size()
    }

    fn prev_rank(&self) -> usize {
        (self.rank() + self.size() - 1) % self.size()
    }

    /// Every rank's frame, in rank order.
    fn all_gather(&self, frame: Frame) -> Result<Vec<Frame>> {
        let (me, p) = (self.rank(), self.size());
        for dst in (0..p).filter(|&d| d != me) {
            self.send(dst, frame.clone())?;
        }
        let mut out = Vec::with_capacity(p);
        for src in 0..p {
            out.push(if src == me { frame.clone() } else { self.recv(src)? });
        }
        Ok(out)
    }

    /// Elementwise sum over ranks, added in rank order (identical on every rank).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.all_gather(vec![t.clone()])?;
        let mut acc: Option<Tensor> = None;
        for mut f in all {
            let x = f.pop().ok_or_else(|| DistError::Plan("all_reduce_sum: empty frame".into()))?;
            acc = Some(match acc {
                None => x,
                Some(a) => (a + x)?,
            });
        }
        acc.ok_or_else(|| DistError::Plan("all_reduce_sum over no ranks".into()))
    }

    /// Elementwise maximum over ranks (identical on every rank).
    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for mut f in self.all_gather(vec![t.clone()])? {
            let x = f.pop().ok_or_else(|| DistError::Plan("all_reduce_max: empty frame".into()))?;
            acc = Some(match acc {
                None => x,
                Some(a) => a.maximum(&x)?,
            });
        }
        acc.ok_or_else(|| DistError::Plan("all_reduce_max over no ranks".into()))
    }

    /// Sum of the values of ranks `0..rank` (zeros on rank 0), passed along the chain of ranks.
    fn exclusive_scan_sum(&self, t: &Tensor) -> Result<Tensor> {
        let (me, p) = (self.rank(), self.size());
        let prefix = if me == 0 { t.zeros_like()? } else { single(self.recv(me - 1)?, "exclusive_scan_sum")? };
        if me + 1 < p {
            self.send(me + 1, vec![(&prefix + t)?])?;
        }
        Ok(prefix)
    }

    /// Sends `parts[d]` to rank `d` and returns what each rank sent here, in rank order.
    fn all_to_all(&self, parts: Vec<Frame>) -> Result<Vec<Frame>> {
        let (me, p) = (self.rank(), self.size());
        if parts.len() != p {
            return Err(DistError::Plan(format!("all_to_all needs {p} parts, got {}", parts.len())));
        }
        let mut mine = None;
        for (dst, part) in parts.into_iter().enumerate() {
            if dst == me {
                mine = Some(part);
            } else {
                self.send(dst, part)?;
            }
        }
        let mut out = Vec::with_capacity(p);
        for src in 0..p {
            out.push(if src == me { mine.take().unwrap_or_default() } else { self.recv(src)? });
        }
        Ok(out)
    }

    /// Returns once every rank has reached the barrier.
    fn barrier(&self) -> Result<()> {
        self.all_gather(Vec::new()).map(drop)
    }
}

fn single(mut frame: Frame, op: &str) -> Result<Tensor> {
    match (frame.pop(), frame.is_empty()) {
        (Some(t), true) => Ok(t),
        _ => Err(DistError::Plan(format!("{op}: expected a frame of one tensor"))),
    }
}

/// Small helpers to carry positions and flags in frames.
pub(crate) fn flags_to_tensor(flags: &[bool]) -> Result<Tensor> {
    let bytes: Vec<u8> = flags.iter().map(|&b| b as u8).collect();
    Ok(Tensor::from_vec(bytes, flags.len(), &candle_core::Device::Cpu)?)
}

pub(crate) fn tensor_to_flags(t: &Tensor) -> Result<Vec<bool>> {
    Ok(t.to_dtype(DType::U8)?.to_vec1::<u8>()?.into_iter().map(|b| b != 0).collect())
}
