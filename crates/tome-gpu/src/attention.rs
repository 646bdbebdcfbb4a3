//! Attention partials on a GPU: `kernels/attention.cu` (CUDA cores, f32 arithmetic) and
//! `kernels/attention_mma.cu` (tensor cores, bf16 or f16 operands with f32 accumulation)
//! compiled for the GPU at hand, launched on device buffers, with the arguments and result of
//! `tome_attn::attention`.
//!
//! [`GpuAttention::launch`] works on buffers already on the GPU (what a device-resident layer
//! calls), [`GpuAttention::launch_tensor_cores`] likewise on tensor cores, and
//! [`GpuAttention::launch_in`] picks between them for a run's precision;
//! [`GpuAttention::attention`] takes host tensors and a [`Mask`], copies them over and returns a
//! host [`Partial`], for tests and benchmarks beside the CPU kernel.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use tome_attn::{Mask, Partial};

use crate::blas::Half;
use crate::device::Gpu;
use crate::error::{driver, GpuError, Result};
use crate::kernels::{ATTENTION, ATTENTION_MMA};

/// Query rows per thread block, threads per block, and the largest head size: as in the kernels
/// (`attention.cu`'s TOME_ROWS and TOME_THREADS, `attention_mma.cu`'s TOME_MMA_ROWS and
/// TOME_MMA_THREADS: 4 warps of 16 rows).
const ROWS: usize = 64;
const THREADS: u32 = 256;
const MMA_ROWS: usize = 64;
const MMA_THREADS: u32 = 128;
/// The compute capability `mma.m16n8k16` on bf16 and f16 operands needs (Ampere).
const MMA_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);
const MAX_HEAD_DIM: usize = 128;
/// Grid rows (query heads) a launch may have.
const MAX_HEADS: usize = 65_535;
/// Window widths are capped here so that position arithmetic in the kernel cannot overflow; a
/// wider window sees everything any real document holds.
const MAX_WINDOW: usize = 1 << 60;

const OP: &str = "gpu attention";

/// An element type the kernel reads: f32, or bf16 carried as its 16 bits.
pub trait AttentionElement: DeviceRepr {
    const ENTRY: &'static str;
}

impl AttentionElement for f32 {
    const ENTRY: &'static str = "tome_attention_f32";
}

/// bf16 as its bits (`half::bf16::to_bits`).
impl AttentionElement for u16 {
    const ENTRY: &'static str = "tome_attention_bf16";
}

/// The sizes of one call: `q` is `[heads, queries, head_dim]`, `k` and `v` are
/// `[kv_heads, keys, head_dim]` and `[kv_heads, keys, value_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub value_dim: usize,
}

impl Dims {
    /// Checks what the kernel can take, before anything is allocated.
    pub fn check(&self) -> Result<()> {
        let shape = |msg: String| GpuError::Shape { op: OP, msg };
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(shape(format!("{} query heads cannot share {} key/value heads", self.heads, self.kv_heads)));
        }
        if self.heads > MAX_HEADS {
            return Err(shape(format!("{} heads: at most {MAX_HEADS} in one launch", self.heads)));
        }
        for (name, dim) in [("head", self.head_dim), ("value head", self.value_dim)] {
            if dim == 0 || dim > MAX_HEAD_DIM || !dim.is_multiple_of(4) {
                return Err(shape(format!("{name} size {dim}: the kernel takes multiples of 4 up to {MAX_HEAD_DIM}")));
            }
        }
        let fits = |n: usize| i32::try_from(n).is_ok();
        if ![self.queries, self.keys, self.heads * self.queries, self.kv_heads * self.keys].into_iter().all(fits) {
            return Err(shape(format!("{} queries and {} keys per head: past the kernel's 32-bit counts", self.queries, self.keys)));
        }
        Ok(())
    }

    /// Whether the tensor-core kernel takes these head sizes: multiples of 8 (its fragments'
    /// widths; queries and keys are padded to 16).
    pub fn fits_tensor_cores(&self) -> bool {
        self.head_dim.is_multiple_of(8) && self.value_dim.is_multiple_of(8)
    }
}

/// What a launch reads: device buffers laid out as [`Dims`] says, and the mask's rule.
pub struct Inputs<'a, T> {
    pub q: &'a CudaSlice<T>,
    pub k: &'a CudaSlice<T>,
    pub v: &'a CudaSlice<T>,
    pub q_pos: &'a CudaSlice<i64>,
    /// Sorted ascending, as on the CPU.
    pub k_pos: &'a CudaSlice<i64>,
    /// One byte per key, 0 for a key no query may see; `None`: every key is valid.
    pub key_valid: Option<&'a CudaSlice<u8>>,
    pub causal: bool,
    pub window: Option<usize>,
    pub scale: f32,
}

/// The attention kernels loaded on one GPU, with the stream they run on.
pub struct GpuAttention {
    stream: Arc<CudaStream>,
    f32_entry: CudaFunction,
    bf16_entry: CudaFunction,
    /// Tensor cores, on GPUs of compute capability 8.0 and later.
    mma: Option<MmaEntries>,
}

/// The tensor-core kernel's entry points: f32 inputs as bf16 and as f16 operands, and bf16 bits.
struct MmaEntries {
    bf16: CudaFunction,
    f16: CudaFunction,
    bf16_bits: CudaFunction,
}

impl GpuAttention {
    /// The kernel compiled for `gpu`'s architecture and loaded, launched on `stream`.
    pub fn new(gpu: &Gpu, stream: Arc<CudaStream>) -> Result<Self> {
        let module = gpu.load(&ATTENTION)?;
        let f = |m: &Arc<cudarc::driver::CudaModule>, name: &str| m.load_function(name).map_err(driver("cuModuleGetFunction"));
        let mma = if gpu.info()?.compute_capability >= MMA_COMPUTE_CAPABILITY {
            let mma = gpu.load(&ATTENTION_MMA)?;
            Some(MmaEntries { bf16: f(&mma, "tome_attention_mma_bf16")?, f16: f(&mma, "tome_attention_mma_f16")?, bf16_bits: f(&mma, "tome_attention_mma_bf16_bits")? })
        } else {
            None
        };
        Ok(GpuAttention { stream, f32_entry: f(&module, <f32 as AttentionElement>::ENTRY)?, bf16_entry: f(&module, <u16 as AttentionElement>::ENTRY)?, mma })
    }

    /// Whether this GPU attends on tensor cores (compute capability 8.0 or later).
    pub fn has_tensor_cores(&self) -> bool {
        self.mma.is_some()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Writes the partial of `inputs` into `out` (`[heads, queries, value_dim]`) and `lse`
    /// (`[heads, queries]`), on this kernel's stream, in f32 arithmetic on CUDA cores.
    pub fn launch<T: AttentionElement>(&self, dims: Dims, inputs: &Inputs<'_, T>, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>) -> Result<()> {
        let entry = if T::ENTRY == <f32 as AttentionElement>::ENTRY { &self.f32_entry } else { &self.bf16_entry };
        self.run(entry, (ROWS, THREADS), dims, inputs, out, lse)
    }

    /// As [`GpuAttention::launch`], with both products on tensor cores: the inputs read as
    /// `operands` values (f32 inputs a bf16 or f16 run has rounded to them, or bf16 bits as bf16
    /// operands), the probabilities rounded to that type before the second product, scores,
    /// softmax statistics and the partial in f32. Head sizes as [`Dims::fits_tensor_cores`].
    pub fn launch_tensor_cores<T: AttentionElement>(&self, dims: Dims, inputs: &Inputs<'_, T>, operands: Half, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>) -> Result<()> {
        if !dims.fits_tensor_cores() {
            return Err(GpuError::Shape { op: OP, msg: format!("head sizes {} and {}: tensor cores take multiples of 8", dims.head_dim, dims.value_dim) });
        }
        let Some(mma) = &self.mma else {
            return Err(GpuError::Unavailable("tensor-core attention needs compute capability 8.0 or later".into()));
        };
        let entry = match (T::ENTRY == <f32 as AttentionElement>::ENTRY, operands) {
            (true, Half::Bf16) => &mma.bf16,
            (true, Half::F16) => &mma.f16,
            (false, Half::Bf16) => &mma.bf16_bits,
            (false, Half::F16) => return Err(GpuError::Shape { op: OP, msg: "bf16 bits cannot be read as f16 operands".into() }),
        };
        self.run(entry, (MMA_ROWS, MMA_THREADS), dims, inputs, out, lse)
    }

    /// The partial of a run in `operands` precision (`None`: f32) from f32 inputs rounded to it:
    /// on tensor cores where it is bf16 or f16, the GPU has them and the head sizes fit them,
    /// else on CUDA cores.
    pub fn launch_in(&self, dims: Dims, inputs: &Inputs<'_, f32>, operands: Option<Half>, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>) -> Result<()> {
        match operands {
            Some(half) if dims.fits_tensor_cores() && self.has_tensor_cores() => self.launch_tensor_cores(dims, inputs, half, out, lse),
            _ => self.launch(dims, inputs, out, lse),
        }
    }

    /// Launches `entry`, whose blocks are `rows` query rows of `threads` threads.
    fn run<T: DeviceRepr>(
        &self,
        entry: &CudaFunction,
        (rows, threads): (usize, u32),
        dims: Dims,
        inputs: &Inputs<'_, T>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        dims.check()?;
        let expect = |name: &str, have: usize, want: usize| {
            if have == want {
                Ok(())
            } else {
                Err(GpuError::Shape { op: OP, msg: format!("{name} holds {have} elements, the dimensions {dims:?} need {want}") })
            }
        };
        let Dims { heads, kv_heads, queries, keys, head_dim, value_dim } = dims;
        expect("q", inputs.q.len(), heads * queries * head_dim)?;
        expect("k", inputs.k.len(), kv_heads * keys * head_dim)?;
        expect("v", inputs.v.len(), kv_heads * keys * value_dim)?;
        expect("q_pos", inputs.q_pos.len(), queries)?;
        expect("k_pos", inputs.k_pos.len(), keys)?;
        if let Some(valid) = inputs.key_valid {
            expect("key_valid", valid.len(), keys)?;
        }
        expect("out", out.len(), heads * queries * value_dim)?;
        expect("lse", lse.len(), heads * queries)?;
        if queries == 0 {
            return Ok(());
        }
        let as_i32 = |n: usize| n as i32; // fits: `Dims::check`
        let (hq, hk, nq, nk, d, dv) = (as_i32(heads), as_i32(kv_heads), as_i32(queries), as_i32(keys), as_i32(head_dim), as_i32(value_dim));
        let causal = i32::from(inputs.causal);
        let window: i64 = inputs.window.map_or(-1, |w| w.min(MAX_WINDOW) as i64);
        let no_validity = 0u64;
        let config = LaunchConfig { grid_dim: (queries.div_ceil(rows) as u32, heads as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut args = self.stream.launch_builder(entry);
        args.arg(inputs.q).arg(inputs.k).arg(inputs.v).arg(inputs.q_pos).arg(inputs.k_pos);
        match inputs.key_valid {
            Some(valid) => args.arg(valid),
            None => args.arg(&no_validity),
        };
        args.arg(&hq).arg(&hk).arg(&nq).arg(&nk).arg(&d).arg(&dv).arg(&causal).arg(&window).arg(&inputs.scale).arg(out).arg(lse);
        // SAFETY: the argument list matches `tome_attention_*` in kernels/attention.cu and
        // kernels/attention_mma.cu (the same for every entry), and every buffer's length was
        // checked against the dimensions above.
        unsafe { args.launch(config) }.map_err(driver("cuLaunchKernel"))?;
        Ok(())
    }

    /// `tome_attn::attention` on this GPU: host tensors (f32, or bf16 for the bf16 kernel) in,
    /// the host partial out.
    pub fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Result<Partial> {
        self.on_host(q, k, v, mask, scale, None)
    }

    /// [`GpuAttention::attention`] on tensor cores in `operands`: f32 tensors whose values are
    /// `operands` values, or bf16 tensors for bf16 operands.
    pub fn attention_tensor_cores(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32, operands: Half) -> Result<Partial> {
        self.on_host(q, k, v, mask, scale, Some(operands))
    }

    fn on_host(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32, operands: Option<Half>) -> Result<Partial> {
        let dims = dims_of(q, k, v, mask)?;
        dims.check()?;
        if dims.queries == 0 || dims.keys == 0 {
            return Ok(Partial::empty(dims.heads, dims.queries, dims.value_dim)?);
        }
        let dtype = q.dtype();
        if k.dtype() != dtype || v.dtype() != dtype {
            return Err(GpuError::Shape { op: OP, msg: format!("q, k and v differ in element type: {dtype:?}, {:?}, {:?}", k.dtype(), v.dtype()) });
        }
        match dtype {
            DType::F32 => self.run_host(dims, &flat::<f32>(q)?, &flat::<f32>(k)?, &flat::<f32>(v)?, mask, scale, operands),
            DType::BF16 => {
                let bits = |t: &Tensor| -> Result<Vec<u16>> { Ok(flat::<half::bf16>(t)?.into_iter().map(half::bf16::to_bits).collect()) };
                self.run_host(dims, &bits(q)?, &bits(k)?, &bits(v)?, mask, scale, operands)
            }
            other => Err(GpuError::Shape { op: OP, msg: format!("the kernel reads f32 or bf16, not {other:?}") }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_host<T: AttentionElement>(&self, dims: Dims, q: &[T], k: &[T], v: &[T], mask: &Mask<'_>, scale: f32, operands: Option<Half>) -> Result<Partial> {
        let s = &self.stream;
        let upload = |op: &'static str| driver(op);
        let q_dev = s.clone_htod(q).map_err(upload("copy q"))?;
        let k_dev = s.clone_htod(k).map_err(upload("copy k"))?;
        let v_dev = s.clone_htod(v).map_err(upload("copy v"))?;
        let q_pos = s.clone_htod(mask.q_pos).map_err(upload("copy query positions"))?;
        let k_pos = s.clone_htod(mask.k_pos).map_err(upload("copy key positions"))?;
        let valid = match mask.key_valid {
            Some(flags) => Some(s.clone_htod(&flags.iter().map(|&f| u8::from(f)).collect::<Vec<_>>()).map_err(upload("copy key validity"))?),
            None => None,
        };
        let mut out = s.alloc_zeros::<f32>(dims.heads * dims.queries * dims.value_dim).map_err(driver("allocate out"))?;
        let mut lse = s.alloc_zeros::<f32>(dims.heads * dims.queries).map_err(driver("allocate lse"))?;
        let inputs = Inputs { q: &q_dev, k: &k_dev, v: &v_dev, q_pos: &q_pos, k_pos: &k_pos, key_valid: valid.as_ref(), causal: mask.causal, window: mask.window, scale };
        match operands {
            None => self.launch(dims, &inputs, &mut out, &mut lse)?,
            Some(half) => self.launch_tensor_cores(dims, &inputs, half, &mut out, &mut lse)?,
        }
        let out = s.clone_dtoh(&out).map_err(driver("copy out back"))?;
        let lse = s.clone_dtoh(&lse).map_err(driver("copy lse back"))?;
        Ok(Partial::from_vecs(out, lse, dims.heads, dims.queries, dims.value_dim)?)
    }
}

fn dims_of(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>) -> Result<Dims> {
    let three = |t: &Tensor, name: &str| match t.dims() {
        &[a, b, c] => Ok((a, b, c)),
        other => Err(GpuError::Shape { op: OP, msg: format!("{name} must be [heads, tokens, head_dim], got {other:?}") }),
    };
    let ((hq, nq, d), (hk, nk, dk), (hv, nv, dv)) = (three(q, "q")?, three(k, "k")?, three(v, "v")?);
    if hk != hv || nk != nv || dk != d {
        return Err(GpuError::Shape { op: OP, msg: format!("q {:?}, k {:?}, v {:?} do not fit together", q.dims(), k.dims(), v.dims()) });
    }
    if mask.q_pos.len() != nq || mask.k_pos.len() != nk || mask.key_valid.is_some_and(|m| m.len() != nk) {
        return Err(GpuError::Shape { op: OP, msg: format!("the mask covers {} queries and {} keys, the tensors {nq} and {nk}", mask.q_pos.len(), mask.k_pos.len()) });
    }
    Ok(Dims { heads: hq, kv_heads: hk, queries: nq, keys: nk, head_dim: d, value_dim: dv })
}

fn flat<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}
