//! `favor`: Performer FAVOR+ attention across ranks (Choromanski et al. 2021).
//!
//! The keys' stabiliser is a maximum over the whole sequence: one all-reduce (max) of a scalar
//! per head. Bidirectional: every rank's state (phi(K)ᵀV, Σ phi(K)) is summed by one all-reduce
//! and each rank finishes its own queries. Causal: the state of all earlier tokens reaches each
//! rank by an exclusive prefix scan along the ranks (linear attention's state passing, as in
//! LASP); the shards must then be contiguous runs in rank order.

use candle_core::{DType, Device, Tensor};
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
    /// Tokens per row block: feature maps exist for one block at a time.
    pub rows: usize,
}

/// This rank's output rows; `q`, `k`, `v` are `[heads, shard, d]`.
pub fn favor_attention(group: &dyn Group, plan: &ShardPlan, q: &Tensor, k: &Tensor, v: &Tensor, spec: &FavorSpec) -> Result<Tensor> {
    if spec.causal && !plan.is_contiguous() {
        return Err(DistError::Unsupported("causal FAVOR+ needs contiguous shards in rank order (prefix state passes rank to rank)".into()));
    }
    let proj = &spec.projection;
    let (heads, n, dv) = v.dims3()?;
    let m = proj.dim(0)?;
    // Row blocks keep the feature maps small (phi is `m` wide per token) and the cost linear.
    let step = spec.rows.max(1);
    let blocks: Vec<(usize, usize)> = (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect();
    let rows = |t: &Tensor, (s, len): (usize, usize)| t.narrow(1, s, len);

    let mut stab = favor::key_stabilizer(&k.narrow(1, 0, 0)?, proj)?;
    for &b in &blocks {
        stab = stab.maximum(&favor::key_stabilizer(&rows(k, b)?, proj)?)?;
    }
    let stab = group.all_reduce_max(&stab)?;
    let mut context = Tensor::zeros((heads, m, dv), DType::F32, &Device::Cpu)?;
    let mut ksum = Tensor::zeros((heads, m), DType::F32, &Device::Cpu)?;
    for &b in &blocks {
        let (c, s) = favor::state(&favor::key_features(&rows(k, b)?, proj, &stab)?, &rows(v, b)?)?;
        context = (context + c)?;
        ksum = (ksum + s)?;
    }
    let mut outs = Vec::with_capacity(blocks.len());
    if !spec.causal {
        let (context, ksum) = (group.all_reduce_sum(&context)?, group.all_reduce_sum(&ksum)?);
        for &b in &blocks {
            outs.push(favor::bidirectional(&favor::query_features(&rows(q, b)?, proj)?, &context, &ksum)?);
        }
    } else {
        let state = Tensor::cat(&[&context.flatten_from(1)?, &ksum], 1)?;
        let before = group.exclusive_scan_sum(&state)?;
        let (mut context, mut ksum) = (before.narrow(1, 0, m * dv)?.reshape((heads, m, dv))?, before.narrow(1, m * dv, m)?);
        for &b in &blocks {
            let (phi_q, phi_k) = (favor::query_features(&rows(q, b)?, proj)?, favor::key_features(&rows(k, b)?, proj, &stab)?);
            let (out, c, s) = favor::causal(&phi_q, &phi_k, &rows(v, b)?, &context, &ksum, spec.chunk)?;
            outs.push(out);
            (context, ksum) = (c, s);
        }
    }
    if outs.is_empty() {
        return Ok(Tensor::zeros((heads, 0, dv), DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}
