//! Ranks that compute on a GPU: a rank's handles on its GPU ([`GpuRank`]: its own stream, the
//! kernels, cuBLAS), a model's weights uploaded once per GPU ([`DeviceWeights`]), and the
//! attention of a shard whose queries, keys and values are on the device (`attention`). Only
//! results (the rank's hidden rows) and the frames between ranks leave the device.
//!
//! An architecture runs on a GPU by implementing `Architecture::forward_gpu`: the BERT family
//! (BERT, RoBERTa, MiniLM, Longformer, BigBird) with dense attention, window attention with or
//! without global tokens, and block-sparse attention,
//! GPT-2, GPT-Neo (its dense and local causal layers) and Llama (causal dense attention; its
//! grouped-query heads read their shared key and value heads in place), in f32, bf16 and f16
//! (weights and what enters a product or attention rounded to bf16 as on the CPU, or to f16,
//! products on tensor cores with f32 accumulation; norms, residuals and partials in f32). Every other architecture or family is refused on a GPU
//! rank by name.

mod attention;
pub(crate) mod bert;
pub mod footprint;
pub(crate) mod gpt2;
pub(crate) mod gpt_neo;
pub(crate) mod llama;
mod sparse;

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use tome_attn::Precision;
use tome_dist::DeviceFrame;
use tome_gpu::blas::{Blas, Half};
use tome_gpu::layers::{Activation, Layers};
use tome_gpu::{Gpu, GpuAttention, GpuError, GpuInfo};

pub use footprint::GpuFootprint;
pub use tome_gpu::DeviceSpec;

// A rank with no rows does no device work (the driver allocates no zero-sized buffer); it only
// takes part in its peers' exchanges: `attention::without_rows`.

use crate::error::{ModelError, Result};

/// One rank's handles on a GPU: a stream of its own (ranks sharing a GPU run side by side), the
/// kernels loaded on it and a cuBLAS handle bound to it.
pub struct GpuRank {
    info: GpuInfo,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) layers: Layers,
    pub(crate) attention: GpuAttention,
    pub(crate) blas: Blas,
    /// Frames of other ranks this rank has read, each kept until the event recorded after its
    /// reads completes ([`GpuRank::retire`]).
    retired: Mutex<Vec<(CudaEvent, DeviceFrame)>>,
}

/// Frames of other ranks a rank holds at most while its reads of them are under way.
const MAX_RETIRED: usize = 16;

/// Ranks' handles kept for the next job's ranks, by GPU: a cuBLAS handle's creation and
/// destruction (which waits for the whole device) and the modules' loading happen once per
/// handle, not once per rank of every job.
static IDLE: Mutex<Vec<GpuRank>> = Mutex::new(Vec::new());

/// A [`GpuRank`] held by one rank of a job, given back for reuse when dropped (its stream's
/// work finished first).
pub struct LeasedRank(ManuallyDrop<GpuRank>);

impl std::ops::Deref for LeasedRank {
    type Target = GpuRank;

    fn deref(&self) -> &GpuRank {
        &self.0
    }
}

impl Drop for LeasedRank {
    fn drop(&mut self) {
        // SAFETY: the handles are taken once, here, and the lease is not used after.
        let rank = unsafe { ManuallyDrop::take(&mut self.0) };
        // Waited for before the pool is locked: one stuck stream holds up no other lease.
        let finished = rank.stream.synchronize().is_ok();
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if finished {
            rank.retired.lock().unwrap_or_else(|p| p.into_inner()).clear();
            idle.push(rank);
        } else {
            // A stream that cannot finish its work means a fault in the GPU's context, which
            // every handle on that GPU shares: none of them is given to another job.
            idle.retain(|r| r.info.index != rank.info.index);
        }
    }
}

impl GpuRank {
    /// A rank's handles on GPU `index`: an idle one if there is, else newly opened.
    pub fn lease(index: usize) -> Result<LeasedRank> {
        let idle = {
            let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter().position(|r| r.info.index == index).map(|at| idle.swap_remove(at))
        };
        Ok(LeasedRank(ManuallyDrop::new(match idle {
            Some(rank) => rank,
            None => GpuRank::open(index)?,
        })))
    }

    /// Opens GPU `index` for one rank, compiling the kernels the first time in the process.
    pub fn open(index: usize) -> Result<Self> {
        let gpu = Gpu::open(index)?;
        let stream = gpu.new_stream()?;
        let info = gpu.info()?;
        Ok(GpuRank {
            layers: Layers::new(&gpu, stream.clone())?,
            attention: GpuAttention::new(&gpu, stream.clone())?,
            blas: Blas::new(stream.clone())?,
            info,
            stream,
            retired: Mutex::default(),
        })
    }

    /// Lets go of a frame this rank has read on its stream, once those reads are done: a buffer
    /// another stream made is freed there, after the last read that stream's record names, so
    /// a frame holding one is kept, with an event recorded now, until the event completes
    /// (checked here, at each call). No stream waits on another's work for it.
    pub(crate) fn retire(&self, frame: DeviceFrame) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        // Past MAX_RETIRED frames held, wait for the oldest reads rather than hold more.
        if retired.len() >= MAX_RETIRED && retired[0].0.synchronize().is_err() {
            let _ = self.stream.synchronize();
            retired.clear();
        }
        retired.retain(|(read, _)| read.try_is_complete().unwrap_or(false));
        let mine = |t: &tome_dist::DeviceTensor| t.stream().is_none_or(|s| s.cu_stream() == self.stream.cu_stream());
        if frame.iter().all(mine) {
            return;
        }
        match self.stream.record_event(None) {
            Ok(read) => retired.push((read, frame)),
            // No event to wait on (a fault in the GPU's context): wait for the reads instead.
            Err(_) => {
                let _ = self.stream.synchronize();
            }
        }
    }

    /// The GPU this rank runs on.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Refuses a precision this GPU cannot compute: bf16 products need compute capability 8.0
    /// (Ampere) or later.
    pub fn check_precision(&self, precision: Precision) -> Result<()> {
        if precision == Precision::Bf16 && self.info.compute_capability.0 < 8 {
            return Err(ModelError::Unsupported(format!(
                "bf16 on a GPU rank needs compute capability 8.0 or later; cuda:{} ({}) is {}",
                self.info.index,
                self.info.name,
                self.info.arch()
            )));
        }
        Ok(())
    }

    /// Rounds `x` to bf16 or f16 values in place where the run is in one (what attention takes).
    pub(crate) fn attention_input(&self, x: &mut CudaSlice<f32>, precision: Precision) -> Result<()> {
        match precision {
            Precision::F32 => Ok(()),
            Precision::Bf16 => Ok(self.layers.round_bf16(x)?),
            Precision::F16 => Ok(self.layers.round_f16(x)?),
        }
    }

    /// Copies `values` to the device.
    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(values).map_err(|e| gpu_err("copy to the GPU", e))
    }

    /// A tensor's values (f32) on the device.
    pub(crate) fn upload_tensor(&self, t: &Tensor) -> Result<CudaSlice<f32>> {
        self.upload(&t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
    }

    /// `len` zeros on the device.
    pub(crate) fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(len).map_err(|e| gpu_err("allocate", e))
    }

    /// A device buffer's values back on the host.
    pub(crate) fn download(&self, values: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(values).map_err(|e| gpu_err("copy from the GPU", e))
    }
}

pub(crate) fn gpu_err(op: &'static str, e: cudarc::driver::DriverError) -> ModelError {
    ModelError::Gpu(GpuError::Driver { op, msg: format!("{e:?}") })
}

impl Drop for GpuRank {
    /// Work still queued on the stream (a rank that failed or was cancelled mid-layer) finishes
    /// before its modules and cuBLAS handle go.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

/// A model's weights on each GPU that has run it: uploaded by the first rank there, shared by
/// every rank and job after.
pub(crate) struct DeviceWeights<W> {
    by_gpu: Mutex<HashMap<(usize, Precision), OnGpu<W>>>,
}

/// Weights on one GPU, with the context they live in.
type OnGpu<W> = (Arc<W>, Arc<CudaContext>);

impl<W> Drop for DeviceWeights<W> {
    /// Every stream that read the weights finishes before they are freed.
    fn drop(&mut self) {
        for (_, ctx) in self.by_gpu.get_mut().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = ctx.synchronize();
        }
    }
}

impl<W> Default for DeviceWeights<W> {
    fn default() -> Self {
        DeviceWeights { by_gpu: Mutex::new(HashMap::new()) }
    }
}

impl<W> DeviceWeights<W> {
    /// This GPU's weights for `precision` runs, uploaded with `upload` (and the copy finished)
    /// if they are not yet.
    pub(crate) fn on(&self, rank: &GpuRank, precision: Precision, upload: impl FnOnce(&GpuRank) -> Result<W>) -> Result<Arc<W>> {
        let mut held = self.by_gpu.lock().unwrap_or_else(|p| p.into_inner());
        let key = (rank.info.index, precision);
        if let Some((w, _)) = held.get(&key) {
            return Ok(w.clone());
        }
        let w = Arc::new(upload(rank)?);
        rank.stream.synchronize().map_err(|e| gpu_err("upload weights", e))?;
        held.insert(key, (w.clone(), rank.stream.context().clone()));
        Ok(w)
    }

    /// Frees the weights on GPU `gpu` in `precision` once every stream that read them has
    /// finished (ranks running still hold them until they end).
    pub(crate) fn release(&self, gpu: usize, precision: Precision) {
        let released = self.by_gpu.lock().unwrap_or_else(|p| p.into_inner()).remove(&(gpu, precision));
        if let Some((weights, ctx)) = released {
            let _ = ctx.synchronize();
            drop(weights);
        }
    }
}

/// A layer's `[out, in]` weights on the device as a run's products read them.
enum DeviceMatrix {
    F32(CudaSlice<f32>),
    /// bf16 bits (rounded as tome-attn rounds) or f16 bits: products on tensor cores, f32
    /// accumulation.
    Half(Half, CudaSlice<u16>),
}

/// The 16-bit operands of a run's products (`None`: f32).
pub(crate) fn operands(precision: Precision) -> Option<Half> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(Half::Bf16),
        Precision::F16 => Some(Half::F16),
    }
}

/// A linear layer on the device: its weights and the bias (f32), if any.
pub(crate) struct DeviceLinear {
    w: DeviceMatrix,
    pub(crate) b: Option<CudaSlice<f32>>,
    pub(crate) inp: usize,
    pub(crate) out: usize,
}

impl DeviceLinear {
    /// `layer` on the device, its weights in `precision`.
    pub(crate) fn upload(rank: &GpuRank, layer: &candle_nn::Linear, precision: Precision) -> Result<Self> {
        let (out, inp) = layer.weight().dims2()?;
        let w = match precision {
            Precision::F32 => DeviceMatrix::F32(rank.upload_tensor(layer.weight())?),
            Precision::Bf16 => {
                let values = layer.weight().flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
                DeviceMatrix::Half(Half::Bf16, rank.upload(&values.into_iter().map(tome_attn::bf16::to_bf16_bits).collect::<Vec<u16>>())?)
            }
            Precision::F16 => {
                // Rounded on the device, as the activations are (`half`'s rounding, bit for bit).
                let values = rank.upload_tensor(layer.weight())?;
                // SAFETY: `to_f16` writes every element.
                let mut bits = unsafe { rank.stream.alloc::<u16>(values.len()) }.map_err(|e| gpu_err("allocate", e))?;
                rank.layers.to_f16(&values, &mut bits)?;
                DeviceMatrix::Half(Half::F16, bits)
            }
        };
        Ok(DeviceLinear { w, b: layer.bias().map(|b| rank.upload_tensor(b)).transpose()?, inp, out })
    }

    /// `x Wᵀ` into a new buffer; in bf16 or f16, `x` rounded to it on its way in.
    fn product(&self, rank: &GpuRank, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let rows = x.len() / self.inp.max(1);
        // SAFETY: the product writes every element of `y` (beta = 0: nothing is read).
        let mut y = unsafe { rank.stream.alloc::<f32>(rows * self.out) }.map_err(|e| gpu_err("allocate", e))?;
        match &self.w {
            DeviceMatrix::F32(w) => rank.blas.linear(x, w, self.inp, self.out, &mut y)?,
            DeviceMatrix::Half(half, w) => {
                // SAFETY: the rounding writes every element before the product reads it.
                let mut x16 = unsafe { rank.stream.alloc::<u16>(x.len()) }.map_err(|e| gpu_err("allocate", e))?;
                match half {
                    Half::Bf16 => rank.layers.to_bf16(x, &mut x16)?,
                    Half::F16 => rank.layers.to_f16(x, &mut x16)?,
                }
                rank.blas.linear_half(*half, &x16, w, self.inp, self.out, &mut y)?;
            }
        }
        Ok(y)
    }

    /// `act(x Wᵀ + b)`.
    pub(crate) fn forward(&self, rank: &GpuRank, x: &CudaSlice<f32>, act: Activation) -> Result<CudaSlice<f32>> {
        let mut y = self.product(rank, x)?;
        match &self.b {
            Some(b) => rank.layers.bias_activation(&mut y, b, act)?,
            None if act == Activation::Identity => {}
            None => rank.layers.bias_activation(&mut y, &rank.zeros(self.out)?, act)?,
        }
        Ok(y)
    }

    /// `x Wᵀ + b + residual`.
    pub(crate) fn forward_residual(&self, rank: &GpuRank, x: &CudaSlice<f32>, residual: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut y = self.product(rank, x)?;
        match &self.b {
            Some(b) => rank.layers.bias_residual(&mut y, b, residual)?,
            None => rank.layers.bias_residual(&mut y, &rank.zeros(self.out)?, residual)?,
        }
        Ok(y)
    }
}

/// A layer norm on the device.
pub(crate) struct DeviceNorm {
    pub(crate) gamma: CudaSlice<f32>,
    pub(crate) beta: CudaSlice<f32>,
    pub(crate) eps: f32,
}

impl DeviceNorm {
    pub(crate) fn upload(rank: &GpuRank, norm: &candle_nn::LayerNorm, eps: f64) -> Result<Self> {
        let beta = norm.bias().ok_or_else(|| ModelError::Unsupported("a layer norm without a bias on a GPU rank".into()))?;
        Ok(DeviceNorm { gamma: rank.upload_tensor(norm.weight())?, beta: rank.upload_tensor(beta)?, eps: eps as f32 })
    }

    pub(crate) fn apply(&self, rank: &GpuRank, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut out = rank.zeros(x.len())?;
        rank.layers.layer_norm(x, &self.gamma, &self.beta, self.gamma.len(), self.eps, &mut out)?;
        Ok(out)
    }
}
