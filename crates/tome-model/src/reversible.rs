//! Reversible residual layers (Gomez et al. 2017, "The Reversible Residual Network"; Kitaev et
//! al. 2020, "Reformer"): two streams, `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`, so a layer's inputs
//! can be recomputed from its outputs (`x2 = y2 - g(y1)`, `x1 = y1 - f(x2)`) instead of stored.
//! In Reformer `f` is attention (the sequence-parallel part: an operator over a Group) and `g`
//! the feed-forward block; the streams start as two copies of the embeddings and end
//! concatenated.

use candle_core::Tensor;

use crate::error::Result;

/// One reversible layer forward.
pub fn forward(x1: &Tensor, x2: &Tensor, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>, g: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    let y1 = (x1 + f(x2)?)?;
    let y2 = (x2 + g(&y1)?)?;
    Ok((y1, y2))
}

/// The layer's inputs recomputed from its outputs.
pub fn inverse(y1: &Tensor, y2: &Tensor, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>, g: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    let x2 = (y2 - g(y1)?)?;
    let x1 = (y1 - f(&x2)?)?;
    Ok((x1, x2))
}
