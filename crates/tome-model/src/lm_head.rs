//! The language-model head of causal models: per-token log-probabilities of the next token,
//! computed a block of rows at a time so that a book never holds `tokens x vocab` logits.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};

/// Rows of logits computed at once (`[HEAD_ROWS, vocab]` and their log-softmax).
pub const HEAD_ROWS: usize = 1024;

/// log p(`next_ids[i]` | row i) for the first `next_ids.len()` rows of `hidden` (`[rows, d]`),
/// with the head `weight` (`[vocab, d]`, e.g. tied embeddings): `[next_ids.len()]`.
pub fn log_probs(hidden: &Tensor, weight: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    let vocab = weight.dim(0)?;
    if next_ids.len() > rows {
        return Err(ModelError::Input(format!("{} next tokens for {rows} rows", next_ids.len())));
    }
    crate::model::check_vocab(next_ids, vocab)?;
    let head = weight.t()?;
    let mut parts = Vec::new();
    for start in (0..next_ids.len()).step_by(HEAD_ROWS) {
        let len = HEAD_ROWS.min(next_ids.len() - start);
        let logits = hidden.narrow(0, start, len)?.matmul(&head)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ids = Tensor::from_slice(&next_ids[start..start + len], (len, 1), &Device::Cpu)?;
        parts.push(logp.gather(&ids, 1)?.squeeze(1)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
