//! GPU memory of a worker whose ranks compute on GPUs: which GPUs its ranks use, each model's
//! footprint there (weights and per-rank activations) in each precision the GPU runs, measured
//! once at start so that coordinators plan each GPU's memory with measured bytes, and the
//! worker's own check of its running shards against each GPU ([`GpuBudget`]).

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

/// The GPU memory a worker's running shards hold, per GPU: weights resident for good once a
/// shard of a model ran there in a precision, and each running shard's activations while it
/// runs, within the share of each GPU's memory a plan fills. Coordinators plan the same, but
/// only with their own jobs; this is the check across every coordinator a worker serves.
pub struct GpuBudget {
    gpus: HashMap<usize, GpuShare>,
}

struct GpuShare {
    /// What a plan may fill of the GPU's memory, in KiB permits.
    kib: Arc<tokio::sync::Semaphore>,
    capacity_kib: usize,
    /// (model, precision) whose weights are there, and their KiB taken for good.
    resident: std::sync::Mutex<HashMap<(String, tome_attn::Precision), usize>>,
}

/// The share of a GPU's memory planned: the rest is for what the memory pool does not count
/// (the context, the kernels, cuBLAS's workspaces, the allocator's slack). The coordinator's plan
/// uses the same.
pub const GPU_PLANNED_PERCENT: u64 = 90;

impl GpuBudget {
    /// A budget for GPUs of `memory_bytes` each, by index.
    pub fn new(gpus: impl IntoIterator<Item = (usize, u64)>) -> Self {
        let gpus = gpus
            .into_iter()
            .map(|(index, memory)| {
                let capacity_kib = ((memory / 100 * GPU_PLANNED_PERCENT / 1024) as usize).min(tokio::sync::Semaphore::MAX_PERMITS);
                (index, GpuShare { kib: Arc::new(tokio::sync::Semaphore::new(capacity_kib)), capacity_kib, resident: std::sync::Mutex::default() })
            })
            .collect();
        GpuBudget { gpus }
    }

    /// The GPUs of this machine.
    pub fn of_this_machine() -> Self {
        Self::new(tome_gpu::present().as_ref().map(|g| g.iter().map(|g| (g.index, g.memory_bytes)).collect::<Vec<_>>()).unwrap_or_default())
    }

    /// Room on GPU `gpu` for a shard of `model` in `precision` under `footprint` with `tokens`
    /// tokens: the weights taken for good the first time, the activations until the permit
    /// drops. A GPU this budget does not know is not checked (`None`). Refuses what could not
    /// fit even alone (`TooLarge`) and what does not fit beside the shards running (`Busy`).
    pub fn admit(&self, worker: &str, gpu: usize, model: &str, footprint: &GpuFootprint, tokens: usize) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, WorkerError> {
        let Some(share) = self.gpus.get(&gpu) else { return Ok(None) };
        let kib = |bytes: u64| (bytes.div_ceil(1024) as usize).min(share.capacity_kib);
        let need = kib(footprint.rank_bytes(tokens));
        let mut resident = share.resident.lock().unwrap_or_else(|p| p.into_inner());
        let key = (model.to_string(), footprint.precision);
        let weights = if resident.contains_key(&key) { 0 } else { kib(footprint.weight_bytes) };
        let held_for_good: usize = resident.values().sum();
        if held_for_good + weights + need > share.capacity_kib {
            return Err(WorkerError::TooLarge(format!(
                "rank needs about {} MiB of activations on GPU cuda:{gpu} of worker {worker}, beside {} MiB of weights there, past the {} MiB planned of it",
                need / 1024,
                (held_for_good + weights) / 1024,
                share.capacity_kib / 1024
            )));
        }
        if weights > 0 {
            let taken = share
                .kib
                .try_acquire_many(u32::try_from(weights).unwrap_or(u32::MAX))
                .map_err(|_| WorkerError::Busy(format!("GPU cuda:{gpu} of worker {worker} has no room for {model}'s weights beside the shards running now")))?;
            taken.forget();
            resident.insert(key, weights);
        }
        drop(resident);
        let permit = share
            .kib
            .clone()
            .try_acquire_many_owned(u32::try_from(need).unwrap_or(u32::MAX))
            .map_err(|_| WorkerError::Busy(format!("GPU cuda:{gpu} of worker {worker} has no room for {} more MiB of activations now", need / 1024)))?;
        Ok(Some(permit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tome_attn::Precision;

    #[test]
    fn a_gpu_takes_weights_once_and_activations_while_shards_run() {
        const MIB: u64 = 1 << 20;
        let budget = GpuBudget::new([(0, 1000 * MIB)]); // 900 MiB planned
        let f = GpuFootprint { precision: Precision::F32, weight_bytes: 300 * MIB, rank_base_bytes: 100 * MIB, rank_bytes_per_token: MIB };
        // 300 MiB of weights for good, then 100 + 100 MiB a shard of 100 tokens.
        let a = budget.admit("w", 0, "m", &f, 100).unwrap();
        let b = budget.admit("w", 0, "m", &f, 100).unwrap();
        let c = budget.admit("w", 0, "m", &f, 100).unwrap();
        assert!(matches!(budget.admit("w", 0, "m", &f, 100), Err(WorkerError::Busy(m)) if m.contains("cuda:0 of worker w")));
        drop((a, b));
        let _d = budget.admit("w", 0, "m", &f, 100).expect("the finished shards' share is given back");
        drop(c);
        // Past the GPU even alone; a GPU the budget does not know is not checked.
        assert!(matches!(budget.admit("w", 0, "m", &f, 600), Err(WorkerError::TooLarge(m)) if m.contains("300 MiB of weights")));
        assert!(budget.admit("w", 3, "m", &f, 10_000).unwrap().is_none());
        // Another precision's weights come beside the resident ones.
        let half = GpuFootprint { precision: Precision::Bf16, weight_bytes: 500 * MIB, ..f };
        assert!(matches!(budget.admit("w", 0, "m", &half, 100), Err(WorkerError::TooLarge(m)) if m.contains("800 MiB of weights")));
    }
}
