//! Which Group a job's ranks exchange frames over, chosen in one place ([`choose`]) from where
//! the ranks run, and a worker's rank joining the Group its plan names ([`join`]).
//!
//! Ranks that are threads of one process use the in-process group (GPU ranks' frames stay on
//! the device). Ranks on worker processes talk over NCCL when every worker of the job can give
//! each rank it hosts a GPU of its own with NCCL (NCCL refuses two ranks of a communicator on one
//! GPU): a rank computing on a GPU talks from that GPU, its frames going out of and arriving in
//! device buffers; a rank computing on the CPU leases an idle GPU for its frames alone. Ranks
//! talk over `tome.v1.Peer` streams otherwise, which reach wherever the workers reach each
//! other, their frames staged through the host. The coordinator writes the
//! choice into the job's plan; every rank of the job joins the same kind of Group, so any rank
//! runs the same [`crate::run_rank`] over any backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tome_dist::Group;
use tome_net::{PeerGroup, PeerHub, TraceParent};
use tome_proto::v1 as pb;

use crate::error::WorkerError;

/// The Group backend of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Every rank a thread of this process ([`tome_dist::InProcessGroup`]).
    InProcess,
    /// Ranks on workers, frames over `tome.v1.Peer` streams between their peer hubs.
    PeerStreams,
    /// Ranks on workers, each on a GPU of its own, frames over NCCL.
    Nccl,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::InProcess => "in-process",
            Transport::PeerStreams => "peer-streams",
            Transport::Nccl => "nccl",
        }
    }
}

/// Where the ranks of a job run.
pub enum Hosts<'a> {
    /// All of them in this process.
    ThisProcess,
    /// Rank r on worker `workers[r]` (a worker appears once for each rank it hosts).
    Workers(&'a [pb::WorkerInfo]),
}

/// The transport for ranks placed on `hosts`.
pub fn choose(hosts: Hosts) -> Transport {
    let workers = match hosts {
        Hosts::ThisProcess => return Transport::InProcess,
        Hosts::Workers(w) => w,
    };
    let mut ranks_on: HashMap<&str, u32> = HashMap::new();
    for w in workers {
        *ranks_on.entry(w.name.as_str()).or_default() += 1;
    }
    // One rank exchanges nothing: NCCL would only cost its set-up. A worker computing on GPUs
    // puts its k-th rank of a job on `rank_gpus[k mod their count]`, and talks from there.
    let own_gpu = |w: &pb::WorkerInfo, n: u32| n <= w.nccl_gpus && (!w.gpu_ranks || n as usize <= w.rank_gpus.len());
    let gpu_per_rank = workers.iter().all(|w| ranks_on.get(w.name.as_str()).is_some_and(|&n| own_gpu(w, n)));
    if workers.len() > 1 && gpu_per_rank {
        Transport::Nccl
    } else {
        Transport::PeerStreams
    }
}

/// The GPUs of this worker that ranks talking over NCCL may use, one rank each at a time.
pub struct NcclGpus {
    free: Arc<Mutex<Vec<usize>>>,
    count: usize,
    /// Why there are none, when there are none.
    missing: String,
}

impl NcclGpus {
    /// The GPUs this process can use with NCCL: none without the `nccl` feature, or without a
    /// CUDA driver, an NCCL library or a GPU.
    pub fn detect() -> Self {
        #[cfg(feature = "nccl")]
        let found = tome_net::nccl::gpus_available();
        #[cfg(not(feature = "nccl"))]
        let found: Result<usize, String> = Err("this build has no NCCL (cargo feature `nccl`)".into());
        match found {
            Ok(0) => Self::none("no GPU is visible"),
            Ok(n) => NcclGpus { free: Arc::new(Mutex::new((0..n).rev().collect())), count: n, missing: String::new() },
            Err(why) => Self::none(&why),
        }
    }

    /// No GPU, for `why`.
    pub fn none(why: &str) -> Self {
        NcclGpus { free: Arc::default(), count: 0, missing: why.into() }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The GPU one rank of a job that talks over `transport` talks from (none but for NCCL):
    /// `computes_on`, the GPU the rank computes on, or for a rank computing on the CPU an idle
    /// GPU, held until the lease is dropped.
    pub fn lease(&self, transport: Transport, computes_on: Option<usize>, worker: &str) -> Result<Option<GpuLease>, WorkerError> {
        if transport != Transport::Nccl {
            return Ok(None);
        }
        if self.count == 0 {
            return Err(WorkerError::Precondition(format!("the plan's ranks talk over NCCL, and worker {worker} has no GPU for it: {}", self.missing)));
        }
        if let Some(gpu) = computes_on {
            if gpu >= self.count {
                return Err(WorkerError::Precondition(format!("worker {worker} computes on GPU {gpu}, and NCCL sees {} GPUs", self.count)));
            }
            // Ranks of other jobs may talk from the same GPU: their communicators are apart.
            return Ok(Some(GpuLease { gpu, free: None }));
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = free.pop().ok_or_else(|| WorkerError::Busy(format!("every GPU of worker {worker} holds a rank now")))?;
        Ok(Some(GpuLease { gpu, free: Some(self.free.clone()) }))
    }
}

/// The GPU one rank talks from; an idle GPU leased to a rank computing on the CPU is handed
/// back when this is dropped.
pub struct GpuLease {
    gpu: usize,
    free: Option<Arc<Mutex<Vec<usize>>>>,
}

impl GpuLease {
    pub fn gpu(&self) -> usize {
        self.gpu
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        if let Some(free) = &self.free {
            free.lock().unwrap_or_else(|p| p.into_inner()).push(self.gpu);
        }
    }
}

/// A worker's rank joined to its job's Group.
pub enum RankGroup {
    Peer(PeerGroup),
    /// Frames over NCCL; `control` carried the communicators' ids and stays open with them.
    #[cfg(feature = "nccl")]
    Nccl {
        nccl: tome_net::nccl::NcclGroup,
        control: PeerGroup,
    },
}

impl RankGroup {
    pub fn group(&self) -> &dyn Group {
        match self {
            RankGroup::Peer(g) => g,
            #[cfg(feature = "nccl")]
            RankGroup::Nccl { nccl, .. } => nccl,
        }
    }

    /// Bytes the rank put on the wire for its frames, framing included.
    pub fn wire_bytes_sent(&self) -> u64 {
        match self {
            RankGroup::Peer(g) => g.wire_bytes_sent(),
            #[cfg(feature = "nccl")]
            RankGroup::Nccl { nccl, control } => nccl.wire_bytes_sent() + control.wire_bytes_sent(),
        }
    }
}

/// What a worker's rank needs to join its job's Group.
pub struct Rendezvous<'a> {
    pub job: &'a str,
    /// The job's credential, which its peer streams open with.
    pub secret: &'a tome_net::JobSecret,
    pub rank: usize,
    /// The peer address of every rank's worker.
    pub addresses: &'a [String],
    pub trace: Option<TraceParent>,
}

/// Joins rank `at.rank` to its job's Group on `transport`: the peer streams of `hub`, and over
/// them the NCCL communicators on the leased GPU.
pub fn join(hub: &PeerHub, transport: Transport, gpu: Option<&GpuLease>, at: &Rendezvous) -> Result<RankGroup, WorkerError> {
    let peers = hub.join(at.job, at.secret, at.rank, at.addresses, at.trace)?;
    match (transport, gpu) {
        (Transport::PeerStreams, _) => Ok(RankGroup::Peer(peers)),
        #[cfg(feature = "nccl")]
        (Transport::Nccl, Some(gpu)) => Ok(RankGroup::Nccl { nccl: tome_net::nccl::NcclGroup::join(&peers, gpu.gpu())?, control: peers }),
        (Transport::Nccl, _) => Err(WorkerError::Internal("an NCCL rank started without a GPU".into())),
        (Transport::InProcess, _) => Err(WorkerError::Internal("a worker's rank cannot join an in-process group".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, nccl_gpus: u32) -> pb::WorkerInfo {
        pb::WorkerInfo { name: name.into(), nccl_gpus, ..Default::default() }
    }

    #[test]
    fn ranks_in_one_process_use_the_in_process_group() {
        assert_eq!(choose(Hosts::ThisProcess), Transport::InProcess);
    }

    #[test]
    fn workers_whose_every_rank_has_a_gpu_of_its_own_use_nccl() {
        let (a, b) = (worker("a", 2), worker("b", 1));
        assert_eq!(choose(Hosts::Workers(&[a.clone(), b.clone()])), Transport::Nccl);
        assert_eq!(choose(Hosts::Workers(&[a.clone(), b.clone(), a.clone()])), Transport::Nccl);
    }

    #[test]
    fn peer_streams_serve_every_other_placement() {
        let (a, b, cpu) = (worker("a", 2), worker("b", 1), worker("cpu", 0));
        assert_eq!(choose(Hosts::Workers(&[a.clone(), cpu.clone()])), Transport::PeerStreams, "a worker without GPUs");
        assert_eq!(choose(Hosts::Workers(&[a.clone(), b.clone(), b.clone()])), Transport::PeerStreams, "two ranks on one GPU");
        assert_eq!(choose(Hosts::Workers(std::slice::from_ref(&a))), Transport::PeerStreams, "one rank exchanges nothing");
        assert_eq!(choose(Hosts::Workers(&[cpu.clone(), cpu])), Transport::PeerStreams);
    }

    #[test]
    fn gpus_are_leased_one_rank_each_and_come_back() {
        let gpus = NcclGpus { free: Arc::new(Mutex::new(vec![1, 0])), count: 2, missing: String::new() };
        assert!(gpus.lease(Transport::PeerStreams, None, "w").unwrap().is_none(), "peer streams need no GPU");
        let first = gpus.lease(Transport::Nccl, None, "w").unwrap().unwrap();
        let second = gpus.lease(Transport::Nccl, None, "w").unwrap().unwrap();
        assert_eq!((first.gpu(), second.gpu()), (0, 1));
        let busy = gpus.lease(Transport::Nccl, None, "w").err().unwrap();
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        drop(second);
        assert_eq!(gpus.lease(Transport::Nccl, None, "w").unwrap().unwrap().gpu(), 1);
    }

    #[test]
    fn a_rank_computing_on_a_gpu_talks_from_that_gpu() {
        let gpus = NcclGpus { free: Arc::new(Mutex::new(vec![1, 0])), count: 2, missing: String::new() };
        let held = gpus.lease(Transport::Nccl, None, "w").unwrap().unwrap();
        assert_eq!(held.gpu(), 0);
        // GPU 0 talks for a CPU rank now; a GPU rank computing there still talks from it, and
        // takes nothing from the idle GPUs.
        let (a, b) = (gpus.lease(Transport::Nccl, Some(0), "w").unwrap().unwrap(), gpus.lease(Transport::Nccl, Some(1), "w").unwrap().unwrap());
        assert_eq!((a.gpu(), b.gpu()), (0, 1));
        drop((a, b));
        assert_eq!(gpus.lease(Transport::Nccl, None, "w").unwrap().unwrap().gpu(), 1, "a GPU rank's lease gives back nothing it did not take");
        let err = gpus.lease(Transport::Nccl, Some(2), "w").err().unwrap();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("computes on GPU 2, and NCCL sees 2 GPUs"), "{err}");
    }

    #[test]
    fn gpu_ranks_use_nccl_only_where_each_computes_on_a_gpu_of_its_own() {
        let gpu_worker = |name: &str, rank_gpus: Vec<u32>| pb::WorkerInfo { gpu_ranks: true, rank_gpus, ..worker(name, 2) };
        let (both, one) = (gpu_worker("both", vec![0, 1]), gpu_worker("one", vec![1]));
        assert_eq!(choose(Hosts::Workers(&[both.clone(), both.clone(), one.clone()])), Transport::Nccl);
        // `one` computes every rank on GPU 1: two of a job's ranks there would share it.
        assert_eq!(choose(Hosts::Workers(&[both, one.clone(), one])), Transport::PeerStreams);
    }

    #[test]
    fn a_worker_without_gpus_refuses_an_nccl_rank_saying_why() {
        let err = NcclGpus::none("no GPU is visible").lease(Transport::Nccl, None, "w1").err().unwrap();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("worker w1 has no GPU for it: no GPU is visible"), "{err}");
    }
}
