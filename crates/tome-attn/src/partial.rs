//! Mergeable attention partials: an output normalised over a subset of keys, plus the
//! log-sum-exp of the scores over that subset.
//!
//! Two partials over disjoint key sets combine exactly into the partial over their union:
//! `lse = log(e^a + e^b)`, `out = (e^(a-lse)) out_a + (e^(b-lse)) out_b`. The merge is
//! commutative and associative up to rounding, so ranks may combine partials in any order;
//! everything stays f32 (never rounded to half precision between hops).

use candle_core::{Device, Tensor};

use crate::error::{shape_err, Result};
use crate::tensor::{dims3, with_f32};

/// Attention over a subset of keys: `out` is `[heads, queries, head_dim]`, `lse` is
/// `[heads, queries]`. A query that saw no key has `out = 0` and `lse = -inf`.
#[derive(Clone, Debug)]
pub struct Partial {
    pub out: Tensor,
    pub lse: Tensor,
}

impl Partial {
    /// The partial over an empty key set: merging it changes nothing.
    pub fn empty(heads: usize, queries: usize, head_dim: usize) -> Result<Self> {
        let out = Tensor::zeros((heads, queries, head_dim), candle_core::DType::F32, &Device::Cpu)?;
        let lse = Tensor::full(f32::NEG_INFINITY, (heads, queries), &Device::Cpu)?;
        Ok(Partial { out, lse })
    }

    pub fn from_vecs(out: Vec<f32>, lse: Vec<f32>, heads: usize, queries: usize, head_dim: usize) -> Result<Self> {
        Ok(Partial { out: Tensor::from_vec(out, (heads, queries, head_dim), &Device::Cpu)?, lse: Tensor::from_vec(lse, (heads, queries), &Device::Cpu)? })
    }

    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        dims3(&self.out, "Partial", "out")
    }

    /// Combines two partials of the same queries over disjoint key sets.
    pub fn merge(&self, other: &Partial) -> Result<Partial> {
        let (h, n, d) = self.dims()?;
        if other.dims()? != (h, n, d) || self.lse.dims() != [h, n] || other.lse.dims() != [h, n] {
            return Err(shape_err("Partial::merge", format!("partials differ: {:?}/{:?} vs {:?}/{:?}", self.out.dims(), self.lse.dims(), other.out.dims(), other.lse.dims())));
        }
        let mut out = vec![0f32; h * n * d];
        let mut lse = vec![0f32; h * n];
        with_f32(&self.out, "Partial::merge", |oa| {
            with_f32(&other.out, "Partial::merge", |ob| {
                with_f32(&self.lse, "Partial::merge", |la| {
                    with_f32(&other.lse, "Partial::merge", |lb| {
                        merge_rows(oa, la, ob, lb, d, &mut out, &mut lse);
                    })
                })
            })
        })????;
        Partial::from_vecs(out, lse, h, n, d)
    }

    /// Merges any number of partials of the same queries, in the order given.
    pub fn merge_all<'a>(parts: impl IntoIterator<Item = &'a Partial>) -> Result<Option<Partial>> {
        let mut acc: Option<Partial> = None;
        for p in parts {
            acc = Some(match acc {
                None => p.clone(),
                Some(a) => a.merge(p)?,
            });
        }
        Ok(acc)
    }
}

/// Row-wise merge of `(oa, la)` and `(ob, lb)` into `(out, lse)`, rows of width `d`.
pub(crate) fn merge_rows(oa: &[f32], la: &[f32], ob: &[f32], lb: &[f32], d: usize, out: &mut [f32], lse: &mut [f32]) {
    for (row, l) in lse.iter_mut().enumerate() {
        let (a, b) = (la[row], lb[row]);
        let m = a.max(b);
        let o = &mut out[row * d..(row + 1) * d];
        if m == f32::NEG_INFINITY {
            o.fill(0.0);
            *l = f32::NEG_INFINITY;
            continue;
        }
        let (wa, wb) = ((a - m).exp(), (b - m).exp());
        let total = wa + wb;
        let (wa, wb) = (wa / total, wb / total);
        let (ra, rb) = (&oa[row * d..(row + 1) * d], &ob[row * d..(row + 1) * d]);
        for ((o, &x), &y) in o.iter_mut().zip(ra).zip(rb) {
            *o = wa * x + wb * y;
        }
        *l = m + total.ln();
    }
}
