"""Pieces of output tensors: byte ranges of source files, or small computations.

Shared by convert, upcycle and the streamed runner: a layout or shard change is a pure
rearrangement of byte ranges; a cast, slice or dequantization is computed one row block or
one expert at a time.
"""

from __future__ import annotations

from math import prod

from moetool.checkpoint.checkpoint import TORCH_DTYPES, TensorRef
from moetool.checkpoint.header import DTYPE_BYTES
from moetool.checkpoint.writer import ComputedPiece, Piece, RawPiece
from moetool.errors import UsageError

CHUNK_BYTES = 16 << 20   # bytes of source rows per computed piece


class ComputedRef:
    """A tensor computed from others (a dequantized weight), usable wherever a TensorRef is read."""

    class _Shard:
        format = "computed"
        path = None

    shard = _Shard()

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], whole=None, expert=None):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)
        self._whole, self._expert = whole, expert

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def expert_wise(self) -> bool:
        return self._expert is not None

    def load(self):
        if self._whole is not None:
            return self._whole()
        import torch

        return torch.stack([self._expert(e) for e in range(self.shape[0])])

    def load_slice(self, index):
        if isinstance(index, int) and self._expert is not None:
            return self._expert(index)
        return self.load()[index]

    def load_rows(self, start: int, stop: int):
        cols = self.shape[-1]
        if self._expert is not None:   # rows within one expert: compute only that expert
            per = self.numel // self.shape[0] // cols
            if start // per == (stop - 1) // per:
                e = start // per
                return self._expert(e).reshape(-1, cols)[start - e * per:stop - e * per]
        return self.load().reshape(-1, cols)[start:stop]


def rows_piece(ref: TensorRef, start: int, stop: int, dtype: str) -> Piece:
    """Rows [start, stop) of REF (as a matrix), raw when no cast is needed."""
    cols = ref.shape[-1] if ref.shape else 1
    length = (stop - start) * cols * DTYPE_BYTES[dtype]
    if dtype == ref.dtype and ref.shard.format == "safetensors":
        itemsize = DTYPE_BYTES[ref.dtype]
        return RawPiece(ref.shard.path, ref.start + start * cols * itemsize, length)
    return ComputedPiece(lambda: cast(ref.load_rows(start, stop), dtype, ref.name), length)


def cast(values, dtype: str, name: str):
    """VALUES in DTYPE; refused where float16 would turn finite values infinite (beyond +-65504)."""
    import torch

    out = values.to(TORCH_DTYPES[dtype])
    if dtype == "F16" and values.dtype in (torch.float32, torch.bfloat16, torch.float64) and bool(
            (torch.isinf(out) & torch.isfinite(values)).any()):
        raise UsageError(f"{name}: holds values beyond float16's range (+-65504), which float16 would make "
                         "infinite", hint="use --dtype bf16 (float32's range), or keep the dtype")
    return out


def tensor_pieces(ref: TensorRef, dtype: str) -> list[Piece]:
    """All of REF: one raw byte range when it is copied as is, else computed pieces of about
    CHUNK_BYTES (one expert at a time for expert-wise computed tensors)."""
    cols = ref.shape[-1] if ref.shape and ref.shape[-1] else 1
    rows = ref.numel // cols
    if rows <= 1 or (dtype == ref.dtype and ref.shard.format == "safetensors"):
        return [rows_piece(ref, 0, rows if ref.numel else 0, dtype)]
    if isinstance(ref, ComputedRef) and ref.expert_wise:
        step = rows // ref.shape[0]
    else:
        step = max(1, CHUNK_BYTES // max(1, ref.nbytes // rows))
    return [rows_piece(ref, a, min(a + step, rows), dtype) for a in range(0, rows, step)]


def computed_piece(fn, shape: tuple[int, ...], dtype: str) -> ComputedPiece:
    """A piece computed by FN (a tensor of SHAPE in DTYPE)."""
    return ComputedPiece(fn, prod(shape) * DTYPE_BYTES[dtype])
