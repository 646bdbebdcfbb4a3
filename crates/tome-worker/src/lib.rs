//! tome-worker: holds loaded models and runs shard jobs on dedicated compute threads.
//!
//! Compute never runs on the async runtime. In one process ([`spawn_job`]) a job gets an OS
//! thread that starts one thread per rank of an in-process group; on a worker process
//! ([`WorkerService`], `tome.v1.Worker`) each `RunShard` call gets a thread that runs one rank
//! whose peers are reached through the process's [`tome_net::PeerHub`]. Both run the same
//! [`run_rank`], report over bounded channels (progress, then outputs), and stop at the next
//! layer boundary when cancelled.

mod error;
mod gpu_footprint;
mod job;
mod memory;
pub mod metrics;
mod registration;
mod server;
mod service;
pub mod transport;
pub mod wire;

use tome_model::ModelDir;
use tome_proto::v1 as pb;

pub use error::WorkerError;
pub use gpu_footprint::{measure_footprints, rank_gpus, GpuBudget, GPU_PLANNED_PERCENT};
pub use job::{assemble, pool_targets, run_rank, spawn_job, Assembled, CancelFlag, Gathered, JobEvent, JobOutput, JobSpec, RankOutput, RankWork};
pub use memory::{activation_bytes, RankLoad};
pub use registration::{worker_key, EtcdRegistration};
pub use server::{serve, EtcdOptions, ServeOptions};
pub use service::{WorkerConfig, WorkerService};

/// How a loaded model describes itself on the wire, with its measured GPU `footprints` where
/// ranks compute on GPUs.
pub fn model_info(m: &ModelDir, footprints: &[tome_model::gpu::GpuFootprint]) -> pb::ModelInfo {
    let shape = m.model.shape();
    pb::ModelInfo {
        name: m.name(),
        architecture: shape.model_type,
        hidden_size: shape.hidden_size as u32,
        num_layers: shape.num_layers as u32,
        max_positions: shape.max_positions.map_or(0, |p| u32::try_from(p).unwrap_or(u32::MAX)),
        default_pooling: m.pooling.name().into(),
        layer_attention: shape.layer_attention,
        has_tokenizer: m.tokenizer.is_some(),
        causal: shape.causal,
        precisions: m.model.precisions().iter().map(|p| p.name().into()).collect(),
        gpu_precisions: m.model.gpu_precisions().iter().map(|p| p.name().into()).collect(),
        gpu_footprints: footprints
            .iter()
            .map(|f| pb::GpuFootprint {
                precision: f.precision.name().into(),
                weight_bytes: f.weight_bytes,
                rank_base_bytes: f.rank_base_bytes,
                rank_bytes_per_token: f.rank_bytes_per_token,
            })
            .collect(),
    }
}

/// The GPUs of this machine as `Info` reports them, and why there are none when there are none
/// (asked of the driver once per process).
pub fn gpu_devices() -> (Vec<pb::GpuDevice>, String) {
    match tome_gpu::present() {
        Ok(gpus) => {
            let list = gpus
                .iter()
                .map(|g| pb::GpuDevice {
                    index: u32::try_from(g.index).unwrap_or(u32::MAX),
                    name: g.name.clone(),
                    memory_bytes: g.memory_bytes,
                    compute_capability: format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                })
                .collect::<Vec<_>>();
            let missing = if list.is_empty() { "the CUDA driver sees no GPU".to_string() } else { String::new() };
            (list, missing)
        }
        Err(why) => (Vec::new(), why.clone()),
    }
}

/// Runs every model once on a few tokens, so that the first request does not pay for lazy
/// initialisation (thread pools, page faults on the weights).
pub fn warm_up(models: &[std::sync::Arc<ModelDir>]) -> Result<(), WorkerError> {
    match gpu_devices() {
        (gpus, _) if !gpus.is_empty() => {
            tracing::info!(gpus = ?gpus.iter().map(|g| format!("cuda:{} {} ({})", g.index, g.name, g.compute_capability)).collect::<Vec<_>>(), "GPUs present")
        }
        (_, missing) => tracing::info!(%missing, "no GPU"),
    }
    for m in models {
        let ids = vec![0u32; m.model.min_tokens().max(8)];
        let doc = m.model.prepare(ids, &tome_model::EncodeOptions::default())?;
        let plan = doc.plan(tome_dist::Layout::Contiguous, 1)?;
        m.model.forward_shard(&tome_dist::InProcessGroup::single(), &plan, &doc, &mut |_| true)?;
    }
    Ok(())
}
