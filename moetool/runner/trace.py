"""Routing traces: every token's routing streamed to disk as it is produced, and read back.

A moetool trace is a folder (format "moetool-routing-trace", version 1):

    trace.json                      header: source, family, seq_len, batch_size, capacity_window,
                                    moe_layers, experts and top_k per layer, what is stored, and
                                    the ranks: [{"rank", "dir", "first_sequence", "sequences"}]
    rank-00/tokens.npy              int32   [sequences, seq_len]          token ids
    rank-00/layer-003.experts.npy   int16   [sequences, seq_len, top_k]   chosen experts, in slot order
    rank-00/layer-003.weights.npy   float16 [sequences, seq_len, top_k]   their gate weights
    rank-00/layer-003.router.npy    float32 [sequences, seq_len, 3]       router entropy (nats), top-1
                                                                          probability, top-1 - top-2
    rank-00/layer-003.salience.npy  float32 [sequences, seq_len, top_k]   ||gate x expert output|| (--saliency)

Plain .npy files (numpy's format, header first, data appended as micro-batches finish), so
`numpy.load(path, mmap_mode="r")` reads any of them. Each rank of a torchrun job writes its own
folder; rank 0 writes trace.json last and renames the folder into place, so a trace without
trace.json is incomplete.

vLLM's routed experts (`--enable-return-routed-experts`: int32 [tokens, num_hidden_layers, top_k]
per request, dense layers' slots zero, or the MoE layers alone; expert ids only; prefix-cached
positions are -1) are read from a .npy file (one request)
or a folder of .npy files (one request each, in name order); rows holding -1 are skipped.

Writing makes no device->host copy in the hooks: a micro-batch's routing is gathered on the
device and moved to the host with one non-blocking copy when the micro-batch is done, then
written by a background thread.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetool.checkpoint.writer import check_replaceable, missing_parents, put_in_place, remove_empty
from moetool.errors import CheckpointFormatError, OutputWriteError, UsageError
from moetool.runner import distributed

log = logging.getLogger(__name__)

FORMAT = "moetool-routing-trace"
VERSION = 1
HEADER = "trace.json"
READ_TOKENS = 1 << 18   # tokens of one layer read at a time when a trace is read back


class TraceError(CheckpointFormatError):
    """A routing trace is truncated, malformed or not a trace (exit 4)."""


def _layer_file(layer: int, what: str) -> str:
    return f"layer-{layer:03d}.{what}.npy"


class _NpyAppender:
    """A .npy file whose header states its final shape, filled front to back."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": shape})
        self.expected = self.fh.tell() + int(np.prod(shape)) * self.dtype.itemsize

    def write(self, data: memoryview | bytes) -> None:
        self.fh.write(data)

    def close(self) -> None:
        size = self.fh.tell()
        self.fh.close()
        if size != self.expected:
            raise OutputWriteError(f"{self.path}: trace file holds {size} bytes, {self.expected} expected")


class TraceWriter:
    """Streams one rank's routing to PATH.partial/rank-NN (see the module docstring)."""

    def __init__(self, path: Path, *, world, header: dict[str, Any], layers: dict[int, tuple[int, int]],
                 sequences: int, first_sequence: int, seq_len: int, token_ids, saliency: bool, force: bool):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.world, self.header, self.layers = world, header, layers
        self.sequences, self.first_sequence, self.seq_len = sequences, first_sequence, seq_len
        self.saliency = saliency
        if world.primary:
            check_replaceable(self.path, force, is_trace_output)
            if (self.partial.exists() or self.partial.is_symlink()) and not _is_trace_folder(self.partial):
                raise UsageError(f"{self.partial}: exists, and is not an unfinished trace (it would be deleted)",
                                 hint="remove it yourself, or write the trace to another path")
            shutil.rmtree(self.partial, ignore_errors=True)   # (left by an interrupted run)
            self.created = missing_parents(self.partial)
            try:
                self.partial.mkdir(parents=True)
            except OSError as exc:
                raise OutputWriteError(f"{self.partial}: cannot create the trace folder ({exc.strerror})") from None
        distributed.barrier()
        self.rank_dir = self.partial / f"rank-{world.rank:02d}"
        self.rank_dir.mkdir()
        tokens = _NpyAppender(self.rank_dir / "tokens.npy", np.int32, (sequences, seq_len))
        tokens.write(np.ascontiguousarray(token_ids, dtype=np.int32).tobytes())
        tokens.close()
        self.files: dict[tuple[int, str], _NpyAppender] = {}
        for layer, (_, k) in layers.items():
            for what, dtype, width in (("experts", np.int16, k), ("weights", np.float16, k),
                                       ("router", np.float32, 3)) + ((("salience", np.float32, k),) if saliency
                                                                     else ()):
                self.files[(layer, what)] = _NpyAppender(self.rank_dir / _layer_file(layer, what), dtype,
                                                         (sequences, seq_len, width))
        self.pending: list[tuple[int, str, Any]] = []
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="moetool-trace-writer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ called from the hooks (device tensors)

    def add(self, layer: int, index, weight, router) -> None:
        import torch

        self.pending += [(layer, "experts", index.to(torch.int16)), (layer, "weights", weight.to(torch.float16)),
                         (layer, "router", router.to(torch.float32))]

    def add_salience(self, layer: int, salience) -> None:
        import torch

        self.pending.append((layer, "salience", salience.to(torch.float32)))

    def step_done(self) -> None:
        """One micro-batch (full mode) or one layer of one micro-batch (streamed) is done: gather its
        routing into one buffer, start one non-blocking copy to pinned host memory, queue the write."""
        import torch

        if self.error is not None:
            raise self.error
        if not self.pending:
            return
        parts, self.pending = self.pending, []
        flat = [t.contiguous().reshape(-1).view(torch.uint8) for _, _, t in parts]
        device_buffer = torch.cat(flat)
        if device_buffer.device.type == "cuda":
            with torch.cuda.device(device_buffer.device):   # the copy and its event on that device's stream
                host = torch.empty(device_buffer.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(device_buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device_buffer.device))
        else:
            host, event = device_buffer, None
        layout = [(layer, what, t.numel() * t.element_size()) for layer, what, t in parts]
        self.queue.put((host, event, layout))

    def _drain(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            host, event, layout = item
            try:
                if event is not None:
                    event.synchronize()
                data = memoryview(host.numpy())
                offset = 0
                for layer, what, nbytes in layout:
                    self.files[(layer, what)].write(data[offset:offset + nbytes])
                    offset += nbytes
            except BaseException as exc:   # reported to the main thread at the next step or at close
                self.error = exc if not isinstance(exc, OSError) else OutputWriteError(
                    f"{self.partial}: cannot write the trace ({exc.strerror})")

    def close(self, stats_header: dict[str, Any] | None = None) -> None:
        """Finish this rank's files; rank 0 writes trace.json and renames the folder into place."""
        self.step_done()
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        for appender in self.files.values():
            appender.close()
        mine = {"rank": self.world.rank, "dir": self.rank_dir.name, "first_sequence": self.first_sequence,
                "sequences": self.sequences}
        ranks = _gather(mine, self.world)
        if self.world.primary:
            header = {"format": FORMAT, "version": VERSION, **self.header, "seq_len": self.seq_len,
                      "sequences": sum(r["sequences"] for r in ranks),
                      "moe_layers": sorted(self.layers),
                      "experts": {str(layer): e for layer, (e, _) in self.layers.items()},
                      "top_k": {str(layer): k for layer, (_, k) in self.layers.items()},
                      "stored": ["tokens", "experts", "weights", "router"] + (["salience"] if self.saliency else []),
                      "ranks": sorted(ranks, key=lambda r: r["first_sequence"])}
            try:
                (self.partial / HEADER).write_text(json.dumps(header, indent=1))
            except OSError as exc:
                raise OutputWriteError(f"{self.partial}: cannot write the trace ({exc.strerror or exc})") from None
            self._put_in_place()
        distributed.barrier()

    def _put_in_place(self) -> None:
        """Rename PATH.partial to PATH; an earlier trace there (--force) is moved aside first, put back if
        the rename fails (or is interrupted), and removed once the new trace is in place."""
        earlier = self.path.exists()   # (a folder: check_replaceable refused anything else)
        try:
            put_in_place([(self.partial, self.path)])
        except OSError as exc:
            raise OutputWriteError(f"{self.path}: cannot put the trace in place ({exc.strerror or exc})"
                                   + ("; the earlier trace is kept" if earlier else "")) from None

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)
        for appender in self.files.values():
            appender.fh.close()
        if self.world.primary:
            shutil.rmtree(self.partial, ignore_errors=True)
            remove_empty(self.created)


def is_trace_output(folder: Path) -> bool:
    """FOLDER looks like a trace moetool wrote: a trace.json of this format, beside rank-NN folders
    only (plain folders, no links). Only such a folder is replaced (--force)."""
    try:
        header = json.loads((folder / HEADER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT and _is_trace_folder(folder)


def _is_trace_folder(folder: Path) -> bool:
    """FOLDER is a plain folder holding nothing but rank-NN folders and trace.json, as a trace (or an
    unfinished one, PATH.partial) does."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return False
        entries = list(folder.iterdir())
    except OSError:
        return False
    return all(entry.name == HEADER and entry.is_file() and not entry.is_symlink() or
               _RANK_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() for entry in entries)


_RANK_DIR = re.compile(r"rank-\d{2,}")


def _gather(item: dict, world) -> list[dict]:
    if not world.distributed:
        return [item]
    import torch.distributed as dist

    out: list = [None] * world.size
    distributed.collective("all_gather_object", dist.all_gather_object, out, item)
    return out


# ---------------------------------------------------------------- reading


@dataclass
class TraceChunk:
    """Whole sequences of one MoE layer of a trace: expert ids [B, S, k] (int64) and, when stored,
    gate weights, router statistics and salience (float32)."""

    layer: int
    first_sequence: int
    experts: Any
    weights: Any = None
    router: Any = None
    salience: Any = None


@dataclass
class Trace:
    kind: str                          # "moetool" | "vllm"
    path: Path
    header: dict[str, Any]
    moe_layers: list[int]
    experts: dict[int, int]            # moetool traces: as recorded; vLLM: from the model
    top_k: dict[int, int]
    seq_len: int | None                # None: sequences of different lengths (vLLM requests)
    sequences: int
    tokens: int
    has_weights: bool
    files: list[Path]                  # vLLM: one array per request
    num_layers: int | None = None      # vLLM: the model's decoder layers (the arrays' layer axis may be all of them)

    def chunks(self):
        """TraceChunks, each layer's in sequence order; memory bounded by READ_TOKENS tokens of one layer."""
        return self._moetool_chunks() if self.kind == "moetool" else self._vllm_chunks()

    def _moetool_chunks(self):
        import torch

        stored = set(self.header.get("stored", []))
        step = max(1, READ_TOKENS // max(1, self.seq_len))
        for rank in self.header["ranks"]:
            folder = self.path / rank["dir"]
            for layer in self.moe_layers:
                width = {"router": 3}
                arrays = {what: _open_npy(folder / _layer_file(layer, what),
                                          (rank["sequences"], self.seq_len, width.get(what, self.top_k[layer])))
                          for what in ("experts", "weights", "router", "salience") if what in stored}
                for start in range(0, rank["sequences"], step):
                    part = {what: torch.from_numpy(np.array(array[start:start + step]))
                            for what, array in arrays.items()}
                    experts = part.pop("experts").to(torch.int64)
                    _check_ids(layer, experts, self.experts[layer], self.path)
                    yield TraceChunk(layer, rank["first_sequence"] + start, experts,
                                     **{what: value.to(torch.float32) for what, value in part.items()})

    def _vllm_chunks(self):
        import torch

        for position, layer in enumerate(self.moe_layers):
            for number, path in enumerate(self.files):
                rows = np.asarray(_open_vllm(path, self.moe_layers, self.num_layers))
                rows = rows[(rows >= 0).all(axis=(1, 2))]   # prefix-cached positions are -1
                if not len(rows):
                    continue
                experts = torch.from_numpy(rows[None, :, position, :].astype(np.int64))
                _check_ids(layer, experts, self.experts[layer], path)
                yield TraceChunk(layer, number, experts)


def _check_ids(layer: int, ids, experts: int, path: Path) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= experts):
        raise UsageError(f"{path}: layer {layer} routes to expert {int(ids.max())}, but the model has "
                         f"{experts} experts there (a trace of another model?)")


def _open_npy(path: Path, shape: tuple[int, ...]):
    """A stored array, memory-mapped, after checking it is whole and of the expected shape."""
    if not path.is_file():
        raise TraceError(f"{path}: missing from the trace")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{path}: truncated or not a .npy array ({exc})") from None
    if tuple(array.shape) != tuple(shape):
        raise TraceError(f"{path}: shape {tuple(array.shape)}, the header says {tuple(shape)}")
    return array


def _open_vllm(path: Path, moe_layers: list[int], num_layers: int | None):
    """The [tokens, MoE layers, top_k] routing of one request. vLLM's and SGLang's capturers index
    the layer axis by decoder layer (dense layers' slots zero); arrays of the MoE layers alone are
    read too."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{path}: truncated or not a .npy array ({exc})") from None
    if array.ndim != 3 or array.dtype.kind not in "iu":
        raise TraceError(f"{path}: not an integer [tokens, layers, top_k] array (shape {array.shape}, "
                         f"{array.dtype})")
    if array.shape[1] == len(moe_layers):
        return array
    if array.shape[1] == num_layers:
        return array[:, moe_layers]
    raise UsageError(f"{path}: routing of {array.shape[1]} layers, but the model has {num_layers} decoder layers, "
                     f"{len(moe_layers)} of them MoE")


def open_trace(path: Path, *, moe_layers: list[int], experts: dict[int, int], top_k: dict[int, int],
               num_layers: int | None = None) -> Trace:
    """A moetool trace folder or vLLM routed-experts arrays, checked against the model's MoE layers,
    expert counts and top-k (MOE_LAYERS, EXPERTS, TOP_K) and its NUM_LAYERS decoder layers."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace")
    if path.is_dir() and (path / HEADER).is_file():
        return _moetool_trace(path, moe_layers, experts, top_k)
    if path.is_dir() and not any(path.glob("*.npy")):
        raise TraceError(f"{path}: neither a moetool trace (no {HEADER}) nor a folder of .npy arrays")
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    tokens = 0
    for file in files:
        array = _open_vllm(file, moe_layers, num_layers)
        k = array.shape[2]
        for layer in moe_layers:
            if k != top_k[layer]:
                raise UsageError(f"{file}: {k} experts per token, but the model's layer {layer} routes to "
                                 f"{top_k[layer]}")
        tokens += array.shape[0]
    return Trace("vllm", path, {}, list(moe_layers), dict(experts), dict(top_k), None, len(files), tokens, False,
                 files, num_layers)


STORED = ("tokens", "experts", "weights", "router", "salience")


def _count(value, least: int = 0) -> bool:
    return type(value) is int and value >= least


def read_trace_header(path: Path) -> dict[str, Any]:
    """PATH/trace.json, every field checked (type and range); a rank's folder must be a plain name of
    a folder inside PATH. Anything else is one TraceError line."""
    where = path / HEADER
    try:
        header = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TraceError(f"{where}: unreadable trace header ({type(exc).__name__})") from None

    def bad(what: str):
        return TraceError(f"{where}: malformed trace header: {what}")

    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError(f"{where}: not a {FORMAT} header")
    if header.get("version") != VERSION or type(header.get("version")) is not int:
        raise TraceError(f"{where}: trace version {header.get('version')!r}; this moetool reads version {VERSION}")
    layers = header.get("moe_layers")
    if not isinstance(layers, list) or not all(_count(v) for v in layers) or len(set(layers)) != len(layers):
        raise bad("'moe_layers' must be a list of distinct layer numbers")
    for key in ("experts", "top_k"):
        table = header.get(key)
        if not isinstance(table, dict) or set(table) != {str(layer) for layer in layers} or \
                not all(_count(v, 1) for v in table.values()):
            raise bad(f"{key!r} must map each of the MoE layers to a positive integer")
    if not _count(header.get("seq_len"), 1) or not _count(header.get("sequences")):
        raise bad("'seq_len' and 'sequences' must be a positive and a non-negative integer")
    if header.get("capacity_window") is not None and not _count(header["capacity_window"], 1):
        raise bad("'capacity_window' must be a positive integer")
    if not isinstance(header.get("dtype", ""), str):
        raise bad("'dtype' must be a string")
    stored = header.get("stored")
    if not isinstance(stored, list) or not all(isinstance(v, str) and v in STORED for v in stored) or \
            not {"tokens", "experts"} <= set(stored):
        raise bad(f"'stored' must list what is stored, of {', '.join(STORED)} (tokens and experts at least)")
    ranks = header.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise bad("'ranks' must be a non-empty list")
    real = path.resolve()
    for rank in ranks:
        if not isinstance(rank, dict) or not _count(rank.get("rank")) or not _count(rank.get("first_sequence")) \
                or not _count(rank.get("sequences")):
            raise bad("each rank needs integer 'rank', 'first_sequence' and 'sequences' (not negative)")
        name = rank.get("dir")
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise bad(f"a rank's 'dir' must name a folder inside the trace, not {name!r}")
        folder = path / name
        if folder.is_symlink() or not folder.is_dir() or folder.resolve().parent != real:
            raise TraceError(f"{folder}: the rank folder is missing or not a folder inside the trace")
    if sum(rank["sequences"] for rank in ranks) != header["sequences"]:
        raise TraceError(f"{where}: its ranks hold a different number of sequences than it says")
    return header


def _moetool_trace(path: Path, moe_layers, experts, top_k) -> Trace:
    header = read_trace_header(path)
    layers = list(header["moe_layers"])
    recorded_experts = {int(k): v for k, v in header["experts"].items()}
    recorded_k = {int(k): v for k, v in header["top_k"].items()}
    seq_len, sequences, ranks = header["seq_len"], header["sequences"], header["ranks"]
    if layers != list(moe_layers) or any(recorded_experts[layer] != experts[layer] or
                                         recorded_k[layer] != top_k[layer] for layer in layers):
        raise UsageError(f"{path}: this trace is of another model (MoE layers {layers}, experts "
                         f"{sorted(set(recorded_experts.values()))}, top-k {sorted(set(recorded_k.values()))}; the "
                         f"model has layers {list(moe_layers)}, experts {sorted(set(experts.values()))}, top-k "
                         f"{sorted(set(top_k.values()))})")
    for rank in ranks:   # every file whole, before anything is computed
        folder = path / rank["dir"]
        _open_npy(folder / "tokens.npy", (int(rank["sequences"]), seq_len))
        for layer in layers:
            for what in header.get("stored", []):
                if what != "tokens":
                    _open_npy(folder / _layer_file(layer, what),
                              (int(rank["sequences"]), seq_len, 3 if what == "router" else top_k[layer]))
    return Trace("moetool", path, header, layers, recorded_experts, recorded_k, seq_len, sequences,
                 sequences * seq_len, "weights" in header.get("stored", []), [])
