//! GPT-Neo on a GPU rank: GPT-2's pre-norm blocks with the layer mix of its config — dense
//! causal layers over the ring, local (causal window) layers over the halo — unscaled scores,
//! in f32 with every activation on the device; the final layer norm when the last layer runs.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::Precision;
use tome_dist::{Group, ShardPlan};
use tome_gpu::layers::Activation;

use super::attention::{attend_rows, without_rows, Pattern, Shard};
use super::{DeviceLinear, DeviceNorm, GpuRank};
use crate::config::LayerAttention;
use crate::document::ShardInput;
use crate::error::{ModelError, Result};
use crate::gpt_neo::GptNeoModel;
use crate::model::check_learned_positions;

/// One block's weights on a GPU.
pub(crate) struct BlockWeights {
    ln_1: DeviceNorm,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    out: DeviceLinear,
    ln_2: DeviceNorm,
    fc: DeviceLinear,
    proj: DeviceLinear,
}

/// GPT-Neo's weights on a GPU.
pub(crate) struct GptNeoWeights {
    wte: CudaSlice<f32>,
    wpe: CudaSlice<f32>,
    /// The embedding's third table, zeros (no token types).
    no_type: CudaSlice<f32>,
    blocks: Vec<BlockWeights>,
    ln_f: DeviceNorm,
}

impl GptNeoWeights {
    fn upload(model: &GptNeoModel, rank: &GpuRank, precision: Precision) -> Result<Self> {
        let eps = model.cfg.layer_norm_epsilon;
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockWeights {
                    ln_1: DeviceNorm::upload(rank, &b.ln_1, eps)?,
                    q: DeviceLinear::upload(rank, b.q.f32(), precision)?,
                    k: DeviceLinear::upload(rank, b.k.f32(), precision)?,
                    v: DeviceLinear::upload(rank, b.v.f32(), precision)?,
                    out: DeviceLinear::upload(rank, b.out.f32(), precision)?,
                    ln_2: DeviceNorm::upload(rank, &b.ln_2, eps)?,
                    fc: DeviceLinear::upload(rank, b.fc.f32(), precision)?,
                    proj: DeviceLinear::upload(rank, b.proj.f32(), precision)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GptNeoWeights {
            wte: rank.upload_tensor(model.wte.embeddings())?,
            wpe: rank.upload_tensor(model.wpe.embeddings())?,
            no_type: rank.zeros(model.cfg.hidden_size)?,
            blocks,
            ln_f: DeviceNorm::upload(rank, &model.ln_f, eps)?,
        })
    }
}

/// A GPT-Neo layer's attention on a GPU rank.
fn pattern(attention: LayerAttention) -> Result<Pattern<'static>> {
    match attention {
        LayerAttention::Dense => Ok(Pattern::Dense { causal: true }),
        LayerAttention::Window { one_sided } => Ok(Pattern::Window { one_sided, causal: true }),
        other => Err(ModelError::Unsupported(format!("GPT-Neo layers are dense or local, not `{other}`"))),
    }
}

impl GptNeoModel {
    /// [`crate::Architecture::forward`] on `rank`'s GPU.
    pub(crate) fn forward_on_gpu(&self, rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let positions = check_learned_positions("GPT-Neo", cfg.vocab_size, cfg.max_position_embeddings, group.rank(), plan, input)?;
        if !input.layers.iter().eq(self.blocks.iter().map(|b| &b.attention)) {
            return Err(ModelError::Input("the shard's layer attentions are not the ones GPT-Neo's config gives its layers".into()));
        }
        let (n, d, heads) = (positions.len(), cfg.hidden_size, cfg.num_heads);
        let hd = d / heads;
        let run = input.run.layers_to_run(self.blocks.len())?;
        if n == 0 {
            let layers = self.blocks.iter().take(run).map(|b| Ok((pattern(b.attention)?, 1.0)));
            return without_rows(group, plan, layers, heads, hd, d, after_layer);
        }
        let w = self.on_gpus.on(rank, input.run.precision, |rank| GptNeoWeights::upload(self, rank, input.run.precision))?;
        let mut x = rank.zeros(n * d)?;
        rank.layers.embed(&input.ids, &input.position_ids, &w.wte, &w.wpe, &w.no_type, 1.0, d, &mut x)?;
        let valid = vec![true; n];
        for (l, (b, block)) in w.blocks.iter().zip(&self.blocks).enumerate().take(run) {
            let h = b.ln_1.apply(rank, &x)?;
            let heads_of = |layer: &DeviceLinear| -> Result<CudaSlice<f32>> {
                let rows = layer.forward(rank, &h, Activation::Identity)?;
                let mut out = rank.zeros(rows.len())?;
                rank.layers.split_heads(&rows, n, heads, hd, &mut out)?;
                rank.attention_input(&mut out, input.run.precision)?;
                Ok(out)
            };
            let (q, k, v) = (heads_of(&b.q)?, heads_of(&b.k)?, heads_of(&b.v)?);
            drop(h);
            let shard = Shard { q: &q, k: &k, v: &v, pos: &positions, valid: &valid, heads, kv_heads: heads, head_dim: hd, precision: input.run.precision };
            // GPT-Neo does not scale its scores.
            let merged = attend_rows(rank, group, plan, &shard, pattern(block.attention)?, 1.0)?;
            drop((q, k, v));
            x = b.out.forward_residual(rank, &merged, &x)?;
            drop(merged);
            let inner = b.fc.forward(rank, &b.ln_2.apply(rank, &x)?, Activation::GeluTanh)?;
            x = b.proj.forward_residual(rank, &inner, &x)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        if run == self.blocks.len() {
            x = w.ln_f.apply(rank, &x)?;
        }
        Ok(Tensor::from_vec(rank.download(&x)?, (n, d), &Device::Cpu)?)
    }
}
