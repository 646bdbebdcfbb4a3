//! Frames whose tensors stay in GPU memory: what ranks computing on GPUs exchange
//! ([`Group::send_device`](crate::Group::send_device)), and their conversions to and from host
//! frames for a pair whose other side, or whose backend, holds no device buffers.
//!
//! A device frame's tensors are buffers of the sender's GPU, each with its element type and
//! shape, in the same order and layout as the host frame the same operator would send, so a
//! receiver may take either kind whatever its sender sent. A frame's buffers are written once,
//! before it is sent; cudarc orders every later use on any stream of the GPU after that write
//! (its event tracking, on wherever a context has more than one stream). It frees a buffer on
//! the stream that made it, after the last read it recorded, which is one stream's: a rank that
//! reads a buffer it shares keeps its handle until its own reads are done.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{DistError, Result};

/// A tensor's elements in GPU memory, of one of the element types frames carry there. A frame's
/// buffers are never written once sent, so a rank may forward what it received and still read
/// it, and ranks of one process share it without a copy.
#[derive(Clone)]
pub enum DeviceData {
    F32(Arc<CudaSlice<f32>>),
    I64(Arc<CudaSlice<i64>>),
    U8(Arc<CudaSlice<u8>>),
}

impl DeviceData {
    fn len(&self) -> usize {
        match self {
            DeviceData::F32(s) => s.len(),
            DeviceData::I64(s) => s.len(),
            DeviceData::U8(s) => s.len(),
        }
    }

    fn stream(&self) -> &Arc<CudaStream> {
        match self {
            DeviceData::F32(s) => s.stream(),
            DeviceData::I64(s) => s.stream(),
            DeviceData::U8(s) => s.stream(),
        }
    }
}

/// A tensor of a device frame: a shape, an element type and, unless it is empty (the driver
/// allocates no zero-sized buffer), its elements on a GPU.
#[derive(Clone)]
pub struct DeviceTensor {
    dtype: DType,
    dims: Vec<usize>,
    data: Option<DeviceData>,
}

/// What travels between ranks computing on GPUs.
pub type DeviceFrame = Vec<DeviceTensor>;

/// Bytes a device frame's elements occupy, as [`crate::frame_bytes`] counts a host frame.
pub fn device_frame_bytes(frame: &[DeviceTensor]) -> u64 {
    frame.iter().map(|t| (t.elem_count() * t.dtype.size_in_bytes()) as u64).sum()
}

fn dtype_of(data: &DeviceData) -> DType {
    match data {
        DeviceData::F32(_) => DType::F32,
        DeviceData::I64(_) => DType::I64,
        DeviceData::U8(_) => DType::U8,
    }
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> DistError + '_ {
    move |e| DistError::Unsupported(format!("GPU {what}: {e:?}"))
}

impl DeviceTensor {
    /// `data` shaped as `dims`, whose product must be its length.
    pub fn new(data: DeviceData, dims: &[usize]) -> Result<Self> {
        let n: usize = dims.iter().product();
        if n != data.len() {
            return Err(DistError::Plan(format!("a device tensor of shape {dims:?} over {} elements", data.len())));
        }
        let dtype = dtype_of(&data);
        Ok(DeviceTensor { dtype, dims: dims.to_vec(), data: (n > 0).then_some(data) })
    }

    /// A tensor of `dims` with no element (a dimension is 0).
    pub fn empty(dtype: DType, dims: &[usize]) -> Result<Self> {
        if dims.iter().product::<usize>() != 0 {
            return Err(DistError::Plan(format!("an empty device tensor of shape {dims:?}")));
        }
        Ok(DeviceTensor { dtype, dims: dims.to_vec(), data: None })
    }

    /// `data` shaped as `dims`, or an empty tensor of `dtype` where `data` is `None`.
    pub fn from_parts(dtype: DType, dims: &[usize], data: Option<DeviceData>) -> Result<Self> {
        match data {
            Some(d) if dtype_of(&d) == dtype => Self::new(d, dims),
            Some(d) => Err(DistError::Plan(format!("{:?} elements for a device tensor of {dtype:?}", dtype_of(&d)))),
            None => Self::empty(dtype, dims),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The elements, `None` for an empty tensor.
    pub fn data(&self) -> Option<&DeviceData> {
        self.data.as_ref()
    }

    /// The stream that made the elements (and frees them), `None` for an empty tensor.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.data.as_ref().map(DeviceData::stream)
    }

    /// The GPU holding the elements, `None` for an empty tensor.
    pub fn gpu(&self) -> Option<usize> {
        self.data.as_ref().map(|d| d.stream().context().ordinal())
    }

    /// The f32 elements, `None` for an empty tensor; an error for another element type.
    pub fn into_f32(self) -> Result<Option<Arc<CudaSlice<f32>>>> {
        match self.data {
            None if self.dtype == DType::F32 => Ok(None),
            Some(DeviceData::F32(s)) => Ok(Some(s)),
            _ => Err(self.wrong_type(DType::F32)),
        }
    }

    /// The i64 elements, as [`DeviceTensor::into_f32`].
    pub fn into_i64(self) -> Result<Option<Arc<CudaSlice<i64>>>> {
        match self.data {
            None if self.dtype == DType::I64 => Ok(None),
            Some(DeviceData::I64(s)) => Ok(Some(s)),
            _ => Err(self.wrong_type(DType::I64)),
        }
    }

    /// The u8 elements, as [`DeviceTensor::into_f32`].
    pub fn into_u8(self) -> Result<Option<Arc<CudaSlice<u8>>>> {
        match self.data {
            None if self.dtype == DType::U8 => Ok(None),
            Some(DeviceData::U8(s)) => Ok(Some(s)),
            _ => Err(self.wrong_type(DType::U8)),
        }
    }

    fn wrong_type(&self, want: DType) -> DistError {
        DistError::Plan(format!("a frame's {:?} tensor of shape {:?} where {want:?} was expected", self.dtype, self.dims))
    }

    /// The tensor copied to the host (waiting for the writes before it on its GPU).
    pub fn to_host(&self) -> Result<Tensor> {
        let on_host = match &self.data {
            None => return Ok(Tensor::zeros(self.dims.as_slice(), self.dtype, &Device::Cpu)?),
            Some(DeviceData::F32(s)) => Tensor::from_vec(s.stream().clone_dtoh(s.as_ref()).map_err(driver("copy to the host"))?, self.dims.as_slice(), &Device::Cpu),
            Some(DeviceData::I64(s)) => Tensor::from_vec(s.stream().clone_dtoh(s.as_ref()).map_err(driver("copy to the host"))?, self.dims.as_slice(), &Device::Cpu),
            Some(DeviceData::U8(s)) => Tensor::from_vec(s.stream().clone_dtoh(s.as_ref()).map_err(driver("copy to the host"))?, self.dims.as_slice(), &Device::Cpu),
        };
        Ok(on_host?)
    }

    /// A host tensor copied onto `stream`'s GPU: f32, i64 and u8 elements.
    pub fn from_host(t: &Tensor, stream: &Arc<CudaStream>) -> Result<Self> {
        let dims = t.dims();
        if t.elem_count() == 0 {
            return Self::empty(t.dtype(), dims);
        }
        let flat = t.flatten_all()?;
        let up = driver("copy to the device");
        let data = match t.dtype() {
            DType::F32 => DeviceData::F32(Arc::new(stream.clone_htod(&flat.to_vec1::<f32>()?).map_err(&up)?)),
            DType::I64 => DeviceData::I64(Arc::new(stream.clone_htod(&flat.to_vec1::<i64>()?).map_err(&up)?)),
            DType::U8 => DeviceData::U8(Arc::new(stream.clone_htod(&flat.to_vec1::<u8>()?).map_err(&up)?)),
            other => return Err(DistError::Unsupported(format!("a {other:?} tensor in a frame for a GPU rank"))),
        };
        Self::new(data, dims)
    }

    /// The tensor on `stream`'s GPU: itself where it is there already, else copied through the
    /// host (ranks of one process on different GPUs).
    pub fn onto(self, stream: &Arc<CudaStream>) -> Result<Self> {
        match self.gpu() {
            Some(gpu) if gpu != stream.context().ordinal() => Self::from_host(&self.to_host()?, stream),
            _ => Ok(self),
        }
    }
}

/// A host frame copied onto `stream`'s GPU.
pub fn frame_to_device(frame: &[Tensor], stream: &Arc<CudaStream>) -> Result<DeviceFrame> {
    frame.iter().map(|t| DeviceTensor::from_host(t, stream)).collect()
}

/// A device frame copied to the host.
pub fn frame_to_host(frame: &[DeviceTensor]) -> Result<crate::Frame> {
    frame.iter().map(DeviceTensor::to_host).collect()
}
