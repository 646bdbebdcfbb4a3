//! GPT-Neo (Black et al. 2021; Hugging Face `GPTNeoModel`): a GPT-3-style causal decoder whose
//! layers mix dense ("global") and banded ("local": causal sliding window) attention, as GPT-3
//! alternated dense and locally banded sparse layers (Brown et al. 2020). Dense layers run as
//! causal ring attention, local layers as causal window attention, so the mix runs on any
//! number of ranks, in either layout, with the one-rank result.
//!
//! Mirrors `modeling_gpt_neo.py`: pre-LN blocks, query/key/value projections without bias,
//! scores *not* scaled by 1/sqrt(head_dim), a local layer sees the `window_size` most recent
//! tokens (itself included), GELU with the tanh approximation ("gelu_new"), learned absolute
//! positions.

use candle_core::{Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::Precision;
use tome_dist::ops::{ring_attention, window_attention, DenseSpec, KeyBlock, WindowSpec};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, linear, linear_no_bias, Linear};
use crate::model::{check_vocab, embed_learned_positions, plain_run, Architecture, Shape};

/// `config.json` of `GPTNeoModel`.
#[derive(Clone, Debug, Deserialize)]
pub struct GptNeoConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// e.g. `[[["global", "local"], 12]]`: the pattern, repeated.
    pub attention_types: Vec<(Vec<GptNeoAttention>, usize)>,
    pub window_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// The language-model head is `wte` (log-probabilities are computed with it).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_act() -> Activation {
    Activation::GeluTanh
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// A GPT-Neo layer's attention (`attention_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GptNeoAttention {
    /// Dense causal attention.
    Global,
    /// Causal attention over the `window_size` latest tokens.
    Local,
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl GptNeoConfig {
    /// Each layer's attention: dense, or a causal window of the `window_size` latest tokens.
    pub fn layer_attention(&self) -> Result<Vec<LayerAttention>> {
        let mut layers = Vec::new();
        for (pattern, repeat) in &self.attention_types {
            for _ in 0..*repeat {
                for kind in pattern {
                    layers.push(match kind {
                        GptNeoAttention::Global => LayerAttention::Dense,
                        GptNeoAttention::Local if self.window_size > 0 => LayerAttention::Window { one_sided: self.window_size - 1 },
                        GptNeoAttention::Local => return Err(config_err("window_size", "local layers need a positive window")),
                    });
                }
            }
        }
        if layers.len() != self.num_layers {
            return Err(config_err("attention_types", format!("expands to {} layers; num_layers is {}", layers.len(), self.num_layers)));
        }
        Ok(layers)
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(config_err("num_heads", format!("{} heads do not divide hidden_size {}", self.num_heads, self.hidden_size)));
        }
        if !self.tie_word_embeddings {
            return Err(config_err("tie_word_embeddings", "false is not supported: tome's language-model head is the tied `wte`"));
        }
        if self.activation_function != Activation::GeluTanh {
            return Err(config_err("activation_function", format!("`{}` is not supported (gelu_new)", self.activation_function.name())));
        }
        self.layer_attention().map(drop)
    }
}

pub(crate) struct Block {
    pub(crate) ln_1: LayerNorm,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) out: Linear,
    pub(crate) ln_2: LayerNorm,
    pub(crate) fc: Linear,
    pub(crate) proj: Linear,
    pub(crate) attention: LayerAttention,
}

pub struct GptNeoModel {
    pub(crate) cfg: GptNeoConfig,
    pub(crate) wte: Embedding,
    pub(crate) wpe: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: LayerNorm,
    /// The weights on each GPU that has run this model.
    pub(crate) on_gpus: crate::gpu::DeviceWeights<crate::gpu::gpt_neo::GptNeoWeights>,
}

impl GptNeoModel {
    /// Loads `GPTNeoModel` weights (with or without the `transformer.` prefix of the LM class).
    pub fn load(vb: VarBuilder, cfg: &GptNeoConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb };
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        let inner = cfg.intermediate_size.unwrap_or(4 * d);
        let blocks = cfg
            .layer_attention()?
            .into_iter()
            .enumerate()
            .map(|(i, attention)| {
                let b = vb.pp(format!("h.{i}"));
                let a = b.pp("attn.attention");
                let name = |s: &str| format!("{}.{s}", b.prefix());
                Ok(Block {
                    ln_1: weights(layer_norm(d, eps, b.pp("ln_1")), name("ln_1"))?,
                    q: weights(linear_no_bias(d, d, a.pp("q_proj")), name("attn.attention.q_proj"))?,
                    k: weights(linear_no_bias(d, d, a.pp("k_proj")), name("attn.attention.k_proj"))?,
                    v: weights(linear_no_bias(d, d, a.pp("v_proj")), name("attn.attention.v_proj"))?,
                    out: weights(linear(d, d, a.pp("out_proj")), name("attn.attention.out_proj"))?,
                    ln_2: weights(layer_norm(d, eps, b.pp("ln_2")), name("ln_2"))?,
                    fc: weights(linear(d, inner, b.pp("mlp.c_fc")), name("mlp.c_fc"))?,
                    proj: weights(linear(inner, d, b.pp("mlp.c_proj")), name("mlp.c_proj"))?,
                    attention,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GptNeoModel {
            wte: weights(embedding(cfg.vocab_size, d, vb.pp("wte")), "wte")?,
            wpe: weights(embedding(cfg.max_position_embeddings, d, vb.pp("wpe")), "wpe")?,
            ln_f: weights(layer_norm(d, eps, vb.pp("ln_f")), "ln_f")?,
            blocks,
            on_gpus: Default::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &GptNeoConfig {
        &self.cfg
    }

    /// Checks a whole document against the model.
    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        if ids.len() > self.cfg.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "the document has {} tokens; GPT-Neo has learned {} positions and a causal model's positions cannot be tiled",
                ids.len(),
                self.cfg.max_position_embeddings
            )));
        }
        check_vocab(ids, self.cfg.vocab_size)
    }

    fn attention(&self, block: &Block, group: &dyn Group, plan: &ShardPlan, x: &Tensor, positions: &[i64], p: Precision) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let (heads, hd) = (self.cfg.num_heads, d / self.cfg.num_heads);
        let split = |t: Tensor| -> Result<Tensor> { Ok(attention_input(t.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()?, p)?) };
        let q = split(block.q.forward_at(x, p)?)?;
        let own = KeyBlock { k: split(block.k.forward_at(x, p)?)?, v: split(block.v.forward_at(x, p)?)?, pos: positions.to_vec(), valid: vec![true; n] };
        // GPT-Neo does not scale its scores.
        let ctx = match block.attention {
            LayerAttention::Dense => ring_attention(group, &q, positions, own, DenseSpec { causal: true, scale: 1.0, precision: p })?,
            LayerAttention::Window { one_sided } => window_attention(group, plan, &q, own, WindowSpec { one_sided, causal: true, scale: 1.0, precision: p }, None)?,
            LayerAttention::BlockSparse { .. } | LayerAttention::Favor { .. } | LayerAttention::Native(_) => {
                return Err(ModelError::Unsupported("GPT-Neo layers are dense or local".into()))
            }
        };
        Ok(block.out.forward_at(&ctx.transpose(0, 1)?.reshape((n, d))?, p)?)
    }
}

impl Architecture for GptNeoModel {
    fn gpu_precisions(&self) -> &'static [Precision] {
        Precision::ALL
    }

    fn release_gpu(&self, gpu: usize, precision: Precision) {
        self.on_gpus.release(gpu, precision);
    }

    fn forward_gpu(&self, rank: &crate::gpu::GpuRank, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        self.forward_on_gpu(rank, group, plan, input, after_layer)
    }

    /// f32, and bf16: products in bf16 with f32 accumulation, attention on bf16 queries, keys
    /// and values; embeddings, norms, residual sums and the language-model head in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = &self.cfg;
        Shape {
            model_type: "gpt_neo".into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size.unwrap_or(4 * c.hidden_size),
            num_heads: c.num_heads,
            memory_len: 0,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
            max_positions: Some(c.max_position_embeddings),
            layer_attention: self.blocks.iter().map(|b| format!("{} (causal)", b.attention)).collect(),
            causal: true,
        }
    }

    /// Each layer runs the attention its config gives it: an override would change the outputs.
    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        if let Some(attention) = opts.attention {
            return Err(ModelError::Unsupported(format!("GPT-Neo's layers alternate dense and local attention as its config says; `{attention}` would change its outputs")));
        }
        if !opts.global_tokens.is_empty() {
            return Err(ModelError::Input("global tokens are not part of GPT-Neo's attention".into()));
        }
        Ok(Prepared::plain(ids, self.blocks.iter().map(|b| b.attention).collect(), plain_run(opts)))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the last, after
    /// `ln_f`), from its own tokens.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let (mut x, positions) = embed_learned_positions("GPT-Neo", &self.wte, &self.wpe, self.cfg.max_position_embeddings, group, plan, input)?;
        if !input.layers.iter().eq(self.blocks.iter().map(|b| &b.attention)) {
            return Err(ModelError::Input("the shard's layer attentions are not the ones GPT-Neo's config gives its layers".into()));
        }
        let run = input.run.layers_to_run(self.blocks.len())?;
        let p = input.run.precision;
        for (l, block) in self.blocks.iter().enumerate().take(run) {
            let a = self.attention(block, group, plan, &block.ln_1.forward(&x)?, &positions, p)?;
            x = (x + a)?;
            let m = block.proj.forward_at(&block.fc.forward_at(&block.ln_2.forward(&x)?, p)?.gelu()?, p)?;
            x = (x + m)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        // As transformers' `hidden_states`: only the last layer's output passes through `ln_f`.
        match run == self.blocks.len() {
            true => Ok(self.ln_f.forward(&x)?),
            false => Ok(x),
        }
    }

    /// With the head tied to `wte`, as `GPTNeoForCausalLM` ties it (`tie_word_embeddings`).
    fn log_probs(&self, hidden: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
        crate::lm_head::log_probs(hidden, self.wte.embeddings(), next_ids)
    }
}
