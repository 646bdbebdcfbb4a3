//! What a model's GPU ranks take of a GPU, measured on it: the weights one precision uploads,
//! and each rank's activations at their peak as a base plus bytes per token. Two ranks sharing
//! the GPU run documents of two lengths (so the measured peaks hold what ranks send each
//! other, too), and the device memory pool's high-water mark gives each run's peak; the line
//! through the two peaks is the estimate a coordinator plans with.

use tome_attn::Precision;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_gpu::{Gpu, PoolMeter};

use super::GpuRank;
use crate::config::EncodeOptions;
use crate::error::{ModelError, Result};
use crate::model::Model;

/// The longest document a measurement runs (shorter where the model's positions end): long
/// enough that BigBird-base runs block-sparse at both lengths.
const MEASURE_TOKENS: usize = 2048;

/// Ranks a measurement runs, sharing the GPU.
const RANKS: usize = 2;

/// A model's GPU memory in one precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuFootprint {
    pub precision: Precision,
    /// The weights, uploaded once per GPU and shared by its ranks.
    pub weight_bytes: u64,
    /// Each rank's activations at their peak: `rank_base_bytes + rank_bytes_per_token · tokens`.
    pub rank_base_bytes: u64,
    pub rank_bytes_per_token: u64,
}

impl GpuFootprint {
    /// A rank's activations at their peak with `tokens` tokens.
    pub fn rank_bytes(&self, tokens: usize) -> u64 {
        self.rank_base_bytes.saturating_add(self.rank_bytes_per_token.saturating_mul(tokens as u64))
    }

    /// The footprint through two runs' peaks of `RANKS` ranks: `(tokens, bytes)`.
    fn through(precision: Precision, weight_bytes: u64, short: (usize, u64), long: (usize, u64)) -> Self {
        let per_token = long.1.saturating_sub(short.1) / (long.0.saturating_sub(short.0).max(1) as u64);
        let base = short.1.saturating_sub(per_token * short.0 as u64) / RANKS as u64;
        GpuFootprint { precision, weight_bytes, rank_base_bytes: base, rank_bytes_per_token: per_token }
    }
}

/// Measures `model` in `precision` on GPU `gpu`, then frees the weights it uploaded (the first
/// job in that precision uploads them again). The GPU must not be running anything else, and
/// the model must not yet have its weights there in `precision` (a worker measures at start).
/// A measurement whose activations do not grow with the tokens is refused: a plan could not
/// trust it.
pub fn measure(model: &Model, gpu: usize, precision: Precision) -> Result<GpuFootprint> {
    let measured = measure_runs(model, gpu, precision);
    model.release_gpu(gpu, precision);
    let f = measured?;
    if f.rank_bytes_per_token == 0 || f.weight_bytes == 0 {
        return Err(ModelError::Unsupported(format!("{}'s GPU memory in {precision} did not measure: {f:?}", model.shape().model_type)));
    }
    Ok(f)
}

fn measure_runs(model: &Model, gpu: usize, precision: Precision) -> Result<GpuFootprint> {
    let shape = model.shape();
    // Two positions spare: RoBERTa-style checkpoints count their padding offset in them.
    let long = shape.max_positions.map_or(MEASURE_TOKENS, |p| p.saturating_sub(2)).min(MEASURE_TOKENS);
    let short = long / 2;
    if short < model.min_tokens().max(RANKS) {
        return Err(ModelError::Input(format!("{} runs documents of at least {} tokens; its GPU memory is measured on {short}", shape.model_type, model.min_tokens())));
    }
    let meter = PoolMeter::new(&Gpu::open(gpu)?)?;
    let vocab = shape.vocab_size.max(1);
    let run = |tokens: usize| -> Result<()> {
        // Ids away from the special ones at the start of most vocabularies.
        let ids = (0..tokens).map(|i| ((vocab / 2 + i) % vocab) as u32).collect();
        let doc = model.prepare(ids, &EncodeOptions { precision, ..Default::default() })?;
        let plan = ShardPlan::new(Layout::Contiguous, doc.len(), RANKS)?;
        run_ranks(RANKS, |g: &InProcessGroup| {
            let rank = GpuRank::lease(gpu)?;
            model.forward_on(Some(&rank), g, &plan, &doc.shard(&plan, g.rank()), &mut |_| true)
        })?;
        Ok(())
    };
    let before = meter.used()?;
    meter.reset_peak()?;
    run(short)?;
    // What stays after the first run is the weights it uploaded; its peak held them too.
    let resident = meter.used()?;
    let weight_bytes = resident.saturating_sub(before);
    let short_peak = meter.peak()?.saturating_sub(resident);
    meter.reset_peak()?;
    run(long)?;
    let long_peak = meter.peak()?.saturating_sub(resident);
    Ok(GpuFootprint::through(precision, weight_bytes, (short, short_peak), (long, long_peak)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_footprint_is_the_line_through_both_peaks_per_rank() {
        // Two ranks: 2 · (base + per_token · n / 2) = 2 · base + per_token · n.
        let f = GpuFootprint::through(Precision::F32, 7, (512, 2 * 1000 + 300 * 512), (1024, 2 * 1000 + 300 * 1024));
        assert_eq!((f.weight_bytes, f.rank_base_bytes, f.rank_bytes_per_token), (7, 1000, 300));
        assert_eq!(f.rank_bytes(10), 4000);
        // A longer run that peaked lower (noise) gives no negative slope.
        let flat = GpuFootprint::through(Precision::Bf16, 0, (512, 5000), (1024, 4000));
        assert_eq!((flat.rank_base_bytes, flat.rank_bytes_per_token), (2500, 0));
    }
}
