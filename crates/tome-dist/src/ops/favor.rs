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
    /// Tokens per row block. Causal: feature maps exist for one block at a time. Bidirectional:
    /// the rows of one parallel task, whose sums are added in task order (whatever the thread
    /// count); feature maps exist for a few hundred rows per task at a time.
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
    let stab = group.all_reduce_max(&favor::key_stabilizer(k, proj)?)?;
    // This shard's state: all of it for bidirectional attention, what later shards see for causal.
    let (context, ksum) = favor::key_state(k, v, proj, &stab, spec.rows)?;
    if !spec.causal {
        let (context, ksum) = (group.all_reduce_sum(&context)?, group.all_reduce_sum(&ksum)?);
        return Ok(favor::bidirectional(q, proj, &context, &ksum, spec.rows)?);
    }
    // Causal: row blocks keep the feature maps small (phi is `m` wide per token).
    let step = spec.rows.max(1);
    let blocks: Vec<(usize, usize)> = (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect();
    let rows = |t: &Tensor, (s, len): (usize, usize)| t.narrow(1, s, len);
    let state = Tensor::cat(&[&context.flatten_from(1)?, &ksum], 1)?;
    let before = group.exclusive_scan_sum(&state)?;
    let (mut context, mut ksum) = (before.narrow(1, 0, m * dv)?.reshape((heads, m, dv))?, before.narrow(1, m * dv, m)?);
    let mut outs = Vec::with_capacity(blocks.len());
    for &b in &blocks {
        let (phi_q, phi_k) = (favor::query_features(&rows(q, b)?, proj)?, favor::key_features(&rows(k, b)?, proj, &stab)?);
        let (out, c, s) = favor::causal(&phi_q, &phi_k, &rows(v, b)?, &context, &ksum, spec.chunk)?;
        outs.push(out);
        (context, ksum) = (c, s);
    }
    if outs.is_empty() {
        return Ok(Tensor::zeros((heads, 0, dv), DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}
