"""GGUF files (llama.cpp) as a Checkpoint: one file, a split set, or the folder holding them.

Opening reads the header with gguf-py's GGUFReader (a numpy memmap: no tensor data is read and
torch is not imported). Every tensor becomes a GgufTensorRef: its ggml type name as ``dtype``,
its logical shape in numpy order (gguf-py lists ne0 first; it is reversed here), its absolute
byte range. ``config`` holds the metadata keys of the file's architecture without their
``{arch}.`` prefix (plus ``model_type`` = the architecture and ``vocab_size``);
``gguf_metadata`` holds every key as stored.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
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


class GgufArray(NamedTuple):
    """A long metadata array left undecoded: its item type and length."""

    item_type: str
    count: int


@dataclass(slots=True, eq=False)
class GgufTensorRef(TensorRef):
    """A tensor of a GGUF file. ``dtype`` is the ggml type name (F32, F16, Q8_0, Q4_K, ...),
    ``shape`` the logical shape in numpy order, ``numel`` its logical values (n_elements)."""

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self):
        """The tensor as a float32 (or integer) numpy array, dequantized with gguf-py."""
        import numpy as np
        from gguf import GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

        qtype = GGMLQuantizationType[self.dtype]
        BYTES_READ.add(self.nbytes)
        try:
            raw = np.fromfile(self.shard.path, dtype=np.uint8, count=self.nbytes, offset=self.start)
        except OSError as exc:
            raise CheckpointFormatError(f"{self.shard.path}: cannot read {self.name} ({exc.strerror})") from None
        if raw.size != self.nbytes:
            raise CheckpointFormatError(f"{self.shard.path}: ended early reading {self.name}")
        native = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}.get(self.dtype)
        if native is not None:
            return raw.view(native).reshape(self.shape)
        try:
            data = raw.reshape(quant_shape_to_byte_shape(self.shape, qtype))
            return dequantize(data, qtype).reshape(self.shape)
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
    readers = [_read(p) for p in parts]
    metadata = [_metadata(r) for r in readers]
    _check_split(parts, readers, metadata)

    shards: list[Shard] = []
    tensors: dict[str, TensorRef] = {}
    for part, reader in zip(parts, readers):
        size = os.path.getsize(part)
        shard = Shard(part.name, part, "gguf", size)
        shards.append(shard)
        refs = _tensors(part, reader, shard, size)
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointFormatError(f"{part}: tensor {ref.name!r} is also stored in "
                                            f"{tensors[ref.name].shard.name}; the parts are from different "
                                            "split sets")
            tensors[ref.name] = ref
    meta = metadata[0]
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


def _read(path: Path):
    """GGUFReader(path), with every way it can fail turned into one CheckpointFormatError line."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(24)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 24:
        raise CheckpointFormatError(f"{path}: file is {size} bytes, too short to be GGUF")
    if head[:4] != GGUF_MAGIC:
        raise CheckpointFormatError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version_le, = struct.unpack("<I", head[4:8])
    version = version_le if version_le & 0xFFFF else struct.unpack(">I", head[4:8])[0]
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointFormatError(f"{path}: GGUF version {version} is not supported (supported: "
                                    f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:   # gguf-py raises ValueError, KeyError, IndexError, struct and numpy errors
        raise CheckpointFormatError(f"{path}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "GGMLQuantizationType" in text:
        number = re.search(r"(\d+)\)? is not a valid", text)
        return f"a tensor has an unknown ggml type {number.group(1) if number else text}"
    if "GGUFValueType" in text or "field type" in text:
        return f"a metadata value has an unknown type ({text})"
    if "reshape" in text or "buffer is smaller" in text:
        return ("tensor data runs beyond the end of the file: the file is truncated, or a tensor's "
                "offset or shape is wrong")
    if "duplicate" in text.lower():
        return text
    if isinstance(exc, (IndexError, struct.error)) or "index" in text:
        return "the header ends early: the file is truncated or corrupt"
    return f"cannot be read as GGUF ({type(exc).__name__}: {text}); the file is truncated or corrupt"


_SCALARS = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "UINT64", "INT64", "FLOAT64",
            "BOOL"}


def _metadata(reader) -> dict[str, Any]:
    """Every key -> value; strings decoded, scalars as Python values, long arrays as GgufArray."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = _value(field)
        except (IndexError, UnicodeDecodeError, ValueError):
            raise CheckpointFormatError(f"{reader.data.filename}: metadata key {key!r} is malformed") from None
    return out


def _value(field) -> Any:
    kind = field.types[0].name
    if kind == "STRING":
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind in _SCALARS:
        value = field.parts[field.data[0]][0].item()
        return bool(value) if kind == "BOOL" else value
    if kind == "ARRAY":
        item = field.types[1].name if len(field.types) > 1 else "UNKNOWN"
        if len(field.data) > MAX_DECODED_ARRAY:
            return GgufArray(item, len(field.data))
        if item == "STRING":
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if item in _SCALARS:
            return [field.parts[i][0].item() for i in field.data]
        return GgufArray(item, len(field.data))
    raise ValueError(kind)


def _check_split(parts: list[Path], readers, metadata: list[dict]) -> None:
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
    stored = sum(len(r.tensors) for r in readers)
    if not isinstance(total, int) or stored != total:
        raise CheckpointFormatError(f"{parts[0]}: the split set holds {stored} tensors, its metadata says "
                                    f"{total!r}; a part is from another split set")


def _tensors(path: Path, reader, shard: Shard, size: int) -> list[GgufTensorRef]:
    refs = []
    base, align = reader.data_offset, reader.alignment
    spans = []
    for t in reader.tensors:
        start = t.data_offset
        end = start + t.n_bytes
        if end > size:
            raise CheckpointFormatError(f"{path}: tensor {t.name!r} ends at byte {end}, beyond the end of the "
                                        f"file ({size} bytes); the file is truncated or corrupt")
        if (start - base) % align:
            raise CheckpointFormatError(f"{path}: tensor {t.name!r} starts at data offset {start - base}, "
                                        f"not a multiple of the alignment {align}")
        refs.append(GgufTensorRef(t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), shard,
                                  start, end))
        spans.append((start, end, t.name))
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise CheckpointFormatError(f"{path}: tensor {name!r} overlaps tensor {prev!r}")
    return refs
