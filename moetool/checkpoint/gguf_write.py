"""Write an edited copy of a GGUF file or split set: tensors kept, dropped, renamed or cut down to
some experts, metadata values replaced, everything else byte for byte.

llama.cpp stacks a layer's experts on the outermost ggml axis (ne2 of ``ffn_*_exps``, ne1 of the
router ``ffn_gate_inp``, ne0 of ``exp_probs_b``), and ggml blocks run along ne0 only, so each
expert is one contiguous byte range (total bytes / E) in every ggml type: kept experts are copied
as they are, without requantizing. Each output part gets the source part's metadata (the raw
key/value bytes, with the replaced integer values patched in place, types kept), alignment and
tensor order; tensor data is copied range by range in the kernel (copy_file_range), never held in
memory. Every part is written to a temporary file beside its output and renamed only when all
parts are complete.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from moetool.arch.gguf import SPLIT_TENSORS
from moetool.checkpoint.checkpoint import BYTES_READ
from moetool.checkpoint.gguf import GGUF_MAGIC, SPLIT_NAME
from moetool.checkpoint.writer import _copy_range, _write_all
from moetool.errors import CheckpointFormatError, OutputExistsError, OutputWriteError, UnsupportedError, UsageError

HEADER = struct.Struct("<4sIQQ")   # magic, version, tensor count, key/value count
KV_START = HEADER.size


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


# GGUF metadata value types (gguf-py's GGUFValueType): struct format of the scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_INTS = {0, 1, 2, 3, 4, 5, 10, 11}
ALIGNMENT_KEY, DEFAULT_ALIGNMENT = "general.alignment", 32


@dataclass
class _Header:
    """A GGUF file's header as stored: the raw key/value bytes, where each scalar's value lies in
    them, and the tensor infos (name, ggml dims, ggml type, offset in the data section)."""

    version: int
    kv: bytes
    kv_count: int
    scalars: dict[str, tuple[int, int]]          # key -> (value type, offset of the value in kv)
    tensors: list[tuple[str, list[int], int, int]]
    alignment: int
    data_start: int


def _read_header(path: Path) -> _Header:
    """Parse the header with struct over an mmap (gguf-py's reader builds an array per value: a
    150,000-token vocabulary takes it a second; this takes milliseconds)."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            magic, version, n_tensors, n_kv = HEADER.unpack_from(buf, 0)
            if magic != GGUF_MAGIC or not version & 0xFFFF:
                raise UnsupportedError(f"{path}: not a little-endian GGUF file")
            pos = KV_START
            scalars: dict[str, tuple[int, int]] = {}

            def skip(kind: int, at: int, count: int = 1) -> int:
                if kind == _STRING:
                    for _ in range(count):
                        at += 8 + struct.unpack_from("<Q", buf, at)[0]
                    return at
                if kind == _ARRAY:
                    for _ in range(count):
                        item, n = struct.unpack_from("<IQ", buf, at)
                        at = skip(item, at + 12, n)
                    return at
                return at + struct.calcsize("<" + _SCALARS[kind]) * count

            for _ in range(n_kv):
                size = struct.unpack_from("<Q", buf, pos)[0]
                key = bytes(buf[pos + 8:pos + 8 + size]).decode("utf-8")
                kind = struct.unpack_from("<I", buf, pos + 8 + size)[0]
                pos += 12 + size
                if kind in _SCALARS:
                    scalars[key] = (kind, pos - KV_START)
                pos = skip(kind, pos)
            kv = bytes(buf[KV_START:pos])
            alignment = DEFAULT_ALIGNMENT
            if ALIGNMENT_KEY in scalars:
                kind, at = scalars[ALIGNMENT_KEY]
                alignment = struct.unpack_from("<" + _SCALARS[kind], kv, at)[0]
            tensors = []
            for _ in range(n_tensors):
                size = struct.unpack_from("<Q", buf, pos)[0]
                name = bytes(buf[pos + 8:pos + 8 + size]).decode("utf-8")
                pos += 8 + size
                n_dims = struct.unpack_from("<I", buf, pos)[0]
                dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
                pos += 4 + 8 * n_dims
                kind, offset = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                tensors.append((name, dims, kind, offset))
        except (struct.error, KeyError, UnicodeDecodeError, IndexError):
            raise CheckpointFormatError(f"{path}: the header ends early or is malformed") from None
    return _Header(version, kv, n_kv, scalars, tensors, alignment, _align(pos, alignment))


class _PartPlan:
    """One output part: its header bytes and, per tensor, the source byte ranges to copy."""

    def __init__(self, source: Path, edits: dict[str, TensorEdit | None], metadata: dict[str, int]):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.source = source
        head = _read_header(source)
        self.alignment = head.alignment
        self.tensors: list[tuple[str, list[tuple[int, int]]]] = []   # (name, [(start, length)])
        infos = bytearray()
        offset = dropped = 0
        for name, dims, kind, data_offset in head.tensors:
            edit = edits.get(name, TensorEdit())
            if edit is DROP:
                dropped += 1
                continue
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError:
                raise CheckpointFormatError(f"{source}: tensor {name!r} has an unknown ggml type {kind}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = prod(dims) // block * type_size
            start = head.data_start + data_offset
            ranges = [(start, nbytes)]
            if edit.kept is not None:
                dims = list(dims)
                axis = _expert_axis(dims, edit.experts, name, source)
                if axis == 0 and block != 1:
                    raise UnsupportedError(f"{source}: tensor {name!r} stacks its experts along ggml blocks "
                                           f"({qtype.name}); they cannot be cut apart without requantizing")
                per = nbytes // edit.experts
                ranges = _runs(edit.kept, start, per)
                dims[axis] = len(edit.kept)
                nbytes = per * len(edit.kept)
            out_name = (edit.name or name).encode()
            infos += struct.pack("<Q", len(out_name)) + out_name + struct.pack("<I", len(dims))
            infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)
            self.tensors.append((name, ranges))
            offset = _align(offset + nbytes, self.alignment)
        self.data_bytes = offset
        kv = bytearray(head.kv)
        updates = dict(metadata)
        if dropped and SPLIT_TENSORS in head.scalars:
            kind, at = head.scalars[SPLIT_TENSORS]
            updates[SPLIT_TENSORS] = struct.unpack_from("<" + _SCALARS[kind], kv, at)[0] - dropped
        for key, value in updates.items():
            if key in head.scalars:
                _patch(kv, key, *head.scalars[key], value, source)
        header = HEADER.pack(GGUF_MAGIC, head.version, len(self.tensors), head.kv_count) + bytes(kv) + bytes(infos)
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
    if kind not in _INTS:
        raise UnsupportedError(f"{source}: metadata key {key!r} is not an integer; cannot set it to {value}")
    try:
        struct.pack_into("<" + _SCALARS[kind], kv, at, value)
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
    try:
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        for plan, path in zip(plans, outputs):
            tmp = path.with_name(f".{path.name}.moetool-tmp-{os.getpid()}")
            temps.append(tmp)
            _write_part(plan, tmp, progress)
        for tmp, path in zip(temps, outputs):
            os.replace(tmp, path)
        temps.clear()
        _fsync_dir(outputs[0].parent)
    except OSError as exc:
        raise OutputWriteError(f"{out}: writing failed ({exc.strerror or exc}); nothing was left behind") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return outputs


def _write_part(plan: _PartPlan, tmp: Path, progress) -> None:
    src = os.open(plan.source, os.O_RDONLY)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(dst, plan.header)
            for _, ranges in plan.tensors:
                written = 0
                for start, length in ranges:
                    _copy_range(src, dst, start, length)
                    BYTES_READ.add(length)
                    written += length
                    if progress:
                        progress(length)
                pad = -written % plan.alignment
                if pad:
                    _write_all(dst, bytes(pad))
            if os.lseek(dst, 0, os.SEEK_CUR) != plan.size:
                raise AssertionError(f"{tmp}: wrote {os.lseek(dst, 0, os.SEEK_CUR)} bytes, planned {plan.size}")
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


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


def read_expert(ref, expert: int, experts: int):
    """Expert EXPERT of a GGUF tensor stacking EXPERTS on its outermost axis, as float32 numpy
    (dequantized with gguf-py): only that expert's bytes are read."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

    per = ref.nbytes // experts
    shape = tuple(ref.shape[1:]) or (1,)
    BYTES_READ.add(per)
    raw = np.fromfile(ref.shard.path, dtype=np.uint8, count=per, offset=ref.start + expert * per)
    if raw.size != per:
        raise CheckpointFormatError(f"{ref.shard.path}: ended early reading {ref.name}")
    native = {"F32": np.float32, "F16": np.float16, "F64": np.float64}.get(ref.dtype)
    if native is not None:
        return raw.view(native).astype(np.float32).reshape(shape)
    qtype = GGMLQuantizationType[ref.dtype]
    try:
        return dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype).reshape(shape)
    except NotImplementedError:
        raise UnsupportedError(f"{ref.shard.path}: gguf-py cannot dequantize {ref.dtype} ({ref.name})") from None
