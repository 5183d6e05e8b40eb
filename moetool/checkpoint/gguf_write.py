"""Write an edited copy of a GGUF file or split set: tensors kept, dropped, renamed or cut down to
some experts, metadata values replaced, everything else byte for byte.

llama.cpp stacks a layer's experts on the outermost ggml axis (ne2 of ``ffn_*_exps``, ne1 of the
router ``ffn_gate_inp``, ne0 of ``exp_probs_b``), and ggml blocks run along ne0 only, so each
expert is one contiguous byte range (total bytes / E) in every ggml type: kept experts are copied
as they are, without requantizing. Each output part gets the source part's metadata (the raw
key/value bytes, with the replaced integer values patched in place, types kept), alignment and
tensor order; tensor data is copied range by range in the kernel (copy_file_range), never held in
memory, and its writeback to disk is started as it goes (sync_file_range), so that the final
fsync finds little left to write. Every part is written to a temporary file beside its output
and renamed only when all parts are complete; the outputs they replace are moved aside first and
put back if a rename fails.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from moetool.arch.gguf import SPLIT_TENSORS
from moetool.checkpoint.checkpoint import BYTES_READ
from moetool.checkpoint.gguf import GGUF_MAGIC, HEADER, INT_TYPES, KV_START, SCALAR_FORMATS, SPLIT_NAME, read_header
from moetool.checkpoint.writer import _copy_range, _write_all, missing_parents, put_in_place, remove_empty
from moetool.errors import CheckpointFormatError, OutputExistsError, OutputWriteError, UnsupportedError, UsageError


@dataclass(frozen=True)
class TensorEdit:
    """What becomes of one source tensor: a new name (None: the same) and the experts kept of the
    EXPERTS stacked on its outermost axis (None: all of it, unchanged)."""

    name: str | None = None
    kept: tuple[int, ...] | None = None
    experts: int = 0


DROP = None   # an edit of None drops the tensor


def output_parts(out: Path, count: int) -> list[Path]:
    """The files a COUNT-part output named OUT is written as: OUT itself for one part, else
    STEM-0000i-of-0000N.gguf (STEM: OUT without .gguf, or without its own split suffix)."""
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: a GGUF output must be a .gguf file name")
    if count == 1:
        return [out]
    found = SPLIT_NAME.match(out.name)
    if found and int(found["count"]) != count:
        raise UsageError(f"{out}: names a {int(found['count'])}-part split set; the source has {count} parts")
    stem = found["stem"] if found else out.name[: -len(".gguf")]
    return [out.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _expert_axis(dims: list[int], experts: int, name: str, path: Path) -> int:
    """The ggml axis (0 = ne0) the experts are stacked on: the outermost one larger than 1."""
    axis = max((i for i, d in enumerate(dims) if d != 1), default=0)
    if dims[axis] != experts:
        raise CheckpointFormatError(f"{path}: tensor {name!r} has dims {dims} (ggml order); expected "
                                    f"{experts} experts on its outermost axis")
    return axis


class _PartPlan:
    """One output part: its header bytes and, per tensor, the source byte ranges to copy."""

    def __init__(self, source: Path, edits: dict[str, TensorEdit | None], metadata: dict[str, int]):
        """(EDITS name the tensors of the whole set: split.tensors.count, the set's total, is lowered by
        every tensor dropped from any part.)"""
        self.source = source
        head = read_header(source)
        if head.byte_order != "<":
            raise UnsupportedError(f"{source}: not a little-endian GGUF file")
        self.alignment = head.alignment
        self.tensors: list[tuple[str, list[tuple[int, int]]]] = []   # (name, [(start, length)])
        infos = bytearray()
        offset = 0
        for t in head.tensors:
            name, dims, nbytes = t.name, t.dims, t.nbytes
            edit = edits.get(name, TensorEdit())
            if edit is DROP:
                continue
            ranges = [(t.start, nbytes)]
            if edit.kept is not None:
                dims = list(dims)
                axis = _expert_axis(dims, edit.experts, name, source)
                if axis == 0 and t.block != 1:
                    raise UnsupportedError(f"{source}: tensor {name!r} stacks its experts along ggml blocks "
                                           f"({t.type_name}); they cannot be cut apart without requantizing")
                per = nbytes // edit.experts
                ranges = _runs(edit.kept, t.start, per)
                dims[axis] = len(edit.kept)
                nbytes = per * len(edit.kept)
            out_name = (edit.name or name).encode()
            infos += struct.pack("<Q", len(out_name)) + out_name + struct.pack("<I", len(dims))
            infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", t.type, offset)
            self.tensors.append((name, ranges))
            offset = _align(offset + nbytes, self.alignment)
        self.data_bytes = offset
        with open(source, "rb") as fh:   # the key/value pairs as stored; integer values patched in place
            fh.seek(KV_START)
            kv = bytearray(fh.read(head.kv_end - KV_START))
        updates = dict(metadata)
        dropped = sum(1 for e in edits.values() if e is DROP)
        if dropped and isinstance(head.metadata.get(SPLIT_TENSORS), int):
            updates[SPLIT_TENSORS] = head.metadata[SPLIT_TENSORS] - dropped
        for key, value in updates.items():
            if key in head.scalars:
                kind, at = head.scalars[key]
                _patch(kv, key, kind, at - KV_START, value, source)
        header = HEADER.pack(GGUF_MAGIC, head.version, len(self.tensors), len(head.metadata)) + kv + infos
        self.header = header + bytes(-len(header) % self.alignment)
        self.size = len(self.header) + self.data_bytes


def _runs(kept: tuple[int, ...], start: int, per: int) -> list[tuple[int, int]]:
    """Byte ranges of the kept experts, consecutive experts merged into one range."""
    ranges: list[tuple[int, int]] = []
    for e in kept:
        at = start + e * per
        if ranges and ranges[-1][0] + ranges[-1][1] == at:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + per)
        else:
            ranges.append((at, per))
    return ranges


def _patch(kv: bytearray, key: str, kind: int, at: int, value: int, source: Path) -> None:
    """Replace an integer metadata value in the raw key/value bytes, keeping its stored type."""
    if kind not in INT_TYPES:
        raise UnsupportedError(f"{source}: metadata key {key!r} is not an integer; cannot set it to {value}")
    try:
        struct.pack_into("<" + SCALAR_FORMATS[kind], kv, at, value)
    except struct.error:
        raise UnsupportedError(f"{source}: {value} does not fit metadata key {key!r}") from None


def check_outputs(sources: list[Path], out: Path, *, force: bool) -> list[Path]:
    """The output files of OUT (output_parts); refused if one is a source file (even with FORCE)
    or already exists without FORCE."""
    outputs = output_parts(out, len(sources))
    resolved = [s.resolve() for s in sources]
    for path in outputs:
        if path.resolve() in resolved or any(path.exists() and os.path.samefile(path, s) for s in sources):
            raise UsageError(f"{path}: is a file of the source; the input is never overwritten")
    odd = [p for p in outputs if (p.exists() or p.is_symlink()) and (not p.is_file() or p.is_symlink())]
    if odd:   # --force replaces an earlier output file, never a folder, a device or a link
        raise UsageError(f"{odd[0]}: exists and is not a regular file", hint="write to a new path")
    existing = [p for p in outputs if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]}: already exists", hint="use --force to replace it")
    return outputs


def write_edited_gguf(sources: list[Path], out: Path, edits: dict[str, TensorEdit | None],
                      metadata: dict[str, int], *, force: bool = False, progress=None) -> list[Path]:
    """Write the edited copy of the GGUF file or split set SOURCES as OUT (one part per source part,
    each tensor in the same part, see output_parts); METADATA: key -> new integer value, set in
    every part that holds the key. Returns the files written. Atomic: nothing is left on failure."""
    outputs = check_outputs(sources, out, force=force)
    plans = [_PartPlan(s, edits, metadata) for s in sources]
    temps: list[Path] = []
    created = missing_parents(outputs[0])
    try:
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        for plan, path in zip(plans, outputs):
            tmp = path.with_name(f".{path.name}.moetool-tmp-{os.getpid()}")
            temps.append(tmp)
            _write_part(plan, tmp, progress)
        put_in_place(list(zip(temps, outputs)))
        temps.clear()
        _fsync_dir(outputs[0].parent)
    except OSError as exc:
        raise OutputWriteError(f"{out}: writing failed ({exc.strerror or exc}); nothing was left behind") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if temps:   # (cleared once every part is in place)
            remove_empty(created)
    return outputs


def _write_part(plan: _PartPlan, tmp: Path, progress) -> None:
    src = os.open(plan.source, os.O_RDONLY)
    try:
        out = _Output(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        try:
            out.write(plan.header)
            for _, ranges in plan.tensors:
                written = 0
                for start, length in ranges:
                    out.copy(src, start, length)
                    BYTES_READ.add(length)
                    written += length
                    if progress:
                        progress(length)
                out.write(bytes(-written % plan.alignment))
            written = os.lseek(out.fd, 0, os.SEEK_CUR)
            if written != plan.size:
                raise AssertionError(f"{tmp}: wrote {written} bytes, planned {plan.size}")
            os.fsync(out.fd)
        finally:
            os.close(out.fd)
    finally:
        os.close(src)


WRITEBACK_STEP = 16 << 20   # bytes copied between two starts of writeback (8-64 MiB measured alike)


class _Output:
    """The part being written, at POS. Every WRITEBACK_STEP bytes the kernel is asked to start
    writing them to disk (sync_file_range, not waiting): the disk then works while the rest is
    copied, instead of all of it waiting for the final fsync."""

    def __init__(self, fd: int):
        self.fd, self.pos, self._flushed = fd, 0, 0

    def write(self, data: bytes) -> None:
        _write_all(self.fd, data)
        self._advance(len(data))

    def copy(self, src: int, start: int, length: int) -> None:
        for at in range(start, start + length, WRITEBACK_STEP):
            n = min(WRITEBACK_STEP, start + length - at)
            _copy_range(src, self.fd, at, n)
            self._advance(n)

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos - self._flushed >= WRITEBACK_STEP:
            sync_file_range = _sync_file_range()
            if sync_file_range is not None:
                sync_file_range(self.fd, self._flushed, self.pos - self._flushed, SYNC_FILE_RANGE_WRITE)
            self._flushed = self.pos


SYNC_FILE_RANGE_WRITE = 2   # <fcntl.h>: start writeback of the range's dirty pages, do not wait


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux; the os module lacks it), or None where there is none."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
