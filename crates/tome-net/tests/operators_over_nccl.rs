//! The operator suite (crates/tome-dist/tests/suite) on the NCCL backend: every rank a thread of
//! this test on its own GPU, its frames crossing NCCL; the communicators' ids travel over gRPC
//! peer streams on 127.0.0.1. Needs 5 GPUs (the suite runs up to 5 ranks, and NCCL refuses two
//! ranks of a communicator on one GPU); elsewhere every test returns at once, saying why.
#![cfg(feature = "nccl")]

#[path = "../../tome-dist/tests/suite/operators.rs"]
mod suite;

mod common;

use std::sync::OnceLock;

use tome_dist::{Group, RankError};
use tome_net::nccl::{gpus_available, NcclGroup};

use crate::common::launch_with;

const GPUS_NEEDED: usize = 5;

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
    if n < GPUS_NEEDED {
        eprintln!("skipping: the NCCL operator suite needs {GPUS_NEEDED} GPUs; this machine has {n}");
    }
    n >= GPUS_NEEDED
}

/// Runs `f` on every rank of a new job over NCCL, rank r on GPU r.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    launch_with(p, |peers| Ok(NcclGroup::join(&peers, peers.rank())?), f)
}
