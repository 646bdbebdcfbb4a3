//! GPT-2 on a GPU rank: pre-norm blocks of causal dense attention (the ring, blocks above a
//! rank's last query skipped) and a tanh-GELU MLP, in f32 with every activation on the device;
//! the final layer norm when the last layer runs. The rank's hidden rows come back for the LM
//! head (log-probabilities) and pooling, as on the CPU.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use tome_attn::Precision;
use tome_dist::{Group, ShardPlan};
use tome_gpu::layers::Activation;

use super::attention::{attend_rows, without_rows, Pattern, Shard};
use super::{DeviceLinear, DeviceNorm, GpuRank};
use crate::document::ShardInput;
use crate::error::{ModelError, Result};
use crate::gpt2::Gpt2Model;
use crate::model::check_learned_positions;

/// One block's weights on a GPU.
pub(crate) struct BlockWeights {
    ln_1: DeviceNorm,
    c_attn: DeviceLinear,
    c_proj: DeviceLinear,
    ln_2: DeviceNorm,
    c_fc: DeviceLinear,
    mlp_proj: DeviceLinear,
    scale: f32,
}

/// GPT-2's weights on a GPU.
pub(crate) struct Gpt2Weights {
    wte: CudaSlice<f32>,
    wpe: CudaSlice<f32>,
    /// The embedding's third table, zeros (GPT-2 has no token types).
    no_type: CudaSlice<f32>,
    blocks: Vec<BlockWeights>,
    ln_f: DeviceNorm,
}

impl Gpt2Weights {
    fn upload(model: &Gpt2Model, rank: &GpuRank, precision: Precision) -> Result<Self> {
        let eps = model.cfg.layer_norm_epsilon;
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockWeights {
                    ln_1: DeviceNorm::upload(rank, &b.ln_1, eps)?,
                    c_attn: DeviceLinear::upload(rank, b.c_attn.f32(), precision)?,
                    c_proj: DeviceLinear::upload(rank, b.c_proj.f32(), precision)?,
                    ln_2: DeviceNorm::upload(rank, &b.ln_2, eps)?,
                    c_fc: DeviceLinear::upload(rank, b.c_fc.f32(), precision)?,
                    mlp_proj: DeviceLinear::upload(rank, b.mlp_proj.f32(), precision)?,
                    scale: b.scale,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2Weights {
            wte: rank.upload_tensor(model.wte.embeddings())?,
            wpe: rank.upload_tensor(model.wpe.embeddings())?,
            no_type: rank.zeros(model.cfg.n_embd)?,
            blocks,
            ln_f: DeviceNorm::upload(rank, &model.ln_f, eps)?,
        })
    }
}

impl Gpt2Model {
    /// [`crate::Architecture::forward`] on `rank`'s GPU.
    pub(crate) fn forward_on_gpu(&self, rank: &GpuRank, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let positions = check_learned_positions("GPT-2", cfg.vocab_size, cfg.n_positions, group.rank(), plan, input)?;
        let (n, d, heads) = (positions.len(), cfg.n_embd, cfg.n_head);
        let hd = d / heads;
        let run = input.run.layers_to_run(self.blocks.len())?;
        if n == 0 {
            let layers = self.blocks.iter().take(run).map(|b| Ok((Pattern::Dense { causal: true }, b.scale)));
            return without_rows(group, plan, layers, heads, hd, d, after_layer);
        }
        let w = self.on_gpus.on(rank, input.run.precision, |rank| Gpt2Weights::upload(self, rank, input.run.precision))?;
        let mut x = rank.zeros(n * d)?;
        rank.layers.embed(&input.ids, &input.position_ids, &w.wte, &w.wpe, &w.no_type, 1.0, d, &mut x)?;
        let valid = vec![true; n];
        for (l, b) in w.blocks.iter().enumerate().take(run) {
            let qkv = b.c_attn.forward(rank, &b.ln_1.apply(rank, &x)?, Activation::Identity)?;
            let part = |i: usize| -> Result<CudaSlice<f32>> {
                let mut out = rank.zeros(n * d)?;
                rank.layers.split_heads_at(&qkv, n, heads, hd, 3 * d, i * d, &mut out)?;
                rank.attention_input(&mut out, input.run.precision)?;
                Ok(out)
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            drop(qkv);
            let shard = Shard { q: &q, k: &k, v: &v, pos: &positions, valid: &valid, heads, kv_heads: heads, head_dim: hd, precision: input.run.precision };
            let merged = attend_rows(rank, group, plan, &shard, Pattern::Dense { causal: true }, b.scale)?;
            drop((q, k, v));
            x = b.c_proj.forward_residual(rank, &merged, &x)?;
            drop(merged);
            let inner = b.c_fc.forward(rank, &b.ln_2.apply(rank, &x)?, Activation::GeluTanh)?;
            x = b.mlp_proj.forward_residual(rank, &inner, &x)?;
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
