//! How much activation memory a rank needs at its peak, so that a coordinator can plan within each
//! worker's budget and a worker can refuse what would not fit; both compute it from the same
//! [`RankLoad`].
//!
//! The estimate covers what the rank allocates while it runs: the hidden states of its tokens, the
//! largest layer's temporaries (projections, attention partials, feed-forward blocks), what other
//! ranks send it (key/value blocks, halos, global tokens, memories), and after the layers the
//! pooling of its spans or the language-model head's blocks of logits. Model weights are not
//! activations: a worker loads them once for all its ranks, outside this budget. Layers run one
//! after the other, and the pooling and the head after the last, so the peak is the largest of
//! them. Each architecture's terms follow what its code keeps alive at once, counted in f32 rows
//! per token; the coefficients are held to the peaks that the `memory_estimate` test measures
//! (never below them, at most a fifth above on its cases). Those are peaks of live heap bytes:
//! what the allocator holds beyond them (freed pages kept for reuse, fragmentation) is left to
//! the budget's headroom.

use tome_model::{LayerAttention, Shape};

/// Bytes of an f32.
const F32: u64 = 4;

/// Rows BERT-family layers run their feed-forward on at once (tome-model's `FFN_ROWS`).
const FFN_ROWS: u64 = 2048;

/// Rows of logits a causal model's head holds at once (tome-model's `HEAD_ROWS`).
const HEAD_ROWS: u64 = 1024;

/// Query rows a window layer's key stream runs ahead (tome-model's `KEY_CHUNK_ROWS`).
const KEY_CHUNK_ROWS: u64 = 1024;

/// Rows per chunk of causal FAVOR+'s prefix sums (tome-model's `FAVOR_CHUNK`).
const FAVOR_CHUNK: u64 = 64;

/// Query rows per tile of attention with a relative position bias (Switch, MPNet): each tile's
/// scores against a whole key block exist at once, twice (the product and its copy).
const BIAS_ROWS: u64 = 128;

/// Bytes per token besides hidden-width rows: positions, validity flags, softmax statistics,
/// ids, outputs.
const TOKEN_BYTES: u64 = 128;

/// What one rank of a job runs, as far as its memory goes.
#[derive(Clone, Copy, Debug)]
pub struct RankLoad<'a> {
    /// The rank's tokens (its shard).
    pub tokens: usize,
    /// The document's tokens (a window wider than the document is the document).
    pub document: usize,
    /// The job's ranks: with more than one, other ranks' keys and values arrive.
    pub ranks: usize,
    /// The attention of each layer the rank runs.
    pub layers: &'a [LayerAttention],
    /// Tokens with global attention (window layers).
    pub global_tokens: usize,
    /// Tokens per segment (segment-recurrent models).
    pub segment_len: Option<usize>,
    /// Spans the rank pools (the document and chunks); 0 for none.
    pub spans: usize,
    /// The rank scores its tokens with the language-model head.
    pub log_probs: bool,
}

/// Bytes of activations a rank running `load` of a model of `shape` needs at its peak (f32).
pub fn activation_bytes(shape: &Shape, load: &RankLoad) -> u64 {
    let n = load.tokens as u64;
    let layers = load.layers.iter().map(|&attention| layer_floats(shape, load, attention)).max().unwrap_or(0);
    let (h, vocab) = (shape.hidden_size as u64, shape.vocab_size as u64);
    // The head: the last hidden states (and their final norm) and the scores, a block of
    // logits, its log-softmax and the shifted logits it is computed from, and the head's weight
    // as the product takes it.
    let head = if load.log_probs { n * (3 * h + 8) + 3 * n.min(HEAD_ROWS) * vocab + 2 * vocab * h } else { 0 };
    // Pooling: the last hidden states and their copy as plain rows, and each span's running
    // sums (in f64) and its sums, mean and the other ranks' part received.
    let pool = if load.spans > 0 { 2 * n * h + 6 * load.spans as u64 * h } else { 0 };
    F32 * layers.max(head).max(pool) + TOKEN_BYTES * n
}

/// Floats one layer of `attention` holds at its peak on the rank.
fn layer_floats(shape: &Shape, load: &RankLoad, attention: LayerAttention) -> u64 {
    let (n, h, i, heads) = (load.tokens as u64, shape.hidden_size as u64, shape.intermediate_size as u64, shape.num_heads as u64);
    // Keys and values that other ranks send arrive beside this rank's own.
    let received = u64::from(load.ranks > 1);
    let globals = load.global_tokens as u64;
    match shape.model_type.as_str() {
        "bert" | "roberta" | "xlm-roberta" | "camembert" | "longformer" | "big_bird" | "tome-performer" => {
            // After attention the layer runs a block of rows at a time beside the residual, the
            // queries and the whole context: the block's output projection, norm, intermediate
            // and output.
            let block = n.min(FFN_ROWS) * (4 * h + i);
            let attention = match attention {
                // The residual, queries, keys, values, the partial of a key block, the running
                // output and their merge (and a block received from the ring).
                LayerAttention::Dense | LayerAttention::Native(_) => (7 + received) * n * h,
                // Streamed: only the residual is whole; queries, keys and values exist for a
                // chunk of rows and the window around it, beside the block after attention.
                LayerAttention::Window { one_sided } if globals == 0 => {
                    let w = one_sided.min(load.document) as u64;
                    return n * h + n.min(FFN_ROWS) * (6 * h + i) + (KEY_CHUNK_ROWS.max(4 * w) + 2 * w) * 4 * h;
                }
                // Local and global projections of the whole shard, the context and the global
                // rows' partials (and the halo and global keys received).
                LayerAttention::Window { one_sided } => (10 + 2 * received) * n * h + globals * 4 * h + 2 * one_sided.min(load.document) as u64 * 2 * h,
                // The window, global and random blocks gathered beside the shard's own keys.
                LayerAttention::BlockSparse { .. } => (6 + 2 * received) * n * h,
                // Keys and values stay whole beside the queries and context while the blocks run,
                // each block with its queries' random features (and the state of the ranks
                // before, or the sums of all, received); causal prefix sums keep a chunk's
                // running states.
                LayerAttention::Favor { features, causal } => {
                    let m = features as u64;
                    let prefix = if causal { 2 * FAVOR_CHUNK * m * h } else { 0 };
                    return (5 + 2 * received) * n * h + n.min(FFN_ROWS) * (4 * h + i + heads * m) + prefix + n * h / 4;
                }
            };
            // A quarter row more for what the kernels keep beside the rows (masks, per-head
            // statistics, the last tile), which the test's measurements show.
            (attention + n * h / 4).max(3 * n * h + block + n * h / 4)
        }
        // The whole shard through the feed-forward at once: the residual, its norm, the
        // intermediate and its activation, the output; the ring's block beside the attention;
        // and two megabytes of fixed-size buffers that short shards show.
        "gpt2" => n * (9 * h / 2 + 2 * i + 2 * received * h + 16) + (1 << 19),
        // As GPT-2 (its global layers' ring block can arrive while the feed-forward holds the
        // peak).
        "gpt_neo" => n * (4 * h + 2 * i + 2 * received * h + 16),
        // The gate, its activation, the up projection and their product, all whole-shard (and
        // the ring's block beside the attention).
        "llama" => n * (3 * h + 4 * i + received * h),
        // Dense attention with relative bias (Switch's T5 bias, MPNet's) scores a tile of queries
        // against a whole key block (a shard's length), and keeps the tile's buffers beside it.
        "switch_transformers" | "mpnet" => n * (3 * h + 2 * i + 3 * received * h) + 2 * heads * BIAS_ROWS * n + 1024 * heads * BIAS_ROWS,
        // Reversible layers keep both halves (the shape's width is both); LSH sorts each hash
        // round's chunks with their scores; the feed-forward runs in chunks.
        "reformer" => n * (10 * h + 1280 * heads / F32) + 2 * n.min(FFN_ROWS) * h,
        // The whole shard through every step at once, the gate's two products included (and a
        // global layer's ring block, which can arrive while the feed-forward holds the peak).
        "modernbert" => n * (3 * h + 4 * i + 2 * received * h),
        // The shard's states, and one segment with its memory through a layer: projections and
        // scores against the segment and memory (and, with ranks before, their memories of
        // every layer received).
        "transfo-xl" | "tome-compressive" => {
            let segment = load.segment_len.unwrap_or(n as usize) as u64;
            let memory = shape.memory_len as u64;
            5 * n * h / 2 + 16 * segment * h + 4 * heads * segment * (segment + memory) + received * 2 * shape.num_layers as u64 * memory * h
        }
        // Any other architecture: every activation of the shard whole, feed-forward included.
        _ => n * (10 * h + 4 * i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> Shape {
        Shape {
            model_type: "bert".into(),
            hidden_size: 384,
            intermediate_size: 1536,
            num_heads: 12,
            memory_len: 0,
            num_layers: 6,
            vocab_size: 30522,
            max_positions: Some(512),
            layer_attention: vec!["dense".into(); 6],
            causal: false,
        }
    }

    fn load(layers: &[LayerAttention], ranks: usize) -> RankLoad<'_> {
        RankLoad { tokens: 10_000, document: 10_000 * ranks, ranks, layers, global_tokens: 0, segment_len: None, spans: 1, log_probs: false }
    }

    #[test]
    fn a_window_wider_than_the_document_costs_the_document_wide_window() {
        // The coordinator plans with the layers as prepared; a worker reads them clamped to the
        // document: both must agree.
        let wide = [LayerAttention::Window { one_sided: 1 << 30 }; 6];
        let clamped = [LayerAttention::Window { one_sided: 20_000 }; 6];
        assert_eq!(activation_bytes(&minilm(), &load(&wide, 2)), activation_bytes(&minilm(), &load(&clamped, 2)));
    }

    #[test]
    fn what_other_ranks_send_is_counted_and_streamed_windows_cost_less_than_dense() {
        let dense = [LayerAttention::Dense; 6];
        let window = [LayerAttention::Window { one_sided: 256 }; 6];
        let shape = minilm();
        assert!(activation_bytes(&shape, &load(&dense, 2)) > activation_bytes(&shape, &load(&dense, 1)));
        assert!(activation_bytes(&shape, &load(&window, 2)) < activation_bytes(&shape, &load(&dense, 2)));
    }
}
