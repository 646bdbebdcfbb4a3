//! Zero-copy access to the f32 contents of CPU candle tensors, for the kernels' hot loops.

use candle_core::{DType, Storage, Tensor};

use crate::error::{shape_err, Result};

/// Runs `f` on the tensor's elements as one contiguous f32 slice (row-major), without copying
/// when the tensor already is contiguous f32 on the CPU.
pub(crate) fn with_f32<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() != DType::F32 {
        return Err(shape_err(op, format!("expected f32 tensors, got {:?}", t.dtype())));
    }
    let owned;
    let t = if t.is_contiguous() {
        t
    } else {
        owned = t.contiguous()?;
        &owned
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(shape_err(op, "the CPU kernels need CPU tensors"));
    };
    let all = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(f(&all[start..start + t.elem_count()]))
}

/// The dimensions of a rank-3 tensor, or an error naming the operation and argument.
pub(crate) fn dims3(t: &Tensor, op: &'static str, name: &str) -> Result<(usize, usize, usize)> {
    match t.dims() {
        &[a, b, c] => Ok((a, b, c)),
        other => Err(shape_err(op, format!("{name} must be [heads, tokens, head_dim], got {other:?}"))),
    }
}
