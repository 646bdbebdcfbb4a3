//! Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a
//! Fixed-Length Context"; Hugging Face `TransfoXLModel`, transformers 4.37) and tome's
//! Compressive Transformer (Rae et al. 2019, "Compressive Transformers for Long-Range Sequence
//! Modelling"; own schema, docs/models/compressive.md), which is the same network with a
//! compressed memory next to the recent one.
//!
//! A document runs as consecutive segments of `segment_len` tokens, the first with empty
//! memories. Each layer of a segment attends causally over `[memory; segment]` with relative
//! positions (`r_w_bias`/`r_r_bias`, projected sinusoids of the distance clamped to
//! `clamp_len`), then a post-LN (or pre-LN) ReLU feed-forward. A layer's memory is its *input*
//! for the segments before: the last `mem_len` rows (Transformer-XL), plus — Compressive — the
//! rows that left that window, compressed `compression_rate` to one and kept `cmem_len` deep.
//! On several ranks, shards hold whole segments and each layer is a `segment_recurrence`
//! wavefront: a rank folds its segments into the memory it passes on before computing them.
//!
//! Mirrors `modeling_transfo_xl.py` (4.37.2): the adaptive input embedding (clusters with their
//! own widths and projections, scaled by sqrt(d_model)), no final norm, and `same_length`
//! (every query sees the last `mem_len` keys, itself included).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};
use serde::Deserialize;
use tome_attn::relative::segment_attention;
use tome_attn::Precision;
use tome_dist::ops::{segment_recurrence, Compression, CompressiveMemory, XlMemory};
use tome_dist::{Group, ShardPlan};

use crate::config::{EncodeOptions, LayerAttention, NativeAttention};
use crate::document::{Prepared, RunOptions, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::linear::{attention_input, linear, linear_no_bias, Linear};
use crate::model::check_vocab;
use crate::model::{fixed_attention, Architecture, Shape};
use crate::registry::ModelType;

/// `model_type` of tome's Compressive Transformer checkpoints.
pub const COMPRESSIVE: &str = "tome-compressive";

/// Tokens per segment when neither the request nor the config (`tgt_len`) says.
pub const DEFAULT_SEGMENT_LEN: usize = 128;

/// `config.json` of `TransfoXLModel` / `TransfoXLLMHeadModel`, and of tome's Compressive
/// Transformer (the same fields plus `cmem_len`, `compression_rate`, `compression`). Defaults
/// are `TransfoXLConfig`'s.
#[derive(Clone, Debug, Deserialize)]
pub struct TransfoXlConfig {
    pub model_type: ModelType,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_cutoffs")]
    pub cutoffs: Vec<usize>,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "d_model")]
    pub d_embed: usize,
    #[serde(default = "d_n_head")]
    pub n_head: usize,
    #[serde(default = "d_head")]
    pub d_head: usize,
    #[serde(default = "d_inner")]
    pub d_inner: usize,
    #[serde(default = "d_div_val")]
    pub div_val: usize,
    #[serde(default)]
    pub pre_lnorm: bool,
    #[serde(default = "d_n_layer")]
    pub n_layer: usize,
    #[serde(default = "d_mem_len")]
    pub mem_len: usize,
    /// Distances beyond this share one embedding; 0 or less: no clamp.
    #[serde(default = "d_clamp_len")]
    pub clamp_len: i64,
    #[serde(default = "d_true")]
    pub same_length: bool,
    #[serde(default)]
    pub attn_type: usize,
    #[serde(default = "d_true")]
    pub untie_r: bool,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// The training segment length (older configs): the default `segment_len`.
    #[serde(default)]
    pub tgt_len: Option<usize>,
    /// Compressive Transformer only.
    #[serde(default)]
    pub cmem_len: Option<usize>,
    #[serde(default)]
    pub compression_rate: Option<usize>,
    #[serde(default)]
    pub compression: Option<String>,
}

fn d_vocab() -> usize {
    267735
}
fn d_cutoffs() -> Vec<usize> {
    vec![20000, 40000, 200000]
}
fn d_model() -> usize {
    1024
}
fn d_n_head() -> usize {
    16
}
fn d_head() -> usize {
    64
}
fn d_inner() -> usize {
    4096
}
fn d_div_val() -> usize {
    4
}
fn d_n_layer() -> usize {
    18
}
fn d_mem_len() -> usize {
    1600
}
fn d_clamp_len() -> i64 {
    1000
}
fn d_true() -> bool {
    true
}
fn d_eps() -> f64 {
    1e-5
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

/// The compressed memory of tome's Compressive Transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionKind {
    Mean,
    Max,
    Conv,
}

impl TransfoXlConfig {
    pub fn is_compressive(&self) -> bool {
        self.model_type == ModelType::Compressive
    }

    /// The default segment length: the config's `tgt_len`, else [`DEFAULT_SEGMENT_LEN`].
    pub fn default_segment_len(&self) -> usize {
        self.tgt_len.filter(|&t| t > 0).unwrap_or(DEFAULT_SEGMENT_LEN)
    }

    fn clamp(&self) -> usize {
        if self.clamp_len > 0 {
            self.clamp_len as usize
        } else {
            usize::MAX
        }
    }

    /// The compressed memory, for a Compressive checkpoint with `cmem_len > 0`.
    fn compression(&self) -> Result<Option<(usize, usize, CompressionKind)>> {
        if !self.is_compressive() {
            return Ok(None);
        }
        let cmem_len = self.cmem_len.ok_or_else(|| config_err("cmem_len", "missing (required by tome-compressive)"))?;
        let rate = self.compression_rate.ok_or_else(|| config_err("compression_rate", "missing (required by tome-compressive)"))?;
        if rate == 0 {
            return Err(config_err("compression_rate", "must be at least 1"));
        }
        let kind = match self.compression.as_deref().unwrap_or("conv") {
            "mean" => CompressionKind::Mean,
            "max" => CompressionKind::Max,
            "conv" => CompressionKind::Conv,
            other => return Err(config_err("compression", format!("`{other}` is not one of mean, max, conv"))),
        };
        Ok((cmem_len > 0).then_some((cmem_len, rate, kind)))
    }

    fn validate(&self) -> Result<()> {
        if self.attn_type != 0 {
            return Err(config_err("attn_type", format!("{}: only 0 (relative positions with learned biases, Transformer-XL's own) is supported", self.attn_type)));
        }
        if self.is_compressive() && self.same_length {
            return Err(config_err("same_length", "true is not defined for tome-compressive (docs/models/compressive.md)"));
        }
        if self.same_length && self.mem_len == 0 {
            return Err(config_err("same_length", "true with mem_len 0 would let no query see any key"));
        }
        if !self.d_model.is_multiple_of(2) {
            return Err(config_err("d_model", format!("{} must be even (sines and cosines)", self.d_model)));
        }
        if self.div_val == 0 || self.n_head == 0 || self.d_head == 0 {
            return Err(config_err("div_val", "div_val, n_head and d_head must be positive"));
        }
        let mut bounds = vec![0];
        bounds.extend(&self.cutoffs);
        bounds.push(self.vocab_size);
        if bounds.windows(2).any(|w| w[1] <= w[0]) {
            return Err(config_err("cutoffs", format!("{:?} must ascend strictly within the vocabulary of {}", self.cutoffs, self.vocab_size)));
        }
        self.compression().map(drop)
    }
}

/// One cluster of the adaptive input embedding: token ids `start..end`, their table and the
/// projection to `d_model` (none when the table is already `d_model` wide and unprojected).
struct Cluster {
    start: u32,
    end: u32,
    table: Tensor,
    proj: Option<Tensor>,
}

/// Baevski & Auli 2019's adaptive input representation, as `AdaptiveEmbedding`.
struct AdaptiveEmbedding {
    clusters: Vec<Cluster>,
    scale: f64,
    d_model: usize,
}

impl AdaptiveEmbedding {
    fn load(vb: &VarBuilder, cfg: &TransfoXlConfig) -> Result<Self> {
        let name = |s: String| format!("{}.{s}", vb.prefix());
        let clusters = if cfg.div_val == 1 {
            let table = weights(vb.get((cfg.vocab_size, cfg.d_embed), "emb_layers.0.weight"), name("emb_layers.0.weight".into()))?;
            let proj = match cfg.d_embed != cfg.d_model {
                true => Some(weights(vb.get((cfg.d_model, cfg.d_embed), "emb_projs.0"), name("emb_projs.0".into()))?),
                false => None,
            };
            vec![Cluster { start: 0, end: cfg.vocab_size as u32, table, proj }]
        } else {
            let mut bounds = vec![0];
            bounds.extend(&cfg.cutoffs);
            bounds.push(cfg.vocab_size);
            bounds
                .windows(2)
                .enumerate()
                .map(|(c, w)| {
                    let width = cfg.d_embed / cfg.div_val.pow(c as u32);
                    Ok(Cluster {
                        start: w[0] as u32,
                        end: w[1] as u32,
                        table: weights(vb.get((w[1] - w[0], width), &format!("emb_layers.{c}.weight")), name(format!("emb_layers.{c}.weight")))?,
                        proj: Some(weights(vb.get((cfg.d_model, width), &format!("emb_projs.{c}")), name(format!("emb_projs.{c}")))?),
                    })
                })
                .collect::<Result<_>>()?
        };
        Ok(AdaptiveEmbedding { clusters, scale: (cfg.d_model as f64).sqrt(), d_model: cfg.d_model })
    }

    /// `[ids, d_model]`: each id looked up in its cluster, projected, scaled by sqrt(d_model).
    fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Tensor::zeros((ids.len(), self.d_model), DType::F32, &Device::Cpu)?;
        let mut covered = 0;
        for c in &self.clusters {
            let at: Vec<u32> = (0..ids.len() as u32).filter(|&i| (c.start..c.end).contains(&ids[i as usize])).collect();
            if at.is_empty() {
                continue;
            }
            covered += at.len();
            let local: Vec<u32> = at.iter().map(|&i| ids[i as usize] - c.start).collect();
            let mut e = c.table.index_select(&Tensor::from_vec(local, at.len(), &Device::Cpu)?, 0)?;
            if let Some(p) = &c.proj {
                e = e.matmul(&p.t()?)?;
            }
            // Each row belongs to one cluster: adding into zeros places it.
            out = out.index_add(&Tensor::from_vec(at, e.dim(0)?, &Device::Cpu)?, &e, 0)?;
        }
        if covered != ids.len() {
            return Err(ModelError::Input("a token id lies outside every embedding cluster".into()));
        }
        Ok((out * self.scale)?)
    }
}

struct Layer {
    qkv: Linear,
    r_net: Linear,
    o_net: Linear,
    attn_norm: LayerNorm,
    /// `r_w_bias`, `r_r_bias`: `[n_head, d_head]`.
    r_w_bias: Tensor,
    r_r_bias: Tensor,
    ff_in: Linear,
    ff_out: Linear,
    ff_norm: LayerNorm,
    compression: Option<Compression>,
}

pub struct TransfoXlModel {
    cfg: TransfoXlConfig,
    embed: AdaptiveEmbedding,
    inv_freq: Vec<f32>,
    layers: Vec<Layer>,
    /// `(cmem_len, rate)` for a Compressive checkpoint with a compressed memory.
    compressed: Option<(usize, usize)>,
}

impl TransfoXlModel {
    /// Loads `TransfoXLModel` / `TransfoXLLMHeadModel` weights (with or without the
    /// `transformer.` prefix), or a `tome-compressive` checkpoint.
    pub fn load(vb: VarBuilder, cfg: &TransfoXlConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("transformer.word_emb.emb_layers.0.weight") { vb.pp("transformer") } else { vb };
        let (d, inner, hd) = (cfg.d_model, cfg.d_inner, cfg.n_head * cfg.d_head);
        let eps = cfg.layer_norm_epsilon;
        let name = |s: String| if vb.prefix().is_empty() { s } else { format!("{}.{s}", vb.prefix()) };
        let shared_bias = |n: &str| weights(vb.get((cfg.n_head, cfg.d_head), n), name(n.into()));
        let tied = match cfg.untie_r {
            true => None,
            false => Some((shared_bias("r_w_bias")?, shared_bias("r_r_bias")?)),
        };
        let compression = cfg.compression()?;
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let a = l.pp("dec_attn");
                let n = |s: &str| format!("{}.{s}", l.prefix());
                let (r_w_bias, r_r_bias) = match &tied {
                    Some(b) => b.clone(),
                    None => (
                        weights(a.get((cfg.n_head, cfg.d_head), "r_w_bias"), n("dec_attn.r_w_bias"))?,
                        weights(a.get((cfg.n_head, cfg.d_head), "r_r_bias"), n("dec_attn.r_r_bias"))?,
                    ),
                };
                let compression = match compression {
                    None => None,
                    Some((_, _, CompressionKind::Mean)) => Some(Compression::Mean),
                    Some((_, _, CompressionKind::Max)) => Some(Compression::Max),
                    Some((_, rate, CompressionKind::Conv)) => Some(Compression::Conv {
                        weight: weights(l.get((d, d, rate), "compress.weight"), n("compress.weight"))?,
                        bias: weights(l.get(d, "compress.bias"), n("compress.bias"))?,
                    }),
                };
                Ok(Layer {
                    qkv: weights(linear_no_bias(d, 3 * hd, a.pp("qkv_net")), n("dec_attn.qkv_net"))?,
                    r_net: weights(linear_no_bias(d, hd, a.pp("r_net")), n("dec_attn.r_net"))?,
                    o_net: weights(linear_no_bias(hd, d, a.pp("o_net")), n("dec_attn.o_net"))?,
                    attn_norm: weights(layer_norm(d, eps, a.pp("layer_norm")), n("dec_attn.layer_norm"))?,
                    r_w_bias,
                    r_r_bias,
                    ff_in: weights(linear(d, inner, l.pp("pos_ff.CoreNet.0")), n("pos_ff.CoreNet.0"))?,
                    ff_out: weights(linear(inner, d, l.pp("pos_ff.CoreNet.3")), n("pos_ff.CoreNet.3"))?,
                    ff_norm: weights(layer_norm(d, eps, l.pp("pos_ff.layer_norm")), n("pos_ff.layer_norm"))?,
                    compression,
                })
            })
            .collect::<Result<_>>()?;
        // The frequencies as the checkpoint stores them (computed the same way, in f32, if not).
        let inv_freq = match vb.get(d / 2, "pos_emb.inv_freq") {
            Ok(t) => t.to_vec1::<f32>()?,
            Err(_) => (0..d / 2).map(|k| 1.0 / 10000f32.powf((2 * k) as f32 / d as f32)).collect(),
        };
        Ok(TransfoXlModel {
            embed: AdaptiveEmbedding::load(&vb.pp("word_emb"), cfg)?,
            inv_freq,
            layers,
            compressed: compression.map(|(cmem_len, rate, _)| (cmem_len, rate)),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TransfoXlConfig {
        &self.cfg
    }

    pub fn check(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        check_vocab(ids, self.cfg.vocab_size)
    }

    /// `[n, d_model]`: the sinusoid of distances `0..n` (sines, then cosines), in f32 as the
    /// reference computes it.
    fn sinusoid(&self, n: usize) -> tome_dist::Result<Tensor> {
        let d = self.cfg.d_model;
        let mut data = vec![0f32; n * d];
        for p in 0..n {
            for (k, f) in self.inv_freq.iter().enumerate() {
                let x = p as f32 * f;
                data[p * d + k] = x.sin();
                data[p * d + d / 2 + k] = x.cos();
            }
        }
        Ok(Tensor::from_vec(data, (n, d), &Device::Cpu)?)
    }

    /// One layer on one segment (`[L, d]`) given its memory rows (`[M, d]`).
    fn layer_step(&self, layer: &Layer, memory: &Tensor, seg: &Tensor, p: Precision) -> tome_dist::Result<Tensor> {
        let (heads, dh) = (self.cfg.n_head, self.cfg.d_head);
        let (m, l) = (memory.dim(0)?, seg.dim(0)?);
        let klen = m + l;
        let all = Tensor::cat(&[memory, seg], 0)?;
        let attn_in = if self.cfg.pre_lnorm { layer.attn_norm.forward(&all)? } else { all };
        let qkv = layer.qkv.forward_at(&attn_in, p)?;
        let split = |t: Tensor, rows: usize| -> tome_dist::Result<Tensor> { Ok(attention_input(t.reshape((rows, heads, dh))?.transpose(0, 1)?.contiguous()?, p)?) };
        let hd = heads * dh;
        let q = split(qkv.narrow(1, 0, hd)?.narrow(0, m, l)?, l)?;
        let k = split(qkv.narrow(1, hd, hd)?, klen)?;
        let v = split(qkv.narrow(1, 2 * hd, hd)?, klen)?;
        let clamp = self.cfg.clamp();
        let distances = (klen - 1).min(clamp) + 1;
        let r = split(layer.r_net.forward_at(&self.sinusoid(distances)?, p)?, distances)?;
        let horizon = self.cfg.same_length.then_some(self.cfg.mem_len);
        let ctx = segment_attention(&q, &k, &v, &r, &layer.r_w_bias, &layer.r_r_bias, clamp, horizon)?.out;
        let attn = layer.o_net.forward_at(&ctx.transpose(0, 1)?.reshape((l, hd))?, p)?;
        let ff = |x: &Tensor| -> tome_dist::Result<Tensor> { Ok(layer.ff_out.forward_at(&layer.ff_in.forward_at(x, p)?.relu()?, p)?) };
        Ok(if self.cfg.pre_lnorm {
            let h = (seg + attn)?;
            let f = ff(&layer.ff_norm.forward(&h)?)?;
            (h + f)?
        } else {
            let h = layer.attn_norm.forward(&(seg + attn)?)?;
            let f = ff(&h)?;
            layer.ff_norm.forward(&(h + f)?)?
        })
    }
}

impl Architecture for TransfoXlModel {
    /// f32, and bf16: products in bf16 with f32 accumulation, attention on bf16 queries, keys,
    /// values and relative positions; embeddings, norms, residual sums, memory compression and
    /// the memories passed between ranks in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = self.config();
        let kind = if c.is_compressive() { "compressive" } else { "relative" };
        Shape {
            model_type: c.model_type.name().into(),
            hidden_size: c.d_model,
            intermediate_size: c.d_inner,
            num_heads: c.n_head,
            memory_len: c.mem_len + c.cmem_len.unwrap_or(0),
            num_layers: c.n_layer,
            vocab_size: c.vocab_size,
            max_positions: None,
            layer_attention: vec![format!("{kind} (memory {})", c.mem_len); c.n_layer],
            causal: false,
        }
    }

    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check(&ids)?;
        fixed_attention(opts)?;
        let c = self.config();
        let segment = opts.segment_len.unwrap_or_else(|| c.default_segment_len());
        if segment == 0 {
            return Err(ModelError::Input("the segment length must be positive".into()));
        }
        let kind = if c.is_compressive() { NativeAttention::Compressive } else { NativeAttention::Relative };
        Ok(Prepared::plain(
            ids,
            vec![LayerAttention::Native(kind); c.n_layer],
            RunOptions { output_layer: opts.output_layer, segment_len: Some(segment), precision: opts.precision },
        ))
    }

    /// This rank's rows of the hidden states `input.run` asks for (by default the last layer's
    /// output), in segments of `input.run.segment_len`. `after_layer(l)` returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let n = plan.shard_len(group.rank());
        if input.ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids", group.rank(), input.ids.len())));
        }
        check_vocab(&input.ids, self.cfg.vocab_size)?;
        let segment = input.run.segment_len.unwrap_or_else(|| self.cfg.default_segment_len());
        let mut x = self.embed.forward(&input.ids)?;
        let run = input.run.layers_to_run(self.layers.len())?;
        let d = self.cfg.d_model;
        let p = input.run.precision;
        for (l, layer) in self.layers.iter().enumerate().take(run) {
            x = match (&layer.compression, self.compressed) {
                (Some(c), Some((cmem_len, rate))) => {
                    let first = CompressiveMemory::empty(self.cfg.mem_len, cmem_len, rate, c.clone(), d)?;
                    segment_recurrence(group, plan, &x, segment, &first, &|m: &CompressiveMemory, seg| {
                        let context = Tensor::cat(&[&m.cmem, &m.mem], 0)?;
                        self.layer_step(layer, &context, seg, p)
                    })?
                }
                _ => {
                    let first = XlMemory::empty(self.cfg.mem_len, d)?;
                    segment_recurrence(group, plan, &x, segment, &first, &|m: &XlMemory, seg| self.layer_step(layer, &m.mem, seg, p))?
                }
            };
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        Ok(x)
    }
}
