//! The in-process Group backend: one thread per rank, one bounded channel per ordered pair.
//!
//! Frames move as candle tensors (shared storage, no copy), and device frames as the GPU buffers
//! themselves (ranks on one GPU share them; a rank on another GPU gets a copy through the host);
//! bytes are still counted as if they crossed a wire, so plans are accounted for identically on
//! every backend. A rank that exits —
//! normally or by error — drops its channel ends, and its peers get `PeerGone` instead of hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use cudarc::driver::CudaStream;

use crate::device::{device_frame_bytes, frame_to_device, frame_to_host, DeviceFrame};
use crate::error::{DistError, Result};
use crate::group::{frame_bytes, Frame, Group};

/// What one pair's channel carries: either kind of frame, in the order sent.
enum Parcel {
    Host(Frame),
    Device(DeviceFrame),
}

/// Frames that may wait in one pair's queue before `send` blocks.
const QUEUE_DEPTH: usize = 4;

pub struct InProcessGroup {
    rank: usize,
    to: Vec<Option<Sender<Parcel>>>,
    from: Vec<Option<Receiver<Parcel>>>,
    bytes: AtomicU64,
}

impl InProcessGroup {
    /// The `p` ranks of one new group, rank `r` at index `r`.
    pub fn create(p: usize) -> Vec<InProcessGroup> {
        let mut to: Vec<Vec<Option<Sender<Parcel>>>> = (0..p).map(|_| (0..p).map(|_| None).collect()).collect();
        let mut from: Vec<Vec<Option<Receiver<Parcel>>>> = (0..p).map(|_| (0..p).map(|_| None).collect()).collect();
        for src in 0..p {
            for dst in 0..p {
                if src != dst {
                    let (tx, rx) = bounded(QUEUE_DEPTH);
                    to[src][dst] = Some(tx);
                    from[dst][src] = Some(rx);
                }
            }
        }
        to.into_iter().zip(from).enumerate().map(|(rank, (to, from))| InProcessGroup { rank, to, from, bytes: AtomicU64::new(0) }).collect()
    }

    /// A group of one: every operator then runs without communication.
    pub fn single() -> InProcessGroup {
        InProcessGroup { rank: 0, to: vec![None], from: vec![None], bytes: AtomicU64::new(0) }
    }

    fn check(&self, peer: usize) -> Result<()> {
        if peer >= self.to.len() || peer == self.rank {
            return Err(DistError::NoSuchRank { rank: peer, size: self.to.len() });
        }
        Ok(())
    }

    fn post(&self, dst: usize, parcel: Parcel, bytes: u64) -> Result<()> {
        self.check(dst)?;
        let gone = || DistError::PeerGone { rank: self.rank, peer: dst, what: "send" };
        self.to[dst].as_ref().ok_or_else(gone)?.send(parcel).map_err(|_| gone())?;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn take(&self, src: usize) -> Result<Parcel> {
        self.check(src)?;
        let gone = || DistError::PeerGone { rank: self.rank, peer: src, what: "receive" };
        self.from[src].as_ref().ok_or_else(gone)?.recv().map_err(|_| gone())
    }
}

impl Group for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&self, dst: usize, frame: Frame) -> Result<()> {
        let bytes = frame_bytes(&frame);
        self.post(dst, Parcel::Host(frame), bytes)
    }

    fn recv(&self, src: usize) -> Result<Frame> {
        match self.take(src)? {
            Parcel::Host(frame) => Ok(frame),
            Parcel::Device(frame) => frame_to_host(&frame),
        }
    }

    fn send_device(&self, dst: usize, frame: DeviceFrame) -> Result<()> {
        let bytes = device_frame_bytes(&frame);
        self.post(dst, Parcel::Device(frame), bytes)
    }

    fn recv_device(&self, src: usize, stream: &Arc<CudaStream>) -> Result<DeviceFrame> {
        match self.take(src)? {
            Parcel::Host(frame) => frame_to_device(&frame, stream),
            Parcel::Device(frame) => frame.into_iter().map(|t| t.onto(stream)).collect(),
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Runs `f` on each rank of a new `p`-rank in-process group, one thread per rank, and returns
/// the ranks' results in rank order (the first error wins; a panic becomes an error).
pub fn run_ranks<T, E, F>(p: usize, f: F) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: RankError,
    F: Fn(&InProcessGroup) -> std::result::Result<T, E> + Sync,
{
    let groups = InProcessGroup::create(p);
    // The ranks partition the compute threads (the global pool's size: RAYON_NUM_THREADS, else
    // the CPUs this process may use): each computes in a pool of its own share, so the kernels'
    // parallel loops never queue behind another rank's on one shared pool.
    let cores = rayon::current_num_threads();
    let share = (cores / p).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let f = &f;
                let rank = g.rank;
                std::thread::Builder::new().name(format!("tome-rank-{rank}")).spawn_scoped(scope, move || {
                    match rayon::ThreadPoolBuilder::new().num_threads(share).thread_name(move |i| format!("tome-rank-{rank}.{i}")).build() {
                        Ok(pool) => pool.install(|| f(&g)),
                        // No pool (threads exhausted): compute on the shared one.
                        Err(_) => f(&g),
                    }
                })
            })
            .collect();
        let mut results = Vec::with_capacity(p);
        let mut errors = Vec::new();
        for h in handles {
            let r = match h {
                Err(e) => Err(DistError::RankPanicked(format!("could not start a rank thread: {e}")).into()),
                Ok(h) => h.join().unwrap_or_else(|p| Err(DistError::RankPanicked(panic_message(&p)).into())),
            };
            match r {
                Ok(v) => results.push(v),
                Err(e) => errors.push(e),
            }
        }
        // A peer's "rank left" error is a consequence of another rank's failure: report the cause.
        let cause = errors.iter().position(|e| !e.is_peer_gone()).unwrap_or(0);
        match errors.into_iter().nth(cause) {
            Some(e) => Err(e),
            None => Ok(results),
        }
    })
}

/// Errors a rank may end with: anything the rank layer's errors convert into, able to say
/// whether it only reports that another rank went away (or the job was stopped because of it).
pub trait RankError: From<DistError> + Send {
    fn is_peer_gone(&self) -> bool;
}

impl RankError for DistError {
    fn is_peer_gone(&self) -> bool {
        matches!(self, DistError::PeerGone { .. } | DistError::Transport { .. } | DistError::Cancelled)
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}
