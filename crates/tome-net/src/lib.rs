//! tome-net: what crosses process boundaries. For now, the tensor codec of the wire contract:
//! candle tensors to and from `tome.v1.Tensor` (shape, element type, little-endian bytes),
//! used for every tensor the services stream; the gRPC and NCCL Group backends join it here.

mod codec;

pub use codec::{tensor_from_wire, tensor_to_wire, CodecError};
