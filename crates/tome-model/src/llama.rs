//! Llama (Touvron et al. 2023; Hugging Face `LlamaForCausalLM` / `LlamaModel`): a causal
//! decoder with rotary positions (RoPE, Su et al. 2021), grouped-query attention, RMSNorm and a
//! SwiGLU feed-forward. Every layer runs dense causal attention — causal ring attention on
//! several ranks — and only the key/value heads travel around the ring (GQA keeps them few).
//!
//! Mirrors `modeling_llama.py`: `inv_freq = 1 / theta^(2i/head_dim)`, the angle of position p
//! computed as `p * inv_freq` in f32, the rotate-half convention, RMSNorm in f32, scores scaled
//! by 1/sqrt(head_dim). RoPE is computed from global positions, not learned, so documents
//! longer than `max_position_embeddings` run as transformers runs them. Only the default RoPE
//! is supported (scaled variants are refused by name).

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::Precision;
use tome_dist::ops::{ring_attention, DenseSpec, KeyBlock};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, linear_b, Linear};
use crate::model::check_vocab;
use crate::model::{causal_only, plain_run, Architecture, Shape};

/// RoPE settings: `rope_parameters` (transformers 5) or the older top-level `rope_theta` /
/// `rope_scaling`.
#[derive(Clone, Debug, Deserialize, Default)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Older configs' name for the type.
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
}

/// `config.json` of `LlamaForCausalLM` / `LlamaModel`.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_positions() -> usize {
    2048
}
fn default_act() -> Activation {
    Activation::Silu
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// RoPE's base, after refusing anything but the default RoPE.
    pub fn rope_theta(&self) -> Result<f64> {
        for (field, p) in [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)] {
            if let Some(p) = p {
                let kind = p.rope_type.as_deref().or(p.legacy_type.as_deref()).unwrap_or("default");
                if kind != "default" {
                    return Err(config_err(field, format!("RoPE type `{kind}` is not supported (default)")));
                }
            }
        }
        Ok(self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0))
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(config_err("num_key_value_heads", format!("{} key/value heads must divide {} attention heads", self.kv_heads(), self.num_attention_heads)));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(config_err("head_dim", format!("{} must be even for rotary positions", self.head_dim())));
        }
        if self.hidden_act != Activation::Silu {
            return Err(config_err("hidden_act", format!("`{}` is not supported (silu)", self.hidden_act.name())));
        }
        self.rope_theta()?;
        Ok(())
    }
}

pub(crate) struct Layer {
    pub(crate) input_norm: RmsNorm,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) post_norm: RmsNorm,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

pub struct LlamaModel {
    pub(crate) cfg: LlamaConfig,
    pub(crate) embed: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: RmsNorm,
    /// `[vocab, hidden]`: `lm_head.weight`, or the embeddings when tied (or absent: a
    /// `LlamaModel` checkpoint).
    pub(crate) head: Tensor,
    pub(crate) inv_freq: Vec<f32>,
    /// The weights on each GPU that has run this model.
    pub(crate) on_gpus: crate::gpu::DeviceWeights<crate::gpu::llama::LlamaWeights>,
}

impl LlamaModel {
    /// Loads `LlamaForCausalLM` (keys under `model.`, plus `lm_head`) or `LlamaModel` weights.
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let root = vb.clone();
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let (d, hd, heads, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        let eps = cfg.rms_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let name = |s: &str| format!("{}.{s}", l.prefix());
                let (a, m) = (l.pp("self_attn"), l.pp("mlp"));
                Ok(Layer {
                    input_norm: weights(rms_norm(d, eps, l.pp("input_layernorm")), name("input_layernorm"))?,
                    q: weights(linear_b(d, heads * hd, cfg.attention_bias, a.pp("q_proj")), name("self_attn.q_proj"))?,
                    k: weights(linear_b(d, kv * hd, cfg.attention_bias, a.pp("k_proj")), name("self_attn.k_proj"))?,
                    v: weights(linear_b(d, kv * hd, cfg.attention_bias, a.pp("v_proj")), name("self_attn.v_proj"))?,
                    o: weights(linear_b(heads * hd, d, cfg.attention_bias, a.pp("o_proj")), name("self_attn.o_proj"))?,
                    post_norm: weights(rms_norm(d, eps, l.pp("post_attention_layernorm")), name("post_attention_layernorm"))?,
                    gate: weights(linear_b(d, cfg.intermediate_size, cfg.mlp_bias, m.pp("gate_proj")), name("mlp.gate_proj"))?,
                    up: weights(linear_b(d, cfg.intermediate_size, cfg.mlp_bias, m.pp("up_proj")), name("mlp.up_proj"))?,
                    down: weights(linear_b(cfg.intermediate_size, d, cfg.mlp_bias, m.pp("down_proj")), name("mlp.down_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        let embed = weights(embedding(cfg.vocab_size, d, vb.pp("embed_tokens")), format!("{}.embed_tokens", vb.prefix()))?;
        let head = if !cfg.tie_word_embeddings && root.contains_tensor("lm_head.weight") {
            weights(root.get((cfg.vocab_size, d), "lm_head.weight"), "lm_head.weight")?
        } else {
            embed.embeddings().clone()
        };
        let inv_freq = inv_freq(cfg.rope_theta()?, hd);
        Ok(LlamaModel {
            norm: weights(rms_norm(d, eps, vb.pp("norm")), format!("{}.norm", vb.prefix()))?,
            embed,
            layers,
            head,
            inv_freq,
            on_gpus: Default::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Checks a whole document against the model.
    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(ids, self.cfg.vocab_size)
    }

    /// (cos, sin) of the rotary angles at `positions`: `[n, head_dim]` each (halves repeated).
    fn rotary(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        rotary(&self.inv_freq, positions)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(&self, layer: &Layer, group: &dyn Group, x: &Tensor, positions: &[i64], cos: &Tensor, sin: &Tensor, p: Precision) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (hd, heads, kv) = (self.cfg.head_dim(), self.cfg.num_attention_heads, self.cfg.kv_heads());
        let split = |t: Tensor, h: usize| -> Result<Tensor> { Ok(t.reshape((n, h, hd))?.transpose(0, 1)?.contiguous()?) };
        let q = attention_input(rope(&split(layer.q.forward_at(x, p)?, heads)?, cos, sin)?, p)?;
        let k = attention_input(rope(&split(layer.k.forward_at(x, p)?, kv)?, cos, sin)?, p)?;
        let v = attention_input(split(layer.v.forward_at(x, p)?, kv)?, p)?;
        let own = KeyBlock { k, v, pos: positions.to_vec(), valid: vec![true; n] };
        let scale = 1.0 / (hd as f32).sqrt();
        let ctx = ring_attention(group, &q, positions, own, DenseSpec { causal: true, scale, precision: p })?;
        Ok(layer.o.forward_at(&ctx.transpose(0, 1)?.reshape((n, heads * hd))?, p)?)
    }
}

/// RoPE's inverse frequencies for base `theta` and `head_dim`, as transformers computes them:
/// `arange(0, dim, 2) / dim` in f32, theta to that power, one over that.
pub(crate) fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    let theta = theta as f32;
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// (cos, sin) of the rotary angles `p * inv_freq` (f32) at `positions`: `[n, 2 * inv_freq.len()]`
/// each, the halves repeated as transformers' `cat((freqs, freqs))`.
pub(crate) fn rotary(inv_freq: &[f32], positions: &[u32]) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * 2 * half), Vec::with_capacity(positions.len() * 2 * half));
    for &p in positions {
        let angles: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let n = positions.len();
    Ok((Tensor::from_vec(cos, (n, 2 * half), &Device::Cpu)?, Tensor::from_vec(sin, (n, 2 * half), &Device::Cpu)?))
}

/// Applies rotary positions to `x` (`[heads, n, head_dim]`): x cos + rotate_half(x) sin.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(2)?;
    let (x1, x2) = (x.narrow(2, 0, hd / 2)?, x.narrow(2, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 2)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

impl Architecture for LlamaModel {
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
        let c = self.config();
        Shape {
            model_type: "llama".into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_attention_heads,
            memory_len: 0,
            num_layers: c.num_hidden_layers,
            vocab_size: c.vocab_size,
            // Rotary positions are computed: any length runs as transformers runs it.
            max_positions: Some(c.max_position_embeddings),
            layer_attention: vec!["dense (causal)".into(); c.num_hidden_layers],
            causal: true,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        causal_only(opts)?;
        Ok(Prepared::plain(ids, vec![LayerAttention::Dense; self.config().num_hidden_layers], plain_run(opts)))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the last, through
    /// the final norm), from its own tokens.
    /// `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let positions = plan.positions(group.rank());
        let n = positions.len();
        if input.ids.len() != n || input.position_ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids and {} positions", group.rank(), input.ids.len(), input.position_ids.len())));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        let (cos, sin) = self.rotary(&input.position_ids)?;
        let mut x = self.embed.forward(&Tensor::from_slice(&input.ids, n, &Device::Cpu)?)?;
        let run = input.run.layers_to_run(self.layers.len())?;
        let p = input.run.precision;
        for (l, layer) in self.layers.iter().enumerate().take(run) {
            let a = self.attention(layer, group, &layer.input_norm.forward(&x)?, &positions, &cos, &sin, p)?;
            x = (x + a)?;
            let h = layer.post_norm.forward(&x)?;
            let m = layer.down.forward_at(&(layer.gate.forward_at(&h, p)?.silu()? * layer.up.forward_at(&h, p)?)?, p)?;
            x = (x + m)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        // As transformers' `hidden_states`: only the last layer's output is normed.
        match run == self.layers.len() {
            true => Ok(self.norm.forward(&x)?),
            false => Ok(x),
        }
    }

    /// log p(next token | the tokens up to each row) for the first `next_ids.len()` rows.
    fn log_probs(&self, hidden: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
        crate::lm_head::log_probs(hidden, &self.head, next_ids)
    }
}
