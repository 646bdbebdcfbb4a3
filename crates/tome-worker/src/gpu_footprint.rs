//! GPU memory of a worker whose ranks compute on GPUs: which GPUs its ranks use, and each
//! model's footprint there (weights and per-rank activations) in each precision the GPU runs,
//! measured once at start so that coordinators plan each GPU's memory with measured bytes.

use std::collections::HashMap;
use std::sync::Arc;

use tome_model::gpu::footprint::measure;
use tome_model::gpu::{DeviceSpec, GpuFootprint, GpuRank};
use tome_model::ModelDir;

use crate::error::WorkerError;

/// The GPUs `device`'s ranks compute on: rank r of a job on the (r mod count)-th.
pub fn rank_gpus(device: DeviceSpec) -> Vec<usize> {
    match device {
        DeviceSpec::Cpu => Vec::new(),
        DeviceSpec::Cuda(index) => vec![index],
        DeviceSpec::AllCuda => tome_gpu::present().as_ref().map(|g| g.iter().map(|g| g.index).collect()).unwrap_or_default(),
    }
}

/// Each model's footprint, by model name, in every precision it runs on GPUs and the first GPU
/// of `device` computes (bf16 needs compute capability 8.0), measured on that GPU. Nothing for
/// CPU ranks, or for a model without a GPU path. A measurement that fails (a model whose
/// options its GPU path refuses, a GPU without a memory pool) is logged and left out: the
/// worker still serves, and coordinators do not plan that GPU memory.
pub fn measure_footprints(models: &[Arc<ModelDir>], device: DeviceSpec) -> Result<HashMap<String, Vec<GpuFootprint>>, WorkerError> {
    let Some(&gpu) = rank_gpus(device).first() else {
        return Ok(HashMap::new());
    };
    let mut all = HashMap::new();
    for m in models {
        let mut footprints = Vec::new();
        for &precision in m.model.gpu_precisions() {
            if GpuRank::lease(gpu)?.check_precision(precision).is_err() {
                continue;
            }
            match measure(&m.model, gpu, precision) {
                Ok(f) => {
                    tracing::info!(model = %m.name(), %precision, gpu, weight_bytes = f.weight_bytes, rank_base_bytes = f.rank_base_bytes, rank_bytes_per_token = f.rank_bytes_per_token, "GPU footprint measured");
                    footprints.push(f);
                }
                Err(error) => tracing::warn!(model = %m.name(), %precision, gpu, %error, "GPU footprint not measured: coordinators will not plan this GPU memory"),
            }
        }
        all.insert(m.name(), footprints);
    }
    Ok(all)
}
