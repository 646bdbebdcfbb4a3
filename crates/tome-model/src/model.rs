//! The architectures a model directory can hold, behind the one interface the services use:
//! prepare a document, run a rank's shard, and — for causal language models — score each
//! token given the ones before it.

use candle_core::Tensor;
use tome_dist::{Group, ShardPlan};

use crate::bert::BertModel;
use crate::config::{EncodeOptions, LayerAttention};
use crate::document::{Prepared, RunOptions, ShardInput};
use crate::error::{ModelError, Result};
use crate::gpt2::Gpt2Model;
use crate::llama::LlamaModel;
use crate::reformer::ReformerModel;
use crate::switch::SwitchModel;
use crate::transfo_xl::TransfoXlModel;

pub enum Model {
    /// BERT-family encoders (BERT, RoBERTa): embeddings.
    Bert(BertModel),
    /// GPT-2: a causal language model (log-probabilities, perplexity).
    Gpt2(Gpt2Model),
    /// Llama family: a causal language model with rotary positions and grouped-query attention.
    Llama(LlamaModel),
    /// Switch Transformers encoder: T5 attention with relative bias, sparse experts.
    Switch(SwitchModel),
    /// Transformer-XL, or tome's Compressive Transformer: segments with recurrent memories.
    TransfoXl(TransfoXlModel),
    /// Reformer: reversible LSH and local layers; hidden states twice the model width.
    Reformer(ReformerModel),
}

/// What a model is, in the numbers the services plan and describe with.
#[derive(Clone, Debug)]
pub struct Shape {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Longest document without a position extension; `None` when positions are relative
    /// (any length runs).
    pub max_positions: Option<usize>,
    /// Each layer's attention, as the config says.
    pub layer_attention: Vec<String>,
    /// A causal language model: it scores tokens (log-probabilities, perplexity).
    pub causal: bool,
}

impl Model {
    pub fn shape(&self) -> Shape {
        match self {
            Model::Bert(m) => {
                let c = m.config();
                Shape {
                    model_type: c.model_type.clone(),
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_layers: c.num_hidden_layers,
                    vocab_size: c.vocab_size,
                    max_positions: Some(c.usable_positions()),
                    layer_attention: c.layer_attention().map(|l| l.iter().map(|a| a.to_string()).collect()).unwrap_or_default(),
                    causal: false,
                }
            }
            Model::Gpt2(m) => {
                let c = m.config();
                Shape {
                    model_type: "gpt2".into(),
                    hidden_size: c.n_embd,
                    intermediate_size: c.n_inner.unwrap_or(4 * c.n_embd),
                    num_layers: c.n_layer,
                    vocab_size: c.vocab_size,
                    max_positions: Some(c.n_positions),
                    layer_attention: vec!["dense (causal)".into(); c.n_layer],
                    causal: true,
                }
            }
            Model::Llama(m) => {
                let c = m.config();
                Shape {
                    model_type: "llama".into(),
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_layers: c.num_hidden_layers,
                    vocab_size: c.vocab_size,
                    // Rotary positions are computed: any length runs as transformers runs it.
                    max_positions: Some(c.max_position_embeddings),
                    layer_attention: vec!["dense (causal)".into(); c.num_hidden_layers],
                    causal: true,
                }
            }
            Model::Switch(m) => {
                let c = m.config();
                let sparse = m.sparse_layers();
                Shape {
                    model_type: "switch_transformers".into(),
                    hidden_size: c.d_model,
                    intermediate_size: c.d_ff,
                    num_layers: c.num_layers,
                    vocab_size: c.vocab_size,
                    max_positions: None,
                    layer_attention: (0..c.num_layers)
                        .map(|l| if sparse.contains(&l) { format!("relative-bias + {} experts", c.num_experts) } else { "relative-bias".into() })
                        .collect(),
                    causal: false,
                }
            }
            Model::TransfoXl(m) => {
                let c = m.config();
                let kind = if c.is_compressive() { "compressive" } else { "relative" };
                Shape {
                    model_type: c.model_type.clone(),
                    hidden_size: c.d_model,
                    intermediate_size: c.d_inner,
                    num_layers: c.n_layer,
                    vocab_size: c.vocab_size,
                    max_positions: None,
                    layer_attention: vec![format!("{kind} (memory {})", c.mem_len); c.n_layer],
                    causal: false,
                }
            }
            Model::Reformer(m) => {
                let c = m.config();
                Shape {
                    model_type: "reformer".into(),
                    // The output: both reversible streams.
                    hidden_size: 2 * c.hidden_size,
                    intermediate_size: c.feed_forward_size,
                    num_layers: c.attn_layers.len(),
                    vocab_size: c.vocab_size,
                    max_positions: Some(c.max_positions()),
                    layer_attention: m.layer_names().into_iter().map(String::from).collect(),
                    causal: false,
                }
            }
        }
    }

    /// The shortest document the model runs: Reformer's LSH layers need more than one chunk.
    pub fn min_tokens(&self) -> usize {
        match self {
            Model::Reformer(m) => m.min_tokens(),
            _ => 1,
        }
    }

    pub fn is_causal(&self) -> bool {
        matches!(self, Model::Gpt2(_) | Model::Llama(_))
    }

    /// Checks that a model whose attention its architecture fixes gets no attention options.
    fn fixed_attention(opts: &EncodeOptions) -> Result<()> {
        if opts.attention.is_some() {
            return Err(ModelError::Unsupported("this architecture defines its own attention; an override would change its outputs".into()));
        }
        if !opts.global_tokens.is_empty() {
            return Err(ModelError::Input("global tokens need window attention; this architecture defines its own".into()));
        }
        Ok(())
    }

    /// Checks a causal model's document and options: dense attention only, no global tokens.
    fn causal_only(&self, opts: &EncodeOptions) -> Result<()> {
        if matches!(opts.attention, Some(LayerAttention::Window { .. })) {
            return Err(ModelError::Unsupported("this causal model runs dense causal attention in every layer; a window would change its outputs".into()));
        }
        if !opts.global_tokens.is_empty() {
            return Err(ModelError::Input("global tokens need window attention; this causal model attends densely".into()));
        }
        Ok(())
    }

    /// Checks a whole document against the model and options and derives per-token positions.
    pub fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        let doc = match self {
            Model::Bert(m) => m.prepare(ids, opts)?,
            Model::Gpt2(m) => {
                m.check(&ids)?;
                self.causal_only(opts)?;
                Prepared::plain(ids, vec![LayerAttention::Dense; m.config().n_layer], plain_run(opts))
            }
            Model::Llama(m) => {
                m.check(&ids)?;
                self.causal_only(opts)?;
                Prepared::plain(ids, vec![LayerAttention::Dense; m.config().num_hidden_layers], plain_run(opts))
            }
            Model::Switch(m) => {
                m.check(&ids)?;
                Self::fixed_attention(opts)?;
                Prepared::plain(ids, vec![LayerAttention::Native("relative-bias"); m.config().num_layers], plain_run(opts))
            }
            Model::TransfoXl(m) => {
                m.check(&ids)?;
                Self::fixed_attention(opts)?;
                let c = m.config();
                let segment = opts.segment_len.unwrap_or_else(|| c.default_segment_len());
                if segment == 0 {
                    return Err(ModelError::Input("the segment length must be positive".into()));
                }
                let kind = if c.is_compressive() { "compressive" } else { "relative" };
                Prepared::plain(ids, vec![LayerAttention::Native(kind); c.n_layer], RunOptions { output_layer: opts.output_layer, segment_len: Some(segment) })
            }
            Model::Reformer(m) => {
                m.check(&ids)?;
                Self::fixed_attention(opts)?;
                Prepared::plain(ids, m.layer_names().into_iter().map(LayerAttention::Native).collect(), plain_run(opts))
            }
        };
        if opts.segment_len.is_some() && doc.run.segment_len.is_none() {
            return Err(ModelError::Input("a segment length applies to segment-recurrent models (Transformer-XL, Compressive) only".into()));
        }
        doc.run.layers_to_run(self.shape().num_layers)?;
        Ok(doc)
    }

    /// Runs a rank's shard; returns its rows of the last hidden state. `after_layer(l)` is
    /// called when layer `l` is done; returning false cancels.
    pub fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        match self {
            Model::Bert(m) => m.forward(group, plan, input, after_layer),
            Model::Gpt2(m) => m.forward(group, plan, input, after_layer),
            Model::Llama(m) => m.forward(group, plan, input, after_layer),
            Model::Switch(m) => m.forward(group, plan, input, after_layer),
            Model::TransfoXl(m) => m.forward(group, plan, input, after_layer),
            Model::Reformer(m) => m.forward(group, plan, input, after_layer),
        }
    }

    /// As [`Model::forward`] for rank `group.rank()` of a prepared document.
    pub fn forward_shard(&self, group: &dyn Group, plan: &ShardPlan, doc: &Prepared, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        self.forward(group, plan, &doc.shard(plan, group.rank()), after_layer)
    }

    /// log p(next token | tokens so far) for the first `next_ids.len()` rows of `hidden`.
    pub fn log_probs(&self, hidden: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
        match self {
            Model::Gpt2(m) => m.log_probs(hidden, next_ids),
            Model::Llama(m) => m.log_probs(hidden, next_ids),
            Model::Bert(_) | Model::Switch(_) | Model::TransfoXl(_) | Model::Reformer(_) => {
                Err(ModelError::Unsupported("log-probabilities need a causal language model; this is an encoder".into()))
            }
        }
    }
}

/// The run options of a model without segments.
fn plain_run(opts: &EncodeOptions) -> RunOptions {
    RunOptions { output_layer: opts.output_layer, segment_len: None }
}

/// Refuses token ids outside a vocabulary of `vocab`, naming the first.
pub(crate) fn check_vocab(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        Some((i, id)) => Err(ModelError::Input(format!("token {i} has id {id}, beyond the vocabulary of {vocab}"))),
        None => Ok(()),
    }
}
