"""Tensors as they travel: shape, element type and the elements as little-endian bytes."""

from __future__ import annotations

import math

import numpy as np

from ._proto.tome.v1 import tome_pb2 as pb

# Element types that numpy holds as they are sent (little-endian on the wire).
_DIRECT: dict[pb.ElementType, np.dtype] = {
    pb.ELEMENT_TYPE_F32: np.dtype("<f4"),
    pb.ELEMENT_TYPE_F16: np.dtype("<f2"),
    pb.ELEMENT_TYPE_I64: np.dtype("<i8"),
    pb.ELEMENT_TYPE_U8: np.dtype("u1"),
    pb.ELEMENT_TYPE_U32: np.dtype("<u4"),
}
_NATIVE: dict[pb.ElementType, np.dtype] = {
    pb.ELEMENT_TYPE_F32: np.dtype(np.float32),
    pb.ELEMENT_TYPE_F16: np.dtype(np.float16),
    pb.ELEMENT_TYPE_I64: np.dtype(np.int64),
    pb.ELEMENT_TYPE_U8: np.dtype(np.uint8),
    pb.ELEMENT_TYPE_U32: np.dtype(np.uint32),
}


def bf16_to_f32(raw: bytes) -> np.ndarray:
    """Widens little-endian bfloat16 elements to float32, exactly.

    bfloat16 is the upper half of a float32, so each 16-bit pattern shifted left by 16 bits is
    the float32 of the same value (NaNs and infinities included). numpy has no bfloat16 type.
    """
    if len(raw) % 2:
        raise ValueError(f"bf16 data of {len(raw)} bytes is not a whole number of elements")
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (halves << np.uint32(16)).view(np.float32)


def decode_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A `tome.v1.Tensor` as a numpy array of its shape.

    f32 arrives as float32, f16 as float16, bf16 widened to float32 (exact), i64, u8 and u32 as
    int64, uint8 and uint32. Arrays are writable copies in native byte order. Raises ValueError
    for an unknown element type or data that does not fill the shape exactly.
    """
    shape = tuple(int(d) for d in tensor.shape)
    count = math.prod(shape)
    if tensor.dtype == pb.ELEMENT_TYPE_BF16:
        if len(tensor.data) != 2 * count:
            raise ValueError(f"a bf16 tensor of shape {list(shape)} needs {2 * count} bytes, got {len(tensor.data)}")
        return bf16_to_f32(tensor.data).reshape(shape)
    wire = _DIRECT.get(tensor.dtype)
    if wire is None:
        name = pb.ElementType.Name(tensor.dtype) if tensor.dtype in pb.ElementType.values() else str(tensor.dtype)
        raise ValueError(f"tensor element type {name} is not one this client decodes")
    if len(tensor.data) != wire.itemsize * count:
        raise ValueError(f"a {pb.ElementType.Name(tensor.dtype)} tensor of shape {list(shape)} needs {wire.itemsize * count} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=wire).astype(_NATIVE[tensor.dtype]).reshape(shape)


def encode_tensor(array: np.ndarray, dtype: pb.ElementType | None = None) -> pb.Tensor:
    """The `tome.v1.Tensor` of `array` (float32, float16, int64, uint8 or uint32; or bf16 from
    float32 by truncation when `dtype` is `ELEMENT_TYPE_BF16`). Servers in tests use it."""
    array = np.ascontiguousarray(array)
    if dtype == pb.ELEMENT_TYPE_BF16:
        bits = array.astype("<f4").view("<u4") >> np.uint32(16)
        data = bits.astype("<u2").tobytes()
        return pb.Tensor(shape=list(array.shape), dtype=pb.ELEMENT_TYPE_BF16, data=data)
    for code, native in _NATIVE.items():
        if array.dtype == native and (dtype is None or dtype == code):
            return pb.Tensor(shape=list(array.shape), dtype=code, data=array.astype(_DIRECT[code]).tobytes())
    raise ValueError(f"no tome element type for numpy {array.dtype}")
