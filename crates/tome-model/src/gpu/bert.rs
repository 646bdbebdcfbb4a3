//! The BERT family on a GPU rank (BERT, RoBERTa, MiniLM, Longformer, BigBird): the layer stack
//! of `crate::bert` with every activation on the device — embeddings and norms by tome's
//! kernels, projections by cuBLAS (no TF32), attention by tome's kernel over the ring, the
//! window halo with Longformer's global tokens, or BigBird's blocks. The rank's hidden rows
//! leave the device at the end.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::Precision;
use tome_dist::{Group, ShardPlan};
use tome_gpu::layers::Activation;

use super::attention::{attend_rows, without_rows, Globals, Pattern, Shard};
use super::{DeviceLinear, DeviceNorm, GpuRank};
use crate::bert::{BertModel, ShardRows};
use crate::config::{Activation as Act, LayerAttention};
use crate::document::ShardInput;
use crate::error::{ModelError, Result};

/// One layer's weights on a GPU.
pub(crate) struct LayerWeights {
    query: DeviceLinear,
    key: DeviceLinear,
    value: DeviceLinear,
    attn_out: DeviceLinear,
    attn_norm: DeviceNorm,
    intermediate: DeviceLinear,
    output: DeviceLinear,
    out_norm: DeviceNorm,
    /// Longformer's global projections (`query_global`, `key_global`, `value_global`).
    global: Option<[DeviceLinear; 3]>,
}

/// A BERT-family model's weights on a GPU.
pub(crate) struct BertWeights {
    word: CudaSlice<f32>,
    position: CudaSlice<f32>,
    token_type: CudaSlice<f32>,
    embed_norm: DeviceNorm,
    layers: Vec<LayerWeights>,
}

impl BertWeights {
    fn upload(model: &BertModel, rank: &GpuRank, precision: Precision) -> Result<Self> {
        let eps = model.cfg.layer_norm_eps;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    query: DeviceLinear::upload(rank, l.query.f32(), precision)?,
                    key: DeviceLinear::upload(rank, l.key.f32(), precision)?,
                    value: DeviceLinear::upload(rank, l.value.f32(), precision)?,
                    attn_out: DeviceLinear::upload(rank, l.attn_out.f32(), precision)?,
                    attn_norm: DeviceNorm::upload(rank, &l.attn_norm, eps)?,
                    intermediate: DeviceLinear::upload(rank, l.intermediate.f32(), precision)?,
                    output: DeviceLinear::upload(rank, l.output.f32(), precision)?,
                    out_norm: DeviceNorm::upload(rank, &l.out_norm, eps)?,
                    global: l
                        .global
                        .as_ref()
                        .map(|(q, k, v)| {
                            Ok::<_, ModelError>([
                                DeviceLinear::upload(rank, q.f32(), precision)?,
                                DeviceLinear::upload(rank, k.f32(), precision)?,
                                DeviceLinear::upload(rank, v.f32(), precision)?,
                            ])
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(BertWeights {
            word: rank.upload_tensor(model.word.embeddings())?,
            position: rank.upload_tensor(model.position.embeddings())?,
            token_type: rank.upload_tensor(model.token_type.embeddings())?,
            embed_norm: DeviceNorm::upload(rank, &model.embed_norm, eps)?,
            layers,
        })
    }
}

/// What a GPU rank of this model refuses, by name, before any work.
fn check(model: &BertModel, input: &ShardInput) -> Result<Activation> {
    let family = model.cfg.model_type.name();
    if let Some(other) = input.layers.iter().find(|l| !matches!(l, LayerAttention::Dense | LayerAttention::Window { .. } | LayerAttention::BlockSparse { .. })) {
        return Err(ModelError::Unsupported(format!("{family}: `{other}` attention does not run on a GPU rank yet (dense, window and block-sparse attention do)")));
    }
    match model.cfg.hidden_act {
        Act::GeluErf => Ok(Activation::Gelu),
        Act::GeluTanh => Ok(Activation::GeluTanh),
        Act::Relu => Ok(Activation::Relu),
        Act::Silu => Err(ModelError::Unsupported(format!("{family}: the silu activation does not run on a GPU rank yet"))),
    }
}

/// `x Wᵀ + b` split into heads `[heads, rows, d]`, as attention takes them in `precision`.
fn project_heads(rank: &GpuRank, x: &CudaSlice<f32>, layer: &DeviceLinear, rows: usize, heads: usize, precision: Precision) -> Result<CudaSlice<f32>> {
    let y = layer.forward(rank, x, Activation::Identity)?;
    let mut out = rank.zeros(y.len())?;
    rank.layers.split_heads(&y, rows, heads, layer.out / heads, &mut out)?;
    rank.attention_input(&mut out, precision)?;
    Ok(out)
}

impl BertModel {
    /// [`crate::Architecture::forward`] on `rank`'s GPU.
    pub(crate) fn forward_on_gpu(&self, rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let act = check(self, input)?;
        let ShardRows { padded, positions, ids, pos_ids, valid, n } = self.shard_rows(plan, input, group.rank())?;
        let (rows, hidden) = (positions.len(), self.cfg.hidden_size);
        let (heads, d) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let layers = input.run.layers_to_run(self.layers.len())?;
        let pattern = |l: usize| match input.layers[l] {
            LayerAttention::Dense => Ok(Pattern::Dense { causal: false }),
            LayerAttention::Window { one_sided } if input.global_tokens.is_empty() => Ok(Pattern::Window { one_sided, causal: false }),
            LayerAttention::Window { one_sided } => Ok(Pattern::Global { one_sided, globals: Globals { positions: &input.global_tokens, projections: None } }),
            LayerAttention::BlockSparse { block, random } => Ok(Pattern::BlockSparse { block, random }),
            other => Err(ModelError::Unsupported(format!("`{other}` attention on a GPU rank"))),
        };
        if rows == 0 {
            return without_rows(group, &padded, (0..layers).map(|l| Ok((pattern(l)?, scale))), heads, d, hidden, after_layer);
        }
        let weights = self.on_gpus.on(rank, input.run.precision, |rank| BertWeights::upload(self, rank, input.run.precision))?;

        let word_scale = if self.cfg.rescale_embeddings { (hidden as f32).sqrt() } else { 1.0 };
        let mut embedded = rank.zeros(rows * hidden)?;
        rank.layers.embed(&ids, &pos_ids, &weights.word, &weights.position, &weights.token_type, word_scale, hidden, &mut embedded)?;
        let mut x = weights.embed_norm.apply(rank, &embedded)?;
        drop(embedded);

        for (l, w) in weights.layers.iter().enumerate().take(layers) {
            let precision = input.run.precision;
            let q = project_heads(rank, &x, &w.query, rows, heads, precision)?;
            let k = project_heads(rank, &x, &w.key, rows, heads, precision)?;
            let v = project_heads(rank, &x, &w.value, rows, heads, precision)?;
            // Global tokens' queries, keys and values come from their own projections where the
            // checkpoint has them (Longformer).
            let mut pattern = pattern(l)?;
            let global = match (&pattern, &w.global) {
                (Pattern::Global { .. }, Some([gq, gk, gv])) => Some([
                    project_heads(rank, &x, gq, rows, heads, precision)?,
                    project_heads(rank, &x, gk, rows, heads, precision)?,
                    project_heads(rank, &x, gv, rows, heads, precision)?,
                ]),
                _ => None,
            };
            if let (Pattern::Global { globals, .. }, Some([gq, gk, gv])) = (&mut pattern, &global) {
                globals.projections = Some([gq, gk, gv]);
            }
            let shard = Shard { q: &q, k: &k, v: &v, pos: &positions, valid: &valid, heads, kv_heads: heads, head_dim: d, precision };
            let merged = attend_rows(rank, group, &padded, &shard, pattern, scale)?;
            drop((q, k, v, global));
            let h = w.attn_norm.apply(rank, &w.attn_out.forward_residual(rank, &merged, &x)?)?;
            drop(merged);
            let inner = w.intermediate.forward(rank, &h, act)?;
            x = w.out_norm.apply(rank, &w.output.forward_residual(rank, &inner, &h)?)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        let mut values = rank.download(&x)?;
        values.truncate(n * hidden);
        Ok(Tensor::from_vec(values, (n, hidden), &Device::Cpu)?)
    }
}
