//! Matrix products on a GPU through cuBLAS (loaded at run time), in f32 without TF32: a layer's
//! `y = x · Wᵀ` with PyTorch's row-major layouts.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{GpuError, Result};

const OP: &str = "gpu matmul";

/// A cuBLAS handle on one GPU's stream.
pub struct Blas {
    blas: CudaBlas,
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
        let blas = CudaBlas::new(stream).map_err(blas_err("cublasCreate"))?;
        // SAFETY: a live handle; the default math mode computes f32 products in f32 (no TF32).
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH) }.result().map_err(blas_err("cublasSetMathMode"))?;
        Ok(Blas { blas })
    }

    /// `y[n, out] = x[n, inp] · w[out, inp]ᵀ` (a linear layer's product; the bias is added apart).
    pub fn linear(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, inp: usize, out: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        if inp == 0 || !x.len().is_multiple_of(inp) {
            return Err(GpuError::Shape { op: OP, msg: format!("{} values are not rows of {inp}", x.len()) });
        }
        let n = x.len() / inp;
        if w.len() != out * inp || y.len() != n * out {
            return Err(GpuError::Shape { op: OP, msg: format!("weights of {} values for [{out}, {inp}], output of {} for [{n}, {out}]", w.len(), y.len()) });
        }
        if n == 0 || out == 0 {
            return Ok(());
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| GpuError::Shape { op: OP, msg: format!("{v}: past cuBLAS's 32-bit sizes") });
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
}
