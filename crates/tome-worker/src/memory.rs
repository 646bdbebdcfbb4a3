//! How much activation memory a rank needs, so that a coordinator can plan within each
//! worker's budget and a worker can refuse what would not fit.

use tome_model::Shape;

/// Hidden-width rows live at once per token: the residual stream, its norm, query, key, value,
/// context and attention output, plus keys and values received from other ranks. Calibrated on
/// the book job (109,737 tokens, MiniLM, 2 ranks): peak RSS 1.61 GB, of which about 1.5 GB are
/// activations, against 1.69 GB estimated.
const ROWS_PER_TOKEN: u64 = 10;

/// Rows of the feed-forward's intermediate activations kept at once (it runs in blocks).
const FFN_BLOCK_ROWS: u64 = 2048;

/// Rows of logits a causal model's head holds at once (with their log-softmax).
const HEAD_ROWS: u64 = 1024;

/// Bytes of activations a rank of `tokens` tokens needs (f32).
pub fn activation_bytes(shape: &Shape, tokens: usize) -> u64 {
    let (h, i) = (shape.hidden_size as u64, shape.intermediate_size as u64);
    let head = if shape.causal { 2 * HEAD_ROWS * shape.vocab_size as u64 } else { 0 };
    4 * (ROWS_PER_TOKEN * tokens as u64 * h + 2 * FFN_BLOCK_ROWS * i + head)
}
