//! `favor`: Performer FAVOR+ attention across ranks (Choromanski et al. 2021).
//!
//! The keys' stabiliser is a maximum over the whole sequence: one all-reduce (max) of a scalar
//! per head. Bidirectional: every rank's state (phi(K)ᵀV, Σ phi(K)) is summed by one all-reduce
//! and each rank finishes its own queries. Causal: the state of all earlier tokens reaches each
//! rank by an exclusive prefix scan along the ranks (linear attention's state passing, as in
//! LASP); the shards must then be contiguous runs in rank order.

use candle_core::Tensor;
use tome_attn::favor;

use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

#[derive(Clone, Debug)]
pub struct FavorSpec {
    /// The projection `[features, head_dim]`, the same on every rank.
    pub projection: Tensor,
    pub causal: bool,
    /// Tokens per chunk of the causal prefix computation.
    pub chunk: usize,
}

/// This rank's output rows; `q`, `k`, `v` are `[heads, shard, d]`.
pub fn favor_attention(group: &dyn Group, plan: &ShardPlan, q: &Tensor, k: &Tensor, v: &Tensor, spec: &FavorSpec) -> Result<Tensor> {
    if spec.causal && !plan.is_contiguous() {
        return Err(DistError::Unsupported("causal FAVOR+ needs contiguous shards in rank order (prefix state passes rank to rank)".into()));
    }
    let proj = &spec.projection;
    let stab = group.all_reduce_max(&favor::key_stabilizer(k, proj)?)?;
    let (heads, n, dv) = v.dims3()?;
    let m = proj.dim(0)?;
    if n == 0 {
        // An empty shard still takes part in every collective, with a zero state.
        let zeros = Tensor::zeros((heads, m * dv + m), candle_core::DType::F32, &candle_core::Device::Cpu)?;
        if spec.causal {
            group.exclusive_scan_sum(&zeros)?;
        } else {
            group.all_reduce_sum(&zeros.narrow(1, 0, m * dv)?.reshape((heads, m, dv))?)?;
            group.all_reduce_sum(&zeros.narrow(1, m * dv, m)?)?;
        }
        return Ok(Tensor::zeros((heads, 0, dv), candle_core::DType::F32, &candle_core::Device::Cpu)?);
    }
    let phi_q = favor::query_features(q, proj)?;
    let phi_k = favor::key_features(k, proj, &stab)?;
    let (context, ksum) = favor::state(&phi_k, v)?;
    if !spec.causal {
        let (context, ksum) = (group.all_reduce_sum(&context)?, group.all_reduce_sum(&ksum)?);
        return Ok(favor::bidirectional(&phi_q, &context, &ksum)?);
    }
    let state = Tensor::cat(&[&context.flatten_from(1)?, &ksum], 1)?;
    let before = group.exclusive_scan_sum(&state)?;
    let context0 = before.narrow(1, 0, m * dv)?.reshape((heads, m, dv))?;
    let ksum0 = before.narrow(1, m * dv, m)?;
    Ok(favor::causal(&phi_q, &phi_k, v, &context0, &ksum0, spec.chunk)?.0)
}
