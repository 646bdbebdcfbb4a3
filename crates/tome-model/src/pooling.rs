//! Pooling token states into span embeddings across ranks: document embeddings (one span
//! covering everything) and late-chunking chunk embeddings (Günther et al. 2024, "Late
//! Chunking"): each chunk is pooled from states that saw the whole document's context.
//!
//! Each rank sums the rows it owns of every span and one all-reduce adds the sums in rank
//! order, so the pooled result is identical on every rank and equal to one rank's (to f32
//! rounding: each rank's sums are differences of f64 running sums). The cost is one pass over
//! the rows plus the spans, however many spans overlap.

use std::ops::Range;

use candle_core::{Device, Tensor};
use tome_dist::{Group, ShardPlan};

use crate::error::{ModelError, Result};

/// Most spans one job pools (the document and its chunks together).
pub const MAX_POOL_SPANS: usize = 1 << 16;

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
    if spans.len() > MAX_POOL_SPANS {
        return Err(ModelError::Input(format!("{} spans to pool; at most {MAX_POOL_SPANS}", spans.len())));
    }
    if let Some(bad) = spans.iter().find(|s| s.start >= s.end || s.end > plan.len()) {
        return Err(ModelError::Input(format!("span {}..{} is empty or outside the document of {} tokens", bad.start, bad.end, plan.len())));
    }
    let rows = hidden.flatten_all()?.to_vec1::<f32>()?;
    let positions = plan.positions(group.rank());
    if rows.len() != positions.len() * width {
        return Err(ModelError::Input(format!("rank {} holds {} rows for its {} positions", group.rank(), rows.len() / width.max(1), positions.len())));
    }
    let sums = match pooling {
        Pooling::Mean => span_sums(&rows, width, &positions, spans),
        Pooling::Cls => first_rows(&rows, width, &positions, spans),
    };
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

/// The sum of this rank's rows in each span, `[spans * width]`, in one pass over the rows: a
/// span's sum is the running sum (f64) at its end less the running sum at its start, so the
/// cost is O(rows + spans) whatever the spans overlap.
fn span_sums(rows: &[f32], width: usize, positions: &[i64], spans: &[Range<usize>]) -> Vec<f32> {
    // (position, span, is its end), ends after starts at one position (a span is never empty).
    let mut marks: Vec<(usize, usize, bool)> = spans.iter().enumerate().flat_map(|(s, r)| [(r.start, s, false), (r.end, s, true)]).collect();
    marks.sort_unstable();
    let mut running = vec![0f64; width];
    let mut at_start = vec![0f64; spans.len() * width];
    let mut sums = vec![0f32; spans.len() * width];
    let mut next_row = 0;
    for (at, s, is_end) in marks {
        // Rows are in position order within the rank.
        while next_row < positions.len() && (positions[next_row] as usize) < at {
            for (acc, &x) in running.iter_mut().zip(&rows[next_row * width..(next_row + 1) * width]) {
                *acc += f64::from(x);
            }
            next_row += 1;
        }
        let slot = s * width..(s + 1) * width;
        if is_end {
            for ((out, &now), &then) in sums[slot.clone()].iter_mut().zip(&running).zip(&at_start[slot]) {
                *out = (now - then) as f32;
            }
        } else {
            at_start[slot].copy_from_slice(&running);
        }
    }
    sums
}

/// Each span's first row where this rank holds it (zeros elsewhere), `[spans * width]`.
fn first_rows(rows: &[f32], width: usize, positions: &[i64], spans: &[Range<usize>]) -> Vec<f32> {
    let mut out = vec![0f32; spans.len() * width];
    for (s, span) in spans.iter().enumerate() {
        if let Ok(i) = positions.binary_search(&(span.start as i64)) {
            out[s * width..(s + 1) * width].copy_from_slice(&rows[i * width..(i + 1) * width]);
        }
    }
    out
}

/// Rows scaled to unit L2 norm (rows of zeros stay zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_sums_in_one_pass_equal_the_sums_row_by_row_for_overlapping_spans() {
        let width = 3;
        // A zigzag rank's positions: two ranges.
        let positions: Vec<i64> = (2..9).chain(20..26).collect();
        let rows: Vec<f32> = (0..positions.len() * width).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
        let spans = vec![0..30, 3..4, 5..22, 5..22, 8..9, 9..20, 21..30, 0..1];
        let got = span_sums(&rows, width, &positions, &spans);
        for (s, span) in spans.iter().enumerate() {
            for c in 0..width {
                let want: f32 = positions.iter().enumerate().filter(|(_, &p)| span.contains(&(p as usize))).map(|(i, _)| rows[i * width + c]).sum();
                assert!((got[s * width + c] - want).abs() < 1e-6, "span {span:?} column {c}: {} vs {want}", got[s * width + c]);
            }
        }
        let first = first_rows(&rows, width, &positions, &spans);
        assert_eq!(&first[width..2 * width], &rows[width..2 * width], "3..4 starts at the rank's second row");
        assert!(first[..width].iter().all(|&x| x == 0.0), "position 0 is another rank's");
    }
}
