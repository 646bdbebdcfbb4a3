//! The operator suite on the in-process backend (one thread per rank, channels).

#[path = "suite/operators.rs"]
mod suite;

use tome_dist::{run_ranks, Group, InProcessGroup, RankError};

/// Runs `f` on every rank of a new `p`-rank in-process group.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    run_ranks(p, |g: &InProcessGroup| f(g))
}

/// The in-process backend runs everywhere.
pub fn available() -> bool {
    true
}

/// Threads: as many ranks as the suite asks for.
pub fn max_ranks() -> usize {
    usize::MAX
}
