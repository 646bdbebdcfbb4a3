//! `moe`: Switch Transformer sparse experts across ranks (Fedus et al. 2021).
//!
//! Experts are replicated, so tokens never move: the only thing that crosses ranks is, per
//! expert, how many tokens earlier ranks routed to it (an exclusive prefix scan), which decides
//! capacity in global token order exactly as one rank would. Shards must be contiguous runs in
//! rank order.

use candle_core::{Device, Tensor};
use tome_attn::moe;

use crate::error::{DistError, Result};
use crate::group::Group;
use crate::layout::ShardPlan;

/// The outcome of routing a shard: per token, its expert, probability and whether it was kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub expert: Vec<usize>,
    pub prob: Vec<f32>,
    pub kept: Vec<bool>,
}

/// Routes this rank's tokens (`logits` `[shard, experts]`, f32) under a per-sequence capacity.
pub fn route_tokens(group: &dyn Group, plan: &ShardPlan, logits: &Tensor, capacity: usize) -> Result<Routing> {
    if !plan.is_contiguous() {
        return Err(DistError::Unsupported("expert capacity is decided in token order: moe needs contiguous shards in rank order".into()));
    }
    let rows = logits.to_vec2::<f32>()?;
    let experts = logits.dim(1)?;
    let choices = moe::route(&rows);
    let local: Vec<f32> = moe::counts(&choices, experts).into_iter().map(|c| c as f32).collect();
    let before = group.exclusive_scan_sum(&Tensor::from_vec(local, experts, &Device::Cpu)?)?;
    let before: Vec<usize> = before.to_vec1::<f32>()?.into_iter().map(|c| c as usize).collect();
    let kept = moe::kept(&choices, &before, capacity);
    Ok(Routing { expert: choices.iter().map(|c| c.0).collect(), prob: choices.iter().map(|c| c.1).collect(), kept })
}

/// The mixture's output rows: `prob · expert(x)` for kept tokens, zero for dropped ones.
/// `expert(e, rows)` runs expert `e` on a `[tokens, d]` batch.
pub fn apply_experts(x: &Tensor, routing: &Routing, experts: usize, expert: &dyn Fn(usize, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let mut rows: Vec<Option<Tensor>> = vec![None; n];
    for e in 0..experts {
        let idx: Vec<u32> = (0..n).filter(|&i| routing.kept[i] && routing.expert[i] == e).map(|i| i as u32).collect();
        if idx.is_empty() {
            continue;
        }
        let ids = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
        let y = expert(e, &x.index_select(&ids, 0)?)?;
        for (j, &i) in idx.iter().enumerate() {
            rows[i as usize] = Some((y.get(j)? * routing.prob[i as usize] as f64)?);
        }
    }
    let width = match rows.iter().flatten().next() {
        Some(r) => r.dim(0)?,
        None => x.dim(1)?,
    };
    let zero = Tensor::zeros(width, candle_core::DType::F32, &Device::Cpu)?;
    let rows: Vec<Tensor> = rows.into_iter().map(|r| r.unwrap_or_else(|| zero.clone())).collect();
    if rows.is_empty() {
        return Ok(Tensor::zeros((0, width), candle_core::DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}
