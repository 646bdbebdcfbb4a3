//! Llama on a GPU rank: pre-norm blocks with RMS norms, rotary positions on queries and keys,
//! grouped-query causal attention over the ring, and the SwiGLU MLP, in f32 with every
//! activation on the device; the final RMS norm when the last layer runs.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::Precision;
use tome_dist::{Group, ShardPlan};
use tome_gpu::layers::Activation;

use super::attention::{attend_rows, without_rows, Pattern, Shard};
use super::{DeviceLinear, GpuRank};
use crate::document::ShardInput;
use crate::error::{ModelError, Result};
use crate::llama::{rotary, LlamaModel};
use crate::model::check_vocab;

/// An RMS norm on the device.
struct DeviceRmsNorm {
    gamma: CudaSlice<f32>,
    eps: f32,
}

impl DeviceRmsNorm {
    fn upload(rank: &GpuRank, norm: &candle_nn::RmsNorm) -> Result<Self> {
        Ok(DeviceRmsNorm { gamma: rank.upload_tensor(norm.weight())?, eps: norm.eps() as f32 })
    }

    fn apply(&self, rank: &GpuRank, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut out = rank.zeros(x.len())?;
        rank.layers.rms_norm(x, &self.gamma, self.eps, &mut out)?;
        Ok(out)
    }
}

/// One layer's weights on a GPU.
pub(crate) struct LayerWeights {
    input_norm: DeviceRmsNorm,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    o: DeviceLinear,
    post_norm: DeviceRmsNorm,
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
}

/// Llama's weights on a GPU.
pub(crate) struct LlamaWeights {
    embed: CudaSlice<f32>,
    /// The embedding kernel's position and type tables: one row of zeros (Llama's positions are
    /// rotary).
    zeros: CudaSlice<f32>,
    layers: Vec<LayerWeights>,
    norm: DeviceRmsNorm,
}

impl LlamaWeights {
    fn upload(model: &LlamaModel, rank: &GpuRank, precision: Precision) -> Result<Self> {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_norm: DeviceRmsNorm::upload(rank, &l.input_norm)?,
                    q: DeviceLinear::upload(rank, l.q.f32(), precision)?,
                    k: DeviceLinear::upload(rank, l.k.f32(), precision)?,
                    v: DeviceLinear::upload(rank, l.v.f32(), precision)?,
                    o: DeviceLinear::upload(rank, l.o.f32(), precision)?,
                    post_norm: DeviceRmsNorm::upload(rank, &l.post_norm)?,
                    gate: DeviceLinear::upload(rank, l.gate.f32(), precision)?,
                    up: DeviceLinear::upload(rank, l.up.f32(), precision)?,
                    down: DeviceLinear::upload(rank, l.down.f32(), precision)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(LlamaWeights {
            embed: rank.upload_tensor(model.embed.embeddings())?,
            zeros: rank.zeros(model.cfg.hidden_size)?,
            layers,
            norm: DeviceRmsNorm::upload(rank, &model.norm)?,
        })
    }
}

impl LlamaModel {
    /// [`crate::Architecture::forward`] on `rank`'s GPU.
    pub(crate) fn forward_on_gpu(&self, rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let positions = plan.positions(group.rank());
        let n = positions.len();
        if input.ids.len() != n || input.position_ids.len() != n {
            return Err(ModelError::Input(format!("rank {} owns {n} tokens but was given {} ids and {} positions", group.rank(), input.ids.len(), input.position_ids.len())));
        }
        check_vocab(&input.ids, cfg.vocab_size)?;
        let (d, hd, heads, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        let scale = 1.0 / (hd as f32).sqrt();
        let run = input.run.layers_to_run(self.layers.len())?;
        let pattern = Pattern::Dense { causal: true };
        if n == 0 {
            return without_rows(group, plan, (0..run).map(|_| Ok((pattern, scale))), kv, hd, d, after_layer);
        }
        let w = self.on_gpus.on(rank, input.run.precision, |rank| LlamaWeights::upload(self, rank, input.run.precision))?;
        let (cos, sin) = rotary(&self.inv_freq, &input.position_ids)?;
        let (cos, sin) = (rank.upload_tensor(&cos)?, rank.upload_tensor(&sin)?);
        let mut x = rank.zeros(n * d)?;
        rank.layers.embed(&input.ids, &vec![0; n], &w.embed, &w.zeros, &w.zeros, 1.0, d, &mut x)?;
        let valid = vec![true; n];
        let heads_of = |x: &CudaSlice<f32>, layer: &DeviceLinear, h: usize, rotate: bool| -> Result<CudaSlice<f32>> {
            let rows = layer.forward(rank, x, Activation::Identity)?;
            let mut out = rank.zeros(rows.len())?;
            rank.layers.split_heads(&rows, n, h, hd, &mut out)?;
            if rotate {
                rank.layers.rope(&mut out, &cos, &sin, h, n, hd)?;
            }
            rank.attention_input(&mut out, input.run.precision)?;
            Ok(out)
        };
        for (l, lw) in w.layers.iter().enumerate().take(run) {
            let h = lw.input_norm.apply(rank, &x)?;
            let (q, k, v) = (heads_of(&h, &lw.q, heads, true)?, heads_of(&h, &lw.k, kv, true)?, heads_of(&h, &lw.v, kv, false)?);
            drop(h);
            let shard = Shard { q: &q, k: &k, v: &v, pos: &positions, valid: &valid, heads, kv_heads: kv, head_dim: hd, precision: input.run.precision };
            let merged = attend_rows(rank, group, plan, &shard, pattern, scale)?;
            drop((q, k, v));
            x = lw.o.forward_residual(rank, &merged, &x)?;
            drop(merged);
            let h = lw.post_norm.apply(rank, &x)?;
            let mut gate = lw.gate.forward(rank, &h, Activation::Identity)?;
            rank.layers.silu_mul(&mut gate, &lw.up.forward(rank, &h, Activation::Identity)?)?;
            x = lw.down.forward_residual(rank, &gate, &x)?;
            if !after_layer(l) {
                return Err(ModelError::Cancelled);
            }
        }
        if run == self.layers.len() {
            x = w.norm.apply(rank, &x)?;
        }
        Ok(Tensor::from_vec(rank.download(&x)?, (n, d), &Device::Cpu)?)
    }
}
