//! The Group trait over NCCL (cargo feature `nccl`): ranks on GPUs that move frames with
//! `ncclSend`/`ncclRecv`.
//!
//! Every ordered pair of ranks gets its own two-rank communicator, driven by one thread on each
//! side (a sender thread fed by a bounded queue, a receiver thread answering `recv`). NCCL's
//! point-to-point calls block on the GPU until the peer posts the matching call, and the
//! operators' programs (send to all, then receive from all) would deadlock a single stream; one
//! communicator per direction and per pair, with host-side queues, gives exactly the in-process
//! backend's semantics (FIFO per pair, `send` returns once queued). The communicators' unique
//! ids are created by the sending rank and travel over the job's control group (the gRPC peer
//! streams), so no process without a GPU needs NCCL.
//!
//! A frame is a header (tensor count, element types, shapes) and one buffer per tensor, staged
//! through device memory: tome's kernels run on the CPU for now, so tensors are copied in and
//! out; a GPU-resident kernel would hand its buffers over directly. cudarc loads CUDA and NCCL
//! at run time: [`gpus_available`] says whether they are there before anything calls them
//! (a missing library would otherwise panic inside cudarc).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id};
use tome_dist::{frame_bytes, DistError, Frame, Group};

use crate::codec::raw_bytes;

/// Words of a frame header: count, then per tensor its element type, rank and dimensions.
const HEADER_WORDS: usize = 64;
/// The largest tensor a frame may carry (bytes): a peer's header stating more is refused before
/// any device memory is allocated for it.
const MAX_TENSOR_BYTES: usize = 4 << 30;
/// Frames queued per destination before `send` waits.
const QUEUE_DEPTH: usize = 4;

/// How many GPUs this process can use with NCCL, or why none.
pub fn gpus_available() -> Result<usize, String> {
    // SAFETY: these only try to open the shared libraries.
    let (cuda, nccl) = unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::nccl::sys::is_culib_present()) };
    if !cuda {
        return Err("the CUDA driver library is not installed".into());
    }
    if !nccl {
        return Err("libnccl.so is not installed (distributions ship libnccl.so.2: a symlink named libnccl.so fixes it)".into());
    }
    let n = CudaContext::device_count().map_err(|e| format!("CUDA: {e:?}"))?;
    Ok(n.max(0) as usize)
}

type Reply = Result<Frame, String>;

/// One rank of a job whose ranks talk over NCCL.
pub struct NcclGroup {
    rank: usize,
    size: usize,
    outgoing: Vec<Option<SyncSender<Frame>>>,
    incoming: Vec<Option<(SyncSender<()>, Receiver<Reply>)>>,
    bytes: AtomicU64,
    /// `bytes` plus each frame's header.
    wire_bytes: AtomicU64,
}

fn transport(rank: usize, peer: usize, msg: impl Into<String>) -> DistError {
    DistError::Transport { rank, peer, msg: msg.into() }
}

impl NcclGroup {
    /// Joins the NCCL side of a job on GPU `device`, exchanging communicator ids over `control`
    /// (this rank's group on another transport, e.g. a [`crate::PeerGroup`]).
    pub fn join(control: &dyn Group, device: usize) -> Result<Self, DistError> {
        let (rank, size) = (control.rank(), control.size());
        let gpus = gpus_available().map_err(|e| DistError::Unsupported(format!("NCCL: {e}")))?;
        if device >= gpus {
            return Err(DistError::Unsupported(format!("NCCL: GPU {device} asked, {gpus} present")));
        }
        let mut out_ids: Vec<Option<Id>> = (0..size).map(|_| None).collect();
        for (dst, slot) in out_ids.iter_mut().enumerate().filter(|(d, _)| *d != rank) {
            let id = Id::new().map_err(|e| transport(rank, dst, format!("ncclGetUniqueId: {e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            control.send(dst, vec![Tensor::from_vec(bytes, 128, &Device::Cpu)?])?;
            *slot = Some(id);
        }
        let mut in_ids: Vec<Option<Id>> = (0..size).map(|_| None).collect();
        for (src, slot) in in_ids.iter_mut().enumerate().filter(|(s, _)| *s != rank) {
            let frame = control.recv(src)?;
            let bytes = frame.first().ok_or_else(|| transport(rank, src, "an empty id frame"))?.to_vec1::<u8>()?;
            let internal: [std::ffi::c_char; 128] =
                bytes.iter().map(|&b| b as std::ffi::c_char).collect::<Vec<_>>().try_into().map_err(|_| transport(rank, src, "an NCCL id of the wrong size"))?;
            *slot = Some(Id::uninit(internal));
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), DistError>>();
        let mut outgoing: Vec<Option<SyncSender<Frame>>> = (0..size).map(|_| None).collect();
        let mut incoming: Vec<Option<(SyncSender<()>, Receiver<Reply>)>> = (0..size).map(|_| None).collect();
        for (dst, id) in out_ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            let (tx, rx) = sync_channel::<Frame>(QUEUE_DEPTH);
            let ready = ready_tx.clone();
            spawn(format!("tome-nccl-{rank}-to-{dst}"), move || {
                let comm = match open(device, 0, id) {
                    Ok(c) => c,
                    Err(e) => return drop(ready.send(Err(transport(rank, dst, e)))),
                };
                let _ = ready.send(Ok(()));
                // Ends when the group is dropped (the queue closes) or a send fails (the
                // receiver's next `send` then finds the queue closed).
                while let Ok(frame) = rx.recv() {
                    if let Err(e) = send_frame(&comm.0, &comm.1, &frame) {
                        tracing::warn!(rank, peer = dst, error = %e, "NCCL send failed");
                        return;
                    }
                }
            })?;
            outgoing[dst] = Some(tx);
        }
        for (src, id) in in_ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            let (ask_tx, ask_rx) = sync_channel::<()>(1);
            let (reply_tx, reply_rx) = sync_channel::<Reply>(1);
            let ready = ready_tx.clone();
            spawn(format!("tome-nccl-{rank}-from-{src}"), move || {
                let comm = match open(device, 1, id) {
                    Ok(c) => c,
                    Err(e) => return drop(ready.send(Err(transport(rank, src, e)))),
                };
                let _ = ready.send(Ok(()));
                while ask_rx.recv().is_ok() {
                    let reply = recv_frame(&comm.0, &comm.1);
                    let failed = reply.is_err();
                    if reply_tx.send(reply).is_err() || failed {
                        return;
                    }
                }
            })?;
            incoming[src] = Some((ask_tx, reply_rx));
        }
        drop(ready_tx);
        for _ in 0..2 * (size - 1) {
            ready_rx.recv().map_err(|_| DistError::RankPanicked("an NCCL thread ended before initialising".into()))??;
        }
        Ok(NcclGroup { rank, size, outgoing, incoming, bytes: AtomicU64::new(0), wire_bytes: AtomicU64::new(0) })
    }
}

impl NcclGroup {
    /// Bytes this rank has sent over NCCL: its frames' elements and a header per frame.
    pub fn wire_bytes_sent(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), DistError> {
    std::thread::Builder::new().name(name).spawn(f).map(drop).map_err(|e| DistError::RankPanicked(format!("cannot start an NCCL thread: {e}")))
}

/// A two-rank communicator on its own stream of GPU `device`.
fn open(device: usize, rank: usize, id: Id) -> Result<(Comm, Arc<CudaStream>), String> {
    let ctx = CudaContext::new(device).map_err(|e| format!("CUDA context on GPU {device}: {e:?}"))?;
    let stream = ctx.new_stream().map_err(|e| format!("CUDA stream: {e:?}"))?;
    let comm = Comm::from_rank(stream.clone(), rank, 2, id).map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
    Ok((comm, stream))
}

fn dtype_code(dt: DType) -> Option<u64> {
    Some(match dt {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::I64 => 4,
        DType::U8 => 5,
        DType::U32 => 6,
        _ => return None,
    })
}

fn code_dtype(code: u64) -> Option<DType> {
    [DType::F32, DType::F16, DType::BF16, DType::I64, DType::U8, DType::U32].into_iter().find(|&d| dtype_code(d) == Some(code))
}

/// The header of a frame: [count, (dtype, rank, dims...) per tensor], padded to HEADER_WORDS.
fn header(frame: &[Tensor]) -> Result<Vec<u64>, String> {
    let mut h = vec![frame.len() as u64];
    for t in frame {
        h.push(dtype_code(t.dtype()).ok_or_else(|| format!("element type {:?} cannot cross NCCL", t.dtype()))?);
        h.push(t.rank() as u64);
        h.extend(t.dims().iter().map(|&d| d as u64));
    }
    if h.len() > HEADER_WORDS {
        return Err(format!("a frame of {} tensors does not fit a header", frame.len()));
    }
    h.resize(HEADER_WORDS, 0);
    Ok(h)
}

fn send_frame(comm: &Comm, stream: &Arc<CudaStream>, frame: &[Tensor]) -> Result<(), String> {
    let h = stream.clone_htod(&header(frame)?).map_err(|e| format!("{e:?}"))?;
    comm.send(&h, 1).map_err(|e| format!("ncclSend: {e:?}"))?;
    let mut staged = Vec::with_capacity(frame.len());
    for t in frame {
        let bytes = raw_bytes(&t.flatten_all().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            continue;
        }
        let d = stream.clone_htod(&bytes).map_err(|e| format!("{e:?}"))?;
        comm.send(&d, 1).map_err(|e| format!("ncclSend: {e:?}"))?;
        staged.push(d);
    }
    // The staging buffers must outlive the sends.
    stream.synchronize().map_err(|e| format!("{e:?}"))?;
    drop(staged);
    Ok(())
}

/// The element type, dimensions and byte size of each tensor a received frame header states,
/// checked before anything it states is allocated: at most as many tensors and dimensions as a
/// header can describe, no size that overflows, none over [`MAX_TENSOR_BYTES`].
fn layouts(header: &[u64]) -> Result<Vec<(DType, Vec<usize>, usize)>, String> {
    let mut words = header.iter().copied();
    let mut next = || words.next().ok_or_else(|| "a truncated frame header".to_string());
    let count = usize::try_from(next()?).ok().filter(|&c| c <= HEADER_WORDS).ok_or("a frame header counting more tensors than it can describe")?;
    let mut layouts = Vec::with_capacity(count);
    for _ in 0..count {
        let dtype = code_dtype(next()?).ok_or("an unknown element type in a frame header")?;
        let rank = usize::try_from(next()?).ok().filter(|&r| r <= HEADER_WORDS).ok_or("a frame header with more dimensions than it can describe")?;
        let dims =
            (0..rank).map(|_| next().and_then(|d| usize::try_from(d).map_err(|_| "a dimension beyond this machine's address space".to_string()))).collect::<Result<Vec<_>, _>>()?;
        let n = dims
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .filter(|&n| n <= MAX_TENSOR_BYTES)
            .ok_or_else(|| format!("a frame header stating a tensor of {dims:?} {dtype:?}, over the {MAX_TENSOR_BYTES} bytes a tensor may have"))?;
        layouts.push((dtype, dims, n));
    }
    Ok(layouts)
}

fn recv_frame(comm: &Comm, stream: &Arc<CudaStream>) -> Reply {
    let mut h = stream.alloc_zeros::<u64>(HEADER_WORDS).map_err(|e| format!("{e:?}"))?;
    comm.recv(&mut h, 0).map_err(|e| format!("ncclRecv: {e:?}"))?;
    stream.synchronize().map_err(|e| format!("{e:?}"))?;
    let h = stream.clone_dtoh(&h).map_err(|e| format!("{e:?}"))?;
    let layouts = layouts(&h)?;
    let mut frame = Vec::with_capacity(layouts.len());
    for (dtype, dims, n) in layouts {
        let bytes = if n == 0 {
            Vec::new()
        } else {
            let mut d = stream.alloc_zeros::<u8>(n).map_err(|e| format!("{e:?}"))?;
            comm.recv(&mut d, 0).map_err(|e| format!("ncclRecv: {e:?}"))?;
            stream.synchronize().map_err(|e| format!("{e:?}"))?;
            stream.clone_dtoh(&d).map_err(|e| format!("{e:?}"))?
        };
        frame.push(Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu).map_err(|e| e.to_string())?);
    }
    Ok(frame)
}

impl Group for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, dst: usize, frame: Frame) -> Result<(), DistError> {
        let tx = self.outgoing.get(dst).and_then(Option::as_ref).ok_or(DistError::NoSuchRank { rank: dst, size: self.size })?;
        let bytes = frame_bytes(&frame);
        tx.send(frame).map_err(|_| DistError::PeerGone { rank: self.rank, peer: dst, what: "send" })?;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.wire_bytes.fetch_add(bytes + (HEADER_WORDS * size_of::<u64>()) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Frame, DistError> {
        let (ask, reply) = self.incoming.get(src).and_then(Option::as_ref).ok_or(DistError::NoSuchRank { rank: src, size: self.size })?;
        let gone = || DistError::PeerGone { rank: self.rank, peer: src, what: "receive" };
        ask.send(()).map_err(|_| gone())?;
        reply.recv().map_err(|_| gone())?.map_err(|e| transport(self.rank, src, e))
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_frame_header_is_checked_before_anything_is_allocated() {
        let t = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let good = header(&[t]).unwrap();
        assert_eq!(layouts(&good).unwrap(), vec![(DType::F32, vec![3, 5], 60)]);
        let f32_code = dtype_code(DType::F32).unwrap();
        let refused = [
            vec![1 << 60],
            vec![1, f32_code, 1 << 40],
            vec![1, f32_code, 2, 1 << 40, 1 << 40],
            vec![1, f32_code, 1, (MAX_TENSOR_BYTES as u64 / 4) + 1],
            vec![1, 999, 0],
            vec![2, f32_code, 1],
        ];
        for h in refused {
            assert!(layouts(&h).is_err(), "{h:?}");
        }
    }
}
