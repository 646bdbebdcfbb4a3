//! ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer: A Modern Bidirectional
//! Encoder for Fast, Memory Efficient, and Long Context Finetuning and Inference"; Hugging Face
//! `ModernBertModel`): a pre-LN encoder without position embeddings whose layers alternate
//! global attention with rotary positions of one base and local sliding-window attention with
//! rotary positions of another, and a GeGLU feed-forward. Global layers run as ring attention,
//! local layers as window attention with its halo, so any number of ranks and either layout
//! gives the one-rank result.
//!
//! Mirrors `modeling_modernbert.py` (transformers 5.24): `x = norm(tok_embeddings(ids))`; each
//! layer `x += Wo(attn(attn_norm(x)))` (layer 0's `attn_norm` is the identity) and
//! `x += Wo(act(a) * g)` with `(a, g) = Wi(mlp_norm(x))` split in halves; `final_norm` after the
//! last layer. `Wqkv` holds the query, key and value projections in that order. Scores are
//! scaled by `head_dim^-0.5`; RoPE is the rotate-half kind on positions `0..n`, with
//! `global_rope_theta` on `full_attention` layers and `local_rope_theta` on
//! `sliding_attention` ones. A local layer's token sees the keys at `|i - j| <= local_attention / 2`
//! (`local_attention` is the whole window; transformers' `create_bidirectional_sliding_window_mask`
//! with `sliding_window = local_attention // 2`). Which layers are local comes from
//! `layer_types` (transformers 5) or `global_attn_every_n_layers` (layer `i` is global when
//! `i % n == 0`); RoPE bases from `rope_parameters` (transformers 5) or `global_rope_theta` /
//! `local_rope_theta`. LayerNorms carry a bias only with `norm_bias`. Only the default RoPE
//! runs; other RoPE types are refused by name.

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::Precision;
use tome_dist::ops::{ring_attention, window_attention, DenseSpec, KeyBlock, WindowSpec};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::heads::project_heads;
use crate::linear::{attention_input, Linear};
use crate::llama::{inv_freq, rope, rotary};
use crate::model::{check_vocab, fixed_attention, plain_run, Architecture, Shape};

/// A layer's attention as transformers 5 names it in `layer_types`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    SlidingAttention,
}

/// RoPE types tome runs: the default only (scaled variants change the angles).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RopeType {
    #[default]
    Default,
}

/// One layer type's entry of `rope_parameters`.
#[derive(Clone, Debug, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: RopeType,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `rope_parameters` of transformers 5: one entry per layer type.
#[derive(Clone, Debug, Deserialize)]
pub struct RopeByLayerType {
    #[serde(default)]
    pub full_attention: Option<RopeParameters>,
    #[serde(default)]
    pub sliding_attention: Option<RopeParameters>,
}

/// `config.json` of `ModernBertModel` / `ModernBertForMaskedLM`.
#[derive(Clone, Debug, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_activation: Activation,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// transformers 5: each layer's attention. Absent: from `global_attn_every_n_layers`.
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    /// The whole window of a local layer (each side sees half of it).
    #[serde(default = "default_window")]
    pub local_attention: usize,
    #[serde(default)]
    pub rope_parameters: Option<RopeByLayerType>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Older configs' scaled RoPE: refused when set.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_act() -> Activation {
    Activation::GeluErf
}
fn default_positions() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_every() -> usize {
    3
}
fn default_window() -> usize {
    128
}

/// transformers' defaults for the two RoPE bases.
const GLOBAL_THETA: f64 = 160_000.0;
const LOCAL_THETA: f64 = 10_000.0;

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl ModernBertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Each layer's type, from `layer_types` or `global_attn_every_n_layers` as transformers
    /// derives them.
    pub fn layer_types(&self) -> Result<Vec<LayerType>> {
        match &self.layer_types {
            Some(types) if types.len() == self.num_hidden_layers => Ok(types.clone()),
            Some(types) => Err(config_err("layer_types", format!("{} entries for {} layers", types.len(), self.num_hidden_layers))),
            None if self.global_attn_every_n_layers == 0 => Err(config_err("global_attn_every_n_layers", "must be positive")),
            None => {
                Ok((0..self.num_hidden_layers).map(|i| if i % self.global_attn_every_n_layers == 0 { LayerType::FullAttention } else { LayerType::SlidingAttention }).collect())
            }
        }
    }

    /// The RoPE base of a layer type: `rope_parameters`, else the top-level theta, else
    /// transformers' default.
    pub fn rope_theta(&self, kind: LayerType) -> f64 {
        let (entry, legacy, default) = match kind {
            LayerType::FullAttention => (self.rope_parameters.as_ref().and_then(|r| r.full_attention.as_ref()), self.global_rope_theta, GLOBAL_THETA),
            LayerType::SlidingAttention => (self.rope_parameters.as_ref().and_then(|r| r.sliding_attention.as_ref()), self.local_rope_theta, LOCAL_THETA),
        };
        entry.and_then(|p| p.rope_theta).or(legacy).unwrap_or(default)
    }

    /// The attention of each layer: dense for global layers, a window of `local_attention / 2`
    /// on each side for local ones.
    pub fn layer_attention(&self) -> Result<Vec<LayerAttention>> {
        let one_sided = self.local_attention / 2;
        Ok(self
            .layer_types()?
            .into_iter()
            .map(|t| match t {
                LayerType::FullAttention => LayerAttention::Dense,
                LayerType::SlidingAttention => LayerAttention::Window { one_sided },
            })
            .collect())
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(config_err("num_attention_heads", format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size)));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(config_err("hidden_size", format!("head_dim {} must be even for rotary positions", self.head_dim())));
        }
        if self.local_attention < 2 {
            return Err(config_err("local_attention", format!("{}: the window must hold at least one token on each side", self.local_attention)));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(config_err("rope_scaling", "scaled RoPE is not supported (the default RoPE only)"));
        }
        self.layer_types().map(drop)
    }
}

struct Layer {
    /// `None` for layer 0, whose input is the normed embeddings.
    attn_norm: Option<LayerNorm>,
    q: Linear,
    k: Linear,
    v: Linear,
    wo: Linear,
    mlp_norm: LayerNorm,
    /// `Wi`'s two halves: the activated input and the gate.
    wi_input: Linear,
    wi_gate: Linear,
    mlp_wo: Linear,
    attention: LayerAttention,
    /// RoPE inverse frequencies of this layer's type.
    inv_freq: Vec<f32>,
}

pub struct ModernBertModel {
    cfg: ModernBertConfig,
    act: Activation,
    embed: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
}

/// A LayerNorm of `vb`, with a bias only where the config has one (`norm_bias`).
fn norm(vb: &VarBuilder, size: usize, cfg: &ModernBertConfig) -> Result<LayerNorm> {
    let name = |s: &str| format!("{}.{s}", vb.prefix());
    let weight = weights(vb.get(size, "weight"), name("weight"))?;
    Ok(match cfg.norm_bias {
        true => LayerNorm::new(weight, weights(vb.get(size, "bias"), name("bias"))?, cfg.norm_eps),
        false => LayerNorm::new_no_bias(weight, cfg.norm_eps),
    })
}

/// A linear layer whose weight is rows `start..start + rows` of `weight` (and of `bias`).
fn rows_of(weight: &Tensor, bias: Option<&Tensor>, start: usize, rows: usize) -> Result<Linear> {
    let b = match bias {
        Some(b) => Some(b.narrow(0, start, rows)?.contiguous()?),
        None => None,
    };
    Ok(Linear::new(candle_nn::Linear::new(weight.narrow(0, start, rows)?.contiguous()?, b)))
}

impl ModernBertModel {
    /// Loads `ModernBertModel` weights, or a model class's under the `model.` prefix.
    pub fn load(vb: VarBuilder, cfg: &ModernBertConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("model.embeddings.tok_embeddings.weight") { vb.pp("model") } else { vb };
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let name = |vb: &VarBuilder, s: &str| if vb.prefix().is_empty() { s.to_string() } else { format!("{}.{s}", vb.prefix()) };
        let get = |vb: &VarBuilder, shape: (usize, usize), s: &str| weights(vb.get(shape, s), name(vb, s));
        let bias = |vb: &VarBuilder, size: usize, on: bool| -> Result<Option<Tensor>> { on.then(|| weights(vb.get(size, "bias"), name(vb, "bias"))).transpose() };
        let attentions = cfg.layer_attention()?;
        let types = cfg.layer_types()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let (wqkv, wo) = (l.pp("attn.Wqkv"), l.pp("attn.Wo"));
                let (wi, mlp_wo) = (l.pp("mlp.Wi"), l.pp("mlp.Wo"));
                let qkv_w = get(&l, (3 * h, h), "attn.Wqkv.weight")?;
                let qkv_b = bias(&wqkv, 3 * h, cfg.attention_bias)?;
                let wi_w = get(&l, (2 * inter, h), "mlp.Wi.weight")?;
                let wi_b = bias(&wi, 2 * inter, cfg.mlp_bias)?;
                Ok(Layer {
                    attn_norm: if i == 0 { None } else { Some(norm(&l.pp("attn_norm"), h, cfg)?) },
                    q: rows_of(&qkv_w, qkv_b.as_ref(), 0, h)?,
                    k: rows_of(&qkv_w, qkv_b.as_ref(), h, h)?,
                    v: rows_of(&qkv_w, qkv_b.as_ref(), 2 * h, h)?,
                    wo: Linear::new(candle_nn::Linear::new(get(&l, (h, h), "attn.Wo.weight")?, bias(&wo, h, cfg.attention_bias)?)),
                    mlp_norm: norm(&l.pp("mlp_norm"), h, cfg)?,
                    wi_input: rows_of(&wi_w, wi_b.as_ref(), 0, inter)?,
                    wi_gate: rows_of(&wi_w, wi_b.as_ref(), inter, inter)?,
                    mlp_wo: Linear::new(candle_nn::Linear::new(get(&l, (h, inter), "mlp.Wo.weight")?, bias(&mlp_wo, h, cfg.mlp_bias)?)),
                    attention: attentions[i],
                    inv_freq: inv_freq(cfg.rope_theta(types[i]), cfg.head_dim()),
                })
            })
            .collect::<Result<_>>()?;
        let e = vb.pp("embeddings");
        Ok(ModernBertModel {
            act: cfg.hidden_activation,
            embed: weights(embedding(cfg.vocab_size, h, e.pp("tok_embeddings")), name(&e, "tok_embeddings"))?,
            embed_norm: norm(&e.pp("norm"), h, cfg)?,
            final_norm: norm(&vb.pp("final_norm"), h, cfg)?,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ModernBertConfig {
        &self.cfg
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(&self, layer: &Layer, group: &dyn Group, plan: &ShardPlan, x: &Tensor, positions: &[i64], position_ids: &[u32], p: Precision) -> Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let heads = self.cfg.num_attention_heads;
        let [q, k, v] = project_heads(x, [layer.q.at(p)?, layer.k.at(p)?, layer.v.at(p)?], heads)?;
        let (cos, sin) = rotary(&layer.inv_freq, position_ids)?;
        let (q, k) = (attention_input(rope(&q, &cos, &sin)?, p)?, attention_input(rope(&k, &cos, &sin)?, p)?);
        let own = KeyBlock { k, v, pos: positions.to_vec(), valid: vec![true; n] };
        let scale = 1.0 / (self.cfg.head_dim() as f32).sqrt();
        let ctx = match layer.attention {
            LayerAttention::Dense => ring_attention(group, &q, positions, own, DenseSpec { causal: false, scale, precision: p })?,
            LayerAttention::Window { one_sided } => window_attention(group, plan, &q, own, WindowSpec { one_sided, causal: false, scale, precision: p }, None)?,
            other => return Err(ModelError::Unsupported(format!("a ModernBERT layer is global or local, not `{other}`"))),
        };
        Ok(layer.wo.forward_at(&ctx.transpose(0, 1)?.reshape((n, hidden))?, p)?)
    }
}

impl Architecture for ModernBertModel {
    /// f32, and bf16: products in bf16 with f32 accumulation, attention on bf16 queries, keys
    /// and values; embeddings, norms and residual sums in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = &self.cfg;
        Shape {
            model_type: "modernbert".into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_attention_heads,
            memory_len: 0,
            num_layers: c.num_hidden_layers,
            vocab_size: c.vocab_size,
            // Rotary positions are computed: any length runs as transformers runs it.
            max_positions: Some(c.max_position_embeddings),
            layer_attention: self.layers.iter().map(|l| l.attention.to_string()).collect(),
            causal: false,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(&ids, self.cfg.vocab_size)?;
        fixed_attention(opts)?;
        Ok(Prepared::plain(ids, self.layers.iter().map(|l| l.attention).collect(), plain_run(opts)))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the last, after
    /// `final_norm`), from its own tokens. `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let positions = plan.positions(group.rank());
        let n = positions.len();
        if input.ids.len() != n || input.position_ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids and {} positions", group.rank(), input.ids.len(), input.position_ids.len())));
        }
        if !input.layers.iter().eq(self.layers.iter().map(|l| &l.attention)) || !input.global_tokens.is_empty() {
            return Err(ModelError::Input("the shard's layer attentions are not the ones ModernBERT's config gives its layers".into()));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        let mut x = self.embed_norm.forward(&self.embed.forward(&Tensor::from_slice(&input.ids, n, &Device::Cpu)?)?)?;
        let run = input.run.layers_to_run(self.layers.len())?;
        for (l, layer) in self.layers.iter().enumerate().take(run) {
            let h = match &layer.attn_norm {
                Some(norm) => norm.forward(&x)?,
                None => x.clone(),
            };
            let p = input.run.precision;
            x = (&x + self.attention(layer, group, plan, &h, &positions, &input.position_ids, p)?)?;
            let h = layer.mlp_norm.forward(&x)?;
            let gated = (self.act.apply(&layer.wi_input.forward_at(&h, p)?)? * layer.wi_gate.forward_at(&h, p)?)?;
            x = (&x + layer.mlp_wo.forward_at(&gated, p)?)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        // As transformers' `hidden_states`: only the last layer's output passes `final_norm`.
        match run == self.layers.len() {
            true => Ok(self.final_norm.forward(&x)?),
            false => Ok(x),
        }
    }
}
