"""`moetool quantize`: quantize every routed expert on its own, with bits spent where routing says
they matter.

The source is read in the per-expert layout (the tensor plan splits fused experts one expert
at a time, dequantizes fp8/mxfp4 sources). Each routed expert gets one format for its matrices:
one given format, or, under `--bits-budget`, the format chosen for it by a multiple-choice
knapsack: every candidate format's measured squared reconstruction error on the expert, times
the expert's importance from a routing profile, is minimised subject to the average bits per
expert parameter (scales and state included). `--rules` quantize attention, shared experts or
dense MLPs. Each quantized weight is written as its own tensors (codes, scales, state), streamed;
`quantization_config` records every weight's format.

`--layout compressed-tensors` writes the same integer quantization in compressed-tensors'
pack-quantized format (int4/int8 only), for vLLM: one config group per format, routed experts
targeted layer by layer, everything left unquantized ignored. vLLM's MoE kernels take one scheme per
MoE layer, so a bits budget there chooses one format per layer (moetool/quant/compressed_tensors.py).
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.arch import Role
from moetool.arch.matcher import Classifier
from moetool.arch.schema import CATEGORY, SHARED_ROLES, first_key
from moetool.checkpoint import Checkpoint
from moetool.checkpoint.header import DTYPE_BYTES
from moetool.checkpoint.writer import (
    ComputedPiece,
    OutputTensor,
    materialize,
    plan_shards,
    refuse_inside_source,
    side_files,
    write_checkpoint,
)
from moetool.errors import OutputExistsError, OutputWriteError, UnsupportedError, UsageError
from moetool.layout.plan import FLOATS, PlanOptions, family_context, plan_tensors
from moetool.ops.profile import ProfileOptions, routing_profile
from moetool.quant import compressed_tensors as ct
from moetool.quant.config import QUANT_METHOD, tool_quantized
from moetool.quant.formats import Format, parse_format, slice_name
from moetool.quant.released import quant_method
from moetool.runner import distributed
from moetool.runner.modules import model_name

log = logging.getLogger(__name__)

EXPERT_MATRICES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP)
# what --rules may quantize: matrices transformers holds in nn.Linear modules
RULE_ROLES = frozenset({Role.ATTN, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN, Role.SHARED_GATE_UP,
                        Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN, Role.DENSE_GATE_UP})
DEFAULT_CANDIDATES = "int2-g64-asym,int3-g128-asym,int4-g128-asym,nf4-b64-dq,int8-g128-sym"
GPTQ_CANDIDATES = "int2-g64-asym,int3-g128-asym,int4-g128-asym,int8-g128-sym"   # integers only
METHODS = ("rtn", "gptq")
CT_CANDIDATES = "int4-g128-sym,int4-g32-sym,int8-g128-sym"   # --layout compressed-tensors: what vLLM runs
POLICY_FIELD = {"uniform": None, "frequency": "counts", "mass": "weight_mass", "saliency": "saliency"}
IMPORTANCE_FLOOR = 0.05   # share of the mean importance an expert the profile never chose still gets
CT_LAYOUT = "compressed-tensors"
LAYOUTS = ("moetool", "transformers", "transformers4", CT_LAYOUT)


@dataclass
class QuantizeOptions:
    format: str = "nf4"                 # every routed expert's format (without a bits budget)
    bits_budget: float | None = None    # average bits per routed-expert parameter
    candidates: str | None = None       # None: DEFAULT_CANDIDATES (CT_CANDIDATES for compressed-tensors)
    budget_scope: str = "global"        # "global" | "layer"
    policy: str = "frequency"           # importance: uniform | frequency | mass | saliency
    rules: tuple[str, ...] = ()         # "ROLE_OR_REGEX=FORMAT" for attention, shared experts, dense MLPs
    profile: Path | None = None         # a `moetool profile --json` file
    calibration: ProfileOptions | None = None   # data to profile without --profile (None: the built-in corpus)
    layout: str = "moetool"             # "moetool" | "transformers" | "transformers4" (stock + bitsandbytes)
                                        # | "compressed-tensors" (vLLM)
    llama_quantize: Path | None = None  # also write a llama-quantize --tensor-type-file
    max_shard_size: int = 5_000_000_000
    command: str = ""
    method: str = "rtn"                 # "rtn" (round to nearest) | "gptq" (routed experts, calibrated)
    sequential: bool = True             # gptq: calibrate each layer on the quantized earlier ones
    act_order: bool = True              # gptq: columns in descending Hessian-diagonal order (static groups)
    damp: float = 0.01                  # gptq: dampening, a share of the Hessian's mean diagonal
    min_tokens: int = 128               # gptq: experts routed fewer tokens blend in the layer's Hessian

    def __post_init__(self):
        if self.layout == CT_LAYOUT:   # vLLM's MoE kernels take symmetric integers only: the default here
            self.format = _symmetric_default(self.format)
            if self.candidates:
                self.candidates = ",".join(_symmetric_default(c) for c in self.candidates.split(","))
            self.rules = tuple(",".join(_symmetric_rule(r) for r in rule.split(",")) for rule in self.rules)


def _symmetric_default(spec: str) -> str:
    """An integer format SPEC that names neither -sym nor -asym, made -sym (else SPEC as given)."""
    parts = spec.strip().split("-")
    if not parts[0].startswith("int") or {"sym", "asym"} & set(parts[1:]):
        return spec
    return spec.strip() + "-sym"


def _symmetric_rule(item: str) -> str:
    key, sep, spec = item.partition("=")
    return f"{key}{sep}{_symmetric_default(spec)}" if sep else item


@dataclass
class ExpertQuant:
    layer: int
    expert: int
    format: str
    params: int
    bytes: int
    rel_error: float | None = None      # ||W - Q(W)|| / ||W|| over the expert's matrices
    importance: float | None = None     # relative to the layer's mean (1.0)

    @property
    def bits(self) -> float:
        return 8 * self.bytes / self.params


@dataclass
class QuantizeReport:
    source: str
    out: str | None
    family: str
    layout: str
    policy: str | None
    bits_budget: float | None
    experts: list[ExpertQuant]
    rule_tensors: dict[str, str]        # other quantized weights -> format
    expert_params: int
    expert_bytes_before: int
    expert_bytes_after: int
    bytes_before: int
    bytes_after: int
    formats: dict[str, int] = field(default_factory=dict)   # format -> experts
    warnings: list[str] = field(default_factory=list)
    llama_quantize: str | None = None
    seconds: float = 0.0
    method: str = "rtn"
    # gptq: tokens routed to each expert of each layer during calibration (the calibration coverage)
    coverage: dict[int, list[int]] = field(default_factory=dict)

    @property
    def expert_bits(self) -> float:
        return 8 * self.expert_bytes_after / self.expert_params if self.expert_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "experts"}
        out["experts"] = [{**asdict(e), "bits": round(e.bits, 4)} for e in self.experts]
        return {"schema_version": 1, "moetool_version": __version__, **out,
                "expert_bits_per_param": round(self.expert_bits, 4), "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------- rules and formats

def parse_rules(rules: tuple[str, ...]) -> list[tuple[str, Format]]:
    """"KEY=FORMAT" items (comma-separated or repeated): KEY is a role (attn, shared_down, ...), a
    category (attention, shared_experts, dense_mlp) or else a regular expression searched in names (the
    checkpoint's, and transformers 5's where the family's renames and row splits make them differ)."""
    out = []
    for item in (part for rule in rules for part in rule.split(",") if part.strip()):
        key, sep, spec = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--rules {item!r}: use KEY=FORMAT, e.g. attention=int8 or 'q_proj=nf4'")
        key = key.strip()
        if key in CATEGORY.values() or key in {r.value for r in Role}:
            if key in ("routed_experts",) or key in {r.value for r in EXPERT_MATRICES}:
                raise UsageError(f"--rules {key}: routed experts take --format or --bits-budget")
        else:
            try:
                re.compile(key)
            except re.error as exc:
                raise UsageError(f"--rules {key!r}: not a role, category or regular expression ({exc})") from None
        out.append((key, parse_format(spec)))
    return out


def _rule_format(rules: list[tuple[str, Format]], names: tuple[str, ...], role: Role) -> Format | None:
    """The first rule's format that names ROLE, its category, or matches one of NAMES (a weight's names: the
    checkpoint's, and transformers 5's where that differs)."""
    for key, fmt in rules:
        if key == role.value or key == CATEGORY.get(role) or (
                key not in CATEGORY.values() and key not in {r.value for r in Role}
                and any(re.search(key, name) for name in names)):
            return fmt
    return None


def candidate_formats(options: QuantizeOptions) -> list[Format]:
    """The formats a bits budget chooses from (in the compressed-tensors layout, as it stores them)."""
    spec = options.candidates or (CT_CANDIDATES if options.layout == CT_LAYOUT else
                                  GPTQ_CANDIDATES if options.method == "gptq" else DEFAULT_CANDIDATES)
    formats = [parse_format(c) for c in spec.split(",") if c.strip()]
    if not formats:
        raise UsageError("--candidates: give at least one format")
    if options.layout == CT_LAYOUT:
        formats = [ct.compressed_format(f, "--candidates: ") for f in formats]
    return formats


def check_options(options: QuantizeOptions) -> list[tuple[str, Format]]:
    """Refuse bad options before any work; returns the parsed rules (in the compressed-tensors
    layout, their formats as it stores them)."""
    fmt = parse_format(options.format)
    if options.bits_budget is not None and not 1 <= options.bits_budget <= 32:   # (also NaN and infinity)
        raise UsageError(f"--bits-budget {options.bits_budget}: give 1 to 32 bits per expert parameter")
    if options.layout not in LAYOUTS:
        raise UsageError(f"--layout {options.layout}: use {' or '.join(LAYOUTS)}")
    if options.layout == CT_LAYOUT:   # formats it cannot hold are refused before anything is read
        if options.bits_budget is None:
            ct.compressed_format(fmt, "--format ")
        else:
            candidate_formats(options)
    else:
        asked = [fmt] if options.bits_budget is None else candidate_formats(options)
        if any(f.kind == "fp8" for f in asked + [f for _, f in parse_rules(options.rules)]):
            raise UsageError("fp8 is written in --layout compressed-tensors (compressed-tensors' float-quantized "
                             f"weights, which vLLM serves); --layout {options.layout} does not hold it")
    if options.method not in METHODS:
        raise UsageError(f"--method {options.method}: use rtn or gptq")
    if options.method == "gptq":
        if options.layout in ("transformers", "transformers4"):
            raise UsageError(f"--method gptq quantizes to integer formats; --layout {options.layout} stores "
                             "bitsandbytes ones")
        for f in ([fmt] if options.bits_budget is None else candidate_formats(options)):
            if f.kind != "int":
                what = {"keep": "leaves the experts unquantized", "fp8": "is a float format, rounded to nearest"}.get(
                    f.kind, "is a bitsandbytes format")
                raise UsageError(f"--method gptq quantizes the integer formats int2/3/4/8; {f.id} {what}: use "
                                 "--method rtn, or integer --candidates")
    if options.policy not in POLICY_FIELD:
        raise UsageError(f"--policy {options.policy}: use {', '.join(POLICY_FIELD)}")
    if options.budget_scope not in ("global", "layer"):
        raise UsageError(f"--budget-scope {options.budget_scope}: use global or layer")
    if options.llama_quantize is not None and not Path(options.llama_quantize).absolute().parent.is_dir():
        raise UsageError(f"--emit-llama-quantize {options.llama_quantize}: its folder does not exist")
    rules = parse_rules(options.rules)
    if options.method == "gptq":
        for key, f in rules:
            if f.kind not in ("int", "keep"):
                raise UsageError(f"--rules {key}={f.id}: --method gptq quantizes every weight to an integer format "
                                 "(int2/3/4/8); use one, or --method rtn")
    if options.layout == CT_LAYOUT:
        rules = [(key, f if f.kind == "keep" else ct.compressed_format(f, f"--rules {key}="))
                 for key, f in rules]
    return rules


def quant_config(formats: dict[str, Format], experts: list[ExpertQuant], stacked: dict[str, int]
                 ) -> dict[str, Any]:
    """The config.json entry: every quantized weight's format, each expert's by layer, and the stacked
    tensors stored one slice per expert (name -> experts)."""
    by_layer: dict[str, list[str]] = {}
    for e in sorted(experts, key=lambda e: (e.layer, e.expert)):
        by_layer.setdefault(str(e.layer), []).append(e.format)
    used = sorted({f.id for f in formats.values()})
    return {"quant_method": QUANT_METHOD, "format_version": 1, "moetool_version": __version__,
            "formats": {fid: parse_format(fid).describe() for fid in used},
            "experts": by_layer, "tensors": {name: fmt.id for name, fmt in formats.items()},
            **({"stacked": stacked} if stacked else {})}


# ---------------------------------------------------------------- allocation

def _importance(ckpt: Checkpoint, options: QuantizeOptions, layers: list[int], experts: int
                ) -> dict[int, list[float]]:
    """Per MoE layer, each expert's importance relative to the layer mean, floored."""
    key = POLICY_FIELD[options.policy]
    if key is None:
        return {layer: [1.0] * experts for layer in layers}
    from moetool.ops.inspect import inspect_checkpoint

    profile = routing_profile(ckpt, inspect_checkpoint(ckpt), profile=options.profile,
                              calibration=options.calibration, saliency=options.policy == "saliency")
    out = {}
    for layer in layers:
        scores = profile[layer].get(key)
        if scores is None:
            raise UsageError(f"the profile has no {key} (for --policy saliency, profile with --saliency)")
        if any(s is None for s in scores):   # JSON writes NaN as null
            raise UsageError(f"the profile's {key} holds null (NaN) values: the model's weights or activations "
                             "are not finite", hint="moetool inspect --check-values finds the tensors")
        mean = sum(scores) / len(scores) or 1.0
        out[layer] = [max(float(s) / mean, IMPORTANCE_FLOOR) for s in scores]
    return out


def allocate(items: dict[Any, list[tuple[int, float, str]]], budget_bytes: float) -> dict[Any, str]:
    """Multiple-choice knapsack by Lagrangian greedy: ITEMS maps a key to its (bytes, cost, format)
    options; start every item at its smallest option, then repeatedly take the upgrade with the
    largest cost saving per byte (on each item's lower convex hull) that still fits the budget."""
    hulls = {}
    for key, options in items.items():
        hull: list[tuple[int, float, str]] = []
        for b, c, f in sorted(options, key=lambda o: (o[0], o[1])):
            if hull and c >= hull[-1][1]:
                continue            # more bytes, no less error: never worth it
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], (b, c, f)):
                hull.pop()          # keep savings per byte decreasing
            hull.append((b, c, f))
        hulls[key] = hull
    choice = {key: 0 for key in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bytes:
        raise ValueError("the budget is below the smallest options")
    heap = [(-_slope(h[0], h[1]), i, key) for i, (key, h) in enumerate(hulls.items()) if len(h) > 1]
    order = {key: i for i, key in enumerate(hulls)}
    heapq.heapify(heap)
    while heap:
        _, _, key = heapq.heappop(heap)
        hull, at = hulls[key], choice[key]
        extra = hull[at + 1][0] - hull[at][0]
        if used + extra > budget_bytes:
            continue                # this item cannot grow; smaller upgrades elsewhere still may
        used += extra
        choice[key] = at + 1
        if at + 2 < len(hull):
            heapq.heappush(heap, (-_slope(hull[at + 1], hull[at + 2]), order[key], key))
    chosen = {key: hulls[key][i] for key, i in choice.items()}
    # The hull greedy can leave bytes unused (an item whose next hull step did not fit is dropped);
    # spend them: switch one item at a time to whichever option, on its hull or not, saves most.
    while True:
        best = None
        for key, options in items.items():
            b0, c0, _ = chosen[key]
            for option in options:
                if option[0] - b0 <= budget_bytes - used and option[1] < c0 and (
                        best is None or c0 - option[1] > best[0]):
                    best = (c0 - option[1], key, option)
        if best is None:
            return {key: option[2] for key, option in chosen.items()}
        _, key, option = best
        used += option[0] - chosen[key][0]
        chosen[key] = option


def _slope(a, b) -> float:
    """Cost saved per extra byte going from option A to option B."""
    return (a[1] - b[1]) / max(1, b[0] - a[0])


# ---------------------------------------------------------------- planning

@dataclass
class _Weight:
    tensor: OutputTensor                 # the source weight, as the tensor plan reads it
    layer: int | None
    expert: int | None
    role: Role | None                    # None: passed through (MTP modules)


# Quantization runs on torch's threads (both cores); two weights at a time keep the cores busy
# while the next weight is read and the last one written. Always the same two threads: each
# thread's malloc arena keeps its freed temporaries, so more threads would hold more memory.
_QUANTIZER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moetool-quantize")
WRITER_THREADS, WRITER_PREFETCH = 8, 16   # pieces of a few weights in flight, waiting on the quantizer


class _Shared:
    """One weight's quantization, computed once for all of its stored tensors and then dropped."""

    def __init__(self, compute, count: int):
        self.compute, self.count = compute, count
        self.lock = threading.Lock()
        self.parts: dict | None = None
        self.left = 0

    def part(self, suffix: str):
        with self.lock:
            if self.parts is None:
                self.parts, self.left = _QUANTIZER.submit(self.compute).result(), self.count
            value = self.parts[suffix]
            self.left -= 1
            if not self.left:
                self.parts = None
        return value.contiguous()


def _quantized_tensors(name: str, source: OutputTensor, fmt: Format, errors: dict | None = None,
                       calibrated=None) -> list[OutputTensor]:
    """The stored tensors of SOURCE in FMT, computed together when the first is written; ERRORS[name]
    gets (squared error, squared norm) of the weight (a few percent of the quantization's time).
    CALIBRATED (a _CalibratedParts holding NAME) gives GPTQ's parts instead of rounding to nearest."""
    fmt.check(name, source.shape)
    components = fmt.components(source.shape, source.dtype)

    def compute():
        import torch

        weight = materialize(source)
        if calibrated is not None and name in calibrated:
            parts = calibrated.parts(name)
            if isinstance(fmt, ct.CompressedFormat):
                parts = fmt.from_parts(parts, weight.dtype)
        else:
            parts = fmt.quantize(weight, name)
        if errors is not None:   # in slices: whole-matrix float temporaries would double the memory
            flat, back = weight.reshape(-1), fmt.dequantize(parts, tuple(weight.shape), torch.float32).reshape(-1)
            sse = norm = 0.0
            for start in range(0, flat.numel(), 1 << 20):
                w = flat[start:start + (1 << 20)].float()
                diff = w - back[start:start + (1 << 20)]
                sse, norm = sse + float(diff @ diff), norm + float(w @ w)
            errors[name] = (sse, norm)
        return parts

    shared = _Shared(compute, len(components))
    out = []
    for suffix, dtype, shape in components:
        nbytes = prod(shape) * DTYPE_BYTES[dtype]
        out.append(OutputTensor(name + suffix, dtype, shape,
                                [ComputedPiece(lambda s=suffix: shared.part(s), nbytes)], fmt.id))
    return out


@dataclass
class QuantizePlan:
    tensors: list[OutputTensor]
    config: dict[str, Any] | None
    report: QuantizeReport
    expert_weights: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)   # filled as weights are written
    calibrated: Any = None              # GPTQ's parts, held in a temporary folder until written

    def close(self) -> None:
        if self.calibrated is not None:
            self.calibrated.close()

    def fill_errors(self) -> None:
        """Each expert's relative error from what writing measured (where the budget did not already)."""
        for row in self.report.experts:
            names = self.expert_weights.get((row.layer, row.expert), [])
            if row.rel_error is None and names and all(n in self.errors for n in names):
                sse, norm = (sum(self.errors[n][i] for n in names) for i in (0, 1))
                row.rel_error = (sse / norm) ** 0.5 if norm else 0.0


def plan_quantize(ckpt: Checkpoint, options: QuantizeOptions, progress=None, *, calibrate: bool = True
                  ) -> QuantizePlan:
    """Choose every weight's format (measuring candidate errors under a bits budget; with --method gptq
    that is a calibration pass of GPTQ per candidate, a dry run included) and plan the output; with
    --method gptq and CALIBRATE, also run the GPTQ that is written (a dry run skips it)."""
    if ckpt.kind == "gguf":
        raise UnsupportedError(f"{ckpt.source}: quantize reads safetensors and .bin checkpoints, not GGUF "
                               "(llama-quantize requantizes GGUF files; --emit-llama-quantize writes its types)")
    family, cfg, offset = family_context(ckpt)
    if family is None or family.dense:
        raise UsageError(f"{ckpt.source}: not a known MoE architecture; moetool quantizes routed experts")
    if tool_quantized(ckpt.config):
        raise UnsupportedError(f"{ckpt.source}: already quantized ({quant_method(ckpt.config)}; quantize its "
                               "unquantized source, or convert --dequantize it first)")
    rules = check_options(options)
    if options.method == "gptq" and family.decoder_offset is not None:
        raise UnsupportedError(f"{family.title}: --method gptq calibrates decoder-only models layer by layer; "
                               "use --method rtn")
    if options.method == "gptq" and first_key(cfg, family.keys.get("expert_hidden", ())):
        raise UnsupportedError(f"{family.title}: its routed experts work in a latent space ("
                               f"{' or '.join(family.keys['expert_hidden'])} set); --method gptq does not calibrate "
                               "them on their latent inputs: use --method rtn")
    quantized_source = any(r.dtype not in FLOATS for r in ckpt.tensors.values())
    per_expert = "per-expert" if "per-expert" in family.layouts else None   # stacked-only families keep theirs
    base = plan_tensors(ckpt, PlanOptions(layout=per_expert, dequantize=quantized_source))
    classifier = Classifier(family, offset)
    weights, stacked, mtp = [], {}, 0
    # gate and up rows of identity experts (LongCat-Flash, as transformers 5 saves them): never used, left as they are
    real = first_key(cfg, family.keys.get("num_experts", ())) if family.zero_expert_rows(cfg) else None
    identity = 0
    for tensor in base.tensors:
        m = classifier.classify(tensor.name)
        if family.is_mtp(cfg, tensor.name, m.layer):   # not run by transformers: no calibration reaches it
            weights.append(_Weight(tensor, m.layer, None, None))
            mtp += 1
        elif real is not None and m.expert is not None and m.expert >= real:
            identity += 1
            if options.layout != CT_LAYOUT:   # (vLLM's loader reads the real experts only, as the hub stores them)
                weights.append(_Weight(tensor, m.layer, None, None))
        elif m.role in EXPERT_MATRICES and m.expert is None and len(tensor.shape) == 3:
            stacked[tensor.name] = tensor.shape[0]   # stored stacked (Granite): one slice per expert
            weights.extend(_Weight(_expert_slice(tensor, e), m.layer, e, m.role) for e in range(tensor.shape[0]))
        else:
            weights.append(_Weight(tensor, m.layer, m.expert, m.role))
    experts: dict[tuple[int, int], list[_Weight]] = {}
    for w in weights:
        if w.role in EXPERT_MATRICES and w.expert is not None and len(w.tensor.shape) == 2:
            experts.setdefault((w.layer, w.expert), []).append(w)
    if not experts:
        if any(classifier.classify(t.name).role in EXPERT_MATRICES for t in base.tensors):
            raise UnsupportedError(f"{family.title}: its experts are packed into matrices shared by all experts, "
                                   "so moetool cannot quantize them one by one")
        raise UsageError(f"{ckpt.source}: no routed expert weights found")
    warnings: list[str] = []
    if mtp:
        warnings.append(f"the {mtp} tensors of the multi-token-prediction module(s) were kept as they are: "
                        "transformers does not run them, so neither routing nor calibration reaches them")
    if identity:
        warnings.append(f"the {identity} gate and up tensors of identity experts (never used) were "
                        + ("left out, as the hub's checkpoints hold none" if options.layout == CT_LAYOUT
                           else "kept as they are"))
    if options.layout == CT_LAYOUT and stacked:
        raise UnsupportedError(f"{family.title}: its experts are stored stacked, not as one Linear module each, "
                               "so compressed-tensors (and vLLM) cannot take them quantized; use --layout moetool")

    names = {key: [w.tensor.name for w in ws] for key, ws in experts.items()}
    errors: dict[str, tuple[float, float]] = {}
    if options.layout in ("transformers", "transformers4"):
        return QuantizePlan(*_plan_transformers(ckpt, options, family, weights, experts, base, rules, warnings,
                                                errors, _hub_forms(ckpt, family, per_expert, quantized_source)),
                            names, errors)

    expert_choice, measured = _expert_formats(ckpt, options, experts, progress, warnings)
    formats: dict[str, Format] = {}
    for ws in experts.values():
        for w in ws:
            formats[w.tensor.name] = expert_choice[(w.layer, w.expert)]
    aliases: dict[str, str] = {}
    if rules:
        hub = _hub_forms(ckpt, family, per_expert, quantized_source)
        chosen, weights, aliases = _rule_formats(ckpt, family, offset, weights, set(formats), rules, warnings, hub)
        formats.update(chosen)
    calibrated = None
    if options.method == "gptq" and calibrate:
        calibrated = _gptq_experts(ckpt, options, experts, formats, {w.tensor.name: w.tensor.dtype for w in weights},
                                   warnings, progress, aliases)
    elif options.method == "gptq":   # a dry run: the data the real run would calibrate on is checked
        _calibration_ids(ckpt, options)
    out = []
    for w in weights:
        fmt = formats.get(w.tensor.name)
        if fmt is None or fmt.kind == "keep":
            out.append(w.tensor)
        else:
            out.extend(_quantized_tensors(w.tensor.name, w.tensor, fmt, errors, calibrated))
    report = _report(ckpt, options, family, experts, expert_choice, measured, base.tensors, out, formats, warnings)
    config = json.loads(json.dumps(base.config)) if base.config is not None else {}
    if options.layout == CT_LAYOUT:
        config["quantization_config"] = _ct_config(family, weights, experts, formats, warnings)
    else:
        config["quantization_config"] = quant_config(formats, report.experts, stacked)
    report.method = options.method
    if calibrated is not None:
        report.coverage = calibrated.coverage
    return QuantizePlan(out, config, report, names, errors, calibrated)


def _ct_config(family, weights: list[_Weight], experts: dict[tuple[int, int], list[_Weight]],
               formats: dict[str, Format], warnings: list[str]) -> dict[str, Any]:
    """compressed-tensors' quantization_config: a config group per format (the experts' first), whose
    targets are the MoE layers it holds (every projection of every expert under them) and the other
    modules it holds; `ignore` names every other matrix's module, and the output embedding. vLLM
    looks each Linear module up in these, and refuses one that matches neither."""
    expert_names = {w.tensor.name for ws in experts.values() for w in ws}
    by_id = {fmt.id: fmt for fmt in formats.values()}
    prefixes: dict[str, list[str]] = {}    # format -> `...experts.` of each MoE layer it holds
    modules: dict[str, list[str]] = {}     # format -> other modules it holds
    expert_weights = [w for ws in experts.values() for w in ws]
    for w in expert_weights + [w for w in weights if w.tensor.name in formats and w.tensor.name not in expert_names]:
        fid, module = formats[w.tensor.name].id, w.tensor.name.removesuffix(".weight")
        prefix = ct.expert_prefix(module, w.expert) if w.tensor.name in expert_names else None
        if prefix is None:   # not an expert, or no expert number in its name: the module itself
            modules.setdefault(fid, []).append(module)
        else:
            prefixes.setdefault(fid, []).append(prefix)
    order = dict.fromkeys([*prefixes, *modules])   # experts' formats first (transformers takes the first)
    groups = [(by_id[fid], ct.patterns(prefixes.get(fid, []), ct.EXPERT_TAIL) + ct.patterns(modules.get(fid, [])))
              for fid in order]
    # every matrix left as it is (routers, attention, embeddings, ...), and the output embedding
    ignore = [w.tensor.name.removesuffix(".weight") for w in weights
              if w.tensor.name not in formats and len(w.tensor.shape) == 2 and w.tensor.name.endswith(".weight")]
    head = family.templates(None).get(Role.LM_HEAD)
    if isinstance(head, str) and head.removesuffix(".weight") not in ignore:
        ignore.append(head.removesuffix(".weight"))   # tied to the embedding: vLLM still builds an lm_head
    expert_formats = {formats[n] for n in expert_names}
    other_formats = {f for n, f in formats.items() if n not in expert_names}
    asymmetric = not all(f.symmetric for f in expert_formats)
    if asymmetric:   # vllm compressed_tensors_moe.py: both WNA16 MoE methods assert weight_quant.symmetric
        warnings.append("vLLM's MoE kernels take symmetric experts only (its WNA16 MoE methods refuse zero points), "
                        "so vLLM cannot serve this checkpoint; use -sym formats (the default in this layout)")
    if len(expert_formats) > 1 or asymmetric or other_formats - expert_formats:
        warnings.append("transformers 5 reads compressed-tensors experts in one symmetric scheme and other weights "
                        "in the experts' scheme, so it cannot load this checkpoint; moetool.load_model does"
                        + ("" if asymmetric else " and vLLM do") + ", and compressed-tensors' "
                        "CompressedTensorsDequantizer writes it back in bf16")
    return ct.quantization_config(groups, ct.patterns(ignore))


def _expert_slice(tensor: OutputTensor, expert: int) -> OutputTensor:
    """Expert EXPERT of a stacked tensor: a byte range when the tensor is copied as one, else computed."""
    from moetool.checkpoint.writer import RawPiece

    shape, nbytes = tuple(tensor.shape[1:]), tensor.nbytes // tensor.shape[0]
    name = slice_name(tensor.name, expert)
    if len(tensor.pieces) == 1 and isinstance(tensor.pieces[0], RawPiece):
        raw = tensor.pieces[0]
        return OutputTensor(name, tensor.dtype, shape, [RawPiece(raw.path, raw.start + expert * nbytes, nbytes)])
    return OutputTensor(name, tensor.dtype, shape, [ComputedPiece(lambda: materialize(tensor)[expert], nbytes)])


@dataclass
class _HubForm:
    """Checkpoint tensors named apart from transformers 5 (the family's renames, row splits, joins and shards)
    and the tensors transformers 5 holds in their place, under its names."""

    sources: tuple[str, ...]
    held: list[OutputTensor]
    renamed: bool                        # one tensor, only its name changed: quantized under the checkpoint's


def _hub_forms(ckpt: Checkpoint, family, layout: str | None, dequantize: bool) -> list[_HubForm]:
    """What transformers 5 holds in place of each tensor the checkpoint names apart from it (none where the
    family renames nothing)."""
    if not (family.renames or family.row_splits or family.row_joins or family.row_shards):
        return []
    named = plan_tensors(ckpt, PlanOptions(layout=layout, dequantize=dequantize, model_names=True))
    by_name = {t.name: t for t in named.tensors}
    groups: dict[tuple[str, ...], list[OutputTensor]] = {}
    for name, sources in named.origins.items():
        groups.setdefault(sources, []).append(by_name[name])
    return [_HubForm(sources, held, len(held) == 1 and held[0].name in named.renamed)
            for sources, held in groups.items()]


def _rule_formats(ckpt, family, offset: int, weights: list[_Weight], taken: set[str], rules, warnings: list[str],
                  hub: list[_HubForm]) -> tuple[dict[str, Format], list[_Weight], dict[str, str]]:
    """Formats --rules give: to matrices of nn.Linear modules in the roles rules cover. A tensor the checkpoint
    names apart from transformers 5 (HUB) is matched under both names: one only renamed (Hy4's linear_gate,
    transformers' gate_proj) is quantized under the checkpoint's name, which the loaders map; one transformers
    splits or joins as it loads (Sarvam's query_key_value into q/k/v_proj, LARA-mini's in_proj into four) is
    replaced, where a rule quantizes any of its parts, by the parts transformers holds, under its names
    (quantized blocks cannot be split by rows). Returns the formats, the weights (so replaced), and the
    checkpoint's names of renamed weights quantized -> transformers' (for GPTQ's modules)."""
    from moetool.runner.quantized import linear_weights

    linear = linear_weights(ckpt, family)
    classifier = Classifier(family, offset)
    out, skipped, unfit, aliases, replaced = {}, [], {}, {}, []

    def rule_format(w: _Weight, held: str, *names: str) -> Format | None:
        name = w.tensor.name
        stacked = len(w.tensor.shape) == 3 and w.role in SHARED_ROLES   # (Inkling's shared experts: not Linear)
        if name in taken or w.role is None or (len(w.tensor.shape) != 2 and not stacked):
            return None   # (role None: MTP, kept as is)
        fmt = _rule_format(rules, (name, held, *names), w.role)
        if fmt is None or fmt.kind == "keep":
            return None
        if stacked:   # said so (with the routers and norms rules match), never quantized silently as something else
            skipped.append(name)
            return None
        if (w.role in RULE_ROLES or w.role == Role.OTHER) and held in linear and w.tensor.dtype in FLOATS:
            try:
                fmt.check(name, w.tensor.shape)
                return fmt
            except UsageError as exc:   # grouped by reason: one warning, not one per weight
                unfit.setdefault(str(exc).removeprefix(f"{name}: "), []).append(name)
        else:
            skipped.append(name)
        return None

    renamed = {form.sources[0]: form.held[0].name for form in hub if form.renamed}
    parts_of = {form.sources[0]: form for form in hub if not form.renamed}   # (a join: at its first part)
    joined = {name for form in hub if not form.renamed for name in form.sources[1:]}
    by_name = {w.tensor.name: w for w in weights}
    kept: list[_Weight] = []
    for w in weights:
        name = w.tensor.name
        form = parts_of.get(name)
        if form is not None:
            sources = [by_name[n] for n in form.sources if n in by_name]
            parts = [_Weight(t, w.layer, None, classifier.classify(t.name).role) for t in form.held]
            open_ = all(s.role is not None and s.tensor.name not in taken for s in sources)   # (not MTP, experts)
            chosen = {p.tensor.name: f for p in parts if open_ and (f := rule_format(p, p.tensor.name, *form.sources))}
            if chosen:
                out.update(chosen)
                kept.extend(parts)
                replaced.append(form)
                continue
            kept.extend(sources)
            continue
        if name in joined:   # placed with its first part
            continue
        fmt = rule_format(w, renamed.get(name, name))
        if fmt is not None:
            out[name] = fmt
            if name in renamed:
                aliases[name] = renamed[name]
        kept.append(w)
    for why, names in unfit.items():
        warnings.append(f"{len(names)} weight(s) matched by --rules left in their precision: {why} "
                        f"(first: {names[0]})")
    if skipped:
        warnings.append(f"{len(skipped)} weights matched by --rules stay in their precision: routers, norms, "
                        f"embeddings, lm_head and non-Linear weights (stacked shared experts too) are not quantized "
                        f"(first: {skipped[0]})")
    if replaced:
        first = replaced[0]
        warnings.append(f"{len(replaced)} checkpoint tensors that transformers splits or joins as it loads were "
                        f"quantized as the tensors it holds, stored under transformers 5's names (first: "
                        f"{', '.join(first.sources)} -> {', '.join(t.name for t in first.held)}): moetool.load_model "
                        "and transformers 5 read them; loaders of the hub's names (its remote code, vLLM) may not")
    if not out and not unfit:
        warnings.append("--rules matched no attention, shared-expert or dense-MLP weight")
    return out, kept, aliases


def _expert_formats(ckpt: Checkpoint, options: QuantizeOptions, experts: dict[tuple[int, int], list[_Weight]],
                    progress, warnings: list[str]
                    ) -> tuple[dict[tuple[int, int], Format], dict[tuple[int, int], dict[str, Any]]]:
    """Each expert's format: the one given, or the budget's allocation. Also what was measured of
    each expert (relative error of its format, importance)."""
    ct_layout = options.layout == CT_LAYOUT
    if options.bits_budget is None:
        fmt = parse_format(options.format)
        fmt = ct.compressed_format(fmt) if ct_layout else fmt
        for ws in experts.values():
            for w in ws:
                fmt.check(w.tensor.name, w.tensor.shape)
        return {key: fmt for key in experts}, {}
    candidates = candidate_formats(options)
    by_id = {fmt.id: fmt for fmt in candidates}
    layers = sorted({layer for layer, _ in experts})
    count = 1 + max(e for _, e in experts)
    importance = _importance(ckpt, options, layers, count)
    options_of: dict[tuple[int, int], list[tuple[int, float, str]]] = {}
    errors: dict[tuple[int, int], dict[str, float]] = {}
    norms: dict[tuple[int, int], float] = {}
    unusable: dict[str, str] = {}   # candidate -> why it was not offered for some expert
    if options.method == "gptq":   # each candidate's GPTQ output error on the expert's routed tokens
        dtype = next(iter(experts.values()))[0].tensor.dtype   # the experts' (compressed-tensors scales')
        costs, unusable = _gptq_costs(ckpt, options, candidates, dtype, progress, warnings)
        measurements = ((key, None, costs.get(key, {}), {}, 0) for key in experts)
    else:   # rounding error; two experts at a time on the quantizer threads (the next is read meanwhile)
        measurements = _QUANTIZER.map(lambda k: _measure(experts[k], k, candidates), experts)
    for key, norm, sse_by_format, misfits, nbytes in measurements:
        norms[key], errors[key] = norm, sse_by_format
        for fid, why in misfits.items():
            unusable.setdefault(fid, why)
        for fmt in candidates:
            if fmt.id in sse_by_format:
                nbytes_f = sum(fmt.nbytes(tuple(w.tensor.shape), w.tensor.dtype) for w in experts[key])
                options_of.setdefault(key, []).append((nbytes_f, importance[key[0]][key[1]] * sse_by_format[fmt.id],
                                                       fmt.id))
        if key not in options_of:
            why = f" ({next(iter(misfits.values()))})" if misfits else ""
            raise UsageError(f"layer {key[0]} expert {key[1]}: no candidate format fits its matrices{why}")
        if progress:
            progress(nbytes)
    params = {key: sum(prod(w.tensor.shape) for w in ws) for key, ws in experts.items()}
    # What gets a format: each expert, or in the compressed-tensors layout each MoE layer, since
    # vLLM's MoE kernels take one scheme for all of a layer's experts and projections.
    unit = (lambda key: key[0]) if ct_layout else (lambda key: key)
    layer_of = (lambda u: u) if ct_layout else (lambda u: u[0])
    unit_options = _unit_options(options_of, unit)
    units = list(unit_options)
    groups = [units] if options.budget_scope == "global" else \
        [[u for u in units if layer_of(u) == layer] for layer in layers]
    chosen: dict[Any, str] = {}
    for group in groups:
        items = {u: unit_options[u] for u in group}
        total = sum(params[k] for k in experts if unit(k) in items)
        smallest = sum(min(o[0] for o in items[u]) for u in group)
        if 8 * smallest > options.bits_budget * total:
            raise UsageError(f"--bits-budget {options.bits_budget}: the smallest candidate formats need "
                             f"{8 * smallest / total:.3f} bits per expert parameter")
        chosen.update(allocate(items, options.bits_budget * total / 8))
    choice = {key: chosen[unit(key)] for key in experts}
    # rounding's error is the written one; GPTQ's is measured when it is written (QuantizePlan.fill_errors)
    measured = {key: {"rel_error": None if norms[key] is None else
                      (errors[key][fid] / norms[key]) ** 0.5 if norms[key] else 0.0,
                      "importance": importance[key[0]][key[1]]} for key, fid in choice.items()}
    warnings.extend(f"candidate {fid} was not used where it cannot hold the weights ({why})"
                    for fid, why in unusable.items())
    if ct_layout:
        warnings.append("--layout compressed-tensors: vLLM's MoE kernels take one scheme per MoE layer, so the "
                        "budget was spent one format per layer (every expert's gate, up and down alike), not per "
                        "expert")
    return {key: by_id[fid] for key, fid in choice.items()}, measured


def _unit_options(options_of: dict[Any, list[tuple[int, float, str]]], unit) -> dict[Any, list]:
    """The options of experts grouped by UNIT(key): each format's bytes and cost summed over the
    group, for the formats every expert of the group can take (per expert: the options themselves)."""
    sums: dict[Any, dict[str, list]] = {}
    members: dict[Any, int] = {}
    for key, options in options_of.items():
        u = unit(key)
        members[u] = members.get(u, 0) + 1
        for nbytes, cost, fid in options:
            acc = sums.setdefault(u, {}).setdefault(fid, [0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + nbytes, acc[1] + cost, acc[2] + 1
    out = {u: [(b, c, fid) for fid, (b, c, n) in fids.items() if n == members[u]] for u, fids in sums.items()}
    for u, options in out.items():
        if not options:
            raise UsageError(f"layer {u}: no candidate format fits all of its experts' matrices")
    return out


def _measure(ws: list[_Weight], key, candidates: list[Format]):
    """Squared reconstruction error of an expert's matrices in every candidate format that can hold them."""
    matrices = [materialize(w.tensor) for w in ws]
    norm = sum(float(m.float().pow(2).sum()) for m in matrices)
    errors, misfits = {}, {}
    for fmt in candidates:
        try:
            for w in ws:
                fmt.check(w.tensor.name, w.tensor.shape)
            errors[fmt.id] = sum(float((m.float() - fmt.dequantize(fmt.quantize(m, w.tensor.name), tuple(m.shape),
                                                                    m.dtype).float()).pow(2).sum())
                                 for w, m in zip(ws, matrices))
        except UsageError as exc:
            misfits[fmt.id] = str(exc)
    return key, norm, errors, misfits, sum(m.numel() * m.element_size() for m in matrices)


def _report(ckpt, options, family, experts, choice, measured, source_tensors, out_tensors, formats, warnings
            ) -> QuantizeReport:
    rows = []
    for key in sorted(experts):
        ws = experts[key]
        fmt = choice[key]
        rows.append(ExpertQuant(key[0], key[1], fmt.id, sum(prod(w.tensor.shape) for w in ws),
                                sum(fmt.nbytes(tuple(w.tensor.shape), w.tensor.dtype) for w in ws),
                                0.0 if fmt.kind == "keep" else measured.get(key, {}).get("rel_error"),
                                measured.get(key, {}).get("importance")))
    names = {w.tensor.name for ws in experts.values() for w in ws}
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.format] = counts.get(row.format, 0) + 1
    return QuantizeReport(
        source=ckpt.source, out=None, family=family.name, layout=options.layout,
        policy=options.policy if options.bits_budget is not None else None, bits_budget=options.bits_budget,
        experts=rows, rule_tensors={n: f.id for n, f in formats.items() if n not in names},
        expert_params=sum(r.params for r in rows),
        expert_bytes_before=sum(w.tensor.nbytes for ws in experts.values() for w in ws),
        expert_bytes_after=sum(r.bytes for r in rows),
        bytes_before=sum(t.nbytes for t in source_tensors), bytes_after=sum(t.nbytes for t in out_tensors),
        formats=counts, warnings=warnings)


def _plan_transformers(ckpt, options, family, weights, experts, base, rules, warnings, errors, hub: list[_HubForm]
                       ) -> tuple[list[OutputTensor], dict[str, Any], QuantizeReport]:
    """What stock transformers 5 + bitsandbytes loads: every nn.Linear weight in bitsandbytes' own
    serialization, other Linear modules named in llm_int8_skip_modules. transformers 5 holds routed
    experts as fused 3-D parameters that its bitsandbytes integration never quantizes, and cannot load
    per-expert quantized experts (its expert-fusing loader concatenates the packed bytes), so they
    stay in the source precision."""
    from moetool.runner.quantized import linear_weights

    fmt = parse_format(options.format)
    if not fmt.is_bnb4 or options.bits_budget is not None or rules:
        raise UsageError(f"--layout {options.layout} writes one bitsandbytes 4-bit format (--format nf4 or fp4, "
                         "no --bits-budget or --rules): that is all stock transformers loads")
    if not family.transformers_reads_per_expert and not family.bnb_linear_experts:
        raise UnsupportedError(f"{family.title}: transformers keeps its experts stacked, so a stock bitsandbytes "
                               "checkpoint would quantize attention only; use --layout moetool")
    linear = linear_weights(ckpt, family, head=True)   # given skip modules, transformers adds no lm_head itself
    v4 = options.layout == "transformers4" or family.bnb_linear_experts
    if v4:   # transformers 4 (and 5 for Llama 4) holds each expert's matrices in nn.Linear modules
        linear |= {w.tensor.name for w in weights if w.role in EXPERT_MATRICES and w.expert is not None}
        linear |= {w.tensor.name for w in weights if CATEGORY.get(w.role) == "router" and len(w.tensor.shape) == 2}
    formats = {w.tensor.name: fmt for w in weights if w.tensor.name in linear and len(w.tensor.shape) == 2
               and w.tensor.dtype in FLOATS and CATEGORY[w.role] not in ("router", "lm_head", "embedding")}
    # module names as they are: transformers 4 matches them as substrings, 5 as regexes with module
    # boundaries (where an unescaped dot can only meet the dot it stands for in these names)
    # (and without the built model's names of the quantized weights, where a wrapper stores them under others:
    # such a name would match the quantized module too, Qwen3-Omni's thinker.model.language_model.*)
    held_only = linear - set(ckpt.tensors)   # names the built model holds and the checkpoint does not
    twins = {model_name(name, family, held_only) for name in formats} & held_only
    skip = sorted(name.removesuffix(".weight") for name in linear - set(formats) - twins)
    out = []
    for tensor in base.tensors:   # stacked experts stay stacked: transformers reads them so
        fmt_w = formats.get(tensor.name)
        out.extend(_quantized_tensors(tensor.name, tensor, fmt_w, errors) if fmt_w else [tensor])
    choice = {key: fmt if all(w.tensor.name in formats for w in ws) else parse_format("keep")
              for key, ws in experts.items()}
    report = _report(ckpt, options, family, experts, choice, {}, base.tensors, out, formats, warnings)
    dtype = next((w.tensor.dtype for w in weights if w.tensor.name in formats), "BF16")
    apart = [form.sources[0] for form in hub if any(t.name in linear for t in form.held)]
    if apart:   # (stored under other names than the Linear modules transformers loads them into)
        warnings.append(f"{len(apart)} Linear weights the checkpoint names apart from transformers 5, which renames "
                        f"or splits them as it loads, stay in their precision (first: {apart[0]}): this layout "
                        "quantizes weights under the names of transformers' modules only; --layout moetool "
                        "quantizes them")
    if family.bnb_linear_experts:
        warnings.append(f"{family.title}: transformers 4 and 5 both load this checkpoint, experts quantized")
    elif v4:
        warnings.append("transformers 4 loads this checkpoint; transformers 5 cannot (its loader fuses the "
                        "experts' packed bytes), except for Llama 4")
    else:
        warnings.append(f"{report.expert_params:,} routed-expert parameters stay in {dtype.lower()}: transformers 5 "
                        "quantizes only nn.Linear modules and holds experts as fused 3-D parameters; --layout "
                        "moetool quantizes them (load with moetool.load_model), --layout transformers4 for "
                        "transformers 4")
    config = json.loads(json.dumps(base.config)) if base.config is not None else {}
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
        "_load_in_8bit": False, "bnb_4bit_quant_type": fmt.kind, "bnb_4bit_use_double_quant": fmt.double_quant,
        "bnb_4bit_compute_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, "bfloat16"),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}
    return out, config, report


# ---------------------------------------------------------------- execution

def quantize(ckpt: Checkpoint, out: Path | None, options: QuantizeOptions, *, force: bool = False,
             dry_run: bool = False, progress=None, analysis_progress=None) -> QuantizeReport:
    """Quantize CKPT into OUT (atomically); with DRY_RUN, choose formats and report without writing."""
    start = time.perf_counter()
    check_options(options)                # bad options fail before any work
    if out is not None:
        refuse_inside_source(Path(out), ckpt)
    if options.llama_quantize is not None:
        refuse_inside_source(Path(options.llama_quantize), ckpt)
        if Path(options.llama_quantize).is_dir():
            raise UsageError(f"--emit-llama-quantize {options.llama_quantize}: is a folder; give a file name")
    for path in (out, options.llama_quantize):
        if path is not None and not dry_run and Path(path).exists() and not force:
            raise OutputExistsError(f"{path}: already exists", hint="use --force to replace it")
    plan = plan_quantize(ckpt, options, analysis_progress, calibrate=not dry_run)   # (every rank: GPTQ's share)
    report = plan.report
    write = not dry_run and distributed.is_primary()   # torchrun: rank 0 alone writes
    try:
        if write:
            shards = plan_shards(plan.tensors, options.max_shard_size)
            write_checkpoint(Path(out), shards, op="quantize", config=plan.config, files=side_files(ckpt),
                             readme=_model_card(report, options, Path(out)), force=force, progress=progress,
                             workers=WRITER_THREADS, prefetch=WRITER_PREFETCH)
            report.out = str(out)
            plan.fill_errors()
    finally:
        plan.close()
    if options.llama_quantize is not None:
        from moetool.quant.llama_cpp import tensor_type_lines

        if write:
            try:
                path = Path(options.llama_quantize)
                tmp = path.with_name(f".{path.name}.moetool-tmp")
                tmp.write_text("\n".join(tensor_type_lines(report.experts)) + "\n")
                tmp.replace(path)
            except OSError as exc:
                raise OutputWriteError(f"{options.llama_quantize}: {exc.strerror or exc}") from None
        report.llama_quantize = str(options.llama_quantize)
    report.seconds = time.perf_counter() - start
    return report


class _CalibratedParts:
    """GPTQ's stored parts of the routed experts, one safetensors file per expert in a temporary
    folder (memory stays at one layer's weights and Hessians), read back as each weight is written."""

    def __init__(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="moetool-gptq-")
        self.files: dict[str, Path] = {}
        self.coverage: dict[int, list[int]] = {}

    def add(self, key: str, parts_by_name: dict[str, dict]) -> None:
        from safetensors.torch import save_file

        path = Path(self._dir.name) / f"{key}.safetensors"
        save_file({name + suffix: t.contiguous().cpu() for name, parts in parts_by_name.items()
                   for suffix, t in parts.items()}, str(path))
        self.files.update({name: path for name in parts_by_name})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def parts(self, name: str) -> dict:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return {key[len(name):]: f.get_tensor(key) for key in f.keys() if key.startswith(name)
                    and key[len(name):] in ("", ".scales", ".zeros")}

    def close(self) -> None:
        self._dir.cleanup()


def _calibration_ids(ckpt: Checkpoint, options: QuantizeOptions):
    """The calibration options (sequences of 256 tokens unless told) and token ids, checked: ids within
    the vocabulary, at least one whole sequence (GPTQ's Hessians need whole sequences)."""
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.ops.profile import calibration_ids
    from moetool.runner.data import DataError

    calibration = options.calibration or ProfileOptions()
    calibration = replace(calibration, seq_len=calibration.seq_len or 256)
    ids = calibration_ids(ckpt, calibration, default="builtin", vocab_size=inspect_checkpoint(ckpt).vocab_size)
    if ids.shape[1] < calibration.seq_len:
        raise DataError(f"the calibration data holds {ids.numel()} tokens, fewer than one sequence of "
                        f"{calibration.seq_len}", hint="give more data, or a smaller --seq-len")
    return calibration, ids


def _calibrate(ckpt: Checkpoint, options: QuantizeOptions, make_calibrator, progress):
    """Run the calibration tokens layer by layer (streamed, float32) with the calibrator
    MAKE_CALIBRATOR(loaded model) builds; returns it. Under torchrun each rank runs its share of the
    sequences on its own device (the calibrators sum their Hessians over the ranks)."""
    import torch

    from moetool.runner.data import DataError
    from moetool.runner.device import pick_device
    from moetool.runner.engine import micro_batches, run
    from moetool.runner.model import load_model

    calibration, ids = _calibration_ids(ckpt, options)
    world = distributed.world_from_env()
    if ids.shape[0] < world.size:   # a rank without sequences would miss the layers' collectives
        raise DataError(f"{ids.shape[0]} calibration sequences for {world.size} ranks: give each rank one at least",
                        hint="give more data, or a smaller --seq-len")
    device = pick_device(calibration.device, local_rank=world.local_rank if world.distributed else None)
    distributed.init(world, device)
    first, count = distributed.share(ids.shape[0], world)
    ids = ids[first:first + count]
    loaded = load_model(ckpt, device=device, dtype=torch.float32, mode="streamed",
                        trust_remote_code=calibration.trust_remote_code)
    calibrator = make_calibrator(loaded)
    seen = {"label": None, "done": 0}

    def tokens_done(label, done, total):   # the engine counts tokens per pass; PROGRESS takes steps
        if label != seen["label"]:
            seen.update(label=label, done=0)
        progress(done - seen["done"])
        seen["done"] = done

    run(loaded, micro_batches(ids, calibration.batch_size, first), calibrate=calibrator,
        progress=tokens_done if progress else None, offload_dir=calibration.offload_dir)
    return calibrator


def _base(fmt: Format, dtype: str) -> Format:
    """The integer format GPTQ rounds a weight stored in DTYPE to (a compressed-tensors format stores one)."""
    return fmt.base_for(dtype) if isinstance(fmt, ct.CompressedFormat) else fmt


def _gptq_costs(ckpt: Checkpoint, options: QuantizeOptions, candidates: list[Format], dtype: str, progress,
                warnings: list[str]):
    """Each routed expert's GPTQ output error in every candidate format, measured layer by layer on
    the unquantized model (`GptqCosts`): (layer, expert) -> format id -> error, and the misfits."""
    from moetool.runner.sequential import GptqCosts

    costs = _calibrate(ckpt, options, lambda loaded: GptqCosts(
        [_base(f, dtype) for f in candidates], min_tokens=options.min_tokens, damp=options.damp,
        act_order=options.act_order), progress)
    if costs.fallbacks:
        warnings.append(f"gptq: measuring the candidates, {len(costs.fallbacks)} GPTQ runs fell back to "
                        f"round-to-nearest (first: {costs.fallbacks[0]})")
    return costs.costs, costs.misfits   # a compressed-tensors format's id is its integer format's


def _gptq_experts(ckpt: Checkpoint, options: QuantizeOptions, experts: dict, formats: dict[str, Format],
                  dtypes: dict[str, str], warnings: list[str], progress, aliases: dict[str, str] | None = None
                  ) -> _CalibratedParts:
    """Run the calibration tokens layer by layer (streamed) and quantize every routed expert with GPTQ
    on the Hessians of its own routed tokens, and the other weights FORMATS holds (--rules) on the
    Hessians of all tokens at their modules; sequentially (the default), each layer sees the outputs
    of the earlier layers as quantized. ALIASES: weights quantized under the checkpoint's name -> transformers'."""
    import torch

    from moetool.runner.sequential import GptqExperts

    roles = {Role.EXPERT_GATE: 0, Role.EXPERT_UP: 1, Role.EXPERT_DOWN: 2}
    plan: dict[tuple[int, int], list] = {}
    names: dict[tuple[int, int], dict[str, str]] = {}
    for key, ws in experts.items():
        chosen: list = [None, None, None]
        for w in ws:
            if w.role not in roles:
                raise UnsupportedError(f"--method gptq: {w.tensor.name} holds gate and up together ({w.role.value}); "
                                       "GPTQ per expert covers separate gate, up and down matrices")
            chosen[roles[w.role]] = _base(formats[w.tensor.name], w.tensor.dtype)
            names.setdefault(key, {})[("gate", "up", "down")[roles[w.role]]] = w.tensor.name
        plan[key] = tuple(chosen)
    expert_names = {n for row in names.values() for n in row.values()}
    others = {name: fmt for name, fmt in formats.items() if name not in expert_names}
    store = _CalibratedParts()

    def save(layer, expert, results):
        store.add(f"{layer}-{expert}", {names[(layer, expert)][part]: r.parts for part, r in results.items()})

    def save_linear(name, result):
        store.add(f"w{len(store.files)}", {name: result.parts})

    def make(loaded):
        linear = {}
        for name, fmt in others.items():   # the module holding each weight --rules quantize
            try:
                module = loaded.model.get_submodule((aliases or {}).get(name, name).removesuffix(".weight"))
            except AttributeError:
                module = None
            if isinstance(module, torch.nn.Linear) and name.endswith(".weight"):
                linear[module] = (name, _base(fmt, dtypes[name]))
        return GptqExperts(plan, save, linear=linear, save_linear=save_linear, min_tokens=options.min_tokens,
                           damp=options.damp, act_order=options.act_order, write_back=options.sequential)

    try:
        calibrator = _calibrate(ckpt, options, make, progress)
    except BaseException:
        store.close()
        raise
    store.coverage = calibrator.coverage
    few = [(layer, e, n) for layer, counts in calibrator.coverage.items() for e, n in enumerate(counts)
           if n < options.min_tokens]
    if few:
        listed = ", ".join(f"L{layer}E{e}={n}" for layer, e, n in few[:12]) + (" ..." if len(few) > 12 else "")
        warnings.append(f"gptq: {len(few)} experts were routed fewer than {options.min_tokens} calibration tokens; "
                        f"their Hessians were blended with their layer's (see coverage): {listed}")
    warnings += [f"gptq fell back to round-to-nearest: {f}" for f in calibrator.fallbacks]
    rounded = [name for name in others if name not in store]   # not an nn.Linear inside a decoder layer
    if rounded:
        warnings.append(f"gptq: {len(rounded)} weights --rules quantize are not in a decoder layer's nn.Linear "
                        f"modules, so they were rounded to nearest (first: {rounded[0]})")
    return store


def _model_card(report: QuantizeReport, options: QuantizeOptions, out: Path) -> str:
    formats = ", ".join(f"{fid}: {n} experts" for fid, n in sorted(report.formats.items()))
    budget = f"bits budget {report.bits_budget} ({report.policy})" if report.bits_budget else "one format"
    return (f"---\nbase_model: {report.source}\ntags:\n- moetool\n- mixture-of-experts\n- quantized\n---\n\n"
            f"# {out.name}\n\nQuantized from `{report.source}` by moetool {__version__}:\n\n"
            f"```\n{options.command or 'moetool quantize'}\n```\n\n"
            f"- routed experts: {formats}; {budget}; {report.expert_bits:.3f} bits per expert parameter\n"
            f"- size: {report.bytes_before:,} -> {report.bytes_after:,} bytes\n"
            + ("- compressed-tensors (pack-quantized integers; fp8 float-quantized, its activations quantized to fp8 "
               "per token when served): serve it with vLLM, load it with `moetool.load_model(path)`, or in "
               "transformers with `quantization_config=CompressedTensorsConfig(dequantize=True)` (one symmetric "
               "integer expert format only)\n" if options.layout == CT_LAYOUT else
               "- load it with `moetool.load_model(path)`; `moetool convert --dequantize` writes it back in bf16\n"))
