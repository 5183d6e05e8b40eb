"""Read and validate safetensors headers in pure Python (no torch, no numpy).

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
then the data buffer. Offsets are relative to the start of the buffer.
"""

from __future__ import annotations

import json
import os
import struct
from operator import itemgetter
from pathlib import Path

from moetool.errors import CheckpointFormatError

# Bytes per element for every safetensors dtype. Sub-byte dtypes are stored packed;
# we only accept whole-byte ones here (F4/F6 are not used by any MoE release).
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

# name -> (the name, bytes per element): parsed headers hold this one copy of each dtype name
_DTYPES = {name: (name, size) for name, size in DTYPE_BYTES.items()}

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_U64 = (1 << 64) - 1         # the largest dimension and element count safetensors reads (a usize)


# (name, dtype, shape, start, end): absolute byte range [start, end) in the file
TensorInfo = tuple[str, str, tuple[int, ...], int, int]


def parse_header(raw: bytes, *, where: str, data_start: int, file_size: int | None
                 ) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate a header's JSON and return its tensors with absolute offsets, and its metadata.

    Args:
        raw: the header JSON bytes.
        where: file name used in error messages.
        data_start: absolute offset of the data buffer (8 + header length).
        file_size: total file size, or None when unknown (remote headers).
    """
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{where}: header is not valid JSON ({exc})") from None
    except RecursionError:   # (the decoder recurses once per nesting level)
        raise CheckpointFormatError(f"{where}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{where}: __metadata__ must map strings to strings")
    if raw.count(b'"data_offsets"') != len(header):
        _check_unique_names(raw, where)

    tensors: list[TensorInfo] = []
    append = tensors.append
    buffer_size = None if file_size is None else file_size - data_start
    position = 0   # while the tensors come in file order (as writers store them), each must start here
    # One tuple (and dtype name) for the tensors of one shape: a checkpoint's 90,000 tensors have a
    # few dozen, and memory first touched costs (page faults) more than the lookup
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
            dtype, itemsize = _DTYPES[dtype]
        except KeyError:
            if isinstance(entry, dict) and "dtype" in entry and "shape" in entry and "data_offsets" in entry:
                raise CheckpointFormatError(
                    f"{where}: tensor {name!r} has unknown dtype {entry['dtype']!r}") from None
            raise CheckpointFormatError(
                f"{where}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"{where}: tensor {name!r} has malformed fields") from None
        count = 1
        try:
            for dim in shape:
                if type(dim) is not int or not 0 <= dim <= MAX_U64:
                    raise TypeError
                count *= dim
                if count > MAX_U64:   # as safetensors counts, in 64 bits: [2**40, 2**40, 0] overflows
                    raise OverflowError
        except TypeError:
            raise CheckpointFormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}") from None
        except OverflowError:
            raise CheckpointFormatError(f"{where}: tensor {name!r} has shape {shape!r}, whose element count "
                                        "overflows 64 bits") from None
        nbytes = count * itemsize
        if nbytes * 8 > MAX_U64:   # (safetensors counts bits)
            raise CheckpointFormatError(f"{where}: tensor {name!r} has shape {shape!r}, too large for a "
                                        "safetensors file")
        if type(begin) is not int or type(end) is not int or begin < 0 or end < begin:
            raise CheckpointFormatError(f"{where}: tensor {name!r} has invalid data_offsets")
        if end - begin != nbytes:
            raise CheckpointFormatError(
                f"{where}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {nbytes}")
        if buffer_size is not None and end > buffer_size:
            raise CheckpointFormatError(
                f"{where}: tensor {name!r} ends at byte {data_start + end}, beyond the end of the "
                f"file ({file_size} bytes); the file is truncated or corrupt")
        if begin == position:
            position = end
        else:
            position = -1   # not in file order: _check_contiguous sorts them
        shape = tuple(shape)
        append((name, dtype, shapes.setdefault(shape, shape), data_start + begin, data_start + end))

    if position < 0 or (buffer_size is not None and position != buffer_size):
        _check_contiguous(tensors, where, data_start, buffer_size)
    return tensors, metadata


def _check_unique_names(raw: bytes, where: str) -> None:
    """json.loads keeps the last of duplicate keys; safetensors refuses them, and so do we."""
    def pairs_hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointFormatError(f"{where}: tensor {key!r} appears twice in the header")
            seen.add(key)
        return dict(pairs)

    json.loads(raw, object_pairs_hook=pairs_hook)


def _check_contiguous(tensors: list[TensorInfo], where: str, data_start: int, buffer_size: int | None) -> None:
    """As safetensors requires: tensors tile the data buffer exactly, without overlaps or holes."""
    ordered = sorted(tensors, key=itemgetter(3, 4))
    position = data_start
    for name, _, _, start, end in ordered:
        if start < position:
            raise CheckpointFormatError(f"{where}: tensor {name!r} overlaps the tensor before it in the file")
        if start > position:
            raise CheckpointFormatError(f"{where}: {start - position} unused bytes before tensor {name!r} "
                                        "(the data buffer has a hole)")
        position = end
    if buffer_size is not None and position != data_start + buffer_size:
        raise CheckpointFormatError(f"{where}: {data_start + buffer_size - position} bytes follow the last "
                                    "tensor; the file is not a well-formed safetensors file")


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Read and validate the header of a local .safetensors file."""
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(
                    f"{path}: file is {file_size} bytes, too short to be safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > file_size:
                raise CheckpointFormatError(
                    f"{path}: header length {length} runs beyond the end of the file "
                    f"({file_size} bytes); the file is truncated or not safetensors")
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(raw, where=str(path), data_start=8 + length, file_size=file_size)
