"""`moetool profile`: run real tokens through the model and report how it routes them."""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.checkpoint import Checkpoint
from moetool.errors import UnsupportedError
from moetool.ops import routing_stats as rs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class ProfileOptions:
    data: Path | None = None            # text file, .jsonl, folder, or "builtin" (the default)
    token_ids: Path | None = None       # token-id file, for models without a tokenizer
    field: str = "text"                 # .jsonl field
    max_tokens: int | None = 8192
    seq_len: int = 512
    batch_size: int = 8                 # sequences per forward in full mode
    device: str | None = None
    dtype: str | None = None
    mode: str = "auto"                  # "full" | "streamed" | "auto"
    ep: int | None = None               # devices for expert-parallel placement
    ep_replicas: int = 0                # extra copies of hot experts in the balanced placement
    saliency: bool = False              # also record expert output norms (REAP saliency); k more expert passes
    trust_remote_code: bool = False


@dataclass
class LayerProfile:
    layer: int
    experts: int
    top_k: int
    tokens: int
    counts: list[int]
    share: list[float]
    weight_mass: list[float]
    saliency: list[float] | None        # mean of ||gate weight x expert output|| over the tokens routed to it
    activation_norm: list[float] | None  # EAN: mean ||expert output|| over the tokens routed to it
    dead_experts: list[int]
    entropy_mean: float
    entropy_normalized: float           # mean entropy / log(E): 1 = uniform routing
    top1_prob_mean: float
    margin_mean: float
    imbalance: dict[str, float]
    capacity_drop: dict[str, float]     # capacity factor -> share of assignments dropped
    coactivation: list[list[int]]
    distinct_experts_per_sequence: float
    consecutive_reuse: float
    lru_hit_rate: dict[str, float]      # cache size -> hit rate
    ep: dict[str, Any] | None = None


@dataclass
class ProfileReport:
    source: str
    family: str
    mode: str
    device: str
    dtype: str
    tokens: int
    sequences: int
    seq_len: int
    timing: dict[str, Any]
    memory: dict[str, Any]
    layers: list[LayerProfile]
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    moetool_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), "moetool_version": data.pop("moetool_version"),
                **data}


def _token_ids(ckpt: Checkpoint, options: ProfileOptions) -> list[int]:
    from moetool.runner import data

    if options.token_ids is not None:
        return data.read_token_ids(options.token_ids)
    texts = data.read_texts(options.data or Path("builtin"), options.field)
    if not texts:
        raise data.DataError(f"{options.data}: holds no text")
    return data.tokenize(texts, ckpt.root)


def profile(ckpt: Checkpoint, options: ProfileOptions, progress=None) -> ProfileReport:
    """Run the calibration tokens through CKPT's model and compute the routing statistics.

    Args:
        progress: optional callable(done_sequences, total_sequences).
    """
    import torch

    from moetool.ops.inspect import inspect_checkpoint
    from moetool.runner.capture import RouterCapture
    from moetool.runner.data import pack
    from moetool.runner.device import DeviceError, pick_device, pick_dtype
    from moetool.runner.model import load_model

    structure = inspect_checkpoint(ckpt)
    if not structure.moe_layers:
        raise UnsupportedError(f"{ckpt.source}: no MoE layers ({structure.family_title or 'unknown family'} "
                               "is dense), so there is no routing to profile")
    config = ckpt.config or {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    max_positions = text_config.get("max_position_embeddings") or text_config.get("max_seq_len")
    ids = pack(_token_ids(ckpt, options), seq_len=options.seq_len, max_tokens=options.max_tokens,
               vocab_size=structure.vocab_size, max_positions=max_positions)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    loaded = load_model(ckpt, device=device, dtype=dtype, mode=options.mode,
                        trust_remote_code=options.trust_remote_code)
    top_k = structure.top_k

    def k_at(layer: int) -> int:
        return top_k[layer] if isinstance(top_k, list) else top_k

    capture = RouterCapture(loaded.model, loaded.family, config, structure.moe_layers, k_at,
                            saliency=options.saliency)
    layer_time = _time_layers(loaded)
    # streamed: every sequence in one forward, so each layer's weights are read once
    batch = ids.shape[0] if loaded.mode == "streamed" else max(1, options.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    batch_tokens = []
    try:
        with torch.no_grad():
            for first in range(0, ids.shape[0], batch):
                chunk = ids[first:first + batch].to(device)
                loaded.base_forward(chunk)
                batch_tokens.append(chunk.numel())
                if progress:
                    progress(first + chunk.shape[0], ids.shape[0])
    except torch.OutOfMemoryError:
        raise DeviceError(f"{device}: out of memory running {batch} sequences of {ids.shape[1]} tokens",
                          hint="use --mode streamed, a smaller --batch-size or --seq-len") from None
    finally:
        capture.close()
        layer_time.close()
    seconds = time.perf_counter() - start
    tokens = ids.numel()

    layers = [_layer_profile(layer, capture.layers[layer], structure, k_at(layer), ids.shape[1], batch_tokens,
                             options) for layer in structure.moe_layers]
    memory = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        memory["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    timing = {"seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
              "layer_seconds": {str(k): round(v, 5) for k, v in sorted(layer_time.seconds.items())}}
    return ProfileReport(ckpt.source, structure.family, loaded.mode, str(device), str(dtype).removeprefix("torch."),
                         tokens, ids.shape[0], ids.shape[1], timing, memory, layers)


class _time_layers:
    """Wall time spent in each decoder layer (streamed mode: loading included)."""

    def __init__(self, loaded):
        self.seconds: dict[int, float] = {}
        self._handles = []
        for index, layer in enumerate(loaded.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(index)))
            self._handles.append(layer.register_forward_hook(self._leave(index)))
        if loaded.mode == "streamed":   # loading happens in earlier-registered hooks: count it too
            self.loaded = loaded

    def _enter(self, index):
        def hook(module, args):
            self.seconds[index] = self.seconds.get(index, 0.0) - time.perf_counter()
        return hook

    def _leave(self, index):
        def hook(module, args, output):
            self.seconds[index] += time.perf_counter()
        return hook

    def close(self):
        for handle in self._handles:
            handle.remove()
        loaded = getattr(self, "loaded", None)
        if loaded is not None:
            self.seconds = dict(loaded.layer_seconds)


def _layer_profile(layer: int, record, structure, k: int, seq_len: int, batch_tokens: list[int],
                   options: ProfileOptions) -> LayerProfile:
    info = next(i for i in structure.layers if i.index == layer)
    experts = info.experts or structure.num_experts
    index = record.cat("index")
    weight = record.cat("weight")
    counts = rs.expert_counts(index, experts)
    total = max(1, int(counts.sum()))
    entropy = record.cat("entropy")
    cache_sizes = sorted({c for c in (k, 2 * k, experts // 4, experts // 2) if 0 < c < experts})
    seq = rs.sequence_stats(index, seq_len, cache_sizes)
    ep = None
    if options.ep:
        ep = _expert_parallel(index, counts.tolist(), options.ep, options.ep_replicas, seq_len)
    return LayerProfile(
        layer=layer, experts=experts, top_k=k, tokens=index.shape[0], counts=counts.tolist(),
        share=[round(c / total, 6) for c in counts.tolist()],
        weight_mass=[round(float(m), 6) for m in rs.weight_mass(index, weight, experts)],
        saliency=(None if not record.salience else
                  [float(v) for v in rs.saliency(index, record.cat("salience"), experts)]),
        activation_norm=(None if not record.salience else
                         [float(v) for v in rs.activation_norm(index, weight, record.cat("salience"), experts)]),
        dead_experts=[e for e, c in enumerate(counts.tolist()) if c == 0],
        entropy_mean=float(entropy.mean()), entropy_normalized=float(entropy.mean()) / math.log(experts),
        top1_prob_mean=float(record.cat("top1").mean()), margin_mean=float(record.cat("margin").mean()),
        imbalance=rs.imbalance(counts.tolist()), capacity_drop=rs.capacity_drops(index, experts, batch_tokens),
        coactivation=rs.coactivation(index, experts).tolist(),
        distinct_experts_per_sequence=seq.distinct_experts_mean, consecutive_reuse=seq.consecutive_reuse,
        lru_hit_rate=seq.lru_hit_rate, ep=ep)


def _expert_parallel(index, counts: list[int], devices: int, replicas: int, seq_len: int) -> dict[str, Any]:
    experts = len(counts)
    if devices < 1 or devices > experts:
        raise UnsupportedError(f"--ep {devices}: needs between 1 and {experts} devices")
    result = {}
    for name, placement in (("contiguous", rs.contiguous_placement(experts, devices)),
                            ("balanced", rs.balanced_placement(counts, devices, replicas))):
        load = rs.placement_load(counts, placement)
        mean = sum(load) / devices
        traffic = rs.all_to_all(index, placement, seq_len, devices)
        result[name] = {"placement": placement, "device_load": [round(x, 2) for x in load],
                        "busiest_over_mean": round(max(load) / mean, 4) if mean else 0.0,
                        "all_to_all_tokens": traffic,
                        "cross_device_tokens": sum(traffic[i][j] for i in range(devices) for j in range(devices)
                                                   if i != j)}
    return result


def routing_profile(ckpt: Checkpoint, structure, *, profile: Path | None, data: Path | None, max_tokens: int,
                    saliency: bool) -> dict[int, dict[str, Any]]:
    """Per MoE layer, the fields of a profile (counts, weight_mass, saliency, ...): read from a
    `moetool profile --json` file (refused if it is of another model) or measured on DATA."""
    import json

    from moetool.errors import UsageError

    if profile is None:
        positions = (ckpt.config or {}).get("max_position_embeddings")
        seq_len = min(256, positions) if isinstance(positions, int) and positions > 1 else 256
        report = _run(ckpt, ProfileOptions(data=data, max_tokens=max_tokens, seq_len=seq_len, saliency=saliency))
        return {lp.layer: lp.__dict__ for lp in report.layers}
    try:
        layers = {int(layer["layer"]): layer for layer in json.loads(Path(profile).read_text())["layers"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UsageError(f"{profile}: not a moetool profile --json file") from None
    if sorted(layers) != structure.moe_layers or any(
            layers[info.index]["experts"] != info.experts or any(
                isinstance(layers[info.index].get(k), list) and len(layers[info.index][k]) != info.experts
                for k in ("counts", "weight_mass", "saliency", "activation_norm"))
            for info in structure.layers if info.index in layers):
        raise UsageError(f"{profile}: this profile is of another model (its MoE layers or expert counts differ "
                         f"from {ckpt.source}'s)")
    return layers


_run = profile   # routing_profile's own `profile` argument hides the function
