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

#[cfg(not(target_endian = "little"))]
compile_error!("tome's wire carries little-endian element bytes and decodes them in place: build for a little-endian target");

/// Element bytes of a flat tensor, in its own type (little-endian: the host's order).
pub(crate) fn raw_bytes(flat: &Tensor) -> Result<Vec<u8>, CodecError> {
    Ok(match flat.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::U32 => bytemuck::cast_slice(&flat.to_vec1::<u32>()?).to_vec(),
        DType::I64 => bytemuck::cast_slice(&flat.to_vec1::<i64>()?).to_vec(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::F16 => flat.to_vec1::<f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => flat.to_vec1::<bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => return Err(CodecError::UnsupportedDType(other)),
    })
}

fn wire_type(dtype: DType) -> Result<pb::ElementType, CodecError> {
    Ok(match dtype {
        DType::F32 => pb::ElementType::F32,
        DType::F16 => pb::ElementType::F16,
        DType::BF16 => pb::ElementType::Bf16,
        DType::I64 => pb::ElementType::I64,
        DType::U8 => pb::ElementType::U8,
        DType::U32 => pb::ElementType::U32,
        other => return Err(CodecError::UnsupportedDType(other)),
    })
}

fn tensor_type(wire: pb::ElementType) -> Option<DType> {
    Some(match wire {
        pb::ElementType::F32 => DType::F32,
        pb::ElementType::F16 => DType::F16,
        pb::ElementType::Bf16 => DType::BF16,
        pb::ElementType::I64 => DType::I64,
        pb::ElementType::U8 => DType::U8,
        pb::ElementType::U32 => DType::U32,
        pb::ElementType::Unspecified => return None,
    })
}

/// Encodes a tensor as `wire` element type: `Unspecified` keeps the tensor's own type, and f32
/// tensors may be narrowed to f16/bf16 on the way. Any other conversion is refused.
pub fn tensor_to_wire(t: &Tensor, wire: pb::ElementType) -> Result<pb::Tensor, CodecError> {
    let own = wire_type(t.dtype())?;
    let target = match wire {
        pb::ElementType::Unspecified => own,
        w if w == own => own,
        w @ (pb::ElementType::F16 | pb::ElementType::Bf16) if t.dtype() == DType::F32 => w,
        _ => return Err(CodecError::UnsupportedDType(t.dtype())),
    };
    let mut flat = t.flatten_all()?;
    if let Some(dt) = tensor_type(target).filter(|&dt| dt != t.dtype()) {
        flat = flat.to_dtype(dt)?;
    }
    Ok(pb::Tensor { shape: t.dims().iter().map(|&d| d as u64).collect(), dtype: target as i32, data: raw_bytes(&flat)? })
}

/// Decodes a wire tensor in its own element type.
pub fn tensor_from_wire(t: &pb::Tensor) -> Result<Tensor, CodecError> {
    let wire = pb::ElementType::try_from(t.dtype).map_err(|_| CodecError::UnknownWireDType(t.dtype))?;
    let dtype = tensor_type(wire).ok_or(CodecError::UnknownWireDType(t.dtype))?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let want = shape.iter().try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
    if want != Some(t.data.len()) {
        return Err(CodecError::Size { shape: t.shape.clone(), dtype: wire, want: want.unwrap_or(usize::MAX), got: t.data.len() });
    }
    Ok(Tensor::from_raw_buffer(&t.data, dtype, &shape, &Device::Cpu)?)
}

/// A frame's tensors, each in its own type (what travels between ranks is never converted).
pub fn frame_to_wire(frame: &[Tensor]) -> Result<Vec<pb::Tensor>, CodecError> {
    frame.iter().map(|t| tensor_to_wire(t, pb::ElementType::Unspecified)).collect()
}

pub fn frame_from_wire(tensors: &[pb::Tensor]) -> Result<Vec<Tensor>, CodecError> {
    tensors.iter().map(tensor_from_wire).collect()
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
        for t in [Tensor::new(&[3u32, 7], &Device::Cpu).unwrap(), Tensor::new(&[[1u8, 0], [0, 1]], &Device::Cpu).unwrap()] {
            let w = tensor_to_wire(&t, pb::ElementType::Unspecified).unwrap();
            let back = tensor_from_wire(&w).unwrap();
            assert_eq!((back.dtype(), back.dims()), (t.dtype(), t.dims()));
            assert_eq!(
                back.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert!(matches!(tensor_to_wire(&t, pb::ElementType::I64), Err(CodecError::UnsupportedDType(_))), "no silent conversion");
        let ids = Tensor::new(&[3i64, -4], &Device::Cpu).unwrap();
        assert_eq!(tensor_from_wire(&tensor_to_wire(&ids, pb::ElementType::Unspecified).unwrap()).unwrap().to_vec1::<i64>().unwrap(), vec![3, -4]);
        let mut bad = w.clone();
        bad.data.pop();
        assert!(matches!(tensor_from_wire(&bad), Err(CodecError::Size { .. })));
        bad.dtype = 99;
        assert!(matches!(tensor_from_wire(&bad), Err(CodecError::UnknownWireDType(99))));
    }
}
