//! MPNet (Song et al. 2020, "MPNet: Masked and Permuted Pre-training for Language
//! Understanding"; Hugging Face `MPNetModel`, the encoder of sentence-transformers'
//! all-mpnet-base-v2): a BERT-like post-LN encoder whose attention adds a learned relative
//! position bias, T5-style buckets of `key - query`, computed once and added in every layer.
//! Every layer is dense bidirectional attention; on several ranks it is ring attention with the
//! bias, which follows from the global positions each key block carries, so any number of ranks
//! and either layout gives the one-rank result.
//!
//! Mirrors `modeling_mpnet.py` (transformers 5.24): embeddings `LayerNorm(word + position)` with
//! no token types and RoBERTa-style positions from a padding index hard-coded to 1 (not
//! `pad_token_id`); scores `q·k / sqrt(head_dim) + bias[bucket(j - i), h]`, the bucket being
//! `MPNetEncoder.relative_position_bucket` with its defaults (32 buckets, max distance 128, never
//! read from the config) on positions `0..n` — exactly T5's bidirectional bucket, which
//! [`tome_attn::relative_bias::RelativeBias::bucket`] computes in the same f32 arithmetic; then
//! `LayerNorm(o(ctx) + x)` and `LayerNorm(W2 act(W1 h) + h)`. The `pooler` is not run (it is
//! not part of the hidden states); sentence-transformers pools the hidden states itself.

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::relative_bias::RelativeBias;
use tome_attn::Precision;
use tome_dist::ops::{ring_attention_with_bias, KeyBlock};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention, PositionExtension};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::heads::project_heads;
use crate::linear::{attention_input, linear, Linear};
use crate::model::{check_vocab, fixed_attention, plain_run, Architecture, Shape};

/// The padding index `MPNetEmbeddings` uses, whatever `pad_token_id` says.
const PADDING_IDX: usize = 1;
/// Buckets and maximum distance of `MPNetEncoder.compute_position_bias` (its defaults; the
/// config does not reach them).
const NUM_BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;

/// `config.json` of `MPNetModel` / `MPNetForMaskedLM`.
#[derive(Clone, Debug, Deserialize)]
pub struct MpnetConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_act() -> Activation {
    Activation::GeluErf
}
fn default_eps() -> f64 {
    1e-12
}
fn default_buckets() -> usize {
    NUM_BUCKETS
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl MpnetConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Positions a document can use without extension (they start at the padding index + 1).
    pub fn usable_positions(&self) -> usize {
        self.max_position_embeddings.saturating_sub(PADDING_IDX + 1)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(config_err("num_attention_heads", format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size)));
        }
        if self.relative_attention_num_buckets != NUM_BUCKETS {
            // transformers sizes the table from the config but always buckets into 32: another
            // size either fails there (fewer rows) or leaves rows unused.
            return Err(config_err(
                "relative_attention_num_buckets",
                format!("{}: MPNet always buckets relative positions into {NUM_BUCKETS} (transformers' compute_position_bias)", self.relative_attention_num_buckets),
            ));
        }
        if self.usable_positions() == 0 {
            return Err(config_err("max_position_embeddings", "leaves no usable position"));
        }
        Ok(())
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct MpnetModel {
    cfg: MpnetConfig,
    act: Activation,
    word: Embedding,
    position: Embedding,
    embed_norm: LayerNorm,
    bias: RelativeBias,
    layers: Vec<Layer>,
}

impl MpnetModel {
    /// Loads `MPNetModel` weights, or a model class's under the `mpnet.` prefix.
    pub fn load(vb: VarBuilder, cfg: &MpnetConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("mpnet.embeddings.word_embeddings.weight") { vb.pp("mpnet") } else { vb };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let e = vb.pp("embeddings");
        let name = |vb: &VarBuilder, s: &str| if vb.prefix().is_empty() { s.to_string() } else { format!("{}.{s}", vb.prefix()) };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention.attn");
                Ok(Layer {
                    q: weights(linear(h, h, a.pp("q")), name(&a, "q"))?,
                    k: weights(linear(h, h, a.pp("k")), name(&a, "k"))?,
                    v: weights(linear(h, h, a.pp("v")), name(&a, "v"))?,
                    o: weights(linear(h, h, a.pp("o")), name(&a, "o"))?,
                    attn_norm: weights(layer_norm(h, eps, l.pp("attention.LayerNorm")), name(&l, "attention.LayerNorm"))?,
                    intermediate: weights(linear(h, cfg.intermediate_size, l.pp("intermediate.dense")), name(&l, "intermediate.dense"))?,
                    output: weights(linear(cfg.intermediate_size, h, l.pp("output.dense")), name(&l, "output.dense"))?,
                    out_norm: weights(layer_norm(h, eps, l.pp("output.LayerNorm")), name(&l, "output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let enc = vb.pp("encoder");
        let table = weights(enc.get((NUM_BUCKETS, cfg.num_attention_heads), "relative_attention_bias.weight"), name(&enc, "relative_attention_bias.weight"))?;
        let bias = RelativeBias { table: table.to_vec2::<f32>()?, num_buckets: NUM_BUCKETS, max_distance: MAX_DISTANCE, bidirectional: true };
        Ok(MpnetModel {
            act: cfg.hidden_act,
            word: weights(embedding(cfg.vocab_size, h, e.pp("word_embeddings")), name(&e, "word_embeddings"))?,
            position: weights(embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings")), name(&e, "position_embeddings"))?,
            embed_norm: weights(layer_norm(h, eps, e.pp("LayerNorm")), name(&e, "LayerNorm"))?,
            bias,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &MpnetConfig {
        &self.cfg
    }

    /// The bucket of `key - query` this model's bias uses (T5's bidirectional bucket).
    pub fn bucket(&self, relative: i64) -> usize {
        self.bias.bucket(relative)
    }

    fn layer_forward(&self, layer: &Layer, group: &dyn Group, x: &Tensor, positions: &[i64], p: Precision) -> Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let heads = self.cfg.num_attention_heads;
        let [q, k, v] = project_heads(x, [layer.q.at(p)?, layer.k.at(p)?, layer.v.at(p)?], heads)?;
        // MPNet scales the scores before adding the bias; the relative-bias ring adds the bias
        // to unscaled dot products, so the queries carry the scale: (q/√d)·k = q·k/√d.
        let q = attention_input((q * (1.0 / (self.cfg.head_dim() as f64).sqrt()))?, p)?;
        let own = KeyBlock { k, v, pos: positions.to_vec(), valid: vec![true; n] };
        let ctx = ring_attention_with_bias(group, &q, positions, own, &self.bias)?;
        let ctx = ctx.transpose(0, 1)?.reshape((n, hidden))?;
        let h = layer.attn_norm.forward(&(layer.o.forward_at(&ctx, p)? + x)?)?;
        let inner = self.act.apply(&layer.intermediate.forward_at(&h, p)?)?;
        Ok(layer.out_norm.forward(&(layer.output.forward_at(&inner, p)? + h)?)?)
    }
}

impl Architecture for MpnetModel {
    /// f32, and bf16: products in bf16 with f32 accumulation, attention on bf16 queries, keys
    /// and values; embeddings, norms and residual sums in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = &self.cfg;
        Shape {
            model_type: "mpnet".into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_attention_heads,
            memory_len: 0,
            num_layers: c.num_hidden_layers,
            vocab_size: c.vocab_size,
            max_positions: Some(c.usable_positions()),
            layer_attention: vec!["dense + relative-bias".into(); c.num_hidden_layers],
            causal: false,
        }
    }

    /// Positions as transformers derives them: tokens other than the padding id 1 count from 2,
    /// padding tokens take position 1. Past the learned positions, as the BERT family: refused,
    /// or tiled when asked.
    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(&ids, self.cfg.vocab_size)?;
        fixed_attention(opts)?;
        let usable = self.cfg.usable_positions();
        let mut position_ids = Vec::with_capacity(ids.len());
        let mut counted = 0usize;
        for &id in &ids {
            if id as usize == PADDING_IDX {
                position_ids.push(PADDING_IDX as u32);
                continue;
            }
            let p = match opts.position_extension {
                PositionExtension::Tile => counted % usable,
                PositionExtension::Refuse if counted < usable => counted,
                PositionExtension::Refuse => {
                    return Err(ModelError::Input(format!(
                        "the document has {} tokens but MPNet has learned {usable} positions; {}",
                        ids.len(),
                        crate::config::ASK_FOR_TILED_POSITIONS
                    )))
                }
            };
            counted += 1;
            position_ids.push((p + PADDING_IDX + 1) as u32);
        }
        Ok(Prepared { ids, position_ids, layers: vec![LayerAttention::Dense; self.cfg.num_hidden_layers], global_tokens: Vec::new(), run: plain_run(opts) })
    }

    /// This rank's rows of the hidden states `input.run` asks for, from its own tokens: the
    /// bias of each score follows from the global positions the ring carries with the keys.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let positions = plan.positions(group.rank());
        let n = positions.len();
        if input.ids.len() != n || input.position_ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids and {} positions", group.rank(), input.ids.len(), input.position_ids.len())));
        }
        if input.layers.len() != self.layers.len() || input.layers.iter().any(|l| *l != LayerAttention::Dense) || !input.global_tokens.is_empty() {
            return Err(ModelError::Input("MPNet runs dense attention with its relative bias in every layer, without global tokens".into()));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        if let Some(&bad) = input.position_ids.iter().find(|&&p| p as usize >= self.cfg.max_position_embeddings) {
            return Err(ModelError::Input(format!("position id {bad} is beyond the {} learned positions", self.cfg.max_position_embeddings)));
        }
        let dev = Device::Cpu;
        let words = self.word.forward(&Tensor::from_slice(&input.ids, n, &dev)?)?;
        let pos = self.position.forward(&Tensor::from_slice(&input.position_ids, n, &dev)?)?;
        let mut x = self.embed_norm.forward(&(words + pos)?)?;
        for (l, layer) in self.layers.iter().enumerate().take(input.run.layers_to_run(self.layers.len())?) {
            x = self.layer_forward(layer, group, &x, &positions, input.run.precision)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        Ok(x)
    }
}
