//! `tome.v1.Tensor` codec: raw little-endian element bytes, never repeated floats.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use tome_proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("tensor element type {0:?} has no wire form")]
    UnsupportedDType(DType),
    #[error("unknown wire element type {0}")]
    UnknownWireDType(i32),
    #[error("a tensor of shape {shape:?} and type {dtype:?} needs {want} bytes, got {got}")]
    Size { shape: Vec<u64>, dtype: pb::ElementType, want: usize, got: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&to_le(v));
    }
    out
}

/// Encodes a tensor as `wire` element type (f32 tensors may be narrowed to f16/bf16 on the way).
pub fn tensor_to_wire(t: &Tensor, wire: pb::ElementType) -> Result<pb::Tensor, CodecError> {
    let flat = t.flatten_all()?;
    let (dtype, data) = match (wire, t.dtype()) {
        (pb::ElementType::Unspecified | pb::ElementType::F32, DType::F32) => (pb::ElementType::F32, le_bytes(&flat.to_vec1::<f32>()?, f32::to_le_bytes)),
        (pb::ElementType::F16, DType::F32 | DType::F16) => {
            (pb::ElementType::F16, le_bytes(&flat.to_dtype(DType::F16)?.to_vec1::<f16>()?, f16::to_le_bytes))
        }
        (pb::ElementType::Bf16, DType::F32 | DType::BF16) => {
            (pb::ElementType::Bf16, le_bytes(&flat.to_dtype(DType::BF16)?.to_vec1::<bf16>()?, bf16::to_le_bytes))
        }
        (pb::ElementType::Unspecified | pb::ElementType::I64, DType::I64) => (pb::ElementType::I64, le_bytes(&flat.to_vec1::<i64>()?, i64::to_le_bytes)),
        (_, other) => return Err(CodecError::UnsupportedDType(other)),
    };
    Ok(pb::Tensor { shape: t.dims().iter().map(|&d| d as u64).collect(), dtype: dtype as i32, data })
}

/// Decodes a wire tensor (f16/bf16 stay in their type).
pub fn tensor_from_wire(t: &pb::Tensor) -> Result<Tensor, CodecError> {
    let dtype = pb::ElementType::try_from(t.dtype).map_err(|_| CodecError::UnknownWireDType(t.dtype))?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let count: usize = shape.iter().product();
    let width = match dtype {
        pb::ElementType::F32 => 4,
        pb::ElementType::F16 | pb::ElementType::Bf16 => 2,
        pb::ElementType::I64 => 8,
        pb::ElementType::Unspecified => return Err(CodecError::UnknownWireDType(t.dtype)),
    };
    if t.data.len() != count * width {
        return Err(CodecError::Size { shape: t.shape.clone(), dtype, want: count * width, got: t.data.len() });
    }
    let dev = &Device::Cpu;
    let chunks = t.data.chunks_exact(width);
    Ok(match dtype {
        pb::ElementType::F32 => Tensor::from_vec(chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>(), shape, dev)?,
        pb::ElementType::F16 => Tensor::from_vec(chunks.map(|c| f16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(), shape, dev)?,
        pb::ElementType::Bf16 => Tensor::from_vec(chunks.map(|c| bf16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(), shape, dev)?,
        pb::ElementType::I64 => Tensor::from_vec(chunks.map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect::<Vec<_>>(), shape, dev)?,
        pb::ElementType::Unspecified => return Err(CodecError::UnknownWireDType(t.dtype)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_sizes() {
        let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 1e-3, 7.0]], &Device::Cpu).unwrap();
        let w = tensor_to_wire(&t, pb::ElementType::F32).unwrap();
        assert_eq!(w.data.len(), 24);
        assert_eq!(&w.data[..4], &1.5f32.to_le_bytes());
        assert_eq!(tensor_from_wire(&w).unwrap().to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let h = tensor_to_wire(&t, pb::ElementType::Bf16).unwrap();
        assert_eq!(h.data.len(), 12);
        let back = tensor_from_wire(&h).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back[0][0], 1.5);
        let ids = Tensor::new(&[3i64, -4], &Device::Cpu).unwrap();
        assert_eq!(tensor_from_wire(&tensor_to_wire(&ids, pb::ElementType::Unspecified).unwrap()).unwrap().to_vec1::<i64>().unwrap(), vec![3, -4]);
        let mut bad = w.clone();
        bad.data.pop();
        assert!(matches!(tensor_from_wire(&bad), Err(CodecError::Size { .. })));
        bad.dtype = 99;
        assert!(matches!(tensor_from_wire(&bad), Err(CodecError::UnknownWireDType(99))));
    }
}
