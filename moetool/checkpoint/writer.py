"""Write planned tensors as sharded safetensors, streaming, into a folder made atomically.

Every output tensor is known (name, dtype, shape) before a byte is written, so each
shard's header is written first and the data then streams in piece by piece:
raw byte ranges of source files (copied by the kernel with copy_file_range, as fast as
cp) or tensors computed on the fly (casts, dequantization, transposes). A thread
computes the next pieces while the current one is written, so both cores work and at
most a few pieces are in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from moetool.checkpoint.checkpoint import BYTES_READ
from moetool.checkpoint.header import DTYPE_BYTES, MAX_HEADER_BYTES
from moetool.errors import CheckpointFormatError, MoetoolError, OutputExistsError, OutputWriteError, UsageError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PREFETCH = 3            # computed pieces in flight
COPY_CHUNK = 64 << 20   # bytes per copy_file_range / read-write step


@dataclass(frozen=True)
class RawPiece:
    """Bytes [start, start + length) of a source file, copied as they are."""

    path: Path
    start: int
    length: int


@dataclass(frozen=True)
class ComputedPiece:
    """A tensor computed when needed; its bytes (C order) are written."""

    compute: Callable[[], object]   # -> torch.Tensor (CPU) already in the output dtype
    length: int


Piece = RawPiece | ComputedPiece


@dataclass
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[Piece]
    note: str = ""          # what was done to it, for --dry-run

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    def check(self) -> None:
        total = sum(p.length for p in self.pieces)
        if total != self.nbytes:
            raise AssertionError(f"{self.name}: pieces hold {total} bytes, {self.dtype}{list(self.shape)} "
                                 f"needs {self.nbytes}")


@dataclass
class ShardPlan:
    file: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[ShardPlan]:
    """Fill shards in order up to MAX_SHARD_SIZE bytes (a larger tensor gets a shard of its own)."""
    shards: list[ShardPlan] = []
    filled = 0   # bytes in the last shard, kept as we go: summing it per tensor was quadratic
    for tensor in tensors:
        size = tensor.nbytes
        if not shards or (shards[-1].tensors and filled + size > max_shard_size):
            shards.append(ShardPlan(""))
            filled = 0
        shards[-1].tensors.append(tensor)
        filled += size
    count = len(shards)
    for i, shard in enumerate(shards):
        shard.file = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
    return shards


def header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # keep the data buffer 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor) -> memoryview:
    """The raw bytes of a CPU torch tensor, without a copy when it is contiguous."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.write(fd, view[:COPY_CHUNK])
        view = view[written:]


def _copy_range(src: int, dst: int, start: int, length: int) -> None:
    """Copy LENGTH bytes at START of SRC to DST's current position (in the kernel when possible)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, min(COPY_CHUNK, length - done), start + done)
        except OSError:
            n = 0
        if n <= 0:   # not supported between these files: plain reads and writes
            data = os.pread(src, min(COPY_CHUNK, length - done), start + done)
            if not data:
                raise MoetoolError(f"a source file ended early while copying {length} bytes")
            _write_all(dst, data)
            n = len(data)
        done += n


class _SourceFiles:
    """Open source files once, by path."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pieces_in_order(shards: list[ShardPlan], pool: ThreadPoolExecutor, prefetch: int
                     ) -> Iterator[tuple[Piece, object]]:
    """Yield (piece, future-or-None) in write order, computing up to PREFETCH pieces ahead."""
    queue: deque = deque()
    in_flight = 0
    for piece in (p for s in shards for t in s.tensors for p in t.pieces):
        future = pool.submit(piece.compute) if isinstance(piece, ComputedPiece) else None
        queue.append((piece, future))
        in_flight += future is not None
        while in_flight > prefetch:
            first = queue.popleft()
            in_flight -= first[1] is not None
            yield first
    yield from queue


def write_shards(folder: Path, shards: list[ShardPlan], metadata: dict[str, str],
                 progress: Callable[[int], None] | None = None, workers: int = 2, prefetch: int = PREFETCH
                 ) -> None:
    """Write SHARDS (and the index when there are several) into FOLDER, computing up to PREFETCH
    pieces ahead on WORKERS threads."""
    sources = _SourceFiles()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moetool-compute")
    try:
        pieces = _pieces_in_order(shards, pool, prefetch)
        for shard in shards:
            out = os.open(folder / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(out, header_bytes(shard.tensors, metadata))
                for tensor in shard.tensors:
                    for _ in tensor.pieces:
                        piece, future = next(pieces)
                        if future is None:
                            _copy_range(sources.fd(piece.path), out, piece.start, piece.length)
                        else:
                            data = tensor_bytes(future.result())
                            if data.nbytes != piece.length:
                                raise AssertionError(f"{tensor.name}: a piece computed {data.nbytes} bytes, "
                                                     f"{piece.length} planned")
                            _write_all(out, data)
                        if progress:
                            progress(piece.length)
                os.fsync(out)
            finally:
                os.close(out)
        if len(shards) > 1:
            weight_map = {t.name: s.file for s in shards for t in s.tensors}
            index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        sources.close()


@contextmanager
def atomic_folder(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it becomes OUT, on any failure it is removed.

    An existing OUT is refused unless FORCE (and it is an earlier output, see is_checkpoint_output),
    and then replaced only after the new one is complete: moved aside, and put back if the new one
    cannot take its place (an error, or Ctrl-C between the two renames).
    """
    out = out.absolute()
    check_replaceable(out, force, is_checkpoint_output)
    created = missing_parents(out)   # removed again if the write fails
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.moetool-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        put_in_place([(tmp, out)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)   # (only folders left empty)
        raise


def put_in_place(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each written NEW of PAIRS [(NEW, TARGET), ...] to its TARGET as one step. What is at the
    targets (an earlier output: --force) is moved aside first, put back if any rename fails or is
    interrupted (Ctrl-C), so a set is never part new and part old, and removed once all are in place.
    An earlier output that cannot be put back raises OutputWriteError saying where it is."""
    moved: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, target in pairs:
            if target.exists():
                aside = unused_path(target.with_name(f".{target.name}.moetool-old-{os.getpid()}"))
                moved.append((aside, target))   # (before the rename: an interrupt may follow it)
                os.replace(target, aside)
        for new, target in pairs:
            placed.append(target)   # (every earlier one was moved aside: only a new one is removed)
            os.replace(new, target)
    except BaseException:
        for target in placed:
            _remove(target)
        for aside, target in moved:
            if aside.exists() and not target.exists():
                try:
                    os.replace(aside, target)
                except OSError as exc:
                    raise OutputWriteError(f"{target}: writing failed, and the earlier output could not be put "
                                           f"back ({exc.strerror or exc}); it is at {aside}") from None
        raise
    for aside, _ in moved:
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def unused_path(path: Path) -> Path:
    """PATH, or PATH.1, PATH.2... if it exists (a folder left by a process of the same id)."""
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def materialize(tensor: OutputTensor):
    """Assemble a planned tensor in memory (torch), from its pieces, for the streamed runner."""
    import torch

    from moetool.checkpoint.checkpoint import TORCH_DTYPES

    buffer = bytearray(tensor.nbytes)
    view = memoryview(buffer)
    offset = 0
    for piece in tensor.pieces:
        if isinstance(piece, RawPiece):
            with open(piece.path, "rb", buffering=0) as fh:
                fh.seek(piece.start)
                fh.readinto(view[offset:offset + piece.length])
            BYTES_READ.add(piece.length)
        else:
            view[offset:offset + piece.length] = tensor_bytes(piece.compute())
        offset += piece.length
    if not buffer:
        return torch.empty(tensor.shape, dtype=TORCH_DTYPES[tensor.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[tensor.dtype]).reshape(tensor.shape)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def side_files(ckpt) -> list[Path]:
    """Files an output copies from its source as they are: tokenizer, generation config, chat
    template... (not weights, indexes, config.json, the model card or hidden files). A symlink among
    them leading out of the source folder is refused: what it points to would be copied."""
    if ckpt.root is None or ckpt.kind == "file":
        return []
    files = [p for p in sorted(ckpt.root.iterdir()) if p.is_file() and p.name not in ("config.json", "README.md")
             and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")
             and not p.name.startswith(".")]
    boundary = _link_boundary(ckpt.root)
    return [_check_inside(ckpt.root, p, boundary) for p in files]


def _link_boundary(root: Path) -> Path:
    """The folder ROOT's side files may lead into through symlinks: ROOT itself (resolved) or, inside
    a Hugging Face cache (.../snapshots/REVISION/..., whose files link to the repository's blobs/),
    that repository's cache folder."""
    real = root.resolve()
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent != folder.parent:
            return folder.parent.parent
    return real


def _check_inside(root: Path, path: Path, boundary: Path) -> Path:
    """PATH (a side file of the checkpoint folder ROOT), refused when it is a symlink leading out of
    the folder: what it points to would be copied into the output."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:   # a symbolic-link loop
        raise CheckpointFormatError(f"{path}: cannot be read ({exc})") from None
    if not target.is_relative_to(boundary):
        raise CheckpointFormatError(f"{path}: is a link to {target}, outside the checkpoint folder {root}; it "
                                    "would be copied into the output",
                                    hint="copy the file into the folder instead of linking to it")
    return path


def _source_folder(ckpt) -> Path | None:
    """The folder a checkpoint was given as (None for a file, or a remote checkpoint)."""
    if ckpt.root is not None and (ckpt.kind in ("dir", "hub") or Path(ckpt.source).is_dir()):
        return ckpt.root.resolve()
    return None


def missing_parents(path: Path) -> list[Path]:
    """The folders above PATH that do not exist yet, innermost first (made for an output, removed
    again with `remove_empty` if writing it fails)."""
    return [p for p in Path(path).absolute().parents if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:   # innermost first; only while still empty
        try:
            folder.rmdir()
        except OSError:
            return


OUTPUT_MARK = "moetool_op"   # __metadata__ key of every shard moetool writes (the operation that wrote it)


def _shard_metadata(path: Path) -> dict | None:
    """The __metadata__ of a safetensors file, read without validating the rest (None if unreadable)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


# what a checkpoint folder holds: weights, and beside them (hub repositories) configs, tokenizers,
# model card, licence, remote code; a folder holding anything else is not replaced
CHECKPOINT_WEIGHTS = (".safetensors", ".bin")
CHECKPOINT_SUFFIXES = (*CHECKPOINT_WEIGHTS, ".json", ".txt", ".md", ".model", ".jinja", ".py", ".tiktoken", "")
CACHE_FOLDERS = (".cache",)   # left by `hf download --local-dir` and `hf upload-large-folder`


def is_checkpoint_output(folder: Path) -> bool:
    """FOLDER looks like an earlier output (of moetool, or save_pretrained, or a hub download): weights
    and only the files a checkpoint folder holds beside them, no subfolder but a hub tool's cache.
    Only such a folder is replaced (--force): never a project that merely holds a config.json."""
    weights = False
    for entry in folder.iterdir():
        if entry.is_dir():
            if entry.is_symlink() or entry.name not in CACHE_FOLDERS:
                return False
        elif entry.name.startswith("."):   # .gitattributes and the like
            continue
        elif entry.suffix not in CHECKPOINT_SUFFIXES:
            return False
        weights = weights or entry.suffix in CHECKPOINT_WEIGHTS
    return weights


def check_replaceable(out: Path, force: bool, earlier_output: Callable[[Path], bool]) -> None:
    """Refuse an output folder OUT that would replace what it must not: the current folder or one
    holding it (an empty OUT is the current folder), something not a folder, or (with FORCE) a folder
    that is neither empty nor an earlier output, as EARLIER_OUTPUT(folder) says (is_checkpoint_output,
    or a trace's check)."""
    target, here = out.resolve(), Path.cwd().resolve()
    if target == here or here.is_relative_to(target):
        raise UsageError(f"{out}: is the current folder, or holds it; the output must be a new folder")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UsageError(f"{out}: exists and is not a folder; the output is a folder", hint="write to a new path")
    if not force:
        raise OutputExistsError(f"{out}: already exists", hint="use --force to replace it")
    if any(out.iterdir()) and not earlier_output(out):
        raise UsageError(f"{out}: holds files, but no earlier output (a folder of weights and checkpoint files "
                         "only); --force replaces outputs only", hint="remove it yourself, or write to a new folder")


def refuse_inside_source(out: Path, *ckpts) -> None:
    """Writing OUT may neither touch a source nor replace a folder holding one: an output inside a
    source folder would be read while it is written, and --force would delete a source inside OUT."""
    target = Path(out).resolve()
    for ckpt in ckpts:
        folder = _source_folder(ckpt)
        if folder is not None and (target == folder or target.is_relative_to(folder)):
            raise UsageError(f"{out}: the output may not be inside the source folder {ckpt.root}")
        sources = ([folder] if folder is not None else []) + [s.path.resolve() for s in ckpt.shards if s.path]
        touched = next((p for p in sources if p == target or p.is_relative_to(target)), None)
        if touched is not None:
            raise UsageError(f"{out}: the output would replace the source {touched}; the input is never "
                             "overwritten", hint="write to a new path")


def write_checkpoint(out: Path, shards: list[ShardPlan], *, op: str, config: dict | None, files: list[Path],
                     readme: str, force: bool, progress=None, check=None, workers: int = 2,
                     prefetch: int = PREFETCH) -> None:
    """Write a whole checkpoint folder atomically: shards (+ index), config.json, copied side files and
    a model card; CHECK(tmp folder) runs before the rename. A write failure leaves nothing behind."""
    from moetool import __version__

    metadata = {"format": "pt", "moetool_version": __version__, OUTPUT_MARK: op}
    try:
        with atomic_folder(out, force=force) as tmp:
            write_shards(tmp, shards, metadata, progress, workers, prefetch)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for file in files:
                shutil.copy2(file, tmp / file.name)
            (tmp / "README.md").write_text(readme)
            if check is not None:
                check(tmp)
    except OSError as exc:
        raise OutputWriteError(f"{out}: writing failed ({exc.strerror or exc}); nothing was left behind") from None
