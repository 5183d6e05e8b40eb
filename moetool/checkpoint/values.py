"""Read tensor values as float32 numpy arrays, row range by row range, without torch.

Used by inspect's --experts and --check-values, which must not import torch.
bf16 and fp8 are decoded by bit manipulation; a tensor of shape (..., C) is seen
as a matrix of prod(shape[:-1]) rows and C columns.
"""

from __future__ import annotations

from functools import cache
from math import prod

import numpy as np

from moetool.checkpoint.checkpoint import TensorRef
from moetool.checkpoint.header import DTYPE_BYTES

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
          "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@cache
def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF are NaN; no infinities."""
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    mant = b & 0x7
    value = np.where(exp == 0, mant / 8 * 2.0 ** -6, (1 + mant / 8) * 2.0 ** (exp - 7))
    value = sign * value
    value[(exp == 0xF) & (mant == 0x7)] = np.nan
    return value.astype(np.float32)


def decode(raw: bytes | np.ndarray, dtype: str) -> np.ndarray:
    """Decode raw little-endian bytes of DTYPE into a flat float32 array."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "BF16":
        return (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return _e4m3_table()[buf]
    if dtype == "F8_E5M2":   # the high byte of an IEEE half
        return (buf.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "F8_E8M0":   # power-of-two scales (MXFP4): 2**(b - 127)
        return np.ldexp(np.float32(1.0), buf.astype(np.int32) - 127).astype(np.float32)
    return buf.view(_NUMPY[dtype]).astype(np.float32)


def matrix_shape(ref: TensorRef) -> tuple[int, int]:
    cols = ref.shape[-1] if ref.shape else 1
    return (prod(ref.shape[:-1]) if len(ref.shape) > 1 else 1), cols


def read_rows(ref: TensorRef, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of REF seen as a 2-D matrix, as float32."""
    rows, cols = matrix_shape(ref)
    stop = min(stop, rows)
    if ref.shard.format == "safetensors" and ref.start >= 0:
        itemsize = DTYPE_BYTES[ref.dtype]
        with open(ref.shard.path, "rb") as fh:
            fh.seek(ref.start + start * cols * itemsize)
            raw = fh.read((stop - start) * cols * itemsize)
        return decode(raw, ref.dtype).reshape(stop - start, cols)
    tensor = ref.load()   # .bin (already mmap'd by torch) or an error for remote headers
    import torch

    return tensor.reshape(rows, cols)[start:stop].to(torch.float32).numpy()
