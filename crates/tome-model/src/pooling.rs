//! Pooling token states into span embeddings across ranks: document embeddings (one span
//! covering everything) and late-chunking chunk embeddings (Günther et al. 2024, "Late
//! Chunking"): each chunk is pooled from states that saw the whole document's context.
//!
//! Each rank sums the rows it owns of every span and one all-reduce adds the sums in rank
//! order, so the pooled result is identical on every rank and equal to one rank's.

use std::ops::Range;

use candle_core::{Device, Tensor};
use tome_dist::{Group, ShardPlan};

use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Mean of the span's token states (sentence-transformers' default).
    #[default]
    Mean,
    /// The state of the span's first token.
    Cls,
}

impl Pooling {
    pub fn name(&self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }
}

/// Pools `spans` (token ranges inside the document) over this rank's `hidden` rows
/// (`[shard, width]`, positions from `plan`); returns `[spans, width]` on every rank.
pub fn pool_spans(group: &dyn Group, plan: &ShardPlan, hidden: &Tensor, spans: &[Range<usize>], pooling: Pooling) -> Result<Tensor> {
    let width = hidden.dim(1)?;
    if let Some(bad) = spans.iter().find(|s| s.start >= s.end || s.end > plan.len()) {
        return Err(ModelError::Input(format!("span {}..{} is empty or outside the document of {} tokens", bad.start, bad.end, plan.len())));
    }
    let rows = hidden.to_vec2::<f32>()?;
    let positions = plan.positions(group.rank());
    let mut sums = vec![0f32; spans.len() * width];
    // Rows are visited in position order within the rank; spans sorted by start let us stop early.
    for (row, &pos) in rows.iter().zip(&positions) {
        let pos = pos as usize;
        for (s, span) in spans.iter().enumerate() {
            let take = match pooling {
                Pooling::Mean => span.contains(&pos),
                Pooling::Cls => span.start == pos,
            };
            if take {
                for (acc, x) in sums[s * width..(s + 1) * width].iter_mut().zip(row) {
                    *acc += x;
                }
            }
        }
    }
    let sums = Tensor::from_vec(sums, (spans.len(), width), &Device::Cpu)?;
    let total = group.all_reduce_sum(&sums)?;
    match pooling {
        Pooling::Cls => Ok(total),
        Pooling::Mean => {
            let counts: Vec<f32> = spans.iter().map(|s| (s.end - s.start) as f32).collect();
            let counts = Tensor::from_vec(counts, (spans.len(), 1), &Device::Cpu)?;
            Ok(total.broadcast_div(&counts)?)
        }
    }
}

/// Rows scaled to unit L2 norm (rows of zeros stay zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}
