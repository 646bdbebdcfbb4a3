//! A linear layer in each precision a model runs: the checkpoint's f32 weights, and their bf16
//! packing, made when a bf16 run first asks for it and kept for the runs after.

use std::sync::OnceLock;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use tome_attn::bf16::PackedBf16;
use tome_attn::projection::Projection;
use tome_attn::{Precision, Result};

/// A `[out, in]` weight and optional bias, readable as f32 or as bf16.
pub struct Linear {
    f32: candle_nn::Linear,
    bf16: OnceLock<PackedBf16>,
}

impl Linear {
    /// The checkpoint's layer; its bf16 packing is made when first asked for.
    pub fn new(f32: candle_nn::Linear) -> Self {
        Linear { f32, bf16: OnceLock::new() }
    }

    /// The checkpoint's f32 layer.
    pub fn f32(&self) -> &candle_nn::Linear {
        &self.f32
    }

    /// The weights as a `precision` run's products read them; a bf16 run packs them the first
    /// time (ranks asking at once may each pack; one packing is kept).
    pub fn at(&self, precision: Precision) -> Result<Projection<'_>> {
        let bias = self.f32.bias();
        Ok(match precision {
            Precision::F32 => Projection::F32 { weight: self.f32.weight(), bias },
            Precision::Bf16 => {
                let weight = match self.bf16.get() {
                    Some(packed) => packed,
                    None => {
                        let packed = PackedBf16::from_tensor(self.f32.weight())?;
                        self.bf16.get_or_init(|| packed)
                    }
                };
                Projection::Bf16 { weight, bias }
            }
            Precision::F16 => return Err(f16_on_a_cpu()),
        })
    }

    /// `x Wᵀ + b` (`x` `[n, in]`) in `precision`: f32 through candle's layer, exactly as the
    /// f32 path has always run; bf16 through the packed product, f32 out.
    pub fn forward_at(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        match precision {
            Precision::F32 => Ok(self.f32.forward(x)?),
            Precision::Bf16 => Ok(self.at(precision)?.linear(x, None, |_| {})?),
            Precision::F16 => Err(f16_on_a_cpu()),
        }
    }
}

/// Queries, keys or values as attention takes them in `precision`: as they are in f32, each
/// value rounded to bf16 (nearest even) in bf16.
pub fn attention_input(t: Tensor, precision: Precision) -> Result<Tensor> {
    match precision {
        Precision::F32 => Ok(t),
        Precision::Bf16 => tome_attn::bf16::round_tensor(&t),
        Precision::F16 => Err(f16_on_a_cpu()),
    }
}

/// f16 on a CPU rank, which `Model::forward` refuses by name before any layer runs.
fn f16_on_a_cpu() -> tome_attn::AttnError {
    tome_attn::AttnError::Precondition { kernel: "cpu projection", msg: "f16 runs on GPU ranks only; CPU ranks compute in f32 or bf16".into() }
}

/// candle's `linear_b` (a `[out, in]` weight, a bias when `bias`), as a [`Linear`].
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb).map(Linear::new)
}

/// candle's `linear` (weight and bias), as a [`Linear`].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::new)
}

/// candle's `linear_no_bias`, as a [`Linear`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::new)
}
