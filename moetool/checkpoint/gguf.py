"""GGUF files (llama.cpp) as a Checkpoint: one file, a split set, or the folder holding them.

Opening parses the header with struct over an mmap (read_header): the metadata and the tensor
infos, long arrays (token lists, merges) stepped over without being decoded. No tensor data is
read, and neither torch nor gguf-py is imported (gguf-py's GGUFReader builds numpy objects for
every value: a large vocabulary costs it most of a second). Every tensor becomes a
GgufTensorRef: its ggml type name as ``dtype``, its logical shape in numpy order (the file lists
ne0 first; it is reversed here), its absolute byte range. ``config`` holds the metadata keys of
the file's architecture without their ``{arch}.`` prefix (plus ``model_type`` = the architecture
and ``vocab_size``); ``gguf_metadata`` holds every key as stored.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, NamedTuple

from moetool._util import gc_paused
from moetool.arch.gguf import ARCH_KEY, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, TOKENS_KEY
from moetool.checkpoint.checkpoint import BYTES_READ, Checkpoint, Shard, TensorRef
from moetool.errors import CheckpointFormatError, UnsupportedError, UsageError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_DECODED_ARRAY = 1024   # longer metadata arrays (token lists, merges) are not decoded
HEADER = struct.Struct("<4sIQQ")   # magic, version, tensor count, key/value count (little-endian files)
KV_START = HEADER.size             # then the key/value pairs
# stored types numpy reads as they are (numpy dtype names: numpy is imported only to read data)
NATIVE_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I8": "int8", "I16": "int16",
                 "I32": "int32", "I64": "int64"}
# the format's own key: where the data section and every tensor in it start
ALIGNMENT_KEY, DEFAULT_ALIGNMENT = "general.alignment", 32

# GGUF metadata value types: id -> name (gguf-py's GGUFValueType), struct format of the scalars
VALUE_TYPES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
               8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
UINT32, STRING, ARRAY, UINT64 = 4, 8, 9, 10

# ggml tensor types: id -> (name, values per block, bytes per block), as gguf-py's GGML_QUANT_SIZES
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


def ggml_type(kind: int) -> tuple[str, int, int] | None:
    """(name, values per block, bytes per block) of ggml type id KIND, or None if unknown (ids
    newer than GGML_TYPES are looked up in gguf-py, when it knows them)."""
    found = GGML_TYPES.get(kind)
    if found is None:
        try:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            qtype = GGMLQuantizationType(kind)
            found = (qtype.name, *GGML_QUANT_SIZES[qtype])
        except (ImportError, ValueError, KeyError):
            return None
    return found


class GgufArray(NamedTuple):
    """A long metadata array left undecoded: its item type and length."""

    item_type: str
    count: int


class GgufTensorInfo(NamedTuple):
    """One tensor info of a GGUF header."""

    name: str
    dims: tuple[int, ...]   # ggml order: ne0 (the contiguous axis) first
    type: int               # ggml type id
    type_name: str
    block: int              # values per ggml block
    nbytes: int
    start: int              # absolute offset of its data in the file


@dataclass
class GgufHeader:
    """A GGUF file's header as stored."""

    version: int
    byte_order: str                          # struct prefix: "<" little-endian, ">" big-endian
    metadata: dict[str, Any]                 # every key -> value (see _Reader.value)
    scalars: dict[str, tuple[int, int]]      # key of a scalar -> (value type, file offset of the value)
    kv_end: int                              # the key/value pairs are bytes [KV_START, kv_end) of the file
    tensors: list[GgufTensorInfo]
    alignment: int
    data_start: int                          # file offset of the data section
    size: int                                # the file's size in bytes


class _Ended(Exception):
    """A read ran past the end of the file."""


class _UnknownType(Exception):
    """A metadata value type id that is not in VALUE_TYPES."""


class _Reader:
    """Sequential reads of a GGUF header from BUF (an mmap of the file) in its byte order."""

    def __init__(self, buf, order: str, pos: int):
        self.buf, self.order, self.pos, self.size = buf, order, pos, len(buf)
        self._u32 = struct.Struct(order + "I").unpack_from
        self._u64 = struct.Struct(order + "Q").unpack_from

    def u32(self) -> int:
        value, = self._u32(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        value, = self._u64(self.buf, self.pos)
        self.pos += 8
        return value

    def raw_string(self) -> bytes:
        end = self.pos + 8 + self._u64(self.buf, self.pos)[0]
        if end > self.size:
            raise _Ended
        data = self.buf[self.pos + 8:end]
        self.pos = end
        return data

    def scalars(self, kind: int, count: int) -> tuple:
        fmt = SCALAR_FORMATS[kind]
        nbytes = struct.calcsize(fmt) * count
        if self.pos + nbytes > self.size:
            raise _Ended
        values = struct.unpack_from(f"{self.order}{count}{fmt}", self.buf, self.pos)
        self.pos += nbytes
        return values

    def value(self, kind: int) -> Any:
        """A value of type KIND: strings decoded, scalars as Python values, arrays as lists, or
        as GgufArray when longer than MAX_DECODED_ARRAY or holding arrays (as gguf-py's reader,
        which types an array by its first item and counts the items of nested arrays)."""
        if kind == STRING:
            return self.raw_string().decode("utf-8")
        if kind in SCALAR_FORMATS:
            return self.scalars(kind, 1)[0]
        if kind != ARRAY:
            raise _UnknownType(kind)
        item, count = self.u32(), self.u64()
        if not count:
            return GgufArray("UNKNOWN", 0)
        if item not in VALUE_TYPES:
            raise _UnknownType(item)
        if item == ARRAY or count > MAX_DECODED_ARRAY:
            return GgufArray(VALUE_TYPES[item], self.skip(item, count))
        if item == STRING:
            return [self.raw_string().decode("utf-8") for _ in range(count)]
        return list(self.scalars(item, count))

    def skip(self, kind: int, count: int) -> int:
        """Step over COUNT values of type KIND without decoding them; returns how many strings
        or scalars they are (the items of nested arrays counted, as gguf-py does). Nested arrays
        are walked with a stack, not recursion: a file may nest them thousands deep."""
        items = 0
        pending = [(kind, count)]   # (type, values of it still to step over), innermost last
        while pending:
            kind, count = pending.pop()
            if not count:
                continue
            if kind == ARRAY:   # the next array's header; its items, then the rest of this run
                if count > 1:
                    pending.append((ARRAY, count - 1))
                item, n = self.u32(), self.u64()
                if n and item not in VALUE_TYPES:
                    raise _UnknownType(item)
                pending.append((item, n))
                continue
            if kind == STRING:
                if count > (self.size - self.pos) // 8:   # each takes 8 bytes at least: a corrupt count
                    raise _Ended
                buf, at, u64 = self.buf, self.pos, self._u64
                for _ in range(count):
                    at += 8 + u64(buf, at)[0]
                if at > self.size:
                    raise _Ended
                self.pos = at
            elif kind in SCALAR_FORMATS:
                self.pos += struct.calcsize(SCALAR_FORMATS[kind]) * count
                if self.pos > self.size:
                    raise _Ended
            else:
                raise _UnknownType(kind)
            items += count
        return items


def read_header(path: Path) -> GgufHeader:
    """PATH's GGUF header; every way it can be bad is one CheckpointFormatError line."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < KV_START:
                raise CheckpointFormatError(f"{path}: file is {size} bytes, too short to be GGUF")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc.strerror})") from None


def _parse(path: Path, buf) -> GgufHeader:
    magic = buf[:4]
    if magic != GGUF_MAGIC:
        raise CheckpointFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    order = "<"
    version, = struct.unpack_from(order + "I", buf, 4)
    if not version & 0xFFFF:   # written on a big-endian machine
        order = ">"
        version, = struct.unpack_from(order + "I", buf, 4)
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointFormatError(f"{path}: GGUF version {version} is not supported (supported: "
                                    f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    r = _Reader(buf, order, 8)
    metadata: dict[str, Any] = {}
    scalars: dict[str, tuple[int, int]] = {}
    key = None
    try:
        n_tensors, n_kv = r.u64(), r.u64()
        for _ in range(n_kv):
            key = None   # until this pair's key is read
            key = r.raw_string().decode("utf-8")
            kind = r.u32()
            if key in metadata:
                raise CheckpointFormatError(f"{path}: metadata key {key!r} is stored twice")
            if kind in SCALAR_FORMATS:
                scalars[key] = (kind, r.pos)
            metadata[key] = r.value(kind)
        kv_end = r.pos
        key = None
        infos = []
        for _ in range(n_tensors):
            name = r.raw_string().decode("utf-8")
            dims = r.scalars(UINT64, r.u32())
            infos.append((name, dims, r.u32(), r.u64()))
    except (struct.error, _Ended):
        raise CheckpointFormatError(f"{path}: the header ends early: the file is truncated or corrupt") from None
    except _UnknownType as exc:
        raise CheckpointFormatError(f"{path}: metadata key {key!r} has an unknown value type {exc.args[0]}") from None
    except UnicodeDecodeError:
        raise CheckpointFormatError(f"{path}: " + (f"metadata key {key!r} is malformed" if key else
                                                   "a metadata key or tensor name is not UTF-8")) from None
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if ALIGNMENT_KEY in metadata and (scalars.get(ALIGNMENT_KEY, (None,))[0] != UINT32 or alignment <= 0
                                      or alignment & (alignment - 1)):
        raise CheckpointFormatError(f"{path}: {ALIGNMENT_KEY} is {alignment!r}; it must be a power of two "
                                    "stored as UINT32")
    data_start = r.pos + (-r.pos % alignment)
    tensors = []
    names = set()
    for name, dims, kind, offset in infos:
        if name in names:
            raise CheckpointFormatError(f"{path}: tensor {name!r} is stored twice")
        names.add(name)
        found = ggml_type(kind)
        if found is None:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has an unknown ggml type {kind}")
        type_name, block, type_size = found
        if dims and dims[0] % block:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not whole "
                                        f"{type_name} blocks of {block}")
        tensors.append(GgufTensorInfo(name, dims, kind, type_name, block, prod(dims) // block * type_size,
                                      data_start + offset))
    return GgufHeader(version, order, metadata, scalars, kv_end, tensors, alignment, data_start, len(buf))


def matrix_rows(numel: int, shape) -> int:
    """Rows of a tensor of SHAPE seen as a matrix [prod(shape[:-1]), shape[-1]]."""
    return numel // shape[-1] if shape and shape[-1] else 1


@dataclass(slots=True, eq=False)
class GgufTensorRef(TensorRef):
    """A tensor of a GGUF file. ``dtype`` is the ggml type name (F32, F16, Q8_0, Q4_K, ...),
    ``shape`` the logical shape in numpy order, ``numel`` its logical values (n_elements)."""

    byte_order: str = "<"   # the file's (GgufHeader.byte_order): how F32/F16/integers are stored

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self):
        """The tensor as a float32 (or integer) numpy array, dequantized with gguf-py."""
        return self.read_rows(0, self.rows).reshape(self.shape)

    @property
    def rows(self) -> int:
        """Rows of the tensor seen as a matrix [prod(shape[:-1]), shape[-1]]."""
        return matrix_rows(self.numel, self.shape)

    def read_expert(self, expert: int, experts: int):
        """Expert EXPERT of this tensor stacking EXPERTS on its outermost axis, as float32 numpy
        (dequantized with gguf-py): only that expert's bytes are read."""
        import numpy as np

        per = self.rows // experts
        shape = tuple(self.shape[1:]) or (1,)
        return self.read_rows(expert * per, (expert + 1) * per).astype(np.float32).reshape(shape)

    def read_rows(self, start: int, stop: int):
        """Rows [start, stop) of the tensor seen as a matrix [rows, shape[-1]], as numpy: floats
        dequantized with gguf-py, F32/F16/integers as stored. ggml blocks run along the last axis, so
        the rows are one contiguous byte range and only it is read."""
        import numpy as np

        cols = self.shape[-1] if self.shape else 1
        row_bytes = self.nbytes // self.rows
        count = (stop - start) * row_bytes
        BYTES_READ.add(count)
        try:
            raw = np.fromfile(self.shard.path, dtype=np.uint8, count=count, offset=self.start + start * row_bytes)
        except OSError as exc:
            raise CheckpointFormatError(f"{self.shard.path}: cannot read {self.name} ({exc.strerror})") from None
        if raw.size != count:
            raise CheckpointFormatError(f"{self.shard.path}: ended early reading {self.name}")
        native = NATIVE_DTYPES.get(self.dtype)
        if native is not None:
            stored = np.dtype(native).newbyteorder(self.byte_order)   # the file's order, not the machine's
            values = raw.view(stored)
            return (values if stored.isnative else values.astype(native)).reshape(stop - start, cols)
        if self.byte_order != "<":
            # gguf-py dequantizes little-endian blocks; which fields of a block a big-endian writer
            # swapped is not defined by the format
            raise UnsupportedError(f"{self.shard.path}: {self.name} is {self.dtype} in a big-endian GGUF file; "
                                   "only F32, F16, F64 and integer tensors are read from big-endian files",
                                   hint="convert the file to little-endian (gguf-py's gguf_convert_endian.py)")
        from gguf import GGMLQuantizationType, dequantize

        try:
            qtype = GGMLQuantizationType[self.dtype]
        except KeyError:
            raise UnsupportedError(f"{self.shard.path}: gguf-py does not know ggml type {self.dtype} "
                                   f"({self.name})") from None
        try:
            return dequantize(raw.reshape(stop - start, row_bytes), qtype).reshape(stop - start, cols)
        except NotImplementedError:
            raise UnsupportedError(f"{self.shard.path}: gguf-py cannot dequantize {self.dtype} "
                                   f"({self.name})") from None

    def load_rows(self, start: int, stop: int):
        raise UnsupportedError(f"{self.shard.name}: reading row blocks of GGUF tensors is not supported yet")

    def load_slice(self, index):
        raise UnsupportedError(f"{self.shard.name}: reading slices of GGUF tensors is not supported yet")


def is_gguf_source(path: Path) -> bool:
    """A .gguf file, or a folder without config.json that holds .gguf files."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def open_gguf(path: Path, *, source: str | None = None) -> Checkpoint:
    """Open a .gguf file, any part of a split set, or a folder holding one model's GGUF files."""
    with gc_paused():
        return _open(path, source or str(path))


def _open(path: Path, source: str) -> Checkpoint:
    notes: list[str] = []
    if path.is_dir():
        path = _pick_in_folder(path, notes)
    parts = _split_parts(path)
    headers = [read_header(p) for p in parts]
    _check_split(parts, headers)

    shards: list[Shard] = []
    tensors: dict[str, TensorRef] = {}
    for part, header in zip(parts, headers):
        shard = Shard(part.name, part, "gguf", header.size)
        shards.append(shard)
        refs = _tensors(part, header, shard, header.size)
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointFormatError(f"{part}: tensor {ref.name!r} is also stored in "
                                            f"{tensors[ref.name].shard.name}; the parts are from different "
                                            "split sets")
            tensors[ref.name] = ref
    meta = headers[0].metadata
    arch = meta.get(ARCH_KEY)
    if not isinstance(arch, str) or not arch:
        raise CheckpointFormatError(f"{parts[0]}: has no {ARCH_KEY} metadata key")
    prefix = arch + "."
    config: dict[str, Any] = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    config["model_type"] = arch
    if "vocab_size" not in config:
        tokens = meta.get(TOKENS_KEY)
        if tokens is not None:
            config["vocab_size"] = tokens.count if isinstance(tokens, GgufArray) else len(tokens)
    return Checkpoint(source, "gguf", parts[0].parent, config, tensors, shards, notes, gguf_metadata=meta)


def _pick_in_folder(root: Path, notes: list[str]) -> Path:
    files = sorted(p for p in root.glob("*.gguf") if p.is_file())
    models: dict[str, Path] = {}
    for f in files:
        found = SPLIT_NAME.match(f.name)
        models.setdefault(found["stem"] if found else f.name, f)
    if len(models) > 1:
        main = {k: v for k, v in models.items() if not k.startswith("mmproj")}
        if len(main) == 1:
            notes.append(f"{root}: ignored the multimodal projector file(s) "
                         + ", ".join(k for k in models if k not in main))
            models = main
    if not models:
        raise CheckpointFormatError(f"{root}: no .gguf files found")
    if len(models) > 1:
        raise UsageError(f"{root}: holds {len(models)} GGUF models ({', '.join(sorted(models))}); "
                         "pass the file to inspect")
    return next(iter(models.values()))


def _split_parts(path: Path) -> list[Path]:
    found = SPLIT_NAME.match(path.name)
    if not found:
        return [path]
    count = int(found["count"])
    if count < 1 or not 1 <= int(found["no"]) <= count:
        raise CheckpointFormatError(f"{path}: split file name says part {int(found['no'])} of {count}")
    parts = [path.with_name(f"{found['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointFormatError(f"{path}: split set of {count} parts lacks {', '.join(missing)}")
    return parts


def _check_split(parts: list[Path], headers: list[GgufHeader]) -> None:
    metadata = [h.metadata for h in headers]
    count = len(parts)
    first = metadata[0]
    if count == 1:
        declared = first.get(SPLIT_COUNT)
        if isinstance(declared, int) and declared > 1:
            raise CheckpointFormatError(
                f"{parts[0]}: is part {int(first.get(SPLIT_NO, 0)) + 1} of a {declared}-part split set, "
                "but is not named as one (NAME-0000i-of-0000N.gguf)")
        return
    total = first.get(SPLIT_TENSORS)
    for i, (part, meta) in enumerate(zip(parts, metadata)):
        if meta.get(SPLIT_COUNT) != count or meta.get(SPLIT_NO) != i:
            raise CheckpointFormatError(
                f"{part}: its metadata says part {meta.get(SPLIT_NO)!r} (from 0) of {meta.get(SPLIT_COUNT)!r}, "
                f"but its name says part {i} of {count}: it belongs to another split set")
        if meta.get(SPLIT_TENSORS) != total:
            raise CheckpointFormatError(
                f"{part}: belongs to another split set ({SPLIT_TENSORS} {meta.get(SPLIT_TENSORS)!r}, "
                f"{parts[0].name} says {total!r})")
        arch = meta.get(ARCH_KEY)
        if i and arch is not None and arch != first.get(ARCH_KEY):
            raise CheckpointFormatError(f"{part}: architecture {arch!r} differs from {parts[0].name}'s "
                                        f"{first.get(ARCH_KEY)!r}: it belongs to another split set")
    stored = sum(len(h.tensors) for h in headers)
    if not isinstance(total, int) or stored != total:
        raise CheckpointFormatError(f"{parts[0]}: the split set holds {stored} tensors, its metadata says "
                                    f"{total!r}; a part is from another split set")


def _tensors(path: Path, header: GgufHeader, shard: Shard, size: int) -> list[GgufTensorRef]:
    refs = []
    base, align = header.data_start, header.alignment
    spans = []
    for t in header.tensors:
        start, end = t.start, t.start + t.nbytes
        if end > size:
            raise CheckpointFormatError(f"{path}: tensor {t.name!r} ends at byte {end}, beyond the end of the "
                                        f"file ({size} bytes); the file is truncated or corrupt")
        if (start - base) % align:
            raise CheckpointFormatError(f"{path}: tensor {t.name!r} starts at data offset {start - base}, "
                                        f"not a multiple of the alignment {align}")
        refs.append(GgufTensorRef(t.name, t.type_name, t.dims[::-1], shard, start, end, header.byte_order))
        spans.append((start, end, t.name))
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise CheckpointFormatError(f"{path}: tensor {name!r} overlaps tensor {prev!r}")
    return refs
