//! Shard layouts: which global token positions each rank owns.
//!
//! `contiguous`: rank r owns one run `[a_r, b_r)`, with even or caller-chosen boundaries.
//! `zigzag`: the sequence is cut into 2P chunks and rank r owns chunks r and 2P-1-r, which
//! balances causal attention (the striped/zigzag layouts of ring-flash-attention). Shards may be
//! of different lengths and may be empty; positions travel with the tokens, so no padding is
//! needed for the layout itself.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::{DistError, Result};

/// How a sequence is cut into shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    #[default]
    Contiguous,
    Zigzag,
}

/// The positions every rank owns, as ascending, disjoint ranges covering `0..len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    len: usize,
    shards: Vec<Vec<Range<usize>>>,
}

/// `n` items cut into `parts` runs whose lengths differ by at most one (longer ones first).
fn even_bounds(n: usize, parts: usize) -> Vec<usize> {
    let (base, extra) = (n / parts, n % parts);
    let mut bounds = vec![0];
    for i in 0..parts {
        bounds.push(bounds[i] + base + usize::from(i < extra));
    }
    bounds
}

impl ShardPlan {
    pub fn new(layout: Layout, len: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 {
            return Err(DistError::Plan("a plan needs at least one rank".into()));
        }
        match layout {
            Layout::Contiguous => Self::from_bounds(&even_bounds(len, ranks)),
            Layout::Zigzag => {
                let b = even_bounds(len, 2 * ranks);
                let shards = (0..ranks)
                    .map(|r| {
                        let (lo, hi) = (r, 2 * ranks - 1 - r);
                        union(vec![b[lo]..b[lo + 1], b[hi]..b[hi + 1]])
                    })
                    .collect();
                Ok(ShardPlan { len, shards })
            }
        }
    }

    /// A contiguous plan whose shards hold whole units of `unit` tokens (segments, chunks),
    /// as evenly as whole units allow.
    pub fn aligned(len: usize, ranks: usize, unit: usize) -> Result<Self> {
        if ranks == 0 || unit == 0 {
            return Err(DistError::Plan("a plan needs at least one rank and a positive unit".into()));
        }
        let units = even_bounds(len.div_ceil(unit), ranks);
        Self::from_bounds(&units.iter().map(|&u| (u * unit).min(len)).collect::<Vec<_>>())
    }

    /// A contiguous plan with the given boundaries `0 = b_0 <= b_1 <= ... <= b_P = len`.
    pub fn from_bounds(bounds: &[usize]) -> Result<Self> {
        if bounds.len() < 2 || bounds[0] != 0 || bounds.windows(2).any(|w| w[1] < w[0]) {
            return Err(DistError::Plan(format!("shard boundaries must start at 0 and not decrease: {bounds:?}")));
        }
        // Each shard is one run of positions here (or none).
        #[allow(clippy::single_range_in_vec_init)]
        let shards = bounds.windows(2).map(|w| if w[0] < w[1] { vec![w[0]..w[1]] } else { Vec::new() }).collect();
        Ok(ShardPlan { len: bounds[bounds.len() - 1], shards })
    }

    /// A plan from explicit per-rank ranges (as a plan travels on the wire): each rank's ranges
    /// ascending and non-empty, all of them together covering `0..len` exactly once.
    pub fn from_ranges(len: usize, shards: Vec<Vec<Range<usize>>>) -> Result<Self> {
        if shards.is_empty() {
            return Err(DistError::Plan("a plan needs at least one rank".into()));
        }
        let mut all: Vec<Range<usize>> = Vec::new();
        for (r, ranges) in shards.iter().enumerate() {
            if ranges.iter().any(|x| x.is_empty()) || ranges.windows(2).any(|w| w[1].start < w[0].end) {
                return Err(DistError::Plan(format!("rank {r}'s ranges must be non-empty and ascending: {ranges:?}")));
            }
            all.extend(ranges.iter().cloned());
        }
        all.sort_by_key(|x| x.start);
        let mut next = 0;
        for x in &all {
            if x.start != next {
                return Err(DistError::Plan(format!("the ranks' ranges must cover 0..{len} exactly once; position {next} is not covered once")));
            }
            next = x.end;
        }
        if next != len {
            return Err(DistError::Plan(format!("the ranks' ranges cover 0..{next}, not 0..{len}")));
        }
        Ok(ShardPlan { len, shards })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ranks(&self) -> usize {
        self.shards.len()
    }

    /// The ranges rank `r` owns, ascending.
    pub fn ranges(&self, r: usize) -> &[Range<usize>] {
        &self.shards[r]
    }

    /// How many tokens rank `r` owns.
    pub fn shard_len(&self, r: usize) -> usize {
        self.shards[r].iter().map(|x| x.len()).sum()
    }

    /// Global positions of rank `r`'s tokens, in the order the rank holds them.
    pub fn positions(&self, r: usize) -> Vec<i64> {
        self.shards[r].iter().flat_map(|x| x.clone()).map(|p| p as i64).collect()
    }

    /// True when every rank's positions form one run in rank order (positions ascend across ranks).
    pub fn is_contiguous(&self) -> bool {
        let mut next = 0;
        for ranges in &self.shards {
            for x in ranges {
                if x.start != next {
                    return false;
                }
                next = x.end;
            }
        }
        true
    }

    /// Rank `r`'s rows of a tensor whose dimension `dim` runs over all positions.
    pub fn shard_of(&self, t: &Tensor, dim: usize, r: usize) -> Result<Tensor> {
        let pieces: Vec<Tensor> = self.shards[r].iter().map(|x| t.narrow(dim, x.start, x.len())).collect::<candle_core::Result<_>>()?;
        Ok(if pieces.is_empty() { t.narrow(dim, 0, 0)? } else { Tensor::cat(&pieces, dim)? })
    }

    /// The whole tensor from every rank's shard (`shards[r]` as held by rank `r`), in position order.
    pub fn unshard(&self, shards: &[Tensor], dim: usize) -> Result<Tensor> {
        let mut pieces: Vec<(usize, Tensor)> = Vec::new();
        for (r, t) in shards.iter().enumerate() {
            let mut offset = 0;
            for x in &self.shards[r] {
                pieces.push((x.start, t.narrow(dim, offset, x.len())?));
                offset += x.len();
            }
        }
        pieces.sort_by_key(|(start, _)| *start);
        let pieces: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
        match pieces.is_empty() {
            true => Err(DistError::Plan("cannot reassemble an empty sequence".into())),
            false => Ok(Tensor::cat(&pieces, dim)?),
        }
    }

    /// The parts of `want` (sorted, disjoint ranges) that rank `r` owns, each with the offset of
    /// its first row inside rank `r`'s shard.
    pub fn owned_parts(&self, r: usize, want: &[Range<usize>]) -> Vec<(Range<usize>, usize)> {
        let mut out = Vec::new();
        let mut offset = 0;
        for x in &self.shards[r] {
            for w in want {
                let (lo, hi) = (x.start.max(w.start), x.end.min(w.end));
                if lo < hi {
                    out.push((lo..hi, offset + lo - x.start));
                }
            }
            offset += x.len();
        }
        out.sort_by_key(|(x, _)| x.start);
        out
    }
}

/// Sorted, merged union of ranges.
pub(crate) fn union(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.retain(|x| !x.is_empty());
    ranges.sort_by_key(|x| x.start);
    let mut out: Vec<Range<usize>> = Vec::new();
    for x in ranges {
        match out.last_mut() {
            Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// `a` minus `b` (both sorted, disjoint).
pub(crate) fn subtract(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for x in a {
        let mut start = x.start;
        for y in b.iter().filter(|y| y.end > x.start && y.start < x.end) {
            if y.start > start {
                out.push(start..y.start);
            }
            start = start.max(y.end);
        }
        if start < x.end {
            out.push(start..x.end);
        }
    }
    out
}

#[cfg(test)]
// Shards and subtrahends of one range are written as one-element slices on purpose.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_every_position_once() {
        for n in [0, 1, 5, 17, 100] {
            for p in 1..=5 {
                for layout in [Layout::Contiguous, Layout::Zigzag] {
                    let plan = ShardPlan::new(layout, n, p).unwrap();
                    let mut all: Vec<i64> = (0..p).flat_map(|r| plan.positions(r)).collect();
                    all.sort();
                    assert_eq!(all, (0..n as i64).collect::<Vec<_>>(), "{layout:?} n={n} p={p}");
                    let lens: Vec<usize> = (0..p).map(|r| plan.shard_len(r)).collect();
                    let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                    assert!(max - min <= 2, "{layout:?} unbalanced {lens:?}");
                    let ranges = (0..p).map(|r| plan.ranges(r).to_vec()).collect();
                    assert_eq!(ShardPlan::from_ranges(n, ranges).unwrap(), plan, "{layout:?} n={n} p={p} through ranges");
                }
            }
        }
        let z = ShardPlan::new(Layout::Zigzag, 8, 2).unwrap();
        assert_eq!(z.ranges(0), &[0..2, 6..8]);
        assert_eq!(z.ranges(1), &[2..6]);
        assert!(!z.is_contiguous());
    }

    #[test]
    fn range_algebra() {
        assert_eq!(union(vec![5..7, 0..2, 1..3, 7..9, 10..10]), vec![0..3, 5..9]);
        assert_eq!(subtract(&[0..10], &[2..3, 5..7]), vec![0..2, 3..5, 7..10]);
        assert_eq!(subtract(&[0..4, 6..9], &[3..7]), vec![0..3, 7..9]);
        let plan = ShardPlan::from_bounds(&[0, 3, 3, 10]).unwrap();
        assert_eq!(plan.owned_parts(2, &[1..5, 8..12]), vec![(3..5, 0), (8..10, 5)]);
        assert!(ShardPlan::from_bounds(&[1, 3]).is_err());
        assert!(ShardPlan::from_ranges(4, vec![vec![0..2], vec![1..4]]).is_err(), "overlap");
        assert!(ShardPlan::from_ranges(4, vec![vec![0..2], vec![3..4]]).is_err(), "gap");
        assert!(ShardPlan::from_ranges(4, vec![vec![0..2], vec![2..5]]).is_err(), "beyond len");
        assert!(ShardPlan::from_ranges(4, vec![vec![2..4, 0..2]]).is_err(), "descending");
        assert!(ShardPlan::from_ranges(4, vec![vec![0..4], vec![]]).is_ok(), "empty shard");
    }
}
