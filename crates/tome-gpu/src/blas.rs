//! Matrix products on a GPU through cuBLAS (loaded at run time), in f32 without TF32, or from
//! bf16 or f16 operands accumulated in f32: a layer's `y = x · Wᵀ` with PyTorch's row-major
//! layouts.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasMath_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{GpuError, Result};

const OP: &str = "gpu matmul";

/// A 16-bit floating-point format of a product's operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    fn data_type(self) -> cudaDataType {
        match self {
            Half::Bf16 => cudaDataType::CUDA_R_16BF,
            Half::F16 => cudaDataType::CUDA_R_16F,
        }
    }
}

/// A cuBLAS handle on one GPU's stream.
pub struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

fn blas_err(op: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> GpuError {
    move |e| GpuError::Driver { op, msg: format!("{e:?}") }
}

impl Blas {
    /// cuBLAS on `stream`, in strict f32 (TF32 off), or an error when the library is missing.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: this only tries to open the shared library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::Unavailable("cuBLAS (libcublas.so.12) is not installed: put the CUDA toolkit's lib64 on LD_LIBRARY_PATH".into()));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(blas_err("cublasCreate"))?;
        // SAFETY: a live handle; the default math mode computes f32 products in f32 (no TF32).
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH) }.result().map_err(blas_err("cublasSetMathMode"))?;
        Ok(Blas { blas, stream })
    }

    /// Makes this GPU's context the calling thread's: cuBLAS runs in the thread's current
    /// context, and a rank's handles may move between threads.
    fn bind(&self) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| GpuError::Driver { op: "cuCtxSetCurrent", msg: format!("{e:?}") })
    }

    /// `y[n, out] = x[n, inp] · w[out, inp]ᵀ` (a linear layer's product; the bias is added apart).
    pub fn linear(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, inp: usize, out: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let Some(n) = rows(x.len(), w.len(), y.len(), inp, out)? else {
            return Ok(());
        };
        self.bind()?;
        // Column-major view: y_cmᵀ [out, n] = (w as [inp, out])ᵀ · (x as [inp, n]).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(out)?,
            n: int(n)?,
            k: int(inp)?,
            alpha: 1.0f32,
            lda: int(inp)?,
            ldb: int(inp)?,
            beta: 0.0f32,
            ldc: int(out)?,
        };
        // SAFETY: the sizes above match the buffers' lengths, checked above.
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(blas_err("cublasSgemm"))
    }

    /// [`Blas::linear`] from 16-bit operands (bits of `half`), accumulated and written in f32
    /// (tensor cores).
    pub fn linear_half(&self, half: Half, x: &CudaSlice<u16>, w: &CudaSlice<u16>, inp: usize, out: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let Some(n) = rows(x.len(), w.len(), y.len(), inp, out)? else {
            return Ok(());
        };
        self.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w_ptr, _w) = w.device_ptr(&self.stream);
        let (x_ptr, _x) = x.device_ptr(&self.stream);
        let (y_ptr, _y) = y.device_ptr_mut(&self.stream);
        // SAFETY: column-major y_cmᵀ [out, n] = (w as [inp, out])ᵀ · (x as [inp, n]), as in
        // `linear`; the buffers' lengths were checked against these sizes, and the scalars are
        // f32 for CUBLAS_COMPUTE_32F.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                int(out)?,
                int(n)?,
                int(inp)?,
                (&alpha as *const f32).cast(),
                w_ptr as *const std::ffi::c_void,
                half.data_type(),
                int(inp)?,
                x_ptr as *const std::ffi::c_void,
                half.data_type(),
                int(inp)?,
                (&beta as *const f32).cast(),
                y_ptr as *mut std::ffi::c_void,
                cudaDataType::CUDA_R_32F,
                int(out)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err("cublasGemmEx"))
    }
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| GpuError::Shape { op: OP, msg: format!("{v}: past cuBLAS's 32-bit sizes") })
}

/// The rows of a product's input, after checking the three buffers' lengths; `None` when there
/// is nothing to compute.
fn rows(x: usize, w: usize, y: usize, inp: usize, out: usize) -> Result<Option<usize>> {
    if inp == 0 || !x.is_multiple_of(inp) {
        return Err(GpuError::Shape { op: OP, msg: format!("{x} values are not rows of {inp}") });
    }
    let n = x / inp;
    if w != out * inp || y != n * out {
        return Err(GpuError::Shape { op: OP, msg: format!("weights of {w} values for [{out}, {inp}], output of {y} for [{n}, {out}]") });
    }
    Ok((n > 0 && out > 0).then_some(n))
}
