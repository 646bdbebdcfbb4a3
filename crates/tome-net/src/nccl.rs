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
//! A frame is a header (tensor count, element types, shapes) and the bytes of each non-empty
//! tensor. A device frame of a rank computing on this group's GPU goes out of its own buffers
//! and, taken with `recv_device`, stays in the buffers it arrived in: no host copy on either
//! side. Host frames (ranks computing on the CPU, or a frame asked for on the host) are staged
//! through device buffers; the wire is the same, so either side may use either kind. cudarc loads CUDA and NCCL
//! at run time: [`gpus_available`] says whether they are there before anything calls them
//! (a missing library would otherwise panic inside cudarc).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id};
use tome_dist::{device_frame_bytes, frame_bytes, frame_to_device, frame_to_host, DeviceData, DeviceFrame, DeviceTensor, DistError, Frame, Group};

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

/// What a pair's queue carries: either kind of frame, in the order sent (the wire is the same).
enum Parcel {
    Host(Frame),
    Device(DeviceFrame),
}

/// Which kind of frame a receiver asks for.
#[derive(Clone, Copy)]
enum Want {
    Host,
    Device,
}

type Reply = Result<Parcel, String>;

/// One rank of a job whose ranks talk over NCCL.
pub struct NcclGroup {
    rank: usize,
    size: usize,
    outgoing: Vec<Option<SyncSender<Parcel>>>,
    incoming: Vec<Option<(SyncSender<Want>, Receiver<Reply>)>>,
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
        let mut outgoing: Vec<Option<SyncSender<Parcel>>> = (0..size).map(|_| None).collect();
        let mut incoming: Vec<Option<(SyncSender<Want>, Receiver<Reply>)>> = (0..size).map(|_| None).collect();
        for (dst, id) in out_ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            let (tx, rx) = sync_channel::<Parcel>(QUEUE_DEPTH);
            let ready = ready_tx.clone();
            spawn(format!("tome-nccl-{rank}-to-{dst}"), move || {
                let comm = match open(device, 0, id) {
                    Ok(c) => c,
                    Err(e) => return drop(ready.send(Err(transport(rank, dst, e)))),
                };
                let _ = ready.send(Ok(()));
                // Ends when the group is dropped (the queue closes) or a send fails (the
                // receiver's next `send` then finds the queue closed).
                while let Ok(parcel) = rx.recv() {
                    if let Err(e) = send_parcel(&comm.0, &comm.1, &parcel) {
                        tracing::warn!(rank, peer = dst, error = %e, "NCCL send failed");
                        return;
                    }
                }
            })?;
            outgoing[dst] = Some(tx);
        }
        for (src, id) in in_ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            let (ask_tx, ask_rx) = sync_channel::<Want>(1);
            let (reply_tx, reply_rx) = sync_channel::<Reply>(1);
            let ready = ready_tx.clone();
            spawn(format!("tome-nccl-{rank}-from-{src}"), move || {
                let comm = match open(device, 1, id) {
                    Ok(c) => c,
                    Err(e) => return drop(ready.send(Err(transport(rank, src, e)))),
                };
                let _ = ready.send(Ok(()));
                while let Ok(want) = ask_rx.recv() {
                    let reply = recv_parcel(&comm.0, &comm.1, want);
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

/// The header of a frame of tensors of these element types and shapes: [count, (dtype, rank,
/// dims...) per tensor], padded to HEADER_WORDS.
fn header<'a>(tensors: impl ExactSizeIterator<Item = (DType, &'a [usize])>) -> Result<Vec<u64>, String> {
    let count = tensors.len();
    let mut h = vec![count as u64];
    for (dtype, dims) in tensors {
        h.push(dtype_code(dtype).ok_or_else(|| format!("element type {dtype:?} cannot cross NCCL"))?);
        h.push(dims.len() as u64);
        h.extend(dims.iter().map(|&d| d as u64));
    }
    if h.len() > HEADER_WORDS {
        return Err(format!("a frame of {count} tensors does not fit a header"));
    }
    h.resize(HEADER_WORDS, 0);
    Ok(h)
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String {
    move |e| format!("{what}: {e:?}")
}

fn nccl(what: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> String {
    move |e| format!("{what}: {e:?}")
}

/// Sends a frame's header, then each non-empty tensor as bytes: a device tensor on this
/// communicator's GPU from its own buffer, anything else staged through a buffer of this stream.
/// Returns once the stream has finished with every buffer, whatever the outcome, so that the
/// caller may let the frame go.
fn send_parcel(comm: &Comm, stream: &Arc<CudaStream>, parcel: &Parcel) -> Result<(), String> {
    let mut staged = Vec::new();
    let posted = post_parcel(comm, stream, parcel, &mut staged);
    // The buffers must outlive the sends queued, whether or not all were.
    let finished = stream.synchronize().map_err(driver("NCCL stream"));
    drop(staged);
    posted.and(finished)
}

/// The sends of [`send_parcel`], queued on `stream` (staging buffers kept in `staged`).
fn post_parcel(comm: &Comm, stream: &Arc<CudaStream>, parcel: &Parcel, staged: &mut Vec<CudaSlice<u8>>) -> Result<(), String> {
    let h = match parcel {
        Parcel::Host(frame) => header(frame.iter().map(|t| (t.dtype(), t.dims())))?,
        Parcel::Device(frame) => header(frame.iter().map(|t| (t.dtype(), t.dims())))?,
    };
    let h = stream.clone_htod(&h).map_err(driver("copy to the GPU"))?;
    comm.send(&h, 1).map_err(nccl("ncclSend"))?;
    let gpu = stream.context().ordinal();
    let mut stage = |bytes: Vec<u8>| -> Result<(), String> {
        if !bytes.is_empty() {
            let d = stream.clone_htod(&bytes).map_err(driver("copy to the GPU"))?;
            comm.send(&d, 1).map_err(nccl("ncclSend"))?;
            staged.push(d);
        }
        Ok(())
    };
    match parcel {
        Parcel::Host(frame) => {
            for t in frame {
                stage(raw_bytes(&t.flatten_all().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?)?;
            }
        }
        Parcel::Device(frame) => {
            for t in frame {
                match t.data() {
                    None => {}
                    Some(_) if t.gpu() != Some(gpu) => {
                        stage(raw_bytes(&t.to_host().map_err(|e| e.to_string())?.flatten_all().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?)?
                    }
                    Some(DeviceData::F32(s)) => send_bytes(comm, s)?,
                    Some(DeviceData::I64(s)) => send_bytes(comm, s)?,
                    Some(DeviceData::U8(s)) => send_bytes(comm, s)?,
                }
            }
        }
    }
    Ok(())
}

/// Sends a device buffer's bytes (the receiver takes bytes whatever the element type).
fn send_bytes<T>(comm: &Comm, s: &CudaSlice<T>) -> Result<(), String> {
    // SAFETY: a view of the buffer's own bytes, read only.
    let bytes = unsafe { s.transmute::<u8>(s.num_bytes()) }.ok_or("a device buffer that does not view as bytes")?;
    comm.send(&bytes, 1).map_err(nccl("ncclSend"))?;
    Ok(())
}

/// A buffer of `bytes / size_of::<T>()` elements of this stream, its bytes received from the peer.
fn recv_bytes<T: cudarc::driver::DeviceRepr>(comm: &Comm, stream: &Arc<CudaStream>, bytes: usize) -> Result<CudaSlice<T>, String> {
    // SAFETY: NCCL writes every byte on this stream before anything reads the buffer.
    let mut d = unsafe { stream.alloc::<T>(bytes / size_of::<T>()) }.map_err(driver("allocate"))?;
    {
        // SAFETY: a view of the buffer's own bytes, written by NCCL with as many bytes.
        let mut view = unsafe { d.transmute_mut::<u8>(bytes) }.ok_or("a device buffer that does not view as bytes")?;
        comm.recv(&mut view, 0).map_err(nccl("ncclRecv"))?;
    }
    Ok(d)
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

/// Receives a frame: its tensors on the host, or left in this stream's buffers (`want`).
fn recv_parcel(comm: &Comm, stream: &Arc<CudaStream>, want: Want) -> Reply {
    let mut h = stream.alloc_zeros::<u64>(HEADER_WORDS).map_err(driver("allocate"))?;
    comm.recv(&mut h, 0).map_err(nccl("ncclRecv"))?;
    let h = stream.clone_dtoh(&h).map_err(driver("copy from the GPU"))?;
    let layouts = layouts(&h)?;
    let mut received = Vec::with_capacity(layouts.len());
    for (dtype, dims, n) in layouts {
        let data = match (n, dtype) {
            (0, _) => None,
            (_, DType::F32) => Some(DeviceData::F32(Arc::new(recv_bytes(comm, stream, n)?))),
            (_, DType::I64) => Some(DeviceData::I64(Arc::new(recv_bytes(comm, stream, n)?))),
            (_, DType::U8) => Some(DeviceData::U8(Arc::new(recv_bytes(comm, stream, n)?))),
            // Element types GPU ranks do not exchange arrive as bytes, for the host.
            (_, _) => Some(DeviceData::U8(Arc::new(recv_bytes(comm, stream, n)?))),
        };
        received.push((dtype, dims, data));
    }
    stream.synchronize().map_err(driver("NCCL stream"))?;
    match want {
        Want::Device => {
            received.into_iter().map(|(dtype, dims, data)| DeviceTensor::from_parts(dtype, &dims, data).map_err(|e| e.to_string())).collect::<Result<_, _>>().map(Parcel::Device)
        }
        Want::Host => received
            .into_iter()
            .map(|(dtype, dims, data)| {
                let bytes = match &data {
                    None => Vec::new(),
                    Some(DeviceData::F32(s)) => bytes_of(stream, s)?,
                    Some(DeviceData::I64(s)) => bytes_of(stream, s)?,
                    Some(DeviceData::U8(s)) => bytes_of(stream, s)?,
                };
                Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu).map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()
            .map(Parcel::Host),
    }
}

/// A device buffer's bytes, on the host.
fn bytes_of<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> Result<Vec<u8>, String> {
    // SAFETY: a view of the buffer's own bytes, read only.
    let view = unsafe { s.transmute::<u8>(s.num_bytes()) }.ok_or("a device buffer that does not view as bytes")?;
    stream.clone_dtoh(&view).map_err(driver("copy from the GPU"))
}

impl NcclGroup {
    fn post(&self, dst: usize, parcel: Parcel, bytes: u64) -> Result<(), DistError> {
        let tx = self.outgoing.get(dst).and_then(Option::as_ref).ok_or(DistError::NoSuchRank { rank: dst, size: self.size })?;
        tx.send(parcel).map_err(|_| DistError::PeerGone { rank: self.rank, peer: dst, what: "send" })?;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.wire_bytes.fetch_add(bytes + (HEADER_WORDS * size_of::<u64>()) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn take(&self, src: usize, want: Want) -> Result<Parcel, DistError> {
        let (ask, reply) = self.incoming.get(src).and_then(Option::as_ref).ok_or(DistError::NoSuchRank { rank: src, size: self.size })?;
        let gone = || DistError::PeerGone { rank: self.rank, peer: src, what: "receive" };
        ask.send(want).map_err(|_| gone())?;
        reply.recv().map_err(|_| gone())?.map_err(|e| transport(self.rank, src, e))
    }
}

impl Group for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, dst: usize, frame: Frame) -> Result<(), DistError> {
        let bytes = frame_bytes(&frame);
        self.post(dst, Parcel::Host(frame), bytes)
    }

    fn recv(&self, src: usize) -> Result<Frame, DistError> {
        match self.take(src, Want::Host)? {
            Parcel::Host(frame) => Ok(frame),
            Parcel::Device(frame) => frame_to_host(&frame),
        }
    }

    /// Hands the frame's buffers to NCCL as they are, where they are on this group's GPU.
    fn send_device(&self, dst: usize, frame: DeviceFrame) -> Result<(), DistError> {
        let bytes = device_frame_bytes(&frame);
        self.post(dst, Parcel::Device(frame), bytes)
    }

    /// Leaves the frame in the buffers NCCL received it into (moved to `stream`'s GPU through
    /// the host only where that is another GPU than this group's).
    fn recv_device(&self, src: usize, stream: &Arc<CudaStream>) -> Result<DeviceFrame, DistError> {
        match self.take(src, Want::Device)? {
            Parcel::Device(frame) => frame.into_iter().map(|t| t.onto(stream)).collect(),
            Parcel::Host(frame) => frame_to_device(&frame, stream),
        }
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
        let good = header([(t.dtype(), t.dims())].into_iter()).unwrap();
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
