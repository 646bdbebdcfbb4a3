//! The operator suite (crates/tome-dist/tests/suite) on the NCCL backend: every rank a thread of
//! this test on its own GPU, its frames crossing NCCL; the communicators' ids travel over gRPC
//! peer streams on 127.0.0.1. NCCL refuses two ranks of a communicator on one GPU, so the suite
//! runs its cases of up to as many ranks as there are GPUs, and says which it leaves out;
//! without a GPU (or without CUDA or NCCL) every test returns at once, saying why.
#![cfg(feature = "nccl")]

#[path = "../../tome-dist/tests/suite/operators.rs"]
mod suite;

mod common;

use std::sync::OnceLock;

use tome_dist::{Group, RankError};
use tome_net::nccl::{gpus_available, NcclGroup};

use crate::common::launch_with;

fn gpus() -> usize {
    static GPUS: OnceLock<usize> = OnceLock::new();
    *GPUS.get_or_init(|| {
        gpus_available().unwrap_or_else(|why| {
            eprintln!("NCCL unavailable: {why}");
            0
        })
    })
}

pub fn available() -> bool {
    let n = gpus();
    if n == 0 {
        eprintln!("skipping: the NCCL operator suite needs a GPU; this machine has none");
    }
    n > 0
}

/// One rank per GPU.
pub fn max_ranks() -> usize {
    gpus()
}

/// Runs `f` on every rank of a new job over NCCL, rank r on GPU r.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    launch_with(p, |peers| Ok(NcclGroup::join(&peers, peers.rank())?), f)
}
