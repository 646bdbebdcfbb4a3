//! tome-worker: holds loaded models and runs shard jobs on dedicated compute threads.
//!
//! Compute never runs on the async runtime: a job gets an OS thread that starts one thread per
//! rank (each owning its shard through every layer) and reports back over a bounded channel —
//! progress, then the job's outputs — so the async side only forwards results. A caller that
//! stops listening, or raises the cancel flag, stops every rank at the next layer boundary.

mod error;
mod job;

pub use error::WorkerError;
pub use job::{spawn_job, CancelFlag, JobEvent, JobOutput, JobSpec};
