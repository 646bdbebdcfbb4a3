//! BERT-family encoders (Devlin et al. 2019, BERT; Liu et al. 2019, RoBERTa positions), run
//! sequence-parallel: each rank embeds and transforms its own tokens, and each layer's attention
//! is a tome-dist operator (`dense` ring attention or `window` with global tokens, Longformer
//! style), so any number of ranks gives the one-rank result.
//!
//! Mirrors Hugging Face `modeling_bert.py` (post-LN layers, erf GELU) and its weight names; the
//! checkpoint may carry a `bert.`/`roberta.` prefix (e.g. saved from `BertForMaskedLM`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use tome_attn::blocksparse::{BlockSparsePlan, RandomBlocks};
use tome_attn::Precision;
use tome_dist::ops::{blocksparse_attention, favor_attention, ring_attention, window_attention, DenseSpec, FavorSpec, GlobalTokens, KeyBlock, WindowSpec};
use tome_dist::{Group, ShardPlan};

use crate::config::{BertConfig, EncodeOptions, LayerAttention, PositionExtension};
use crate::document::{padded_plan, Prepared, ShardInput};
use crate::error::{weights, ModelError, Result};
use crate::heads::{project_heads, window_rows};
use crate::linear::{linear, linear_b, Linear};
use crate::model::{Architecture, Shape};
use crate::registry::ModelType;

/// Token rows per feed-forward block (bounds the intermediate activation's memory).
const FFN_ROWS: usize = 2048;

/// Tokens per chunk of causal FAVOR+'s prefix computation.
const FAVOR_CHUNK: usize = 64;

pub struct BertModel {
    pub(crate) cfg: BertConfig,
    pub(crate) word: Embedding,
    pub(crate) position: Embedding,
    pub(crate) token_type: Embedding,
    pub(crate) embed_norm: LayerNorm,
    pub(crate) layers: Vec<BertLayer>,
    /// The weights on each GPU that has run this model.
    pub(crate) on_gpus: crate::gpu::DeviceWeights<crate::gpu::bert::BertWeights>,
}

pub(crate) struct BertLayer {
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    /// Longformer's separate projections for global attention (`query_global`, `key_global`,
    /// `value_global`); BERT and RoBERTa reuse `query`, `key`, `value`.
    pub(crate) global: Option<(Linear, Linear, Linear)>,
    /// The Performer encoder's FAVOR+ projection `[features, head_dim]`.
    pub(crate) projection: Option<Tensor>,
    pub(crate) attn_out: Linear,
    pub(crate) attn_norm: LayerNorm,
    pub(crate) intermediate: Linear,
    pub(crate) output: Linear,
    pub(crate) out_norm: LayerNorm,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = vb.prefix();
        let name = |s: &str| format!("{p}.{s}");
        Ok(BertLayer {
            query: weights(linear_b(h, h, cfg.use_bias, vb.pp("attention.self.query")), name("attention.self.query"))?,
            key: weights(linear_b(h, h, cfg.use_bias, vb.pp("attention.self.key")), name("attention.self.key"))?,
            value: weights(linear_b(h, h, cfg.use_bias, vb.pp("attention.self.value")), name("attention.self.value"))?,
            projection: match cfg.nb_features.filter(|_| cfg.model_type == ModelType::Performer) {
                Some(m) => Some(weights(vb.get((m, cfg.head_dim()), "attention.self.projection_matrix"), name("attention.self.projection_matrix"))?),
                None => None,
            },
            global: if cfg.model_type == ModelType::Longformer {
                let g = |part: &str| weights(linear(h, h, vb.pp(format!("attention.self.{part}"))), name(&format!("attention.self.{part}")));
                Some((g("query_global")?, g("key_global")?, g("value_global")?))
            } else {
                None
            },
            attn_out: weights(linear(h, h, vb.pp("attention.output.dense")), name("attention.output.dense"))?,
            attn_norm: weights(layer_norm(h, eps, vb.pp("attention.output.LayerNorm")), name("attention.output.LayerNorm"))?,
            intermediate: weights(linear(h, i, vb.pp("intermediate.dense")), name("intermediate.dense"))?,
            output: weights(linear(i, h, vb.pp("output.dense")), name("output.dense"))?,
            out_norm: weights(layer_norm(h, eps, vb.pp("output.LayerNorm")), name("output.LayerNorm"))?,
        })
    }
}

impl BertModel {
    /// Loads from a VarBuilder over the checkpoint, finding the weights with or without a
    /// `bert.` / `roberta.` prefix.
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = ["bert", "roberta", "longformer"].into_iter().find(|p| vb.contains_tensor(&format!("{p}.embeddings.word_embeddings.weight"))).map_or(vb.clone(), |p| vb.pp(p));
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let emb = |n: usize, part: &str| weights(embedding(n, h, e.pp(part)), format!("{}.{part}", e.prefix()));
        let layers = (0..cfg.num_hidden_layers).map(|i| BertLayer::load(vb.pp(format!("encoder.layer.{i}")), cfg)).collect::<Result<_>>()?;
        Ok(BertModel {
            word: emb(cfg.vocab_size, "word_embeddings")?,
            position: emb(cfg.max_position_embeddings, "position_embeddings")?,
            token_type: emb(cfg.type_vocab_size, "token_type_embeddings")?,
            embed_norm: weights(layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm")), format!("{}.LayerNorm", e.prefix()))?,
            layers,
            on_gpus: Default::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Runs the encoder on this rank's shard of `doc` and returns the shard's hidden states
    /// (`[shard, hidden]`) after the layers `doc.run` asks for (the last by default). `after_layer(l)` is called when layer `l` is done; returning false
    /// cancels the job.
    pub fn forward_shard(&self, group: &dyn Group, plan: &ShardPlan, doc: &Prepared, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        self.forward(group, plan, &doc.shard(plan, group.rank()), after_layer)
    }

    /// One layer on this rank's rows. Its output is written over its input `x`, which the
    /// layer takes: no second shard-sized tensor exists (see `finish`).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &BertLayer,
        group: &dyn Group,
        plan: &ShardPlan,
        x: Tensor,
        positions: &[i64],
        valid: &[bool],
        attn: LayerAttention,
        global_tokens: &[usize],
        precision: Precision,
    ) -> Result<Tensor> {
        // The rows are written in place, so they must be this layer's own (a copy only if not
        // contiguous; nothing else holds the input of a layer).
        let x = x.contiguous()?;
        let (n, hidden) = x.dims2()?;
        let (heads, hd) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        // Everything after attention is per token: run it in row blocks, so that no whole-shard
        // temporary (the 4x-wide intermediate above all) is ever allocated, and each block stays
        // in cache from projection to norm. A block's output goes over its own input rows: by
        // then nothing reads them again. Its queries and its residual have been taken, and so
        // have the keys and values of every row up to the block's end plus the window (the key
        // stream projects rows ahead of the queries, never behind; the other paths project the
        // whole shard before attention).
        let qkv = [layer.query.at(precision)?, layer.key.at(precision)?, layer.value.at(precision)?];
        let attn_out = layer.attn_out.at(precision)?;
        let finish = |start: usize, c: Tensor| -> Result<()> {
            let h = layer.attn_norm.forward(&attn_out.linear(&c, Some(&x.narrow(0, start, c.dim(0)?)?), |_| {})?)?;
            x.slice_set(&self.feed_forward(layer, &h, precision)?, 0, start)?;
            Ok(())
        };
        if let (LayerAttention::Window { one_sided }, true) = (attn, global_tokens.is_empty()) {
            // Without global tokens, queries go through attention and the rest of the layer a
            // row block at a time: the shard's queries and context never exist whole.
            let spec = WindowSpec { one_sided, causal: false, scale, precision };
            window_rows(group, plan, &x, qkv, heads, positions, valid, spec, FFN_ROWS, finish)?;
            return Ok(x);
        }
        let [q, k, v] = project_heads(&x, qkv, heads)?;
        let own = KeyBlock { k, v, pos: positions.to_vec(), valid: valid.to_vec() };
        let ctx = match attn {
            LayerAttention::Dense => ring_attention(group, &q, positions, own, DenseSpec { causal: false, scale, precision })?,
            LayerAttention::Window { one_sided } => {
                // Global queries and keys come from their own projections where the checkpoint
                // has them (Longformer), computed for this rank's rows; the operator picks the
                // global tokens' rows.
                let projections = match (&layer.global, global_tokens.is_empty()) {
                    (Some((gq, gk, gv)), false) => {
                        let [gq, gk, gv] = project_heads(&x, [gq.at(precision)?, gk.at(precision)?, gv.at(precision)?], heads)?;
                        Some((gq, gk, gv))
                    }
                    _ => None,
                };
                let globals = GlobalTokens { positions: global_tokens.to_vec(), projections };
                window_attention(group, plan, &q, own, WindowSpec { one_sided, causal: false, scale, precision }, Some(&globals))?
            }
            LayerAttention::BlockSparse { block, random } => {
                let pattern = BlockSparsePlan::new(plan.len(), block, heads, &RandomBlocks::AllZero(random))?;
                blocksparse_attention(group, plan, &q, own, &pattern, scale, precision)?
            }
            LayerAttention::Favor { causal, .. } => {
                let projection = layer.projection.clone().ok_or_else(|| ModelError::Unsupported("FAVOR+ needs a checkpoint with projection matrices".into()))?;
                // FAVOR+ scales inside its feature map (d^-1/4 on queries and keys).
                let spec = FavorSpec { projection, causal, chunk: FAVOR_CHUNK, rows: FFN_ROWS };
                favor_attention(group, plan, &q, &own.k, &own.v, &spec)?
            }
            LayerAttention::Native(native) => return Err(ModelError::Unsupported(format!("a BERT-family layer cannot run `{}` attention", native.name()))),
        };
        for start in (0..n).step_by(FFN_ROWS) {
            let rows = FFN_ROWS.min(n - start);
            finish(start, ctx.narrow(1, start, rows)?.transpose(0, 1)?.reshape((rows, hidden))?)?;
        }
        Ok(x)
    }

    fn feed_forward(&self, layer: &BertLayer, x: &Tensor, precision: Precision) -> Result<Tensor> {
        // Bias, activation and residual ride on the two GEMMs (`Projection::linear`).
        let activation = self.cfg.hidden_act;
        let inner = layer.intermediate.at(precision)?.linear(x, None, |xs| activation.apply_in_place(xs))?;
        Ok(layer.out_norm.forward(&layer.output.at(precision)?.linear(&inner, Some(x), |_| {})?)?)
    }
}

/// A rank's rows as a BERT-family layer stack takes them: the plan padded for block-sparse
/// layers, each row's global position, token id and position id, whether it is a real token
/// (padding is never attended to), and how many rows are the rank's own.
pub(crate) struct ShardRows {
    pub(crate) padded: ShardPlan,
    pub(crate) positions: Vec<i64>,
    pub(crate) ids: Vec<u32>,
    pub(crate) pos_ids: Vec<u32>,
    pub(crate) valid: Vec<bool>,
    pub(crate) n: usize,
}

impl BertModel {
    /// Checks rank `r`'s input against the model and the plan and lays out its rows.
    pub(crate) fn shard_rows(&self, plan: &ShardPlan, input: &ShardInput, r: usize) -> Result<ShardRows> {
        let positions = plan.positions(r);
        let n = positions.len();
        if input.ids.len() != n || input.position_ids.len() != n || input.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "rank {r} owns {n} tokens of {} layers but was given {} ids, {} positions and {} layers",
                self.layers.len(),
                input.ids.len(),
                input.position_ids.len(),
                input.layers.len()
            )));
        }
        crate::model::check_vocab(&input.ids, self.cfg.vocab_size)?;
        if let Some(&bad) = input.position_ids.iter().find(|&&p| p as usize >= self.cfg.max_position_embeddings) {
            return Err(ModelError::Input(format!("position id {bad} is beyond the {} learned positions", self.cfg.max_position_embeddings)));
        }
        if input.global_tokens.windows(2).any(|w| w[1] <= w[0]) || input.global_tokens.last().is_some_and(|&g| g >= plan.len()) {
            return Err(ModelError::Input(format!("global tokens must ascend and lie within the {} tokens of the document", plan.len())));
        }
        // Block-sparse layers see whole blocks: as transformers, pad the document's end with
        // `pad_token_id` tokens that are never attended to, at the next positions, and drop
        // their rows at the end.
        let pad = match input.layers.iter().find_map(|l| if let LayerAttention::BlockSparse { block, .. } = l { Some(*block) } else { None }) {
            Some(block) => plan.len().next_multiple_of(block) - plan.len(),
            None => 0,
        };
        let padded = padded_plan(plan, pad)?;
        let positions = padded.positions(r);
        let rows = positions.len();
        let usable = self.cfg.usable_positions();
        let mut ids = input.ids.clone();
        ids.resize(rows, self.cfg.pad_token_id as u32);
        let mut pos_ids = input.position_ids.clone();
        pos_ids.extend((n..rows).map(|i| (((positions[i] as usize) % usable) + self.cfg.position_offset()) as u32));
        let valid: Vec<bool> = positions.iter().map(|&p| (p as usize) < plan.len()).collect();

        Ok(ShardRows { padded, positions, ids, pos_ids, valid, n })
    }
}

impl Architecture for BertModel {
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
    /// and values; embeddings, norms, residual sums and every partial in f32.
    fn precisions(&self) -> &'static [Precision] {
        Precision::CPU
    }

    fn shape(&self) -> Shape {
        let c = self.config();
        Shape {
            model_type: c.model_type.name().into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_attention_heads,
            memory_len: 0,
            num_layers: c.num_hidden_layers,
            vocab_size: c.vocab_size,
            max_positions: Some(c.usable_positions()),
            layer_attention: c.layer_attention().map(|l| l.iter().map(|a| a.to_string()).collect()).unwrap_or_default(),
            causal: false,
        }
    }

    /// Checks a whole document against the model and options and derives per-token positions
    /// (done once, before sharding: RoBERTa positions count the non-padding tokens before each).
    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        let cfg = &self.cfg;
        if ids.is_empty() {
            return Err(ModelError::Input("the document has no tokens".into()));
        }
        crate::model::check_vocab(&ids, cfg.vocab_size)?;
        let usable = cfg.usable_positions();
        let offset = cfg.position_offset();
        // RoBERTa-style models count positions past padding tokens; BERT-style ones number
        // every token.
        let roberta = cfg.position_offset() != 0;
        let mut position_ids = Vec::with_capacity(ids.len());
        let mut counted = 0usize;
        for &id in &ids {
            if roberta && id as usize == cfg.pad_token_id {
                position_ids.push(cfg.pad_token_id as u32);
                continue;
            }
            let p = if roberta { counted } else { position_ids.len() };
            counted += 1;
            let p = match opts.position_extension {
                PositionExtension::Tile => p % usable,
                PositionExtension::Refuse if p < usable => p,
                PositionExtension::Refuse => {
                    return Err(ModelError::Input(format!(
                        "the document has {} tokens but the model has learned {usable} positions; {}",
                        ids.len(),
                        crate::config::ASK_FOR_TILED_POSITIONS
                    )))
                }
            };
            position_ids.push((p + offset) as u32);
        }
        let mut layers = match opts.attention {
            Some(a) => vec![a; cfg.num_hidden_layers],
            None => cfg.layer_attention()?,
        };
        if let Some(&LayerAttention::BlockSparse { block, random }) = layers.iter().find(|l| matches!(l, LayerAttention::BlockSparse { .. })) {
            // As transformers: a sequence no longer than what one block row attends to runs
            // full attention, and block-sparse attention needs whole blocks.
            // Longer ones are padded to whole blocks (in `forward`, on the rank holding the end).
            let padded = ids.len().next_multiple_of(block);
            if ids.len() <= (5 + 2 * random) * block {
                layers = vec![LayerAttention::Dense; cfg.num_hidden_layers];
            } else if opts.position_extension == PositionExtension::Refuse && padded > usable {
                return Err(ModelError::Input(format!(
                    "the document has {} tokens, padded to {padded} for blocks of {block}; the model has learned {usable} positions",
                    ids.len()
                )));
            }
        }
        if !opts.global_tokens.is_empty() {
            if !layers.iter().any(|l| matches!(l, LayerAttention::Window { .. })) {
                return Err(ModelError::Input("global tokens need window attention (dense attention already sees every token)".into()));
            }
            let mut g = opts.global_tokens.clone();
            g.sort_unstable();
            g.dedup();
            if let Some(&last) = g.last().filter(|&&l| l >= ids.len()) {
                return Err(ModelError::Input(format!("global token {last} is outside the document of {} tokens", ids.len())));
            }
        }
        let mut global_tokens = opts.global_tokens.clone();
        global_tokens.sort_unstable();
        global_tokens.dedup();
        Ok(Prepared { ids, position_ids, layers, global_tokens, run: crate::model::plain_run(opts) })
    }

    /// As [`BertModel::forward_shard`], from the rank's [`ShardInput`] alone.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let dev = Device::Cpu;
        let ShardRows { padded, positions, ids, pos_ids, valid, n } = self.shard_rows(plan, input, group.rank())?;
        let rows = positions.len();

        // The embeddings, a block of rows at a time, written into the first layer's input: the
        // whole shard's word, position and type embeddings and their sums never exist at once.
        let mut x = Tensor::zeros((rows, self.cfg.hidden_size), DType::F32, &dev)?;
        for start in (0..rows).step_by(FFN_ROWS) {
            let len = FFN_ROWS.min(rows - start);
            let ids = Tensor::from_slice(&ids[start..start + len], len, &dev)?;
            let pos_ids = Tensor::from_slice(&pos_ids[start..start + len], len, &dev)?;
            let types = Tensor::zeros(len, DType::U32, &dev)?;
            let mut words = self.word.forward(&ids)?;
            if self.cfg.rescale_embeddings {
                words = (words * (self.cfg.hidden_size as f64).sqrt())?;
            }
            let embedded = ((words + self.position.forward(&pos_ids)?)? + self.token_type.forward(&types)?)?;
            x.slice_set(&self.embed_norm.forward(&embedded)?, 0, start)?;
        }
        for (l, layer) in self.layers.iter().enumerate().take(input.run.layers_to_run(self.layers.len())?) {
            x = self.layer_forward(layer, group, &padded, x, &positions, &valid, input.layers[l], &input.global_tokens, input.run.precision)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        Ok(x.narrow(0, 0, n)?)
    }
}
