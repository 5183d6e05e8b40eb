"""`moetool inspect`: what a checkpoint is, how big, how sparse, and what is wrong with it.

Reads headers only (unless expert statistics or value checks are asked for) and
never imports torch. See README "Parameter counts" for what is counted.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from itertools import compress, repeat
from math import prod
from operator import attrgetter, ge, itemgetter, not_
from typing import Any

from moetool import __version__
from moetool._util import gc_paused
from moetool.arch import detect_family, unsupported_reason
from moetool.arch.gguf import GENERIC as GENERIC_GGUF
from moetool.arch.gguf import gguf_family
from moetool.arch.matcher import OTHER_MODALITIES, Classifier, Match, scale_owner, unscaled_weights
from moetool.arch.schema import (
    CATEGORIES,
    CATEGORY,
    DEFAULT_SHAPES,
    DENSE_ROLES,
    EXPERT_ROLES,
    MOE_LAYER_ROLES,
    MTP_MARK,
    SHARED_ROLES,
    UNEVEN_EXPERTS_KEY,
    Family,
    Role,
    first_key,
)
from moetool.checkpoint import Checkpoint, TensorRef
from moetool.checkpoint.header import DTYPE_BYTES
from moetool.errors import ConfigError, UnsupportedError
from moetool.quant import released

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_UNSTRUCTURED = frozenset({Role.OTHER, Role.EMBED, Role.LM_HEAD})   # an "expert" name here fits no template
QUANTIZABLE = frozenset({"attention", "routed_experts", "shared_experts", "dense_mlp"})
TOP_K_GUESS_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "experts_per_token")


@dataclass
class Problem:
    severity: str           # "error" | "warning" | "info"
    code: str
    message: str


@dataclass
class LayerInfo:
    index: int
    kind: str               # "moe" | "dense" | "mtp"
    experts: int = 0        # routed experts found in this layer
    top_k: int | None = None
    expert_ffn: int | None = None
    shared_experts: int = 0
    params: int = 0
    active_params: int = 0


@dataclass
class ExpertStats:
    layer: int
    norms: list[float]
    similarity: list[list[float]]
    near_duplicates: list[tuple[int, int, float]]


@dataclass
class InspectReport:
    source: str
    kind: str
    family: str | None
    family_title: str | None
    model_type: str | None
    guessed: bool
    layout: str | None
    num_layers: int | None
    moe_layers: list[int]
    dense_layers: list[int]
    hidden_size: int | None
    vocab_size: int | None
    num_experts: int | None
    top_k: int | list[int] | None
    expert_ffn: int | None
    num_shared_experts: int
    shared_ffn: int | None
    dense_ffn: int | None
    tied_embeddings: bool
    router: dict[str, Any] | None
    params: dict[str, int]
    total_params: int
    active_params: int | None
    active_params_with_embedding: int | None
    active_params_without_embeddings: int | None   # active, without the input embedding and the lm_head
    mtp_params: int
    buffer_params: int
    disk: dict[str, Any]
    memory: dict[str, int]
    quantization: list[str]
    tensor_count: int
    problems: list[Problem]
    layers: list[LayerInfo]
    experts: list[ExpertStats] | None = None
    zero_experts: int = 0   # zero-computation experts (identity, skip) each router scores beside num_experts
    skip_experts: int = 0   # those of them that add nothing (ZAYA's); the others pass the token on times its weight
    schema_version: int = SCHEMA_VERSION
    moetool_version: str = __version__

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), "moetool_version": data.pop("moetool_version"),
                **data}


@dataclass
class _Dims:
    """Structure read from the config (or guessed from tensors)."""

    num_layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    experts: int | None = None
    zero_experts: int = 0              # zero-computation experts the router also scores (LongCat-Flash, ZAYA)
    router_hidden: int | None = None   # G: the width of a router that is an MLP (ZAYA)
    # layer -> its expert count, where a globally pruned checkpoint's layers keep different numbers (the
    # config's count is then the largest)
    experts_at: dict[int, int] = field(default_factory=dict)
    sink_experts: int = 0              # router rows past those that top-k never picks (Inkling's shared experts)
    top_k: int | list[int] | None = None
    expert_ffn: int | None = None
    expert_hidden: int | None = None   # X: the routed experts' input/output size where not H (latent MoE)
    shared_ffn: int | None = None
    num_shared: int = 0
    dense_ffn: int | None = None
    tie: bool | None = None
    decoder_offset: int = 0

    def experts_in(self, layer: int | None) -> int | None:
        return self.experts_at.get(layer, self.experts) if layer is not None else self.experts

    def at(self, layer: int | None) -> _Dims:
        """These dimensions as LAYER has them (its own expert count)."""
        count = self.experts_in(layer)
        return self if count == self.experts else replace(self, experts=count)

    def k_at(self, layer: int) -> int | None:
        if isinstance(self.top_k, list):
            return self.top_k[layer] if layer < len(self.top_k) else None
        return self.top_k

    def symbol(self, sym: str) -> int | None:
        values = {"H": self.hidden, "X": self.expert_hidden or self.hidden, "I": self.expert_ffn,
                  "S": self.shared_ffn, "D": self.dense_ffn,
                  "E": self.experts, "V": self.vocab, "N": self.num_shared,
                  "K": self.top_k if isinstance(self.top_k, int) else None,
                  "G": self.router_hidden,
                  "R": None if self.experts is None else self.experts + self.zero_experts + self.sink_experts}
        if sym.isdigit():
            return int(sym)
        if "*" in sym:
            a, b = (self.symbol(s) for s in sym.split("*"))
            return None if a is None or b is None else a * b
        if sym[0].isdigit():
            factor = self.symbol(sym[1:])
            return None if factor is None else int(sym[0]) * factor
        return values[sym]


@dataclass(slots=True)
class _Record:
    """One counted tensor (for expert statistics and the rarer per-tensor passes: _records)."""

    ref: TensorRef
    match: Match
    category: str
    params: int


@dataclass(slots=True)
class _Group:
    """Counted tensors that classify alike (one masked name, one template): what the tally works
    in, so that the work per tensor is done by map(), sum() and set() in C. Parallel lists, in
    checkpoint order."""

    match: Match               # its layer and expert are None: each tensor's are in layers and experts
    category: str
    index: list[int]           # the tensors' positions in the checkpoint ("first" and "last" follow them)
    refs: list[TensorRef]
    shapes: list[tuple[int, ...]]
    layers: list[int | None]   # all numbers, or all None (names without a layer number)
    experts: list[int | None]  # the same
    params: list[int]
    _pairs: set[tuple[int | None, int | None]] | None = None

    def pairs(self) -> set[tuple[int | None, int | None]]:
        """The (layer, expert) of each tensor, one of each (computed once)."""
        if self._pairs is None:
            self._pairs = set(zip(self.layers, self.experts))
        return self._pairs


_SHAPE, _DTYPE, _NBYTES = attrgetter("shape"), attrgetter("dtype"), attrgetter("nbytes")


@dataclass
class _Tally:
    """Everything accumulated in one pass over the tensors, a group at a time (_Group)."""

    groups: list[_Group] = field(default_factory=list)
    params: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    layer_params: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    layer_routed: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    quantizable: int = 0
    mtp: int = 0
    buffers: int = 0
    unexpected: list[str] = field(default_factory=list)
    quant_forms: set[str] = field(default_factory=set)
    quantized: set[str] = field(default_factory=set)      # weights stored quantized by moetool (other shapes)
    fp4: set[str] = field(default_factory=set)            # I8 weights of packed FP4 e2m1 (two values a byte)
    bad_scales: list[str] = field(default_factory=list)   # X.scale companions whose grid does not fit X.weight
    unscaled: list[str] = field(default_factory=list)     # block-FP8 checkpoint: quantized weights without scales
    unreadable: list[str] = field(default_factory=list)   # why compressed-tensors weights cannot be dequantized
    sliced: dict[str, int] = field(default_factory=dict)  # one expert of a tensor stored stacked -> expert
    dtype_bytes: dict[str, int] = field(default_factory=dict)   # elements per dtype, in order of appearance
    ggml_bytes: dict[str, int] = field(default_factory=dict)    # GGUF: bytes per type, the same


def _records(tally: _Tally) -> list[_Record]:
    """Every counted tensor, in checkpoint order."""
    rows = [(i, _Record(ref, g.match._replace(layer=layer, expert=expert), g.category, params))
            for g in tally.groups
            for i, ref, layer, expert, params in zip(g.index, g.refs, g.layers, g.experts, g.params)]
    rows.sort(key=itemgetter(0))
    return [record for _, record in rows]


def _layers_with(tally: _Tally, roles: frozenset[Role]) -> set[int | None]:
    return set().union(*(g.layers for g in tally.groups if g.match.role in roles))


@gc_paused()
def inspect_checkpoint(ckpt: Checkpoint, *, experts: bool | Collection[int] = False, check_values: bool = False,
                       duplicate_threshold: float = 0.995, progress=None) -> InspectReport:
    """Analyse an open checkpoint.

    Args:
        ckpt: the checkpoint (header-only is enough unless experts/check_values).
        experts: read expert weights to report norms and pairwise similarity (of these MoE layers only, where it
            names them).
        check_values: scan every tensor for NaN/Inf.
        duplicate_threshold: cosine similarity above which two experts count as near-duplicates.
        progress: optional callable(done_bytes, total_bytes) for long reads.
    """
    config = ckpt.config or {}
    gguf = ckpt.kind == "gguf"
    if gguf:
        if experts or check_values:
            raise UnsupportedError(f"{ckpt.source}: --experts and --check-values are not available for GGUF "
                                   "files yet")
        family = gguf_family(config, ckpt.tensors)
    else:
        family = detect_family(ckpt.config)
    where = f"{ckpt.shards[0].path} (GGUF metadata)" if gguf and ckpt.shards else "config.json"
    cfg = family.settings(config) if family else config   # (a wrapper's text_config; class defaults)
    problems: list[Problem] = [Problem("warning", "checkpoint", note) for note in ckpt.notes]

    dims = _read_dims(family, cfg, where)
    guessed = family is None
    _check_fixed_top_k(family, dims, cfg, problems)
    tally = _classify(ckpt, family, Classifier(family, dims.decoder_offset, ckpt.tensors), dims, cfg)
    if gguf:
        _gguf_checks(family, dims, cfg, tally, problems)
    if guessed:
        _guess_dims(dims, tally, cfg)
        reason = unsupported_reason(config)
        problems.append(Problem("warning", "guessed_architecture",
                                (f"unknown architecture (model_type={config.get('model_type')!r})" if config
                                 else "no config.json (a bare weights file)") + "; experts were found by name "
                                "patterns, so structure and counts are a guess"
                                + (f". moetool does not support it yet: {reason}" if reason else "")))
    if dims.num_layers is None:
        dims.num_layers = 1 + max((max(g.layers) for g in tally.groups if g.layers[0] is not None), default=-1)

    # the layers whose tensors say they are MoE: where config and metadata do not say
    by_tensors = _layers_with(tally, EXPERT_ROLES) if guessed else _layers_with(tally, MOE_LAYER_ROLES) if gguf \
        else set()
    moe_layers = [L for L in range(dims.num_layers) if _is_moe(family, cfg, L, guessed, by_tensors, where)]
    layout = _detect_layout(family, tally, problems)
    if family is not None:
        _check_expected(family, dims, cfg, moe_layers, layout, tally, problems)
        _check_shapes(family, dims, tally, problems, cfg, squeeze=gguf)
        if family.shared_in_dense_layers:
            _shared_as_dense(set(moe_layers), tally)
    layers, routed_active = _layer_table(family, dims, moe_layers, tally, problems)
    _apply_tie(dims, tally)
    for name in tally.unexpected[:1]:
        problems.append(Problem("error", "unexpected_tensor",
                                f"{len(tally.unexpected)} expert-like tensors match no "
                                f"{family.name if family else 'known'} template (first: {name})"))
    _check_experts_quantized(tally, dims, problems)
    if tally.bad_scales:
        problems.append(Problem("error", "bad_scale", f"{len(tally.bad_scales)} quantization scales do not fit "
                                                      f"their weights (first: {tally.bad_scales[0]})"))
    if tally.unscaled:
        problems.append(Problem("error", "missing_scale",
                                f"{len(tally.unscaled)} weights of this block-FP8 checkpoint are stored "
                                f"quantized without their scales (first: {tally.unscaled[0]})"))
    for why in tally.unreadable:
        problems.append(Problem("warning", "unreadable_quantization", f"moetool cannot dequantize some weights, so "
                                f"it can count them but not run, convert or dequantize them: {why}"))
    if tally.mtp:
        problems.append(Problem("info", "mtp", f"{tally.mtp:,} parameters belong to multi-token-prediction "
                                               "modules, which transformers ignores; they are not counted"))

    total = sum(tally.params.values())
    routed_total = tally.params["routed_experts"]
    active = active_emb = active_bare = None
    if not moe_layers or all(info.top_k is not None for info in layers if info.kind == "moe"):
        non_routed = total - routed_total - tally.params["embedding"]
        embed = tally.params["embedding"]
        tied_head = embed if dims.tie and not _head_weight(tally) else 0
        active = non_routed + routed_active + tied_head
        active_emb = active + embed - tied_head
        active_bare = active - tally.params["lm_head"] - tied_head
    elif moe_layers:
        problems.append(Problem("warning", "top_k_unknown", "top-k is not known, so active parameters are not"))

    expert_stats = None
    if experts and moe_layers:
        from moetool.ops.expert_stats import expert_statistics

        chosen = set(experts) if not isinstance(experts, bool) else None
        expert_stats = expert_statistics(ckpt, _records(tally), {i.index: i.experts for i in layers if i.kind == "moe"
                                                                 and (chosen is None or i.index in chosen)},
                                         duplicate_threshold, progress)
        for stats in expert_stats:
            if stats.near_duplicates:
                pairs = ", ".join(f"{a}~{b} ({s:.4f})" for a, b, s in stats.near_duplicates[:5])
                problems.append(Problem("warning", "near_duplicate_experts",
                                        f"layer {stats.layer}: {len(stats.near_duplicates)} near-duplicate "
                                        f"expert pairs (cosine >= {duplicate_threshold}): {pairs}"))
    if check_values:
        from moetool.ops.expert_stats import find_non_finite

        for name, count in find_non_finite(ckpt, progress):
            problems.append(Problem("error", "non_finite", f"{name}: {count} NaN/Inf values"))

    unknown_gguf = family is not None and family.name == GENERIC_GGUF
    return InspectReport(
        source=ckpt.source, kind=ckpt.kind, family=family.name if family and not unknown_gguf else None,
        family_title=family.title if family else None, model_type=config.get("model_type"),
        guessed=guessed or unknown_gguf, layout=layout, num_layers=dims.num_layers, moe_layers=moe_layers,
        dense_layers=[i.index for i in layers if i.kind == "dense"], hidden_size=dims.hidden,
        vocab_size=dims.vocab, num_experts=dims.experts, top_k=dims.top_k, expert_ffn=dims.expert_ffn,
        num_shared_experts=dims.num_shared if moe_layers else 0,
        shared_ffn=dims.shared_ffn if dims.num_shared and moe_layers else None, dense_ffn=dims.dense_ffn,
        tied_embeddings=bool(dims.tie), router=_router_info(family, cfg, dims, moe_layers) if moe_layers else None,
        params={c: tally.params[c] for c in CATEGORIES}, total_params=total, active_params=active,
        active_params_with_embedding=active_emb, active_params_without_embeddings=active_bare,
        mtp_params=tally.mtp, buffer_params=tally.buffers,
        disk=_disk_info(ckpt, tally), memory=_memory(total, tally.quantizable),
        quantization=sorted(tally.quant_forms), tensor_count=len(ckpt.tensors), problems=problems,
        layers=layers, experts=expert_stats, zero_experts=dims.zero_experts if moe_layers else 0,
        skip_experts=family.skip_experts if family is not None and moe_layers else 0)


# ---------------------------------------------------------------- structure

# Bounds that no real model comes near; they keep a hostile config from hanging inspect.
LIMITS = {"num_layers": 100_000, "num_experts": 1_000_000}


def _read_dims(family: Family | None, cfg: dict, where: str = "config.json") -> _Dims:
    dims = _Dims()
    if family is None:
        return dims

    def value(key: str, derived=None, *, required: bool = False):
        names = " or ".join(family.keys.get(key, (key,)))
        try:
            val = derived(cfg) if derived else first_key(cfg, family.keys.get(key, ()))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot derive {key} ({exc})") from None
        if val is None:
            if required:
                raise ConfigError(f"{where}: the {family.name} config lacks {names}")
            return None
        items = val if key == "top_k" and isinstance(val, list) else [val]
        if not items or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in items):
            raise ConfigError(f"{where}: {names} must be a non-negative integer, got {val!r}")
        if max(items) > LIMITS.get(key, 1 << 40):
            raise ConfigError(f"{where}: {names} = {max(items)} is implausible "
                              f"(more than {LIMITS[key]:,})")
        return val

    dims.num_layers = value("num_layers", family.num_layers, required=True)
    dims.hidden = value("hidden", required=True)
    dims.vocab, dims.dense_ffn = value("vocab"), value("dense_ffn")
    tie = first_key(cfg, family.keys.get("tie", ()))
    dims.tie = tie if isinstance(tie, bool) else None
    if family.decoder_offset:
        dims.decoder_offset = value("decoder_offset", family.decoder_offset) or 0
    if not family.dense:
        dims.experts = value("num_experts", required=True)
        dims.zero_experts = (value("zero_experts") or 0) + family.skip_experts
        dims.router_hidden = value("router_hidden")
        uneven = cfg.get(UNEVEN_EXPERTS_KEY)
        if isinstance(uneven, dict):
            try:
                dims.experts_at = {int(k): int(v) for k, v in uneven.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {UNEVEN_EXPERTS_KEY} must map layers to expert counts") from None
        dims.sink_experts = value("sink_experts") or 0
        dims.top_k = value("top_k", family.top_k)
        dims.expert_ffn = value("expert_ffn", required=True)
        dims.expert_hidden = value("expert_hidden")
        dims.shared_ffn = value("shared_ffn", family.shared_ffn)
        dims.num_shared = value("num_shared", family.num_shared) or 0
    return dims


def _is_moe(family: Family | None, cfg: dict, layer: int, guessed: bool, by_tensors: set[int | None],
            where: str = "config.json") -> bool:
    """Whether LAYER is MoE: by the family's rule, else by BY_TENSORS (the layers holding experts)."""
    if not guessed:
        try:
            rule = family.is_moe_layer(cfg, layer)
        except (TypeError, KeyError, ZeroDivisionError) as exc:
            raise ConfigError(f"{where}: cannot tell which layers are MoE ({type(exc).__name__}: {exc})") \
                from None
        if rule is None:   # GGUF metadata that does not say: the layer's tensors do, as for llama.cpp
            return layer in by_tensors
        return bool(rule)
    return layer in by_tensors


def _guess_dims(dims: _Dims, tally: _Tally, cfg: dict) -> None:
    experts = set()
    records = _records(tally)
    for r in records:
        m = r.match
        if m.role in EXPERT_ROLES:
            if m.expert is not None:
                experts.add(m.expert)
            elif r.ref.shape:
                experts.update(range(r.ref.shape[0]))
            if m.role in (Role.EXPERT_GATE, Role.EXPERT_UP) and m.expert is not None and not m.packed:
                dims.expert_ffn = r.ref.shape[0]
        elif m.role == Role.EMBED and len(r.ref.shape) == 2:
            dims.vocab, dims.hidden = r.ref.shape
    dims.experts = len(experts) or None
    dims.top_k = next((cfg[k] for k in TOP_K_GUESS_KEYS if isinstance(cfg.get(k), int)), None)
    dims.num_layers = cfg.get("num_hidden_layers") if isinstance(cfg.get("num_hidden_layers"), int) else None
    shared = {r.match.layer for r in records if r.match.role in SHARED_ROLES}
    dims.num_shared = 1 if shared else 0
    dims.shared_ffn = next((r.ref.shape[0] for r in records if r.match.role in (Role.SHARED_GATE, Role.SHARED_UP)
                            and len(r.ref.shape) == 2 and not r.match.packed), None)


# ---------------------------------------------------------------- one pass over names

def _classify(ckpt: Checkpoint, family: Family | None, classifier: Classifier, dims: _Dims,
              cfg: dict) -> _Tally:
    tally = _Tally()
    names, refs = list(ckpt.tensors), list(ckpt.tensors.values())
    bits = _compressed_bits(cfg)
    moetool_formats = _moetool_formats(cfg)
    # compressed-tensors: each quantized weight's scheme (its parameters and form follow from it)
    stored = released.codes_of(released.quantized_weights(cfg, ckpt.tensors) or {})
    slices = {}   # experts moetool stores one slice each, of a tensor stored stacked: classified as it
    if (cfg.get("quantization_config") or {}).get("quant_method") == "moetool":
        from moetool.quant.formats import stacked_slices

        slices = stacked_slices(cfg)
    groups = classifier.classify_all([slices[n][0] if n in slices else n for n in names] if slices else names)
    # the stored names (the classifier saw a slice's stacked tensor instead)
    group_names = [list(map(names.__getitem__, g.members)) for g in groups] if slices else [g.names for g in groups]
    # A group's names differ only in their digits, so a test for digit-free text (as "mtp" in name)
    # that holds for its first name holds for all; not where slices were classified by another name.
    alike = [not slices or slices.keys().isdisjoint(gnames) for gnames in group_names]
    bnb4 = {n.rsplit(".quant_state.", 1)[0] for g_alike, gnames in zip(alike, group_names)
            for n in (gnames if not g_alike or _BNB4_STATE in gnames[0] else ()) if _BNB4_STATE in n}
    buffers = family.buffers if family else frozenset()
    buffer_suffixes = family.buffer_suffixes if family else ()
    not_experts = family.not_experts if family else ()
    mtp_from = dims.num_layers if family is not None and family.mtp else None
    gguf = family is not None and family.gguf_arch
    quant_forms = tally.quant_forms
    fp4 = tally.fp4
    fp4.update(owner for owner in map(scale_owner, classifier.companions) if ckpt.tensors[owner].dtype == "I8")

    dtype_elements, dtype_first, ggml_bytes, ggml_first = defaultdict(int), {}, defaultdict(int), {}
    aux_tails: dict[str, tuple[int, str]] = {}   # last name part of quantization companions -> first (index, name)
    unexpected: list[tuple[int, str]] = []
    weight_dtypes = set()   # of the tensors that are not quantization companions
    for g, gnames, g_alike in zip(groups, group_names, alike):
        m, index = g.match, g.members
        grefs = list(map(refs.__getitem__, index))
        shapes = list(map(_SHAPE, grefs))
        uniform = shapes.count(shapes[0]) == len(shapes)   # one shape for all, as a group's experts have
        numels = [prod(shapes[0])] * len(shapes) if uniform else list(map(prod, shapes))
        dtypes = list(map(_DTYPE, grefs))
        _add_by_key(dtype_elements, dtype_first, index, dtypes, numels)
        if gguf:
            _add_by_key(ggml_bytes, ggml_first, index, dtypes, list(map(_NBYTES, grefs)))
        if m.aux:   # scales, absmax, ...: bytes on disk, not parameters; their forms by last name part
            tail = gnames[0].rsplit(".", 1)[-1]
            one_tail = g_alike and not any(map(str.isdigit, tail))
            for i, name in [(index[0], gnames[0])] if one_tail else zip(index, gnames):
                tail = name.rsplit(".", 1)[-1]
                if tail not in aux_tails or i < aux_tails[tail][0]:
                    aux_tails[tail] = (i, name)
            continue
        if moetool_formats or m.packed or stored or (bnb4 and "U8" in dtypes) or (fp4 and "I8" in dtypes):
            params = [_stored_params(tally, name, ref, numel, m.packed, moetool_formats, bnb4, bits, fp4, stored)
                      for name, ref, numel in zip(gnames, grefs, numels)]
        else:
            params = numels
        weight_dtypes.update(dtypes)
        if slices:
            tally.sliced.update((name, slices[name][1]) for name in gnames if name in slices)

        # multi-token-prediction modules (layers past num_layers, or named so) are not counted
        layers, experts = g.layers, g.experts
        by_layer = mtp_from is not None and layers[0] is not None and max(layers) >= mtp_from
        if not g_alike:
            mtp = [(MTP_MARK in name) or (by_layer and layer >= mtp_from) for name, layer in zip(gnames, layers)]
        elif MTP_MARK in gnames[0]:
            mtp = [True]
        else:
            mtp = list(map(ge, layers, repeat(mtp_from))) if by_layer else []
        if mtp and all(mtp):
            tally.mtp += sum(params)
            continue
        if any(mtp):
            tally.mtp += sum(compress(params, mtp))
            index, grefs, shapes, gnames, layers, experts, params = _drop(
                mtp, index, grefs, shapes, gnames, layers, experts, params)

        role = m.role
        if m.guessed and role in _UNSTRUCTURED:
            # (a vision tower's own experts, as dots.llm3 Note's, are not the text model's)
            unexpected.extend((i, name) for i, name in zip(index, gnames)
                              if "expert" in name and not any(w in name for w in OTHER_MODALITIES)
                              and not (not_experts and name.endswith(not_experts)))
        if role in buffers:
            tally.buffers += sum(params)
            params = [0] * len(params)
        elif buffer_suffixes:
            held = list(map(str.endswith, gnames, repeat(buffer_suffixes)))
            if any(held):
                tally.buffers += sum(compress(params, held))
                params = [0 if h else p for p, h in zip(params, held)]
        category = CATEGORY[role]
        tally.groups.append(_Group(m, category, index, grefs, shapes, layers, experts, params))
        total = sum(params)
        tally.params[category] += total
        if layers[0] is not None:
            _add_by_layer(tally.layer_params, layers, params)
            if category == "routed_experts":
                _add_by_layer(tally.layer_routed, layers, params)
        if category in QUANTIZABLE:   # linear weights: matrices
            ndims = [len(shapes[0])] if uniform else list(map(len, shapes))
            tally.quantizable += total if min(ndims) >= 2 else sum(compress(params, map(ge, ndims, repeat(2))))

    for _, name in aux_tails.values():
        form = _quant_form(name)
        if form:
            quant_forms.add(form)
    if classifier.companions:
        _scale_forms(ckpt, classifier, cfg, tally)
    method = released.quant_method(cfg)
    quant_forms.update(f"{method} {scheme.id}" for _, scheme in set(stored.values()))
    tally.unreadable = sorted({scheme.unreadable for _, scheme in stored.values() if scheme.unreadable})
    if method and method not in released.METHODS and UNDESCRIBED_PACKED in quant_forms:   # (BitBLAS's, ...)
        quant_forms.discard(UNDESCRIBED_PACKED)
        quant_forms.add(f"packed int32 (X.qweight; quant_method {method})")
        tally.unreadable.append(f"weights packed by quant_method {method!r} are not read "
                                f"({', '.join(released.METHODS)} are)")
    if any(dtype.startswith("F8") for dtype in weight_dtypes) and not stored and \
            not any(form.startswith("fp8 block ") for form in quant_forms):   # (a scale's form names it)
        quant_forms.add("fp8")
    if (cfg.get("quantization_config") or {}).get("quant_method") == "fp8":
        tally.unscaled = unscaled_weights(ckpt.tensors)
    tally.unexpected = [name for _, name in sorted(unexpected)]
    tally.dtype_bytes = {dtype: dtype_elements[dtype] for dtype in sorted(dtype_first, key=dtype_first.get)}
    tally.ggml_bytes = {dtype: ggml_bytes[dtype] for dtype in sorted(ggml_first, key=ggml_first.get)}
    return tally


_BNB4_STATE = ".weight.quant_state.bitsandbytes__"
UNDESCRIBED_PACKED = "packed int32 (X.qweight; no quantization_config)"   # GPTQ's or AWQ's codes, said nowhere


def _scale_forms(ckpt: Checkpoint, classifier: Classifier, cfg: dict, tally: _Tally) -> None:
    """The forms of the X.scale companions of quantized weights (DeepSeek-V4's hub: block FP8, with E8M0 or
    F32 scales, and FP4 e2m1 experts, an E8M0 scale per 32 inputs), each grid checked against its weight's
    shape (tally.bad_scales): FP8 one scale per weight_block_size block, FP4 [rows, inputs / group]."""
    block = tuple((cfg.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    forms, mtp_forms = set(), set()   # (multi-token-prediction modules' experts match no expert template)
    for name in sorted(classifier.companions):
        owner = scale_owner(name)
        weight, scale = ckpt.tensors[owner], ckpt.tensors[name]
        scales = _SCALE_DTYPES.get(scale.dtype, scale.dtype.lower())
        experts = "experts " if classifier.classify(owner).role in EXPERT_ROLES else ""
        if len(weight.shape) < 2 or len(scale.shape) != len(weight.shape):
            tally.bad_scales.append(f"{name} is {list(scale.shape)} for {owner} {list(weight.shape)}")
            continue
        *lead, rows, cols = weight.shape
        if weight.dtype == "I8":   # two e2m1 values a byte
            groups = scale.shape[-1]
            group = 2 * cols // groups if groups and (2 * cols) % groups == 0 else None
            ok = group is not None and tuple(scale.shape) == (*lead, rows, groups)
            form = f"{experts}fp4 e2m1 ({scales} scales per {group})"
        else:
            ok = len(block) == 2 and tuple(scale.shape) == (*lead, -(-rows // block[0]), -(-cols // block[1]))
            form = f"{experts}fp8 block {'x'.join(map(str, block))} ({scales} scales)"
        if ok:
            (mtp_forms if MTP_MARK in name else forms).add(form)
        else:
            tally.bad_scales.append(f"{name} is {list(scale.shape)} for {owner} {list(weight.shape)}")
    tally.quant_forms.update(forms or mtp_forms)


_SCALE_DTYPES = {"F8_E8M0": "ue8m0", "F32": "f32", "BF16": "bf16", "F16": "f16"}


def _stored_params(tally: _Tally, name: str, ref: TensorRef, numel: int, packed: bool, moetool_formats: dict,
                   bnb4: set[str], bits: int, fp4: set[str] = frozenset(), stored: dict | None = None) -> int:
    """The parameters a quantized weight holds (more than its stored elements), noting its form."""
    fmt = moetool_formats.get(name) if moetool_formats else None
    if fmt is not None and fmt.kind != "keep":
        tally.quant_forms.add(f"moetool {fmt.id}")
        tally.quantized.add(name)
        return 2 * numel if fmt.is_bnb4 else prod(fmt.original_shape(ref.shape))
    held = stored.get(name) if stored else None
    if held is not None:   # another tool's codes (their form: named once, after the pass)
        return held[1].params(ref.shape)
    if packed and name.endswith(".qweight"):   # GPTQ's or AWQ's codes without a quantization_config to say so
        tally.quant_forms.add(UNDESCRIBED_PACKED)
        return numel * 32 // bits
    if packed:
        tally.quant_forms.add("mxfp4" if ref.dtype == "U8" else f"compressed-tensors int{bits}")
        return numel * (2 if ref.dtype == "U8" else 32 // bits)
    if ref.dtype == "U8" and name in bnb4:
        return numel * 2
    if ref.dtype == "I8" and name in fp4:   # FP4 e2m1, two values a byte
        return numel * 2
    return numel


def _add_by_key(sums: defaultdict, first: dict, index: list[int], keys: list, values: list[int]) -> None:
    """Add VALUES to SUMS by KEYS, noting in FIRST the first index of each key."""
    if keys.count(keys[0]) == len(keys):   # one key (dtype) for the whole group
        sums[keys[0]] += sum(values)
        first[keys[0]] = min(first.get(keys[0], index[0]), index[0])
        return
    for i, key, value in zip(index, keys, values):
        sums[key] += value
        if key not in first or i < first[key]:
            first[key] = i


def _add_by_layer(sums: defaultdict, layers: list[int], params: list[int]) -> None:
    if params.count(params[0]) == len(params):   # one size (a group's experts): count the layers in C
        size = params[0]
        for layer, n in Counter(layers).items():
            sums[layer] += n * size
    else:
        for layer, n in zip(layers, params):
            sums[layer] += n


def _moetool_formats(cfg: dict) -> dict:
    """Weight name -> format of a checkpoint moetool quantized (its config records every weight's)."""
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "moetool" or not isinstance(qc.get("tensors"), dict):
        return {}
    from moetool.quant.formats import parse_format

    return {name: parse_format(fid) for name, fid in qc["tensors"].items()}


def _quant_form(aux_name: str) -> str | None:
    if "bitsandbytes__" in aux_name:
        return "bitsandbytes " + aux_name.rsplit("__", 1)[1]
    if aux_name.endswith(".SCB"):
        return "bitsandbytes int8"
    if aux_name.endswith(("weight_scale_inv", ".qscale_weight")):
        return "fp8 block-scaled"
    return None


def _compressed_bits(cfg: dict) -> int:
    groups = (cfg.get("quantization_config") or {}).get("config_groups") or {}
    for group in groups.values() if isinstance(groups, dict) else ():
        bits = ((group or {}).get("weights") or {}).get("num_bits")
        if isinstance(bits, int) and 0 < bits <= 32:
            return bits
    return 4


def _head_weight(tally: _Tally) -> int:
    """The lm_head weight's parameters counted (not its bias, which tying leaves the head's own)."""
    return sum(sum(g.params) for g in tally.groups if g.match.role == Role.LM_HEAD)


def _apply_tie(dims: _Dims, tally: _Tally) -> None:
    """Tied embeddings: transformers counts the shared matrix once (an lm_head bias stays the head's)."""
    has_head = _head_weight(tally) > 0
    if dims.tie is None:
        dims.tie = not has_head
    if dims.tie and has_head:
        for g in tally.groups:
            if g.match.role == Role.LM_HEAD:
                total = sum(g.params)
                tally.params["lm_head"] -= total
                if g.category in QUANTIZABLE:
                    tally.quantizable -= total
                g.params = [0] * len(g.params)


# ---------------------------------------------------------------- checks

def _detect_layout(family: Family | None, tally: _Tally, problems: list[Problem]) -> str | None:
    counts, first = Counter(), {}
    for g in tally.groups:
        layout = g.match.layout
        if layout and g.match.role in EXPERT_ROLES:
            counts[layout] += len(g.index)
            first[layout] = min(first.get(layout, g.index[0]), g.index[0])
    seen = Counter({layout: counts[layout] for layout in sorted(counts, key=first.get)})   # in checkpoint order
    if len(seen) > 1:
        problems.append(Problem("error", "mixed_layout",
                                "expert tensors are stored in both the per-expert and the fused layout: "
                                + ", ".join(f"{n} {k}" for k, n in seen.items())))
    if seen:
        return max(seen, key=seen.get)   # the most common; of those, the first stored
    if family is not None and family.layouts:
        return family.layouts[0]
    return None


def _template_alternatives(template) -> tuple[str, ...]:
    return (template,) if isinstance(template, str) else template


def _check_fixed_top_k(family: Family | None, dims: _Dims, cfg: dict, problems: list[Problem]) -> None:
    """A family whose transformers router routes a fixed number of experts (PhiMoE's sparsemixer: two)
    while the config's top-k key says another: transformers ignores the key, and so does the report."""
    if family is None or family.top_k is None or not family.keys.get("top_k") or family.gguf_arch:
        return
    stated = first_key(cfg, family.keys["top_k"])
    if stated is not None and stated != dims.top_k:
        problems.append(Problem("warning", "top_k_ignored",
                                f"{family.keys['top_k'][0]} is {stated!r}, but transformers' {family.title} router "
                                f"always routes {dims.top_k} experts per token; top-k and active parameters "
                                f"are given for {dims.top_k}"))


def _shared_as_dense(moe: set[int], tally: _Tally) -> None:
    """A family whose shared MLP is in every layer: in the layers without experts it is the dense MLP."""
    for g in list(tally.groups):
        if g.match.role not in SHARED_ROLES or g.category != CATEGORY[g.match.role] or g.layers[0] is None:
            continue
        dense = [layer not in moe for layer in g.layers]
        if not any(dense):
            continue
        moved = sum(compress(g.params, dense))
        tally.params[g.category] -= moved
        tally.params["dense_mlp"] += moved
        if all(dense):
            g.category = "dense_mlp"
            continue
        kept = list(map(not_, dense))
        columns = ("index", "refs", "shapes", "layers", "experts", "params")
        g_dense = _Group(g.match, "dense_mlp", *(list(compress(getattr(g, c), dense)) for c in columns))
        for c in columns:
            setattr(g, c, list(compress(getattr(g, c), kept)))
        g._pairs = None
        tally.groups.append(g_dense)


def _check_expected(family: Family, dims: _Dims, cfg: dict, moe_layers: list[int], layout: str | None,
                    tally: _Tally, problems: list[Problem]) -> None:
    """Compare the tensors the config calls for with those stored, per (role, layer).

    Work is proportional to the tensors stored, not to layers x experts, so an absurd
    expert count in a config cannot blow it up.
    """
    moe = set(moe_layers)
    experts = dims.experts or 0
    # (role, layer) -> its templates: any one of them stored, as a role's alternatives usually are (GGUF's
    # attention tensors, encoder/decoder names), but each of them for the dense MLPs a family holds
    # several of beside its MoE (LongCat-Flash's two)
    expected: dict[tuple, list[str]] = defaultdict(list)
    seq2seq = family.decoder_offset is not None
    for role, template in family.templates(layout).items():
        if role in family.role_keys and not cfg.get(family.role_keys[role]):
            continue   # stored only when a config key says so (ERNIE's biases)
        for tpl in _template_alternatives(template):
            if "{L}" not in tpl and "{D}" not in tpl:
                if not (role == Role.LM_HEAD and dims.tie is not False):
                    expected[(role, None)] = [tpl]
                continue
            if "{D}" in tpl:
                layers = range(dims.decoder_offset, dims.num_layers)
            else:
                layers = range(dims.decoder_offset if seq2seq else dims.num_layers)
            for layer in layers:
                if role in MOE_LAYER_ROLES and (layer not in moe or (
                        family.absent_roles is not None and role in family.absent_roles(cfg, layer))):
                    continue
                if role in SHARED_ROLES and (not dims.num_shared or
                                             (layer not in moe and not family.shared_in_dense_layers)):
                    continue
                if role in DENSE_ROLES and ((layer in moe and not family.dense_in_moe_layers) or
                                            (family.is_dense_layer is not None
                                             and not family.is_dense_layer(cfg, layer))):
                    continue
                if role in DENSE_ROLES and family.dense_in_moe_layers:
                    expected[(role, layer)].append(tpl)
                else:
                    expected[(role, layer)] = [tpl]

    # role -> {(layer, expert or None)} stored, and the layers and expert numbers among them: sets
    # built in C, not a dict per tensor
    found: dict[Role, set[tuple]] = defaultdict(set)
    found_layers: dict[Role, set] = defaultdict(set)
    found_experts: dict[Role, set] = defaultdict(set)
    several = {key for key, tpls in expected.items() if len(tpls) > 1}
    stored_names: set[str] = set()   # of the roles and layers for which several templates are expected
    for g in tally.groups:
        if g.match.layout is None or g.match.layout == layout:
            found[g.match.role].update(g.pairs())
            if several:
                stored_names.update(ref.name for ref, layer in zip(g.refs, g.layers)
                                    if (g.match.role, layer) in several)
            found_layers[g.match.role].update(g.layers)
            found_experts[g.match.role].update(g.experts)

    if layout == "fused" and family.joins_stacked_gate_up:   # gate and up stacked apart (the hub's) or joined
        stacked = found_layers.get(Role.EXPERT_GATE, set())
        for role, layer in list(expected):
            if (role == Role.EXPERT_GATE_UP) == (layer in stacked) and role in (
                    Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_GATE_UP):
                del expected[(role, layer)]
    per_layer: dict[Role, Counter] = {}   # role -> layer -> experts found below the config's count
    missing_count, first_missing = 0, None
    for (role, layer), tpls in expected.items():
        have, tpl = found.get(role, set()), tpls[-1]
        if len(tpls) > 1:
            gone = [t for t in tpls if t.replace("{L}", str(layer)) not in stored_names]
            absent, example, tpl = len(gone), None, (gone or tpls)[0]
        elif "{E}" in tpl:
            if role not in per_layer:
                per_layer[role] = _experts_by_layer(have, found_experts.get(role, set()), experts)
            count = dims.experts_in(layer) or 0   # (a layer of a globally pruned checkpoint: its own count)
            absent = count - per_layer[role][layer]
            example = next((e for e in range(count) if (layer, e) not in have), None) if absent else None
        else:
            absent, example = (0, None) if (layer, None) in have else (1, None)
        if absent:
            missing_count += absent
            if first_missing is None:
                local = layer - dims.decoder_offset if layer is not None and "{D}" in tpl else layer
                first_missing = tpl.replace("{L}", str(local)).replace("{D}", str(local)).replace(
                    "{E}", str(example))
    if missing_count:
        problems.append(Problem("error", "missing_tensors", f"{missing_count} tensors the config calls for "
                                                            f"are missing (first: {first_missing})"))

    structural = MOE_LAYER_ROLES | SHARED_ROLES | DENSE_ROLES
    extra = set()   # (role, layer, expert) that the config has no place for
    for role, pairs in found.items():
        if role not in structural:
            continue
        templates = {(expected.get((role, layer)) or [None])[0] for layer in found_layers[role] - {None}}
        numbers = found_experts[role] - {None}
        if None not in templates and all("{E}" in tpl for tpl in templates) and max(numbers, default=-1) < experts \
                and not dims.experts_at:
            continue   # each layer expected, and expert numbers within the config's count (the usual case)
        if None not in templates and not any("{E}" in tpl for tpl in templates) and not numbers:
            continue
        for layer, expert in pairs:
            if layer is None:
                continue
            tpl = (expected.get((role, layer)) or [None])[0]
            if tpl is None and role in SHARED_ROLES and not dims.num_shared:
                continue   # a zero-size shared expert (Qwen2-MoE with shared_expert_intermediate_size 0)
            if tpl is None or (expert is not None and ("{E}" not in tpl or expert >= (dims.experts_in(layer) or 0) + (
                    dims.zero_experts if role in (Role.EXPERT_GATE, Role.EXPERT_UP) else 0))):
                # (transformers 5 saves gate and up of LongCat-Flash's identity experts too, never used)
                extra.add((role, layer, expert))
    if extra:
        names: dict[tuple, tuple[int, str]] = {}   # each the last tensor stored under it, as a dict keeps
        for g in tally.groups:
            if g.match.layout is None or g.match.layout == layout:
                for i, ref, layer, expert in zip(g.index, g.refs, g.layers, g.experts):
                    key = (g.match.role, layer, expert)
                    if key in extra and i > names.get(key, (-1,))[0]:
                        names[key] = (i, ref.name)
        problems.append(Problem("error", "unexpected_tensor",
                                f"{len(extra)} tensors do not fit the config (MoE tensors in a dense layer, "
                                f"an expert index beyond the expert count, or a layer beyond num_layers; "
                                f"first: {min(name for _, name in names.values())})"))


def _experts_by_layer(pairs: set[tuple], numbers: set, experts: int) -> Counter:
    """layer -> how many expert numbers below EXPERTS the (layer, expert) PAIRS hold (NUMBERS: all
    their expert numbers)."""
    if None not in numbers and max(numbers, default=-1) < experts:   # all of them: counted in C
        return Counter(map(itemgetter(0), pairs))
    return Counter(layer for layer, e in pairs if e is not None and e < experts)


def _check_experts_quantized(tally: _Tally, dims: _Dims, problems: list[Problem]) -> None:
    """bitsandbytes through transformers 5 quantizes nn.Linear only: fused experts stay full precision."""
    if not any(form.startswith("bitsandbytes") for form in tally.quant_forms):
        return
    matrices = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP)   # not biases
    real = dims.experts if dims.zero_experts and dims.experts is not None else None   # (not identity experts')
    full = sum(params for g in tally.groups if g.match.role in matrices
               for params, ref, e in zip(g.params, g.refs, g.experts) if ref.dtype in ("F32", "F16", "BF16")
               and (real is None or e is None or e < real))
    if full:
        problems.append(Problem("warning", "experts_not_quantized",
                                f"the checkpoint is bitsandbytes-quantized, but {full:,} routed-expert parameters "
                                f"are stored in full precision (transformers 5 quantizes only nn.Linear; "
                                f"fused 3-D expert parameters are left as they are)"))


def _expected_shape(family: Family, dims: _Dims, role: Role, fused: bool) -> tuple[int, ...] | None:
    symbols = family.shapes.get(role)
    if symbols is not None and not fused and role in EXPERT_ROLES and symbols[0] in ("E", "R"):
        # one expert of a family whose per-expert tensors are slices of its stacked ones (GPT-OSS); a
        # family whose stored stacks transformers transposes has nn.Linear experts, of the default shapes
        symbols = None if family.transposed_on_load else symbols[1:]
    if symbols is None:
        symbols = DEFAULT_SHAPES.get(role)
        if symbols is None:
            return None
        if role in EXPERT_ROLES and fused:
            symbols = ("E", *symbols)
    shape = tuple(dims.symbol(s) for s in symbols)
    return None if any(d is None for d in shape) else shape


def _squeezed(shape: tuple) -> tuple:
    return tuple(d for d in shape if d != 1)


def _mlp_shapes(family: Family, dims: _Dims, cfg: dict, g, fused: bool) -> list | None:
    """The shape each tensor of group G (an MLP role) should have where the family widens some layers'
    MLPs (Family.mlp_width_factor); None where no layer of G is widened."""
    factors = [family.mlp_width_factor(cfg, layer) for layer in g.layers]
    if all(f == 1 for f in factors):
        return None
    scaled = {f: _expected_shape(family, replace(
        dims, shared_ffn=None if dims.shared_ffn is None else f * dims.shared_ffn,
        dense_ffn=None if dims.dense_ffn is None else f * dims.dense_ffn), g.match.role, fused) for f in set(factors)}
    return [scaled[f] for f in factors]


def _check_shapes(family: Family, dims: _Dims, tally: _Tally, problems: list[Problem], cfg: dict, *,
                  squeeze: bool = False) -> None:
    bad = []   # (index, message)
    cache: dict[tuple, tuple | None] = {}
    quantized = tally.quantized
    mlp_roles = SHARED_ROLES | DENSE_ROLES if family.mlp_width_factor is not None else frozenset()
    for g in tally.groups:
        m = g.match
        if m.guessed or m.aux or m.packed:
            continue
        fused = g.experts[0] is None
        key = (m.role, fused)
        want = cache[key] if key in cache else cache.setdefault(key, _expected_shape(family, dims, *key))
        wants = _mlp_shapes(family, dims, cfg, g, fused) if m.role in mlp_roles and g.layers[0] is not None \
            else None
        if dims.experts_at and g.layers[0] is not None and m.role in MOE_LAYER_ROLES:   # each layer its own count
            wants = [_expected_shape(family, dims.at(layer), *key) for layer in g.layers]
        if wants is None:
            if want is None or g.shapes.count(want) == len(g.shapes):
                continue
            wants = [want] * len(g.shapes)
        for i, ref, params, shape, want in zip(g.index, g.refs, g.params, g.shapes, wants):
            if want is None or shape == want or (ref.dtype == "U8" and params == 2 * ref.numel) or \
                    (quantized and ref.name in quantized):
                continue
            if ref.name in tally.fp4 and (*shape[:-1], 2 * shape[-1]) == tuple(want):   # two values a byte
                continue
            if squeeze and _squeezed(shape) == _squeezed(want):
                continue  # GGUF: llama.cpp accepts [1, E] for [E]
            if m.role in EXPERT_ROLES and fused and shape[1:] == want[1:]:
                continue  # expert count differs: reported once per layer by the layer table
            if family.transposed_on_load and m.role in EXPERT_ROLES and fused and len(shape) == 3 and \
                    (shape[2], shape[1]) == want[1:]:
                continue  # stored as transformers 5 holds them (it transposes only the other form as it loads)
            bad.append((i, f"{ref.name} is {list(shape)}, config implies {list(want)}"))
    if bad:
        problems.append(Problem("error", "bad_shape", f"{len(bad)} tensors have the wrong shape ({min(bad)[1]})"))


def _layer_table(family: Family | None, dims: _Dims, moe_layers: list[int], tally: _Tally,
                 problems: list[Problem]) -> tuple[list[LayerInfo], int]:
    """Per-layer structure and counts; also returns the routed-expert parameters active per token."""
    moe = set(moe_layers)
    expert_pairs: set[tuple[int, int]] = set()   # (layer, expert) stored one expert a tensor
    ffn_parts, fused_parts = [], []              # (index, layers, shapes) that give the FFN size / expert count
    sliced, gate_or_up = tally.sliced, (Role.EXPERT_GATE, Role.EXPERT_UP)
    unused: Counter = Counter()   # layer -> parameters of identity experts' gate and up rows (never used)
    for g in tally.groups:
        m = g.match
        if m.role not in EXPERT_ROLES or g.layers[0] is None or m.aux:
            continue
        if dims.zero_experts and m.role in (*gate_or_up, Role.EXPERT_GATE_UP):
            real = dims.experts or 0
            for layer, expert, params, shape in zip(g.layers, g.experts, g.params, g.shapes):
                if expert is None and shape and shape[0] > real:   # fused: rows past the real experts'
                    unused[layer] += params * (shape[0] - real) // shape[0]
                elif expert is not None and expert >= real:
                    unused[layer] += params
        index, refs, shapes, layers, experts = g.index, g.refs, g.shapes, g.layers, g.experts
        if sliced:
            held = [ref.name in sliced for ref in refs]
            if any(held):
                expert_pairs.update((layer, sliced[ref.name]) for layer, ref in compress(zip(layers, refs), held))
                index, shapes, layers, experts = _drop(held, index, shapes, layers, experts)
                if not index:
                    continue
        if experts[0] is not None:
            expert_pairs.update(g.pairs() if index is g.index else zip(layers, experts))
            if m.role in gate_or_up and not m.packed:
                ffn_parts.append((index, layers, shapes))
        elif m.role in (Role.EXPERT_DOWN, Role.EXPERT_GATE) or (m.role == Role.EXPERT_GATE_UP and
                                                                  not dims.zero_experts):
            # (a fused gate_up of a family with identity experts also holds rows for them, never used)
            fused_parts.append((index, layers, shapes))
    packed = family is not None and family.packed_experts and dims.expert_ffn

    def expert_count(shape: tuple[int, ...]) -> int | None:
        if not shape:
            return None
        return shape[0] // dims.expert_ffn if packed else shape[0]   # packed: [E*I, H] (DBRX)

    if dims.zero_experts and dims.experts is not None:   # (gate and up of identity experts, saved by transformers)
        expert_pairs = {(layer, e) for layer, e in expert_pairs if e < dims.experts}
    per_expert = Counter(map(itemgetter(0), expert_pairs))
    ffn = _last_by_layer(ffn_parts, lambda shape: shape[0] if len(shape) == 2 else None)
    fused_count = _last_by_layer(fused_parts, expert_count)

    layers = []
    mismatched, bad_k = [], []
    routed_active = 0
    for layer in range(dims.num_layers):
        info = LayerInfo(layer, "moe" if layer in moe else "dense", params=tally.layer_params[layer])
        if layer in moe:
            info.experts = per_expert.get(layer) or fused_count.get(layer, 0)
            info.top_k = dims.k_at(layer)
            info.expert_ffn = ffn.get(layer, dims.expert_ffn)
            info.shared_experts = dims.num_shared
            routed = tally.layer_routed[layer] - unused[layer]
            if info.top_k is not None and info.experts and not 1 <= info.top_k <= info.experts + dims.zero_experts:
                bad_k.append((layer, info.top_k, info.experts))
            if info.top_k is not None and info.experts:
                active = round(routed * min(info.top_k, info.experts) / info.experts)
                info.active_params = info.params - routed - unused[layer] + active
                routed_active += active
            if dims.experts is not None and info.experts != dims.experts_in(layer):
                mismatched.append((layer, info.experts))
        else:
            info.active_params = info.params
        layers.append(info)
    if bad_k:   # transformers' topk fails (k > experts) or routes nothing (k = 0)
        layer, k, experts = bad_k[0]
        problems.append(Problem("error", "bad_top_k", f"top-k {k} of {experts} experts (layer {layer}"
                                f"{f' and {len(bad_k) - 1} more' if len(bad_k) > 1 else ''}): a layer routes each "
                                "token to 1 to all of its experts"))
    if mismatched:
        layer, count = mismatched[0]
        problems.append(Problem("error", "expert_count_mismatch",
                                f"{len(mismatched)} MoE layers hold a different number of experts than the "
                                f"config's {dims.experts} (layer {layer} has {count})"))
    return layers, routed_active


def _last_by_layer(parts: list[tuple[list, list, list]], value) -> dict[int, int]:
    """layer -> VALUE(shape) of the last tensor of PARTS [(index, layers, shapes)] in checkpoint order
    for which it is not None: what assigning it tensor by tensor leaves."""
    distinct = {shape for _, _, shapes in parts for shape in set(shapes)}
    if len(distinct) == 1:   # one shape for all (the usual case): the order does not matter
        v = value(next(iter(distinct)))
        return {} if v is None else dict.fromkeys(set().union(*(layers for _, layers, _ in parts)), v)
    out = {}
    for _, layer, shape in sorted(row for part in parts for row in zip(*part)):
        v = value(shape)
        if v is not None:
            out[layer] = v
    return out


# ---------------------------------------------------------------- summaries

def _router_info(family: Family | None, cfg: dict, dims: _Dims, moe_layers: list[int]) -> dict[str, Any]:
    if family is None or family.router is None:
        return {"description": "unknown (architecture guessed)", "top_k": dims.top_k}
    router = family.router.resolved(cfg)
    renorm = router.renormalize
    if isinstance(renorm, str):
        renorm = bool(router.setting(cfg, renorm))
    groups = None
    selected = router.groups(cfg)   # as transformers reads the config (its class's defaults included)
    if selected is not None:
        groups = {"n_group": selected[0], "topk_group": selected[1]}
    scaling = router.setting(cfg, router.scaling_key) if router.scaling_key else None
    parts = [router.score, f"top-{dims.top_k}"]
    if router.correction_bias:
        parts.append("chosen on score + correction bias")
    if groups:
        parts.append(f"group-limited ({groups['n_group']} groups, best {groups['topk_group']} kept)")
    parts.append("renormalised" if renorm else "not renormalised")
    if scaling not in (None, 1, 1.0):
        parts.append(f"scaled x{scaling}")
    if dims.num_shared:
        parts.append(f"+ {dims.num_shared} shared expert{'s' if dims.num_shared > 1 else ''}")
    table = [layer for layer in moe_layers if family.routes_by_table(cfg, layer)]
    if table:
        several = len(table) > 1
        parts.append(f"layer{'s' if several else ''} {', '.join(map(str, table))} pick{'' if several else 's'} "
                     "experts by a token table")
    description = ", ".join(parts) + (f" ({router.notes})" if router.notes else "")
    return {"score": router.score, "top_k": dims.top_k, "renormalize": renorm,
            "correction_bias": router.correction_bias, "group_limited": groups, "scaling_factor": scaling,
            "token_table_layers": table, "description": description}


def _disk_info(ckpt: Checkpoint, tally: _Tally) -> dict[str, Any]:
    by_dtype = Counter(tally.ggml_bytes) if tally.ggml_bytes else \
        Counter({dtype: n * DTYPE_BYTES[dtype] for dtype, n in tally.dtype_bytes.items()})
    return {"bytes_by_dtype": dict(by_dtype.most_common()), "tensor_bytes": sum(by_dtype.values()),
            "shards": len(ckpt.shards), "files": [s.name for s in ckpt.shards]}


def _memory(total: int, quantizable: int) -> dict[str, int]:
    """Weight memory at common precisions (see README): linear weights quantized, the rest bf16."""
    rest = total - quantizable
    return {
        "bf16": 2 * total,
        "fp8": quantizable + math.ceil(quantizable / (128 * 128)) * 4 + 2 * rest,
        "int4": math.ceil(quantizable * (0.5 + 4 / 64)) + 2 * rest,
    }


# ---------------------------------------------------------------- GGUF

_FLOAT_GGML = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


def _gguf_checks(family: Family, dims: _Dims, cfg: dict, tally: _Tally, problems: list[Problem]) -> None:
    """What GGUF metadata can say wrong beyond the tensor checks shared with safetensors."""
    tally.quant_forms.update(f"ggml {t}" for t in tally.ggml_bytes if t not in _FLOAT_GGML)
    k, experts = dims.top_k, dims.experts
    if isinstance(k, int) and experts is not None and k > experts:
        problems.append(Problem("error", "bad_metadata", f"expert_used_count {k} exceeds expert_count {experts}"))
    if family.name == GENERIC_GGUF:
        problems.append(Problem("warning", "guessed_architecture",
                                f"{family.title}: its tensors were read by llama.cpp's common names; "
                                "structure and counts may be incomplete"))


def _drop(mask: list[bool], *columns: list) -> list[list]:
    """Each of COLUMNS without the entries MASK marks."""
    kept = list(map(not_, mask))
    return [list(compress(column, kept)) for column in columns]
