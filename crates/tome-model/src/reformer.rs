//! Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer"; Hugging Face
//! `ReformerModel`): reversible layers alternating LSH and chunked local attention, axial
//! position embeddings, and a hidden state twice the model width (the two reversible streams,
//! concatenated and normed).
//!
//! Mirrors `modeling_reformer.py` (transformers 5.24, eval mode, encoder only):
//! - embeddings: word embeddings plus axial positions (`weights.0` `[ax0, 1, d0]` and
//!   `weights.1` `[1, ax1, d1]`, position `p` reading row `p / ax1` of the first and `p % ax1` of
//!   the second, concatenated) or learned ones; at most `max_position_embeddings` tokens;
//! - layer: `y1 = x1 + Attn(LN(x2))`, `y2 = x2 + FF(LN(y1))` with streams starting as two copies
//!   of the embeddings; the output `LN(cat(y1, y2))` over `2 × hidden`;
//! - LSH layers: one shared `query_key` projection and `value`, hashed with the checkpoint's
//!   rotations (`...self_attention.random_rotations`, `[heads, head_dim, hashes, buckets / 2]`)
//!   or, absent, tome's seeded ones; local layers: separate projections, keys over sqrt(d), each
//!   chunk seeing `local_num_chunks_before/after` chunks, wrapping around;
//! - a document longer than the smallest chunk and not a multiple of the chunks' least common
//!   multiple is padded with `pad_token_id` tokens that attend but are never attended to (their
//!   own LSH bucket; positions continue), and the padding is dropped from the output. The pad
//!   rows live on the rank holding the document's end.
//!
//! Refused: decoders (`is_decoder`: causal LSH), factorised bucket lists, unset `num_buckets`,
//! and documents no longer than an LSH chunk (transformers switches those to full attention).

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::blocksparse::BlockSparsePlan;
use tome_attn::lsh::{seeded_rotations, LshSpec};
use tome_attn::Precision;
use tome_dist::ops::{blocksparse_attention, lsh_attention, ring_attention, DenseSpec, KeyBlock};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention, NativeAttention};
use crate::document::{padded_plan, Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, linear, linear_no_bias, Linear};
use crate::model::check_vocab;
use crate::model::{fixed_attention, plain_run, Architecture, Shape};
use crate::reversible;

/// Seed of tome's rotations for checkpoints without their own (per layer: seed + layer).
pub const ROTATION_SEED: u64 = 0x7e_f0_2e;

/// `config.json` of `ReformerModel` (fields and defaults of `ReformerConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ReformerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub attention_head_size: usize,
    pub feed_forward_size: usize,
    pub attn_layers: Vec<Kind>,
    #[serde(default = "d_true")]
    pub axial_pos_embds: bool,
    #[serde(default)]
    pub axial_pos_shape: Vec<usize>,
    #[serde(default)]
    pub axial_pos_embds_dim: Vec<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "d_hashes")]
    pub num_hashes: usize,
    #[serde(default)]
    pub num_buckets: Option<serde_json::Value>,
    #[serde(default = "d_chunk")]
    pub lsh_attn_chunk_length: usize,
    #[serde(default = "d_chunk")]
    pub local_attn_chunk_length: usize,
    #[serde(default = "d_one")]
    pub lsh_num_chunks_before: usize,
    #[serde(default)]
    pub lsh_num_chunks_after: usize,
    #[serde(default = "d_one")]
    pub local_num_chunks_before: usize,
    #[serde(default)]
    pub local_num_chunks_after: usize,
    #[serde(default)]
    pub is_decoder: bool,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn d_true() -> bool {
    true
}
fn d_hashes() -> usize {
    1
}
fn d_chunk() -> usize {
    64
}
fn d_one() -> usize {
    1
}
fn d_act() -> Activation {
    Activation::Relu
}
fn d_eps() -> f64 {
    1e-12
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

/// A Reformer layer's attention (`attn_layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Lsh,
    Local,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl ReformerConfig {
    fn kinds(&self) -> Result<Vec<Kind>> {
        Ok(self.attn_layers.clone())
    }

    fn num_buckets(&self) -> Result<usize> {
        match &self.num_buckets {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| n as usize).filter(|n| *n >= 2 && n % 2 == 0).ok_or_else(|| config_err("num_buckets", format!("{n} must be an even integer of at least 2")))
            }
            Some(serde_json::Value::Array(_)) => Err(config_err("num_buckets", "factorised bucket lists are not supported; give one even integer")),
            _ => Err(config_err("num_buckets", "must be set (transformers would choose one from the first sequence and write it into the config)")),
        }
    }

    pub fn lsh_spec(&self) -> Result<LshSpec> {
        Ok(LshSpec {
            n_hashes: self.num_hashes,
            n_buckets: self.num_buckets()?,
            chunk_len: self.lsh_attn_chunk_length,
            chunks_before: self.lsh_num_chunks_before,
            chunks_after: self.lsh_num_chunks_after,
        })
    }

    /// The chunk lengths of the layer kinds present: (smallest, least common multiple).
    fn chunk_lengths(&self) -> Result<(usize, usize)> {
        let kinds = self.kinds()?;
        let mut lens = Vec::new();
        if kinds.contains(&Kind::Lsh) {
            lens.push(self.lsh_attn_chunk_length);
        }
        if kinds.contains(&Kind::Local) {
            lens.push(self.local_attn_chunk_length);
        }
        let min = lens.iter().copied().min().unwrap_or(1);
        let lcm = lens.iter().fold(1, |acc, &l| acc / gcd(acc, l) * l);
        Ok((min, lcm))
    }

    /// Tokens of padding a document of `n` tokens gets (transformers'
    /// `_pad_to_mult_of_chunk_length`).
    pub fn padding(&self, n: usize) -> Result<usize> {
        let (min, lcm) = self.chunk_lengths()?;
        Ok(if !n.is_multiple_of(lcm) && n > min { lcm - n % lcm } else { 0 })
    }

    fn activation(&self) -> Result<Activation> {
        Ok(self.hidden_act)
    }

    fn validate(&self) -> Result<()> {
        if self.is_decoder {
            return Err(config_err("is_decoder", "true (a causal Reformer language model) is not supported: tome runs the bidirectional encoder"));
        }
        let kinds = self.kinds()?;
        if kinds.contains(&Kind::Lsh) {
            let spec = self.lsh_spec()?;
            if spec.n_hashes == 0 || spec.chunk_len == 0 {
                return Err(config_err("num_hashes", "hashes and the LSH chunk length must be positive"));
            }
        }
        if self.local_attn_chunk_length == 0 {
            return Err(config_err("local_attn_chunk_length", "must be positive"));
        }
        if self.axial_pos_embds {
            if self.axial_pos_shape.len() != 2 || self.axial_pos_embds_dim.len() != 2 {
                return Err(config_err("axial_pos_shape", "axial positions need two axes and two widths"));
            }
            if self.axial_pos_embds_dim.iter().sum::<usize>() != self.hidden_size {
                return Err(config_err("axial_pos_embds_dim", format!("{:?} must sum to hidden_size {}", self.axial_pos_embds_dim, self.hidden_size)));
            }
        }
        if self.pad_token_id.is_some_and(|p| p as usize >= self.vocab_size) {
            return Err(config_err("pad_token_id", "is outside the vocabulary"));
        }
        self.activation().map(drop)
    }

    /// Positions the model can embed in eval mode.
    pub fn max_positions(&self) -> usize {
        let axial = if self.axial_pos_embds { self.axial_pos_shape.iter().product() } else { usize::MAX };
        self.max_position_embeddings.min(axial)
    }
}

enum Positions {
    /// `[ax0, d0]` and `[ax1, d1]`.
    Axial {
        rows: Tensor,
        cols: Tensor,
        ax1: usize,
    },
    Learned(Embedding),
}

enum Attention {
    Lsh { query_key: Linear, value: Linear, rotations: Tensor },
    Local { query: Linear, key: Linear, value: Linear },
}

struct Layer {
    attn_norm: LayerNorm,
    attention: Attention,
    attn_out: Linear,
    ff_norm: LayerNorm,
    ff_dense: Linear,
    ff_out: Linear,
}

pub struct ReformerModel {
    cfg: ReformerConfig,
    act: Activation,
    words: Embedding,
    positions: Positions,
    layers: Vec<Layer>,
    out_norm: LayerNorm,
}

impl ReformerModel {
    /// Loads `ReformerModel` weights (or a head model's, under `reformer.`).
    pub fn load(vb: VarBuilder, cfg: &ReformerConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("reformer.embeddings.word_embeddings.weight") { vb.pp("reformer") } else { vb };
        let full = |v: &VarBuilder, s: &str| if v.prefix().is_empty() { s.to_string() } else { format!("{}.{s}", v.prefix()) };
        let (d, heads, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_size);
        let all = heads * hd;
        let eps = cfg.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let positions = if cfg.axial_pos_embds {
            let (ax0, ax1) = (cfg.axial_pos_shape[0], cfg.axial_pos_shape[1]);
            let (d0, d1) = (cfg.axial_pos_embds_dim[0], cfg.axial_pos_embds_dim[1]);
            let p = emb.pp("position_embeddings");
            let rows = weights(p.get((ax0, 1, d0), "weights.0"), full(&p, "weights.0"))?.reshape((ax0, d0))?;
            let cols = weights(p.get((1, ax1, d1), "weights.1"), full(&p, "weights.1"))?.reshape((ax1, d1))?;
            Positions::Axial { rows, cols, ax1 }
        } else {
            let p = emb.pp("position_embeddings.embedding");
            Positions::Learned(weights(embedding(cfg.max_position_embeddings, d, p.clone()), full(&p, "weight"))?)
        };
        let kinds = cfg.kinds()?;
        let spec = kinds.contains(&Kind::Lsh).then(|| cfg.lsh_spec()).transpose()?;
        let layers = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let l = vb.pp(format!("encoder.layers.{i}"));
                let n = |s: &str| full(&l, s);
                let sa = l.pp("attention.self_attention");
                let attention = match (kind, spec) {
                    (Kind::Lsh, Some(spec)) => {
                        let shape = (heads, hd, spec.n_hashes, spec.n_buckets / 2);
                        let rotations = match sa.contains_tensor("random_rotations") {
                            true => weights(sa.get(shape, "random_rotations"), n("attention.self_attention.random_rotations"))?,
                            false => seeded_rotations(heads, hd, &spec, ROTATION_SEED + i as u64)?,
                        };
                        Attention::Lsh {
                            query_key: weights(linear_no_bias(d, all, sa.pp("query_key")), n("attention.self_attention.query_key"))?,
                            value: weights(linear_no_bias(d, all, sa.pp("value")), n("attention.self_attention.value"))?,
                            rotations,
                        }
                    }
                    _ => Attention::Local {
                        query: weights(linear_no_bias(d, all, sa.pp("query")), n("attention.self_attention.query"))?,
                        key: weights(linear_no_bias(d, all, sa.pp("key")), n("attention.self_attention.key"))?,
                        value: weights(linear_no_bias(d, all, sa.pp("value")), n("attention.self_attention.value"))?,
                    },
                };
                Ok(Layer {
                    attn_norm: weights(layer_norm(d, eps, l.pp("attention.layer_norm")), n("attention.layer_norm"))?,
                    attention,
                    attn_out: weights(linear_no_bias(all, d, l.pp("attention.output.dense")), n("attention.output.dense"))?,
                    ff_norm: weights(layer_norm(d, eps, l.pp("feed_forward.layer_norm")), n("feed_forward.layer_norm"))?,
                    ff_dense: weights(linear(d, cfg.feed_forward_size, l.pp("feed_forward.dense.dense")), n("feed_forward.dense.dense"))?,
                    ff_out: weights(linear(cfg.feed_forward_size, d, l.pp("feed_forward.output.dense")), n("feed_forward.output.dense"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ReformerModel {
            act: cfg.activation()?,
            words: weights(embedding(cfg.vocab_size, d, emb.pp("word_embeddings")), full(&emb, "word_embeddings"))?,
            positions,
            layers,
            out_norm: weights(layer_norm(2 * d, eps, vb.pp("encoder.layer_norm")), full(&vb, "encoder.layer_norm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ReformerConfig {
        &self.cfg
    }

    /// Each layer's attention, as the config lists them.
    pub fn layer_attention(&self) -> Vec<NativeAttention> {
        self.layers.iter().map(|l| if matches!(l.attention, Attention::Lsh { .. }) { NativeAttention::Lsh } else { NativeAttention::Local }).collect()
    }

    /// Checks a whole document: tokens, positions (padding included) and the LSH chunk.
    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(ids, self.cfg.vocab_size)?;
        let padded = ids.len() + self.cfg.padding(ids.len())?;
        if padded > self.cfg.max_positions() {
            return Err(ModelError::Input(format!(
                "the document has {} tokens ({padded} padded to whole chunks); the model embeds at most {} positions",
                ids.len(),
                self.cfg.max_positions()
            )));
        }
        if self.layers.iter().any(|l| matches!(l.attention, Attention::Lsh { .. })) && padded <= self.cfg.lsh_attn_chunk_length {
            return Err(ModelError::Unsupported(format!(
                "a document of {} tokens fits in one LSH chunk of {}; transformers then runs full attention instead of LSH, which tome does not",
                ids.len(),
                self.cfg.lsh_attn_chunk_length
            )));
        }
        if padded > ids.len() && self.cfg.pad_token_id.is_none() {
            return Err(ModelError::Input(format!("the document needs {} tokens of padding but the config has no pad_token_id", padded - ids.len())));
        }
        Ok(())
    }

    fn embed_positions(&self, positions: &[i64]) -> Result<Tensor> {
        let n = positions.len();
        let idx = |f: &dyn Fn(i64) -> i64| Tensor::from_vec(positions.iter().map(|&p| f(p) as u32).collect::<Vec<_>>(), n, &Device::Cpu);
        Ok(match &self.positions {
            Positions::Axial { rows, cols, ax1 } => {
                let ax1 = *ax1 as i64;
                Tensor::cat(&[rows.index_select(&idx(&|p| p / ax1)?, 0)?, cols.index_select(&idx(&|p| p % ax1)?, 0)?], 1)?
            }
            Positions::Learned(e) => e.forward(&idx(&|p| p)?)?,
        })
    }

    /// `[rows, heads × head_size]`: this rank's rows of the layer's attention over the padded plan.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, layer: &Layer, group: &dyn Group, plan: &ShardPlan, x: &Tensor, positions: &[i64], valid: &[bool], p: Precision) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let (heads, hd) = (self.cfg.num_attention_heads, self.cfg.attention_head_size);
        let split = |t: Tensor| -> Result<Tensor> { Ok(attention_input(t.reshape((rows, heads, hd))?.transpose(0, 1)?.contiguous()?, p)?) };
        let ctx = match &layer.attention {
            Attention::Lsh { query_key, value, rotations } => {
                let spec = self.cfg.lsh_spec()?;
                lsh_attention(group, plan, &split(query_key.forward_at(x, p)?)?, &split(value.forward_at(x, p)?)?, valid, rotations, &spec)?
            }
            Attention::Local { query, key, value } => {
                let q = split(query.forward_at(x, p)?)?;
                let own = KeyBlock { k: split(key.forward_at(x, p)?)?, v: split(value.forward_at(x, p)?)?, pos: positions.to_vec(), valid: valid.to_vec() };
                let scale = 1.0 / (hd as f32).sqrt();
                let chunk = self.cfg.local_attn_chunk_length;
                if plan.len() <= chunk {
                    // transformers' "standard" self-attention: one chunk sees every key.
                    ring_attention(group, &q, positions, own, DenseSpec { causal: false, scale, precision: p })?
                } else {
                    let pattern = BlockSparsePlan::local(plan.len(), chunk, heads, self.cfg.local_num_chunks_before, self.cfg.local_num_chunks_after, false)?;
                    blocksparse_attention(group, plan, &q, own, &pattern, scale, p)?
                }
            }
        };
        Ok(ctx.transpose(0, 1)?.reshape((rows, heads * hd))?)
    }
}

impl Architecture for ReformerModel {
    /// f32, and bf16: products in bf16 with f32 accumulation, LSH hashing and attention on bf16
    /// queries, keys and values; embeddings, norms and the reversible sums in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = self.config();
        Shape {
            model_type: "reformer".into(),
            // The output: both reversible streams.
            hidden_size: 2 * c.hidden_size,
            intermediate_size: c.feed_forward_size,
            num_heads: c.num_attention_heads,
            memory_len: 0,
            num_layers: c.attn_layers.len(),
            vocab_size: c.vocab_size,
            max_positions: Some(c.max_positions()),
            layer_attention: self.layer_attention().into_iter().map(|a| a.name().to_string()).collect(),
            causal: false,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        fixed_attention(opts)?;
        Ok(Prepared::plain(ids, self.layer_attention().into_iter().map(LayerAttention::Native).collect(), plain_run(opts)))
    }

    /// The shortest document LSH layers run (longer than one chunk).
    fn min_tokens(&self) -> usize {
        match self.layers.iter().any(|l| matches!(l.attention, Attention::Lsh { .. })) {
            true => self.cfg.lsh_attn_chunk_length + 1,
            false => 1,
        }
    }

    /// This rank's rows of the hidden states `input.run` asks for: by default the normed
    /// concatenation of both streams (`[shard, 2 × hidden]`); after `k < layers` layers the raw
    /// concatenation. `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let me = group.rank();
        let n = plan.shard_len(me);
        if input.ids.len() != n {
            return Err(ModelError::Input(format!("rank {me} owns {n} tokens but was given {} ids", input.ids.len())));
        }
        if !plan.is_contiguous() {
            return Err(ModelError::Unsupported("Reformer keeps tokens in order across ranks: it needs contiguous shards".into()));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        // The padded plan: the rank holding the document's end also holds the padding.
        let pad = self.cfg.padding(plan.len())?;
        let padded = padded_plan(plan, pad)?;
        let positions = padded.positions(me);
        let mut ids = input.ids.clone();
        ids.resize(positions.len(), self.cfg.pad_token_id.unwrap_or(0));
        let valid: Vec<bool> = positions.iter().map(|&p| (p as usize) < plan.len()).collect();
        let rows = positions.len();

        let words = self.words.forward(&Tensor::from_slice(&ids, rows, &Device::Cpu)?)?;
        let x = (words + self.embed_positions(&positions)?)?;
        let (mut x1, mut x2) = (x.clone(), x);
        let run = input.run.layers_to_run(self.layers.len())?;
        let p = input.run.precision;
        for (l, layer) in self.layers.iter().enumerate().take(run) {
            let mut f = |x: &Tensor| -> Result<Tensor> {
                let a = self.attention(layer, group, &padded, &layer.attn_norm.forward(x)?, &positions, &valid, p)?;
                Ok(layer.attn_out.forward_at(&a, p)?)
            };
            let mut g = |y: &Tensor| -> Result<Tensor> { Ok(layer.ff_out.forward_at(&self.act.apply(&layer.ff_dense.forward_at(&layer.ff_norm.forward(y)?, p)?)?, p)?) };
            (x1, x2) = reversible::forward(&x1, &x2, &mut f, &mut g)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        let both = Tensor::cat(&[&x1, &x2], 1)?;
        let out = if run == self.layers.len() { self.out_norm.forward(&both)? } else { both };
        Ok(out.narrow(0, 0, n)?)
    }
}
