//! GPT-2 (Radford et al. 2019; Hugging Face `GPT2LMHeadModel` / `GPT2Model`): a causal decoder
//! whose every layer runs dense causal attention — on several ranks, causal ring attention
//! (zigzag layouts balance it) — and whose tied LM head gives per-token log-probabilities.
//!
//! Mirrors `modeling_gpt2.py`: pre-LN blocks, a fused query/key/value `Conv1D` (weights stored
//! as `[in, out]`), scores scaled by 1/sqrt(head_dim) (`scale_attn_weights`) and by
//! 1/(layer + 1) with `scale_attn_by_inverse_layer_idx`, GELU with the tanh approximation
//! ("gelu_new"), learned absolute positions (documents beyond `n_positions` are refused), and
//! the LM head tied to `wte`.

use candle_core::{Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::Precision;
use tome_dist::ops::{ring_attention, DenseSpec, KeyBlock};
use tome_dist::{Group, ShardPlan};

use crate::config::{Activation, EncodeOptions, LayerAttention};
use crate::document::{Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, Linear};
use crate::model::{causal_only, check_vocab, embed_learned_positions, plain_run, Architecture, Shape};

/// `config.json` of `GPT2Model` / `GPT2LMHeadModel`.
#[derive(Clone, Debug, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
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

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl Gpt2Config {
    fn validate(&self) -> Result<()> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(config_err("n_head", format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd)));
        }
        if self.activation_function != Activation::GeluTanh {
            return Err(config_err("activation_function", format!("`{}` is not supported (gelu_new)", self.activation_function.name())));
        }
        if self.add_cross_attention {
            return Err(config_err("add_cross_attention", "cross-attention (an encoder-decoder GPT-2) is not supported"));
        }
        Ok(())
    }
}

pub(crate) struct Block {
    pub(crate) ln_1: LayerNorm,
    pub(crate) c_attn: Linear,
    pub(crate) c_proj: Linear,
    pub(crate) ln_2: LayerNorm,
    pub(crate) c_fc: Linear,
    pub(crate) mlp_proj: Linear,
    /// The scores' scale: 1/sqrt(head_dim), and 1/(layer + 1) when the config asks.
    pub(crate) scale: f32,
}

pub struct Gpt2Model {
    pub(crate) cfg: Gpt2Config,
    pub(crate) wte: Embedding,
    pub(crate) wpe: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: LayerNorm,
    /// The weights on each GPU that has run this model.
    pub(crate) on_gpus: crate::gpu::DeviceWeights<crate::gpu::gpt2::Gpt2Weights>,
}

/// A `Conv1D` (weight `[in, out]`, `y = x W + b`) as a linear layer.
fn conv1d(vb: &VarBuilder, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    let full = format!("{}.{name}", vb.prefix());
    let w = weights(vb.get((d_in, d_out), &format!("{name}.weight")), format!("{full}.weight"))?;
    let b = weights(vb.get(d_out, &format!("{name}.bias")), format!("{full}.bias"))?;
    Ok(Linear::new(candle_nn::Linear::new(w.t()?, Some(b))))
}

impl Gpt2Model {
    /// Loads `GPT2Model` or `GPT2LMHeadModel` weights (with or without the `transformer.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb };
        let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let head_dim = d / cfg.n_head;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = vb.pp(format!("h.{i}"));
                let name = |s: &str| format!("{}.{s}", b.prefix());
                let mut scale = if cfg.scale_attn_weights { 1.0 / (head_dim as f32).sqrt() } else { 1.0 };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f32;
                }
                Ok(Block {
                    ln_1: weights(layer_norm(d, eps, b.pp("ln_1")), name("ln_1"))?,
                    c_attn: conv1d(&b.pp("attn"), "c_attn", d, 3 * d)?,
                    c_proj: conv1d(&b.pp("attn"), "c_proj", d, d)?,
                    ln_2: weights(layer_norm(d, eps, b.pp("ln_2")), name("ln_2"))?,
                    c_fc: conv1d(&b.pp("mlp"), "c_fc", d, inner)?,
                    mlp_proj: conv1d(&b.pp("mlp"), "c_proj", inner, d)?,
                    scale,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2Model {
            wte: weights(embedding(cfg.vocab_size, d, vb.pp("wte")), "wte")?,
            wpe: weights(embedding(cfg.n_positions, d, vb.pp("wpe")), "wpe")?,
            ln_f: weights(layer_norm(d, eps, vb.pp("ln_f")), "ln_f")?,
            blocks,
            on_gpus: Default::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// Checks a whole document against the model.
    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        if ids.len() > self.cfg.n_positions {
            return Err(ModelError::Input(format!(
                "the document has {} tokens; GPT-2 has learned {} positions and a causal model's positions cannot be tiled",
                ids.len(),
                self.cfg.n_positions
            )));
        }
        check_vocab(ids, self.cfg.vocab_size)
    }

    fn attention(&self, block: &Block, group: &dyn Group, x: &Tensor, positions: &[i64], p: Precision) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let (heads, hd) = (self.cfg.n_head, d / self.cfg.n_head);
        let qkv = block.c_attn.forward_at(x, p)?;
        let split = |i: usize| -> Result<Tensor> { Ok(attention_input(qkv.narrow(1, i * d, d)?.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()?, p)?) };
        let own = KeyBlock { k: split(1)?, v: split(2)?, pos: positions.to_vec(), valid: vec![true; n] };
        let ctx = ring_attention(group, &split(0)?, positions, own, DenseSpec { causal: true, scale: block.scale, precision: p })?;
        Ok(block.c_proj.forward_at(&ctx.transpose(0, 1)?.reshape((n, d))?, p)?)
    }
}

impl Architecture for Gpt2Model {
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
            model_type: "gpt2".into(),
            hidden_size: c.n_embd,
            intermediate_size: c.n_inner.unwrap_or(4 * c.n_embd),
            num_heads: c.n_head,
            memory_len: 0,
            num_layers: c.n_layer,
            vocab_size: c.vocab_size,
            max_positions: Some(c.n_positions),
            layer_attention: vec!["dense (causal)".into(); c.n_layer],
            causal: true,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        causal_only(opts)?;
        Ok(Prepared::plain(ids, vec![LayerAttention::Dense; self.cfg.n_layer], plain_run(opts)))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the last, after
    /// `ln_f`), from its own tokens.
    /// `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let (mut x, positions) = embed_learned_positions("GPT-2", &self.wte, &self.wpe, self.cfg.n_positions, group, plan, input)?;
        let run = input.run.layers_to_run(self.blocks.len())?;
        let p = input.run.precision;
        for (l, block) in self.blocks.iter().enumerate().take(run) {
            let a = self.attention(block, group, &block.ln_1.forward(&x)?, &positions, p)?;
            x = (x + a)?;
            let m = block.mlp_proj.forward_at(&block.c_fc.forward_at(&block.ln_2.forward(&x)?, p)?.gelu()?, p)?;
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

    /// log p(next token | the tokens up to each row) for the first `next_ids.len()` rows of
    /// `hidden` (`[rows, n_embd]`, the rank's rows in position order): `[next_ids.len()]`,
    /// with the head tied to `wte`.
    fn log_probs(&self, hidden: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
        crate::lm_head::log_probs(hidden, self.wte.embeddings(), next_ids)
    }
}
