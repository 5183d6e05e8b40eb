"""Running micro-batches through a loaded model: whole (`full`) or layer-major (`streamed`).

full: each micro-batch of `batch_size` whole sequences goes through the model's own forward.

streamed (layer-major): decoder layer i is loaded once, every micro-batch goes through it, then
it is freed and layer i+1 (read, and dequantized, on a background thread while layer i ran) is
loaded. The hidden states between layers live in an `ActivationStore`: on the device while they
fit, then in host memory, then in a file under `offload_dir`. Each layer's other arguments
(attention mask, rotary embeddings, position ids, whatever the family passes) are exactly what
the model computes: the model's own forward is run with its decoder layers stubbed out, and the
stub of layer i hands back what the model called it with. The final norm is applied the same way
(the stack's forward with every layer stubbed, the first returning the last layer's output).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from moetool.errors import OutputWriteError, UnsupportedError
from moetool.runner.device import DeviceError, available_memory
from moetool.runner.memory import release_heap

log = logging.getLogger(__name__)

HOST_SHARE = 0.5      # of MemAvailable the host tier of the activation store may use (without --offload-dir)
DEVICE_SHARE = 0.5    # of the device memory left after two layers' weights


@dataclass
class MicroBatch:
    slot: int                  # position in the run (activation store slot)
    first_sequence: int        # global index of its first sequence
    ids: object                # [B, S] LongTensor (host)


@dataclass
class RunTiming:
    seconds: float = 0.0
    layer_seconds: dict[int, float] = field(default_factory=dict)
    weight_wait_seconds: float = 0.0       # streamed: time spent waiting for the next layer's weights
    store: dict[str, int] = field(default_factory=dict)   # streamed: activation bytes per tier


def micro_batches(ids, batch_size: int, first_sequence: int = 0) -> list[MicroBatch]:
    """IDS [N, S] in micro-batches of BATCH_SIZE sequences, numbered from FIRST_SEQUENCE."""
    step = max(1, batch_size)
    return [MicroBatch(n, first_sequence + start, ids[start:start + step])
            for n, start in enumerate(range(0, ids.shape[0], step))]


class ActivationStore:
    """One tensor per micro-batch slot, kept on the device while the device budget lasts, then in
    host memory while the host budget lasts, then in one file under OFFLOAD_DIR (read and written
    with pread/pwrite, so file pages are page cache, not process memory)."""

    def __init__(self, device, *, device_budget: int, host_budget: int, offload_dir: Path | None):
        self.device = device
        self.budget = {"device": device_budget, "host": host_budget}
        self.used = {"device": 0, "host": 0, "disk": 0}
        self.slots: dict[int, tuple] = {}   # slot -> (tier, tensor | (offset, shape, dtype))
        self._given_dir = offload_dir
        self._dir: Path | None = None
        self._fd: int | None = None
        self._end = 0

    @classmethod
    def sized(cls, device, offload_dir: Path | None, *, keep_free: int = 0, device_share: float = DEVICE_SHARE):
        """A store with the default budgets: DEVICE_SHARE of the device memory left after KEEP_FREE bytes
        (none on the CPU, where the device is the host), HOST_SHARE of the host's available memory (none
        with OFFLOAD_DIR: the user asked for files)."""
        import torch

        device_budget = 0 if device.type != "cuda" else \
            int(device_share * max(0, available_memory(device) - keep_free))
        host_budget = 0 if offload_dir is not None else int(HOST_SHARE * available_memory(torch.device("cpu")))
        return cls(device, device_budget=device_budget, host_budget=host_budget, offload_dir=offload_dir)

    def put(self, slot: int, tensor, *, replace: bool = False) -> None:
        """Hold TENSOR under SLOT; a slot keeps its shape, unless REPLACE lets a new one take its place
        (a disk slot's bytes are then not reused)."""
        import torch

        nbytes = self._counted(tensor)
        if slot in self.slots and self._shape(slot) != (tuple(tensor.shape), tensor.dtype):
            if not replace:
                raise ValueError(f"activation slot {slot} holds {self._shape(slot)}, not {tuple(tensor.shape)}")
            tier, value = self.slots.pop(slot)
            if tier != "disk":
                self.used[tier] -= self._counted(value)
        if slot not in self.slots:
            tier = next((t for t in ("device", "host") if self.used[t] + nbytes <= self.budget[t]), "disk")
            if tier == "disk":
                self.slots[slot] = ("disk", (self._allocate(nbytes), tuple(tensor.shape), tensor.dtype))
            self.used[tier] += nbytes
        else:
            tier = self.slots[slot][0]
        if tier == "device" or (tier == "host" and tensor.device.type == "cpu"):
            self.slots[slot] = (tier, tensor)
        elif tier == "host":   # pinned, copied without waiting (the stream keeps the order)
            held = self.slots.get(slot, (None, None))[1]
            if held is None or held.shape != tensor.shape:
                held = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            held.copy_(tensor, non_blocking=True)
            self.slots[slot] = ("host", held)
        else:
            offset = self.slots[slot][1][0]
            self._write(offset, tensor)

    def _counted(self, tensor) -> int:
        """The bytes TENSOR takes from a tier's budget (pinned host blocks are rounded up to a power of two)."""
        nbytes = tensor.numel() * tensor.element_size()
        return 1 << max(0, nbytes - 1).bit_length() if self.device.type == "cuda" else nbytes

    def _shape(self, slot: int):
        tier, value = self.slots[slot]
        return (value[1], value[2]) if tier == "disk" else (tuple(value.shape), value.dtype)

    def get(self, slot: int):
        tier, value = self.slots[slot]
        if tier != "disk":
            return value.to(self.device, non_blocking=True) if tier == "host" and self.device.type != "cpu" else value
        import torch

        offset, shape, dtype = value
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OutputWriteError(f"{self._dir}: the activation file ended early")
            done += got
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape).to(self.device)

    def _allocate(self, nbytes: int) -> int:
        if self._fd is None:
            try:
                if self._given_dir is not None:
                    self._given_dir.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="moetool-activations-",
                                                  dir=self._given_dir if self._given_dir is not None else None))
                self._fd = os.open(self._dir / "hidden.bin", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:   # not a folder, not writable, ...
                raise OutputWriteError(f"{self._given_dir or tempfile.gettempdir()}: cannot hold the offloaded "
                                       f"activations ({exc.strerror or exc})",
                                       hint="give --offload-dir a writable folder") from None
        offset, self._end = self._end, self._end + nbytes
        return offset

    def _write(self, offset: int, tensor) -> None:
        import torch

        data = memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
        except OSError as exc:
            where = self._given_dir or self._dir
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputWriteError(f"{where}: no space left for the offloaded activations "
                                       f"({self._end / 1e9:.2f} GB needed)",
                                       hint="give --offload-dir a disk with more room, or lower --max-tokens") \
                    from None
            raise OutputWriteError(f"{where}: cannot write the offloaded activations ({exc.strerror})") from None

    def close(self) -> None:
        self.slots.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


OUTPUT_KEYS = 16   # store keys set aside per micro-batch for a layer's extra outputs
SHARED_KEYS = 16   # and for the tensors its layers share through the model's shared-state dict (KVSharingDict)
EXTRA_KEYS = OUTPUT_KEYS + SHARED_KEYS


def _extra_key(slot: int, i: int) -> int:
    """The activation-store key of extra output I of micro-batch SLOT (I from OUTPUT_KEYS: its shared tensor
    I - OUTPUT_KEYS; negative: never a slot's)."""
    return -(slot * EXTRA_KEYS + i) - 1


def _shares_states(value) -> bool:
    """Whether VALUE (a decoder layer's keyword argument) is the dict transformers' forward makes once per call
    and hands to every layer for some to write keys and values into and later ones to read (KVSharingDict:
    Mistral Large 4's, Gemma 4's kv-shared layers)."""
    try:
        from transformers.cache_utils import KVSharingDict
    except ImportError:   # (a release without it shares nothing so)
        return False
    return isinstance(value, KVSharingDict)


class _Stubs:
    """Stand-ins for the decoder layers' forwards, so that the model's own forward computes each
    layer's arguments without running any layer. A layer that returns more than its hidden states
    (GLM-5's DSA layers: the indexer's top-k, which the next layer may reuse) has its tensor extras
    kept per micro-batch in the activation store (`keep`: the hidden states' budget and disk spill),
    and the stub before the layer being captured returns them, so that the layer receives them;
    the other stubs return None in their place (what they return only feeds other stubs).

    The model's forward makes its shared-state dict (KVSharingDict: the latent keys and values a layer stores
    for later layers to reuse) anew at each call, and a stubbed call runs no layer to fill it: each micro-batch's
    is kept instead, its tensors in the activation store (`keep`), and handed, refilled, to every layer that
    micro-batch runs through, as the model's one forward hands its own dict to all its layers."""

    class Captured(Exception):
        def __init__(self, args, kwargs):
            self.args, self.kwargs = args, kwargs

    STORED = object()   # an extra output held in the store

    def __init__(self, loaded, store):
        self.loaded, self.store = loaded, store
        self.mode, self.target, self.inject = "real", None, None
        self.slot, self.extras = None, {}   # micro-batch slot -> the last layer run's extras (STORED or values)
        self.shared: dict = {}   # micro-batch slot -> {shared-state key: its tensors' store indices}
        self.live: dict = {}     # micro-batch slot -> (the shared-state dict handed to its layer, what it held)
        for index, layer in enumerate(loaded.layers):
            layer.forward = self._stub(index, layer.forward)

    def _stub(self, index: int, real):
        def forward(*args, **kwargs):
            if self.mode == "real":
                return real(*args, **kwargs)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if self.mode == "capture" and index == self.target:
                raise _Stubs.Captured(args, kwargs)
            value = self.inject if self.mode == "final" and index == 0 else hidden
            extras = self.extras.get(self.slot)
            if extras is None:
                return value
            if self.mode == "capture" and index == self.target - 1:
                return (value, *(self.store.get(_extra_key(self.slot, i)) if e is _Stubs.STORED else e
                                 for i, e in enumerate(extras)))
            return (value, *(None for _ in extras))
        return forward

    def keep(self, slot, output) -> None:
        """The extra outputs (beyond the hidden states) of the layer just run on micro-batch SLOT, and what it
        wrote into that micro-batch's shared-state dict."""
        live, held = self.live.pop(slot, (None, {}))
        for key, value in (live or {}).items():
            if held.get(key) is value:   # (restored, not written by this layer)
                continue
            indices = self.shared.setdefault(slot, {}).get(key)
            if indices is None:
                used = sum(map(len, self.shared[slot].values()))
                indices = list(range(OUTPUT_KEYS + used, OUTPUT_KEYS + used + len(value)))
            if not isinstance(value, tuple) or not value or len(indices) != len(value) or \
                    indices[-1] >= EXTRA_KEYS or not all(hasattr(v, "detach") for v in value):
                raise UnsupportedError(f"a decoder layer shared {key!r} as a {type(value).__name__}, which moetool's "
                                       f"streamed mode cannot keep (a tuple of tensors, {SHARED_KEYS} at most)")
            for i, tensor in zip(indices, value):
                self.store.put(_extra_key(slot, i), tensor.detach(), replace=True)
            self.shared[slot][key] = indices
        if not (isinstance(output, tuple) and len(output) > 1):
            return
        if len(output) - 1 > OUTPUT_KEYS:
            raise UnsupportedError(f"a decoder layer returned {len(output) - 1} extra outputs, more than "
                                   f"{OUTPUT_KEYS}")
        kept = []
        for i, extra in enumerate(output[1:]):
            if hasattr(extra, "detach"):
                self.store.put(_extra_key(slot, i), extra.detach(), replace=True)
                kept.append(_Stubs.STORED)
            else:
                kept.append(extra)
        self.extras[slot] = tuple(kept)

    def inputs(self, index: int, ids, slot=None):
        """(hidden states, other args, kwargs) the model passes to decoder layer INDEX for IDS (of
        micro-batch SLOT)."""
        self.mode, self.target, self.slot = "capture", index, slot
        try:
            self.loaded.base_forward(ids)
        except _Stubs.Captured as call:
            args, kwargs = list(call.args), dict(call.kwargs)
            hidden = args.pop(0) if args else kwargs.pop("hidden_states")
            for name, value in kwargs.items():
                if _shares_states(value):   # (this micro-batch's, as its earlier layers left it)
                    kwargs[name] = self._shared_state(slot, type(value))
            return hidden, args, kwargs
        finally:
            self.mode = "real"
        raise RuntimeError(f"decoder layer {index} was never called")   # pragma: no cover

    def _shared_state(self, slot, kind):
        """Micro-batch SLOT's shared-state dict (of class KIND), filled from the store, for its next layer."""
        state = kind()
        for key, indices in self.shared.get(slot, {}).items():
            state[key] = tuple(self.store.get(_extra_key(slot, i)) for i in indices)
        self.live[slot] = (state, dict(state))
        return state

    def final(self, ids, hidden, slot=None):
        """The decoder stack's output (final norm applied) for the last layer's output HIDDEN."""
        self.mode, self.inject, self.slot = "final", hidden, slot
        try:
            return self.loaded.base_forward(ids).last_hidden_state
        finally:
            self.mode, self.inject = "real", None

    def close(self) -> None:
        for layer in self.loaded.layers:
            layer.__dict__.pop("forward", None)


def _lower_priority() -> None:
    """The reader thread yields the CPU to the layer being computed: reading the next layer only has to
    finish before this one does (on a CPU-bound machine it would otherwise slow the computation)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):   # not Linux, or not allowed
        pass


class _LayerReader:
    """Reads (and dequantizes) decoder layers' weights on a background thread, one layer ahead."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetool-layer-reader",
                                       initializer=_lower_priority)
        self.pending: dict[int, object] = {}

    def prefetch(self, index: int) -> None:
        if index < len(self.loaded.layers) and index not in self.pending:
            self.pending[index] = self.pool.submit(self.loaded.read_layer, index)

    def take(self, index: int):
        self.prefetch(index)
        start = time.perf_counter()
        tensors = self.pending.pop(index).result()
        return tensors, time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)   # an interrupted run does not wait for a read
        self.pending.clear()


def run(loaded, batches: list[MicroBatch], *, capture=None, on_final=None, progress=None,
        offload_dir: Path | None = None, calibrate=None) -> RunTiming:
    """Run BATCHES through LOADED (full or streamed, as it was loaded).

    Args:
        capture: the RouterCapture (told each micro-batch before it runs, and when it is done).
        on_final: callable(batch, hidden [B, S, H]) with the decoder stack's output, micro-batch by
            micro-batch (evaluation applies the head to it); None skips the final norm in streamed mode.
        progress: callable(label, done_tokens, total_tokens) — one label per pass.
        calibrate: sequential calibration (streamed mode): an object with ``observe(index, layer,
            batch, ids)`` (a context manager entered around each micro-batch's first pass through
            layer INDEX; IDS are the micro-batch's token ids on the device)
            and ``update(index, layer)`` (compresses the layer in place); the layer then runs again,
            compressed, and its outputs are what the next layer sees (unless the calibrator's
            ``changes_layers`` is False: then the first pass's outputs are kept).
    """
    import torch

    timing = RunTiming()
    if loaded.device.type == "cuda":   # pinned, so that copying a micro-batch's ids never waits
        for batch in batches:
            batch.ids = batch.ids.pin_memory()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if loaded.mode == "streamed":
                _run_streamed(loaded, batches, capture, on_final, progress, offload_dir, timing, calibrate)
            elif calibrate is not None:
                raise ValueError("sequential calibration runs the model layer by layer: load it streamed")
            else:
                _run_full(loaded, batches, capture, on_final, progress, timing)
    except torch.OutOfMemoryError:
        shape = tuple(batches[0].ids.shape) if batches else ()
        raise DeviceError(f"{loaded.device}: out of memory running micro-batches of {shape[0] if shape else 0} "
                          f"sequences of {shape[1] if shape else 0} tokens",
                          hint="use --mode streamed, a smaller --batch-size or --seq-len") from None
    timing.seconds = time.perf_counter() - start
    return timing


def _run_full(loaded, batches, capture, on_final, progress, timing) -> None:
    total = sum(b.ids.numel() for b in batches)
    handles = []
    for index, layer in enumerate(loaded.layers):   # wall time per layer (host clock)
        def enter(module, args, index=index):
            timing.layer_seconds[index] = timing.layer_seconds.get(index, 0.0) - time.perf_counter()

        def leave(module, args, output, index=index):
            timing.layer_seconds[index] += time.perf_counter()
        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        _forward_batches(loaded, batches, capture, on_final, progress, total)
    finally:
        for handle in handles:
            handle.remove()


def _forward_batches(loaded, batches, capture, on_final, progress, total) -> None:
    done = 0
    for batch in batches:
        ids = batch.ids.to(loaded.device, non_blocking=True)
        if capture is not None:
            capture.set_batch(batch.first_sequence, *ids.shape)
        output = loaded.base_forward(ids)
        if capture is not None:
            capture.step_done()
        if on_final is not None:
            on_final(batch, output.last_hidden_state)
        done += ids.numel()
        if progress:
            progress("forward", done, total)


def _layer_inputs(batches, index: int, stubs, store, device):
    """(micro-batch, its ids on the device, hidden states, args, kwargs) of layer INDEX, batch by batch:
    the first layer's hidden states come from the embedding, the others' from the store."""
    for batch in batches:
        ids = batch.ids.to(device, non_blocking=True)
        hidden, args, kwargs = stubs.inputs(index, ids, batch.slot)
        if index > 0:
            hidden = store.get(batch.slot)
        yield batch, ids, hidden, args, kwargs


def _run_streamed(loaded, batches, capture, on_final, progress, offload_dir, timing, calibrate=None) -> None:
    store = ActivationStore.sized(loaded.device, offload_dir, keep_free=2 * loaded.largest_layer_bytes)
    stubs = _Stubs(loaded, store)
    reader = _LayerReader(loaded)
    total = sum(b.ids.numel() for b in batches)
    layers = len(loaded.layers)
    try:
        for index, layer in enumerate(loaded.layers):
            began = time.perf_counter()
            tensors, waited = reader.take(index)
            reader.prefetch(index + 1)
            timing.weight_wait_seconds += waited
            loaded.install_layer(index, tensors)
            del tensors
            # a calibration that leaves the layer as it was (GPTQ --no-sequential, measuring) keeps
            # the first pass's outputs instead of running the layer again
            once = calibrate is not None and capture is None and not getattr(calibrate, "changes_layers", True)
            if calibrate is not None:   # first pass: observe the layer's inputs, then compress it
                done = 0
                for batch, ids, hidden, args, kwargs in _layer_inputs(batches, index, stubs, store, loaded.device):
                    with calibrate.observe(index, layer, batch, ids):   # around the layer's own call only
                        output = layer(hidden, *args, **kwargs)
                    if once:
                        store.put(batch.slot, output[0] if isinstance(output, tuple) else output)
                        stubs.keep(batch.slot, output)
                    del hidden, args, kwargs, output
                    done += ids.numel()
                    if progress:
                        progress(f"layer {index + 1}/{layers}: calibrating", done, total)
                calibrate.update(index, layer)
            done = 0
            for batch, ids, hidden, args, kwargs in ([] if once else
                                                     _layer_inputs(batches, index, stubs, store, loaded.device)):
                if capture is not None:
                    capture.set_batch(batch.first_sequence, *ids.shape)
                output = layer(hidden, *args, **kwargs)
                if capture is not None:
                    capture.step_done()
                store.put(batch.slot, output[0] if isinstance(output, tuple) else output)
                stubs.keep(batch.slot, output)
                del hidden, output, args, kwargs
                done += ids.numel()
                if progress:
                    progress(f"layer {index + 1}/{layers}", done, total)
            loaded.free_layer(index)
            release_heap()
            timing.layer_seconds[index] = time.perf_counter() - began
        if on_final is not None:
            for batch in batches:
                ids = batch.ids.to(loaded.device, non_blocking=True)
                on_final(batch, stubs.final(ids, store.get(batch.slot), batch.slot))
        timing.store = dict(store.used)
    finally:
        reader.close()
        stubs.close()
        store.close()
