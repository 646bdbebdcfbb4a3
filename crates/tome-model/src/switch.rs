//! Switch Transformers encoder (Fedus et al. 2021, "Switch Transformers: Scaling to Trillion
//! Parameter Models with Simple and Efficient Sparsity"; Hugging Face
//! `SwitchTransformersEncoderModel`): T5 blocks whose feed-forward is, every
//! `encoder_sparse_step` layers, a mixture of experts with top-1 routing.
//!
//! Mirrors `modeling_switch_transformers.py` (transformers 5.24): pre-norm blocks with RMS norms
//! (no mean, no bias, eps `layer_norm_epsilon`); attention without 1/sqrt(d) scaling plus the
//! learned relative position bias of block 0, shared by every layer (the ring carries positions,
//! so the bias is exact on any number of ranks); the router in f32 on the normed hidden states,
//! each token going to its argmax expert scaled by that probability, each expert taking at most
//! `expert_capacity` tokens of the sequence in token order (capacity is decided across ranks by
//! a prefix count) and dropped tokens getting a zero expert output, i.e. only the residual.
//! Layer `i` is sparse when `i % step == 1` or `step == 1`, exactly as transformers decides it.

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, linear_b, rms_norm, Embedding, RmsNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::relative_bias::RelativeBias;
use tome_attn::Precision;
use tome_dist::ops::{apply_experts, ring_attention_with_bias, route_tokens, KeyBlock};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention, NativeAttention};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, linear_no_bias, Linear};
use crate::model::check_vocab;
use crate::model::{fixed_attention, plain_run, Architecture, Shape};

/// `config.json` of `SwitchTransformersModel` / `SwitchTransformersEncoderModel`.
#[derive(Clone, Debug, Deserialize)]
pub struct SwitchConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_experts: usize,
    pub expert_capacity: usize,
    #[serde(default)]
    pub num_sparse_encoder_layers: usize,
    /// Written by transformers from `num_sparse_encoder_layers`; derived the same way if absent.
    #[serde(default)]
    pub encoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub router_bias: bool,
    #[serde(default = "default_router_dtype")]
    pub router_dtype: String,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: Activation,
    /// The activation transformers derives from `feed_forward_proj` (written by 5.x).
    #[serde(default)]
    pub dense_act_fn: Option<Activation>,
}

fn default_router_dtype() -> String {
    "float32".into()
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> Activation {
    Activation::Relu
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl SwitchConfig {
    /// Every `step`-th layer (as transformers counts) is sparse.
    fn sparse_step(&self) -> usize {
        match (self.encoder_sparse_step, self.num_sparse_encoder_layers) {
            (Some(step), _) => step,
            (None, 0) => self.num_layers,
            (None, n) => self.num_layers / n,
        }
    }

    fn is_sparse(&self, layer: usize) -> bool {
        let step = self.sparse_step();
        step > 0 && (layer % step == 1 || step == 1)
    }

    /// Switch's feed-forward is never gated: `feed_forward_proj` names a plain activation.
    fn activation(&self) -> Result<Activation> {
        Ok(self.dense_act_fn.unwrap_or(self.feed_forward_proj))
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.d_kv == 0 {
            return Err(config_err("num_heads", "heads and d_kv must be positive"));
        }
        if self.num_experts == 0 {
            return Err(config_err("num_experts", "a mixture needs at least one expert"));
        }
        if self.router_dtype != "float32" {
            return Err(config_err("router_dtype", format!("`{}`: tome routes in float32, as the checkpoints are trained", self.router_dtype)));
        }
        if self.relative_attention_num_buckets < 4 || self.relative_attention_max_distance < self.relative_attention_num_buckets / 4 {
            return Err(config_err(
                "relative_attention_num_buckets",
                format!("{} buckets with max distance {} do not form T5 buckets", self.relative_attention_num_buckets, self.relative_attention_max_distance),
            ));
        }
        self.activation().map(drop)
    }
}

struct FeedForward {
    wi: Linear,
    wo: Linear,
}

enum Mlp {
    Dense(FeedForward),
    Sparse { router: candle_nn::Linear, experts: Vec<FeedForward> },
}

struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    mlp: Mlp,
}

pub struct SwitchModel {
    cfg: SwitchConfig,
    act: Activation,
    shared: Embedding,
    bias: RelativeBias,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl FeedForward {
    fn load(vb: &VarBuilder, cfg: &SwitchConfig) -> Result<Self> {
        let name = |s: &str| format!("{}.{s}", vb.prefix());
        Ok(FeedForward {
            wi: weights(linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi")), name("wi"))?,
            wo: weights(linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo")), name("wo"))?,
        })
    }

    fn forward(&self, x: &Tensor, act: Activation, p: Precision) -> tome_attn::Result<Tensor> {
        self.wo.forward_at(&act.apply(&self.wi.forward_at(x, p)?)?, p)
    }
}

impl SwitchModel {
    /// Loads the encoder of a `SwitchTransformersModel` / `...ForConditionalGeneration` /
    /// `...EncoderModel` checkpoint (`shared.weight`, `encoder.*`; the decoder is ignored).
    pub fn load(vb: VarBuilder, cfg: &SwitchConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, inner, eps) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.layer_norm_epsilon);
        let shared = if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder.embed_tokens") };
        let shared = weights(embedding(cfg.vocab_size, d, shared), "shared.weight")?;
        let enc = vb.pp("encoder");
        let table_name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".to_string();
        let table = weights(enc.get((cfg.relative_attention_num_buckets, cfg.num_heads), "block.0.layer.0.SelfAttention.relative_attention_bias.weight"), table_name)?;
        let bias = RelativeBias {
            table: table.to_vec2::<f32>()?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            bidirectional: true,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = enc.pp(format!("block.{i}"));
                let name = |s: &str| format!("{}.{s}", b.prefix());
                let attn = b.pp("layer.0.SelfAttention");
                let ff = b.pp("layer.1.mlp");
                let mlp = if cfg.is_sparse(i) {
                    Mlp::Sparse {
                        router: weights(linear_b(d, cfg.num_experts, cfg.router_bias, ff.pp("router.classifier")), name("layer.1.mlp.router.classifier"))?,
                        experts: (0..cfg.num_experts).map(|e| FeedForward::load(&ff.pp(format!("experts.expert_{e}")), cfg)).collect::<Result<_>>()?,
                    }
                } else {
                    Mlp::Dense(FeedForward::load(&ff, cfg)?)
                };
                Ok(Block {
                    attn_norm: weights(rms_norm(d, eps, b.pp("layer.0.layer_norm")), name("layer.0.layer_norm"))?,
                    q: weights(linear_no_bias(d, inner, attn.pp("q")), name("layer.0.SelfAttention.q"))?,
                    k: weights(linear_no_bias(d, inner, attn.pp("k")), name("layer.0.SelfAttention.k"))?,
                    v: weights(linear_no_bias(d, inner, attn.pp("v")), name("layer.0.SelfAttention.v"))?,
                    o: weights(linear_no_bias(inner, d, attn.pp("o")), name("layer.0.SelfAttention.o"))?,
                    ff_norm: weights(rms_norm(d, eps, b.pp("layer.1.layer_norm")), name("layer.1.layer_norm"))?,
                    mlp,
                })
            })
            .collect::<Result<_>>()?;
        Ok(SwitchModel {
            act: cfg.activation()?,
            final_norm: weights(rms_norm(d, eps, enc.pp("final_layer_norm")), "encoder.final_layer_norm")?,
            cfg: cfg.clone(),
            shared,
            bias,
            blocks,
        })
    }

    pub fn config(&self) -> &SwitchConfig {
        &self.cfg
    }

    /// Which layers run a mixture of experts.
    pub fn sparse_layers(&self) -> Vec<usize> {
        (0..self.cfg.num_layers).filter(|&i| self.cfg.is_sparse(i)).collect()
    }

    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(ids, self.cfg.vocab_size)
    }

    fn attention(&self, block: &Block, group: &dyn Group, x: &Tensor, positions: &[i64], p: Precision) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (heads, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let split = |t: Tensor| -> Result<Tensor> { Ok(attention_input(t.reshape((n, heads, dk))?.transpose(0, 1)?.contiguous()?, p)?) };
        let q = split(block.q.forward_at(x, p)?)?;
        let own = KeyBlock { k: split(block.k.forward_at(x, p)?)?, v: split(block.v.forward_at(x, p)?)?, pos: positions.to_vec(), valid: vec![true; n] };
        let ctx = ring_attention_with_bias(group, &q, positions, own, &self.bias)?;
        Ok(block.o.forward_at(&ctx.transpose(0, 1)?.reshape((n, heads * dk))?, p)?)
    }
}

impl Architecture for SwitchModel {
    /// f32, and bf16: products in bf16 with f32 accumulation (the router stays f32, as
    /// transformers' `router_dtype`), attention on bf16 queries, keys and values; embeddings,
    /// norms, residual sums and the relative bias in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = self.config();
        let sparse = self.sparse_layers();
        Shape {
            model_type: "switch_transformers".into(),
            hidden_size: c.d_model,
            intermediate_size: c.d_ff,
            num_heads: c.num_heads,
            memory_len: 0,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
            max_positions: None,
            layer_attention: (0..c.num_layers).map(|l| if sparse.contains(&l) { format!("relative-bias + {} experts", c.num_experts) } else { "relative-bias".into() }).collect(),
            causal: false,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        fixed_attention(opts)?;
        Ok(Prepared::plain(ids, vec![LayerAttention::Native(NativeAttention::RelativeBias); self.config().num_layers], plain_run(opts)))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the encoder's
    /// output after the final norm). Shards must be contiguous (expert capacity follows token
    /// order). `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let positions = plan.positions(group.rank());
        let n = positions.len();
        if input.ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids", group.rank(), input.ids.len())));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        let mut x = self.shared.forward(&Tensor::from_slice(&input.ids, n, &Device::Cpu)?)?;
        let run = input.run.layers_to_run(self.blocks.len())?;
        let p = input.run.precision;
        for (l, block) in self.blocks.iter().enumerate().take(run) {
            let a = self.attention(block, group, &block.attn_norm.forward(&x)?, &positions, p)?;
            x = (x + a)?;
            let h = block.ff_norm.forward(&x)?;
            let f = match &block.mlp {
                Mlp::Dense(ff) => ff.forward(&h, self.act, p)?,
                Mlp::Sparse { router, experts } => {
                    let routing = route_tokens(group, plan, &router.forward(&h)?, self.cfg.expert_capacity)?;
                    apply_experts(&h, &routing, experts.len(), &|e, rows| Ok(experts[e].forward(rows, self.act, p)?))?
                }
            };
            x = (x + f)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        match run == self.blocks.len() {
            true => Ok(self.final_norm.forward(&x)?),
            false => Ok(x),
        }
    }
}
