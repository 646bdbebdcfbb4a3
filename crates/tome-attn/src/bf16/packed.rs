//! Weights packed once into bf16 panels: the layout the product kernels stream.

use candle_core::Tensor;

use super::convert::pair;
use crate::error::{shape_err, Result};
use crate::tensor::with_f32;

/// Output columns per panel: one 512-bit register of f32 accumulators, one AMX tile's columns.
pub const PANEL: usize = 16;

/// Input pairs a panel's stride is a multiple of: one AMX tile's rows of pairs.
pub(crate) const PAIR_STEP: usize = 16;

/// A `[out, in]` weight (Hugging Face's layout) in bf16, packed as panels of [`PANEL`] output
/// columns: for each panel, for each pair of inputs `(2q, 2q + 1)`, the panel's 16 columns'
/// two values in one 32-bit lane each (the layout AMX reads a tile of pairs in). Panels lie
/// [`pair_stride`](Self::pair_stride) pairs apart, the pairs past the input zero; a panel past
/// `out`, and the input past an odd `in`, are zero.
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    out: usize,
    inp: usize,
    data: Vec<u32>,
}

impl PackedBf16 {
    /// Packs a `[out, in]` f32 tensor (each value rounded to the nearest bf16).
    pub fn from_tensor(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2().map_err(|_| shape_err("PackedBf16", format!("a weight must be [out, in], got {:?}", weight.dims())))?;
        with_f32(weight, "PackedBf16", |w| Self::from_rows(w, out, inp))
    }

    /// Packs `w`, `[out, in]` row-major.
    pub(crate) fn from_rows(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "a [{out}, {inp}] weight");
        let (pairs, stride) = (inp.div_ceil(2), Self::stride_for(inp));
        let mut data = vec![0u32; out.div_ceil(PANEL) * stride * PANEL];
        if pairs == 0 {
            return PackedBf16 { out, inp, data };
        }
        let at = |o: usize, i: usize| if i < inp { w[o * inp + i] } else { 0.0 };
        for (p, panel) in data.chunks_exact_mut(stride * PANEL).enumerate() {
            for (q, lanes) in panel.chunks_exact_mut(PANEL).take(pairs).enumerate() {
                for (c, lane) in lanes.iter_mut().enumerate() {
                    let o = p * PANEL + c;
                    if o < out {
                        *lane = pair(at(o, 2 * q), at(o, 2 * q + 1));
                    }
                }
            }
        }
        PackedBf16 { out, inp, data }
    }

    /// Output features (the weight's rows).
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features (the weight's columns).
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Input pairs per panel column.
    pub(crate) fn pairs(&self) -> usize {
        self.inp.div_ceil(2)
    }

    /// Pairs from one panel to the next: [`pairs`](Self::pairs) rounded up to whole
    /// [`PAIR_STEP`]s, the rest zero.
    pub(crate) fn pair_stride(&self) -> usize {
        Self::stride_for(self.inp)
    }

    fn stride_for(inp: usize) -> usize {
        inp.div_ceil(2).next_multiple_of(PAIR_STEP)
    }

    /// Panels of 16 output columns (the last padded with zero columns).
    pub(crate) fn panels(&self) -> usize {
        self.out.div_ceil(PANEL)
    }

    /// Panel `p` onwards.
    pub(crate) fn panel(&self, p: usize) -> &[u32] {
        &self.data[p * self.pair_stride() * PANEL..]
    }
}
