"""`moetool profile`: run real tokens through the model and report how it routes them."""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.arch import detect_family
from moetool.checkpoint import BYTES_READ, Checkpoint
from moetool.checkpoint.writer import check_replaceable, refuse_inside_source
from moetool.errors import UnsupportedError, UsageError
from moetool.ops import routing_stats as rs
from moetool.ops.inspect import inspect_checkpoint
from moetool.quant import released
from moetool.runner import data, distributed, engine
from moetool.runner.capture import RouterCapture
from moetool.runner.device import pick_device, pick_dtype
from moetool.runner.engine import micro_batches
from moetool.runner.model import check_runnable, load_model, runnable
from moetool.runner.stats import LayerTotals, RoutingStats, window_unit
from moetool.runner.trace import TraceError, TraceWriter, is_trace_output, open_trace

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class ProfileOptions:
    data: Path | None = None            # calibration data (runner/data.py formats), or "builtin" (the default)
    token_ids: Path | None = None       # token-id file, for models without a tokenizer
    field: str = "text"                 # field of .jsonl/parquet/arrow records
    chat_template: str | None = None    # render chat records: "model" (the tokenizer's) or a Jinja file
    max_tokens: int | None = 8192
    seq_len: int = 512
    batch_size: int = 8                 # sequences per micro-batch
    capacity_window: int | None = None  # tokens per capacity window (default: seq_len, one sequence)
    device: str | None = None
    dtype: str | None = None
    mode: str = "auto"                  # "full" | "streamed" | "auto"
    device_map: str | None = None       # full mode: "auto" spreads the model over the node's GPUs (accelerate)
    offload_dir: Path | None = None     # streamed: where hidden states go that fit neither device nor host
    ep: int | None = None               # devices for expert-parallel placement
    ep_replicas: int = 0                # extra copies of hot experts in the balanced placement
    saliency: bool = False              # also record expert output norms (REAP saliency); k more expert passes
    trace: Path | None = None           # stream per-token routing to this folder
    from_trace: Path | None = None      # compute the report from a trace instead of running the model
    force: bool = False                 # replace an existing --trace folder
    trust_remote_code: bool = False


@dataclass
class LayerProfile:
    layer: int
    experts: int
    top_k: int
    tokens: int
    counts: list[int]
    share: list[float]
    weight_mass: list[float] | None     # None: the routing came without gate weights (vLLM traces)
    saliency: list[float] | None        # mean of ||gate weight x expert output|| over the tokens routed to it
    activation_norm: list[float] | None  # EAN: mean ||expert output|| over the tokens routed to it
    dead_experts: list[int]
    entropy_mean: float | None
    entropy_normalized: float | None    # mean entropy / log(E): 1 = uniform routing
    top1_prob_mean: float | None
    margin_mean: float | None
    imbalance: dict[str, float]
    capacity_drop: dict[str, float]     # capacity factor -> share of assignments dropped
    coactivation: list[list[int]]
    distinct_experts_per_sequence: float
    consecutive_reuse: float
    lru_hit_rate: dict[str, float]      # cache size -> hit rate
    ep: dict[str, Any] | None = None
    # a router that also picks zero-computation experts (LongCat-Flash's identity experts, ZAYA's skip expert):
    # their count, picks, share of all picks, gate weight (a skip pick's: its router probability, which transformers
    # then drops), and the real experts computed per token (top-k minus those picks, averaged); the
    # figures above are of the real experts alone
    identity: dict[str, Any] | None = None


@dataclass
class ProfileReport:
    source: str
    family: str
    mode: str                           # "full" | "streamed" | "trace"
    device: str
    dtype: str
    tokens: int
    sequences: int
    seq_len: int | None
    timing: dict[str, Any]
    memory: dict[str, Any]
    layers: list[LayerProfile]
    capacity_window: int = 0
    world_size: int = 1
    io: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    moetool_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), "moetool_version": data.pop("moetool_version"),
                **data}


def calibration_ids(ckpt: Checkpoint, options, *, default: str, vocab_size: int | None):
    """The packed [N, seq_len] calibration tokens of OPTIONS (any options with the calibration fields:
    data, token_ids, field, chat_template, max_tokens, seq_len)."""
    ids = data.calibration_ids(data=options.data, token_ids=options.token_ids, field=options.field,
                               max_tokens=options.max_tokens, tokenizer_path=data.tokenizer_source(ckpt),
                               chat_template=options.chat_template, default=default)
    return data.pack(ids, seq_len=options.seq_len, max_tokens=options.max_tokens, vocab_size=vocab_size,
                     max_positions=max_positions(ckpt))


def max_positions(ckpt: Checkpoint) -> int | None:
    """The longest sequence the model takes (a GGUF: as its transformers config says)."""
    config = runnable(ckpt).config or {}
    family = detect_family(config)
    found = family.text_root(config) if family else None   # (a wrapper's text model's: Qwen3-Omni's nested one)
    text_config = found[1] if found else config.get("text_config") if isinstance(config.get("text_config"), dict) \
        else config
    return text_config.get("max_position_embeddings") or text_config.get("max_seq_len")


def routing_structure(ckpt: Checkpoint):
    structure = inspect_checkpoint(ckpt)
    if not structure.moe_layers:
        raise UnsupportedError(f"{ckpt.source}: no MoE layers ({structure.family_title or 'unknown family'} "
                               "is dense), so there is no routing to profile")
    experts = {i.index: i.experts or structure.num_experts for i in structure.layers if i.index in structure.moe_layers}
    top_k = {layer: structure.top_k[layer] if isinstance(structure.top_k, list) else structure.top_k
             for layer in structure.moe_layers}
    return structure, {layer: (experts[layer], top_k[layer]) for layer in structure.moe_layers}


def routing_notes(structure) -> list[str]:
    """What a reader of the figures must know about how STRUCTURE's layers route."""
    table = (structure.router or {}).get("token_table_layers") or []
    if not table:
        return []
    several = len(table) > 1
    return [f"layer{'s' if several else ''} {', '.join(map(str, table))} pick{'' if several else 's'} experts by a "
            "fixed token table (hash routing): "
            f"{'their' if several else 'its'} loads "
            f"follow the token frequencies, and {'their' if several else 'its'} entropy, top-1 probability and margin "
            "describe the router's weights, not its choice"]


def profile(ckpt: Checkpoint, options: ProfileOptions, progress=None) -> ProfileReport:
    """Run the calibration tokens through CKPT's model (or read a trace) and compute the routing
    statistics; under torchrun each rank runs its share and the statistics are summed.

    Args:
        progress: optional callable(label, done_tokens, total_tokens), one label per pass.
    """
    import torch

    structure, layers = routing_structure(ckpt)
    fewest = min((experts for experts, _ in layers.values()), default=0)
    if options.ep is not None and not 1 <= options.ep <= fewest:   # before the run, not after it
        raise UsageError(f"--ep {options.ep}: expert parallelism over 1 to {fewest} devices (each holds an expert)")
    if options.ep_replicas and options.ep is None:
        raise UsageError("--ep-replicas adds copies to an expert-parallel placement: give --ep N as well",
                         hint="see 'moetool profile --help'")
    if options.from_trace is not None:
        return _from_trace(ckpt, structure, layers, options)
    world = distributed.world_from_env()
    if world.distributed and options.device_map:
        raise UsageError("--device-map spreads one model over the node's GPUs; under torchrun each rank runs "
                         "its own copy: use one or the other")
    check_runnable(ckpt)
    model_ckpt = runnable(ckpt)   # a GGUF as the transformers checkpoint it stands for, built once
    if options.trace is not None:   # before the run, not after it
        refuse_inside_source(Path(options.trace), ckpt)
        check_replaceable(Path(options.trace).absolute(), options.force, is_trace_output)
    device = pick_device(options.device, local_rank=world.local_rank if world.distributed else None)
    dtype = pick_dtype(options.dtype, device)
    distributed.init(world, device)
    ids = calibration_ids(model_ckpt, options, default="builtin", vocab_size=structure.vocab_size)
    seq_len = ids.shape[1]
    window = options.capacity_window or seq_len   # one sequence: every rank holds whole windows
    unit = window_unit(window, seq_len)
    first_unit, unit_count = distributed.share(math.ceil(ids.shape[0] / unit), world)
    first = first_unit * unit
    local = ids[first:min(ids.shape[0], (first_unit + unit_count) * unit)]
    read_before = BYTES_READ.value
    loaded = load_model(model_ckpt, device=device, dtype=dtype, mode=options.mode, device_map=options.device_map,
                        trust_remote_code=options.trust_remote_code)
    stats = RoutingStats(layers, device, capacity_window=window, ep=options.ep, identity=structure.zero_experts)
    trace = capture = None
    try:
        if options.trace is not None:
            trace = TraceWriter(options.trace, world=world, sequences=local.shape[0],
                                layers={layer: (e + structure.zero_experts, k) for layer, (e, k) in layers.items()},
                                first_sequence=first, seq_len=seq_len, token_ids=local.numpy(),
                                saliency=options.saliency, force=options.force,
                                header={"source": ckpt.source, "family": structure.family, "mode": loaded.mode,
                                        "dtype": str(dtype).removeprefix("torch."),
                                        "batch_size": options.batch_size, "capacity_window": window,
                                        "moetool_version": __version__})
        capture = RouterCapture(loaded.model, loaded.family, loaded.config, structure.moe_layers,
                                lambda layer: layers[layer][1], stats=stats, trace=trace,
                                saliency=options.saliency)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = engine.run(loaded, micro_batches(local, options.batch_size, first), capture=capture,
                            progress=progress, offload_dir=options.offload_dir)
        if trace is not None:
            trace.close()
    except BaseException:
        if trace is not None:
            trace.abort()
        raise
    finally:
        if capture is not None:
            capture.close()
    if world.distributed:
        stats.all_reduce()
    totals = stats.totals()
    memory = {"host_peak_rss_bytes": _peak_rss()}
    if device.type == "cuda":
        memory["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if timing.store:
        memory["activation_store_bytes"] = timing.store
    seconds = distributed.reduce_scalar(timing.seconds, "max")
    memory = {k: (int(distributed.reduce_scalar(v, "max")) if isinstance(v, int) else v) for k, v in memory.items()}
    read = BYTES_READ.value - read_before   # this process (each rank reads the model once)
    # full mode: transformers reads the weights itself, past moetool's counter
    io = {"weight_bytes_read": read if loaded.mode == "streamed" else None, "checkpoint_bytes": ckpt.total_bytes}
    report_timing = {"seconds": round(seconds, 4), "tokens_per_second": round(ids.numel() / seconds, 2)
                     if seconds else None,
                     "layer_seconds": {str(k): round(v, 5) for k, v in sorted(timing.layer_seconds.items())},
                     "weight_wait_seconds": round(timing.weight_wait_seconds, 4)}
    return ProfileReport(ckpt.source, structure.family, loaded.mode, str(device), str(dtype).removeprefix("torch."),
                         ids.numel(), ids.shape[0], seq_len, report_timing, memory,
                         [layer_profile(layer, totals[layer], options) for layer in structure.moe_layers],
                         capacity_window=window, world_size=world.size, io=io,
                         trace=str(options.trace) if options.trace else None,
                         notes=routing_notes(structure) + [n for n in [released.activation_note(ckpt.config,
                                                                                                 ckpt.tensors)] if n])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _from_trace(ckpt: Checkpoint, structure, layers, options: ProfileOptions) -> ProfileReport:
    """The report of a recorded trace (moetool's, or vLLM's routed experts), without the model."""
    import time

    import torch

    start = time.perf_counter()
    trace = open_trace(options.from_trace, moe_layers=structure.moe_layers,
                       experts={layer: e + structure.zero_experts for layer, (e, _) in layers.items()},
                       top_k={layer: k for layer, (_, k) in layers.items()}, num_layers=structure.num_layers)
    seq_len = trace.seq_len
    # vLLM requests differ in length: by default each is its own capacity window (as a live run's
    # sequence is), reported as capacity_window 0; a --capacity-window cuts them into fixed windows
    per_request = trace.kind == "vllm" and not options.capacity_window
    window = options.capacity_window or trace.header.get("capacity_window") or seq_len or options.seq_len
    if seq_len:   # windows of a live run's shape
        window_unit(window, seq_len)
    stats = RoutingStats(layers, torch.device("cpu"), capacity_window=2**62 if per_request else window, ep=options.ep,
                         identity=structure.zero_experts)
    for chunk in trace.chunks():   # each layer's chunks in sequence order (vLLM: one request each)
        stats[chunk.layer].update(chunk.experts, chunk.first_sequence, chunk.weights, chunk.router)
        if chunk.salience is not None:
            stats[chunk.layer].update_salience(chunk.experts, chunk.weights, chunk.salience)
        if per_request:
            stats[chunk.layer].end_window()
    totals = stats.totals()
    seconds = time.perf_counter() - start
    notes = routing_notes(structure) + ([] if trace.has_weights else [
        "routing without gate weights (vLLM routed experts): weight_mass, saliency, entropy, top-1 probability "
        "and margin are not available"])
    if per_request:
        notes.append("capacity windows: one per request, its capacity from its own length (--capacity-window N "
                     "cuts the requests into windows of N tokens instead)")
    first = totals[structure.moe_layers[0]]   # vLLM rows of prefix-cached positions are skipped
    if not first.tokens:
        raise TraceError(f"{options.from_trace}: holds no routed tokens")
    return ProfileReport(ckpt.source, structure.family, "trace", "cpu", trace.header.get("dtype", "n/a"),
                         first.tokens, first.sequences, seq_len,
                         {"seconds": round(seconds, 4),
                          "tokens_per_second": round(first.tokens / seconds, 2) if seconds else None,
                          "layer_seconds": {}, "weight_wait_seconds": 0.0},
                         {"host_peak_rss_bytes": _peak_rss()},
                         [layer_profile(layer, totals[layer], options) for layer in structure.moe_layers],
                         capacity_window=0 if per_request else window, trace=str(options.from_trace), notes=notes)


def layer_profile(layer: int, t: LayerTotals, options: ProfileOptions) -> LayerProfile:
    experts = t.experts
    total = max(1, sum(t.counts))

    def per_routed(sums):
        return None if sums is None else [s / c if c else 0.0 for s, c in zip(sums, t.counts)]

    def mean(value):
        return None if value is None else value / max(1, t.tokens)

    entropy = mean(t.entropy_sum)
    ep = _expert_parallel(t, options.ep, options.ep_replicas) if options.ep else None
    identity = {}
    if t.identity_experts:   # the picks of identity experts, apart from the real experts' figures
        picks = sum(t.counts) + t.identity_assignments
        identity = {"experts": t.identity_experts, "assignments": t.identity_assignments,
                    "share": round(t.identity_assignments / picks, 6) if picks else 0.0,
                    "weight_mass": None if t.identity_mass is None else round(t.identity_mass, 6),
                    "computed_experts_per_token": round(sum(t.counts) / t.tokens, 4) if t.tokens else 0.0}
    return LayerProfile(
        layer=layer, experts=experts, top_k=t.top_k, tokens=t.tokens, counts=t.counts,
        share=[round(c / total, 6) for c in t.counts], identity=identity or None,
        weight_mass=None if t.weight_mass is None else [round(m, 6) for m in t.weight_mass],
        saliency=per_routed(t.salience_sum), activation_norm=per_routed(t.activation_norm_sum),
        dead_experts=[e for e, c in enumerate(t.counts) if c == 0],
        entropy_mean=entropy,
        entropy_normalized=None if entropy is None or experts + t.identity_experts < 2
        else entropy / math.log(experts + t.identity_experts),   # (over every expert the router scores)
        top1_prob_mean=mean(t.top1_sum), margin_mean=mean(t.margin_sum),
        imbalance=rs.imbalance(t.counts),
        capacity_drop={f: (d / t.assignments if t.assignments else 0.0) for f, d in t.drops.items()},
        coactivation=t.coactivation,
        distinct_experts_per_sequence=t.distinct_sum / t.sequences if t.sequences else 0.0,
        consecutive_reuse=t.reused / t.reuse_pairs if t.reuse_pairs else 0.0,
        lru_hit_rate={c: (h / t.lookups if t.lookups else 0.0) for c, h in t.lru_hits.items()}, ep=ep)


def _expert_parallel(t: LayerTotals, devices: int, replicas: int) -> dict[str, Any]:
    experts = t.experts
    if devices < 1 or devices > experts:
        raise UnsupportedError(f"--ep {devices}: needs between 1 and {experts} devices")
    result = {}
    for name, placement in (("contiguous", rs.contiguous_placement(experts, devices)),
                            ("balanced", rs.balanced_placement(t.counts, devices, replicas))):
        traffic = rs.all_to_all(t.ep_counts, placement)
        # what each device processes under that routing rule (a replicated expert's tokens go to the
        # sender's own copy first), so the load and the traffic beside it always agree
        load = [sum(row[d] for row in traffic) for d in range(devices)]
        mean = sum(load) / devices
        result[name] = {"placement": placement, "device_load": [round(x, 2) for x in load],
                        "busiest_over_mean": round(max(load) / mean, 4) if mean else 0.0,
                        "all_to_all_tokens": traffic,
                        "cross_device_tokens": sum(traffic[i][j] for i in range(devices) for j in range(devices)
                                                   if i != j)}
    return result


def routing_profile(ckpt: Checkpoint, structure, *, profile: Path | None, calibration: ProfileOptions | None,
                    saliency: bool, progress=None) -> dict[int, dict[str, Any]]:
    """Per MoE layer, the fields of a profile (counts, weight_mass, saliency, ...): read from a
    `moetool profile --json` file (refused if it is of another model) or measured on the CALIBRATION
    data (its data, token_ids, max_tokens, seq_len, batch_size, device, mode... options; None: the
    built-in corpus; seq_len None: 256 tokens, or the model's maximum positions if fewer)."""
    import json

    if profile is None:
        report = _run(ckpt, replace(calibration_defaults(ckpt, calibration), saliency=saliency, trace=None,
                                    from_trace=None), progress)
        return {lp.layer: lp.__dict__ for lp in report.layers}
    try:
        report = json.loads(Path(profile).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UsageError(f"{profile}: not a moetool profile --json file") from None
    layers = profile_layers(report, profile)
    if sorted(layers) != structure.moe_layers or any(
            layers[info.index]["experts"] != info.experts or any(
                isinstance(layers[info.index].get(k), list) and len(layers[info.index][k]) != info.experts
                for k in ("counts", "weight_mass", "saliency", "activation_norm"))
            for info in structure.layers if info.index in layers):
        raise UsageError(f"{profile}: this profile is of another model (its MoE layers or expert counts differ "
                         f"from {ckpt.source}'s)")
    return layers


PROFILE_LISTS = ("counts", "weight_mass", "saliency", "activation_norm")   # per expert: what commands read


def profile_layers(report: Any, path: Path) -> dict[int, dict[str, Any]]:
    """The layers of REPORT (a `moetool profile --json` document read from PATH) by layer number, each checked:
    `layer` and `experts` non-negative integers (each layer once), and each of PROFILE_LISTS null or a list of
    `experts` finite numbers (non-negative integers for counts) or nulls (--json writes a NaN as null; a NaN or
    infinity written as such is refused). Raises UsageError naming PATH and the field."""
    def bad(where: str, why: str) -> UsageError:
        return UsageError(f"{path}: not a moetool profile --json file: {where} {why}")

    if not isinstance(report, dict):
        raise UsageError(f"{path}: not a moetool profile --json file (not a JSON object)")
    entries = report.get("layers")
    if not isinstance(entries, list):
        raise bad("its layers", "are missing" if entries is None else "are not a list")
    layers: dict[int, dict[str, Any]] = {}
    for n, entry in enumerate(entries):
        where = f"layers[{n}]"
        if not isinstance(entry, dict):
            raise bad(where, "is not a JSON object")
        for key in ("layer", "experts"):
            if not _whole(entry.get(key)):
                raise bad(f"{where}.{key}", "is missing" if key not in entry else
                          f"is {_json_text(entry[key])}, not a non-negative integer")
        if entry["layer"] in layers:
            raise bad(f"{where}.layer", f"repeats layer {entry['layer']}")
        for key in PROFILE_LISTS:
            values = entry.get(key)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != entry["experts"]:
                raise bad(f"{where}.{key}", f"is {_json_text(values)}, not a list of {entry['experts']} values "
                          f"(one per expert) or null")
            fine = _whole if key == "counts" else _number
            wrong = next((v for v in values if v is not None and not fine(v)), None)
            if wrong is not None:
                raise bad(f"{where}.{key}", f"holds {_json_text(wrong)}, not a "
                          f"{'non-negative integer' if key == 'counts' else 'finite number'}")
        layers[entry["layer"]] = entry
    return layers


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_text(value: Any, limit: int = 40) -> str:
    """VALUE as JSON, shortened to about LIMIT characters, for an error message."""
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def calibration_defaults(ckpt: Checkpoint, calibration: ProfileOptions | None) -> ProfileOptions:
    """CALIBRATION with the defaults of commands that calibrate on their own (prune, quantize):
    None is the built-in corpus; seq_len None is 256 tokens, or the model's maximum positions if fewer."""
    calibration = calibration or ProfileOptions(seq_len=None)
    if calibration.seq_len is None:
        positions = max_positions(ckpt)
        calibration = replace(calibration, seq_len=min(256, positions) if isinstance(positions, int) and
                              positions > 1 else 256)
    return calibration


_run = profile   # routing_profile's own `profile` argument hides the function
