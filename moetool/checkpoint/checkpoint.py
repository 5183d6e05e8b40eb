"""The checkpoint abstraction: config + lazy tensor references over one or many shards.

Opening a checkpoint reads only headers (safetensors) or the pickle's structure
(.bin, mmap'd, weights_only). Tensor bytes are read on demand by TensorRef.load()
or load_slice(), which take torch; everything else here is torch-free.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from itertools import repeat
from math import prod
from pathlib import Path
from typing import Any

from moetool._util import gc_paused
from moetool.checkpoint.header import DTYPE_BYTES, TensorInfo, read_header
from moetool.errors import CheckpointFormatError, ConfigError, UnsupportedError

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class ReadCounter:
    """Bytes of tensor data this process has read from weight files (every checkpoint, every
    thread): what the streamed runner's read-once guarantee is measured with."""

    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.value += nbytes


BYTES_READ = ReadCounter()


class Shard:
    """One weights file. Holds the open handle used by TensorRef.load()."""

    __slots__ = ("name", "path", "format", "size", "metadata", "_handle")

    def __init__(self, name: str, path: Path | None, format: str, size: int | None,
                 metadata: dict[str, str] | None = None):
        self.name = name          # file name relative to the checkpoint root
        self.path = path          # None for remote header-only shards
        self.format = format      # "safetensors" | "bin" | "remote" | "gguf"
        self.size = size
        self.metadata = metadata or {}
        self._handle: Any = None

    def handle(self) -> Any:
        """The open reader: safetensors' safe_open, or the mmap'd .bin state dict."""
        if self._handle is None:
            if self.format == "remote":
                raise UnsupportedError(
                    f"{self.name}: only the header was fetched from the hub; tensor data is not local",
                    hint="run without header-only mode (moetool downloads the weights), or download "
                         "the repository first")
            if self.format == "gguf":
                raise UnsupportedError(f"{self.name}: GGUF tensors are read with TensorRef.load() "
                                       "(numpy), not through a shard handle")
            if self.format == "safetensors":
                from safetensors import safe_open
                self._handle = safe_open(str(self.path), framework="pt")
            else:
                self._handle = _load_bin(self.path)
        return self._handle

    def close(self) -> None:
        self._handle = None

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, {self.format})"


@dataclass(slots=True, eq=False)
class TensorRef:
    """A lazy reference to one stored tensor: where it is and what it holds."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Shard
    start: int = -1   # absolute byte range in the shard file; -1 when unknown (.bin)
    end: int = -1

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def load(self):
        """Read the whole tensor as a torch.Tensor (CPU)."""
        handle = self.shard.handle()
        BYTES_READ.add(self.nbytes)
        if self.shard.format == "safetensors":
            return handle.get_tensor(self.name)
        return handle[self.name]

    def load_rows(self, start: int, stop: int):
        """Rows [start, stop) of the tensor seen as a matrix [prod(shape[:-1]), shape[-1]] (torch)."""
        cols = self.shape[-1] if self.shape else 1
        if self.shard.format == "safetensors":
            import torch

            itemsize = DTYPE_BYTES[self.dtype]
            length = (stop - start) * cols * itemsize
            BYTES_READ.add(length)
            with open(self.shard.path, "rb", buffering=0) as fh:
                data = bytearray(length)
                fh.seek(self.start + start * cols * itemsize)
                if fh.readinto(data) != length:
                    raise CheckpointFormatError(f"{self.shard.path}: ended early reading {self.name}")
            flat = torch.frombuffer(data, dtype=TORCH_DTYPES[self.dtype]) if length else \
                torch.empty(0, dtype=TORCH_DTYPES[self.dtype])
            return flat.reshape(stop - start, cols)
        return self.load().reshape(-1, cols)[start:stop]

    def load_slice(self, index):
        """Read part of the tensor, e.g. one expert ``load_slice(e)`` of a fused [E, ...]
        tensor, without reading the rest of it."""
        handle = self.shard.handle()
        part = handle.get_slice(self.name)[index] if self.shard.format == "safetensors" else \
            handle[self.name][index].clone()
        BYTES_READ.add(part.numel() * part.element_size())
        return part


@dataclass
class Checkpoint:
    """A model checkpoint: its config and every stored tensor, by name."""

    source: str                     # what the user gave: path or hub id
    kind: str                       # "dir" | "file" | "hub" | "hub-headers" | "gguf"
    root: Path | None               # folder holding config and shards (None: remote)
    config: dict[str, Any] | None
    tensors: dict[str, TensorRef]
    shards: list[Shard]
    notes: list[str]                # non-fatal oddities found while opening
    # GGUF only (kind "gguf"): every metadata key as stored; config then holds the keys of the
    # file's architecture without their "{arch}." prefix
    gguf_metadata: dict[str, Any] | None = None

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _is_tensor(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _holds_tensors(value) -> bool:
    """VALUE is a tensor, or a dict/list/tuple with a tensor somewhere inside."""
    if isinstance(value, dict):
        return any(map(_holds_tensors, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_holds_tensors, value))
    return _is_tensor(value)


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
    # a legacy (pre-zip) file cannot be mmap'd: read it whole; weights_only still guards the unpickling
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_bin(path: Path) -> dict:
    try:
        state = _torch_load(path)
    except Exception as exc:  # torch raises many types for bad pickles
        raise CheckpointFormatError(
            f"{path}: cannot be loaded safely as a PyTorch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: does not hold a state dict")
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{path}: state dict key {key!r} is not a string")
        if _is_tensor(value):
            if str(value.dtype).removeprefix("torch.") not in _TORCH_TO_ST:
                raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
            tensors[key] = value
        elif _holds_tensors(value):   # dropping it would silently lose the model's weights
            raise CheckpointFormatError(
                f"{path}: is not a flat state dict: {key!r} holds a dict or list of tensors",
                hint="a nested state_dict, e.g. a training checkpoint; save model.state_dict() itself")
        # other values (an epoch count, a version string) are not weights: skipped
    if not tensors:
        raise CheckpointFormatError(f"{path}: holds no tensors", hint="save model.state_dict() itself")
    return tensors


_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                "U8": "uint8", "BOOL": "bool"}


class _TorchDtypes(dict):
    """safetensors dtype name -> torch dtype, importing torch on first use."""

    def __missing__(self, key: str):
        import torch

        self.update({k: getattr(torch, v) for k, v in _TORCH_NAMES.items()})
        return self[key]


TORCH_DTYPES = _TorchDtypes()

_TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64",
                "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def read_config(path: Path) -> dict[str, Any]:
    """Read config.json, failing with a one-line ConfigError that names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:   # (the decoder recurses once per nesting level)
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: is not a JSON object")
    return config


def _safe_member(root: Path, name: str, index: Path) -> Path:
    """The shard file an index names, refusing names that leave ROOT. (A shard that is a symlink is
    read where it leads: hub caches, shared storage and local-dir downloads link their weights.)"""
    if not name or Path(name).is_absolute() or "\\" in name or ".." in Path(name).parts:
        raise CheckpointFormatError(f"{index}: shard {name!r} points outside the checkpoint folder")
    path = root / name
    if not path.is_file():
        raise CheckpointFormatError(f"{index}: names shard {name!r}, which does not exist")
    return path


def read_index(index: Path) -> tuple[dict[str, str], set[str]]:
    """The index's weight_map, and the shard file names it holds."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
        files = set(weight_map.values())   # (a TypeError for unhashable values)
        if not all(isinstance(f, str) for f in files):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise CheckpointFormatError(f"{index}: not a valid index (needs a 'weight_map' object of "
                                    "tensor name -> shard file name)") from None
    return weight_map, files


def _safetensors_shard(path: Path, name: str) -> tuple[Shard, list[TensorInfo]]:
    infos, metadata = read_header(path)
    return Shard(name, path, "safetensors", path.stat().st_size, metadata), infos


def _bin_shard(path: Path, name: str) -> tuple[Shard, list[TensorRef]]:
    shard = Shard(name, path, "bin", path.stat().st_size)
    refs = [TensorRef(k, _TORCH_TO_ST.get(str(v.dtype).removeprefix("torch."), "F32"), tuple(v.shape), shard)
            for k, v in shard.handle().items()]
    return shard, refs


def open_local(path: Path, *, source: str | None = None) -> Checkpoint:
    """Open a local folder, .safetensors file or .bin file."""
    with gc_paused():
        return _open_local(path, source or str(path))


def _open_local(path: Path, source: str) -> Checkpoint:
    if path.is_file():
        return _open_files(path.parent, [path], config=None, kind="file", source=source)
    root = path
    config_path = root / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{config_path}: not found; a checkpoint folder needs its config.json",
                          hint="to look at a bare weights file, pass the file itself")
    config = _with_side_quantization(root, read_config(config_path))

    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = root / index_name
        if index.exists():
            return _open_indexed(root, index, config, source)

    single = root / "model.safetensors"
    files = [single] if single.exists() else sorted(root.glob("*.safetensors"))
    if not files:
        files = sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointFormatError(f"{root}: no .safetensors or pytorch_model*.bin weights found")
    return _open_files(root, files, config=config, kind="dir", source=source)


# quantization described beside config.json instead of in it (older AutoGPTQ releases; ModelOpt's hf export), as
# transformers and vLLM read it: file -> (quant_method, the key holding the description, or None for the whole file)
SIDE_QUANTIZATION = {"quantize_config.json": ("gptq", None), "hf_quant_config.json": ("modelopt", "quantization")}


def _with_side_quantization(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """CONFIG with the quantization_config a side file in ROOT describes (see with_side_quantization)."""
    return with_side_quantization(config, lambda name: read_config(root / name) if (root / name).is_file() else None)


def with_side_quantization(config: dict[str, Any], read_side) -> dict[str, Any]:
    """CONFIG with the quantization_config a side file describes, where config.json has none (the files as they
    are); READ_SIDE(file name) gives the file's JSON, or None where there is no such file."""
    if config.get("quantization_config"):
        return config
    for name, (method, key) in SIDE_QUANTIZATION.items():
        described = read_side(name)
        if isinstance(described, dict):
            described = described.get(key) if key else described
            if isinstance(described, dict):
                return {**config, "quantization_config": {"quant_method": method, **described}}
    return config


def _open_indexed(root: Path, index: Path, config: dict[str, Any], source: str) -> Checkpoint:
    """A folder whose index (weight_map: tensor -> shard file) names its shards, refusing an index
    that lists a tensor in a shard that does not hold it."""
    weight_map, files = read_index(index)
    listed = len(weight_map)
    unique: dict[Path, Path] = {}   # one Path object per file, so shards compare by identity
    shard_paths = {f: unique.setdefault(p, p) for f in files for p in (_safe_member(root, f, index),)}
    file_names = {path: f for f, path in shard_paths.items()}   # (fewer, where a file has two names)
    agreeing = 0

    def count(shard: Shard, stored: dict[str, TensorRef]) -> None:
        # the shard's tensors the index lists under the shard's name, counted in C; popped, so that
        # the index's strings are freed (their memory reused) as the shards' are read
        nonlocal agreeing
        agreeing += list(map(weight_map.pop, stored, repeat(None))).count(file_names[shard.path])

    ckpt = _open_files(root, sorted(unique), config=config, kind="dir", source=source, each=count)
    if agreeing != listed or len(file_names) != len(shard_paths):   # what is wrong, in the index's order
        for name, shard_name in read_index(index)[0].items():
            ref = ckpt.tensors.get(name)
            if ref is None or ref.shard.path is not shard_paths[shard_name]:
                raise CheckpointFormatError(
                    f"{index}: lists {name!r} in {shard_name}, but that shard does not hold it")
    extra = len(ckpt.tensors) - listed
    if extra:
        ckpt.notes.append(f"{extra} tensors are in the shards but not in {index.name}")
    return ckpt


def _open_files(root: Path, files: list[Path], *, config, kind: str, source: str, each=None) -> Checkpoint:
    """The checkpoint of FILES (refusing a tensor stored twice); EACH(shard, its tensors by name), if
    given, is called for every file read."""
    tensors: dict[str, TensorRef] = {}
    shards: list[Shard] = []
    for path in files:
        name = str(path.relative_to(root)) if kind == "dir" else path.name
        if path.suffix == ".safetensors":
            shard, infos = _safetensors_shard(path, name)
            stored = {tensor: TensorRef(tensor, dtype, shape, shard, start, end)
                      for tensor, dtype, shape, start, end in infos}
        elif path.suffix == ".bin":
            shard, refs = _bin_shard(path, name)
            stored = {ref.name: ref for ref in refs}
        else:
            raise CheckpointFormatError(f"{path}: not a .safetensors or .bin file")
        shards.append(shard)
        if not tensors.keys().isdisjoint(stored):
            twice = next(tensor for tensor in stored if tensor in tensors)
            raise CheckpointFormatError(f"{path}: tensor {twice!r} is also stored in {tensors[twice].shard.name}")
        tensors.update(stored)
        if each is not None:
            each(shard, stored)
    return Checkpoint(source, kind, root, config, tensors, shards, notes=[])
