"""`moetool prune`: remove the least important routed experts of every MoE layer.

Scores come from a `moetool profile --json` file or from a profile moetool runs itself. The
output keeps the same number of experts in every layer (stock transformers loads it): expert
tensors of kept experts are copied as byte ranges and renumbered, fused expert tensors are sliced
expert by expert, router rows and router / correction biases are sliced, shared experts stay.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import time
from math import prod
from pathlib import Path

from moetool import __version__
from moetool.arch import Role, detect_family
from moetool.arch.matcher import Classifier, split_quant_suffix
from moetool.arch.schema import EXPERT_ROLES, MTP_KEYS, UNEVEN_EXPERTS_KEY, get_path
from moetool.checkpoint import Checkpoint, TensorRef
from moetool.checkpoint.checkpoint import TORCH_DTYPES, read_config
from moetool.checkpoint.pieces import computed_piece, rows_piece, tensor_pieces
from moetool.checkpoint.writer import (
    OutputTensor,
    plan_shards,
    refuse_inside_source,
    side_files,
    write_checkpoint,
)
from moetool.errors import MoetoolError, OutputExistsError, UnsupportedError, UsageError
from moetool.layout.plan import family_context
from moetool.ops.prune_choice import (
    EXPERT_INDEXED,
    PruneOptions,
    PruneReport,
    check_choice,
    check_group_routing,
    choice_scores,
    choose_per_layer,
    kept_count,
    merge_group,
    remapped_table,
    removed_share,
    sequential_choice,
    table_similarity,
)
from moetool.ops.prune_gguf import prune_gguf
from moetool.quant import autoround, released
from moetool.quant.config import recorded_formats, tool_quantized
from moetool.quant.released import quant_method

log = logging.getLogger(__name__)


def _scores(ckpt: Checkpoint, structure, options: PruneOptions, progress=None):
    def weight_norms():
        from moetool.ops.inspect import inspect_checkpoint

        return {s.layer: s.norms for s in inspect_checkpoint(ckpt, experts=True).experts}

    return choice_scores(ckpt, structure, options, weight_norms, progress)


def _quantization_described(ckpt: Checkpoint) -> list[dict]:
    """The quantization configs that travel with CKPT: config.json's, and ModelOpt's hf_quant_config.json (copied)."""
    out = [(ckpt.config or {}).get("quantization_config") or {}]
    side = ckpt.root / "hf_quant_config.json" if ckpt.root is not None else None
    if side is not None and side.is_file():
        out.append(read_config(side))
    return out


def _check_quantized(ckpt: Checkpoint, options: PruneOptions) -> dict:
    """Refuse (before any work) a quantized source prune cannot copy as it is; for another tool's (compressed-
    tensors, ModelOpt, AWQ, GPTQ), whose kept experts' codes and scales are copied untouched (the calibration runs
    on them dequantized), the stored name of each weight's codes -> (weight, scheme)."""
    method = quant_method(ckpt.config)
    if recorded_formats(ckpt.config) is not None and method != released.compressed_tensors.QUANT_METHOD:
        raise UnsupportedError(f"{ckpt.source}: quantized by moetool (its config records every tensor's format by "
                               "name); prune the original (or convert --dequantize it first), then quantize")
    if not tool_quantized(ckpt.config):
        return {}
    if options.merge:
        raise UnsupportedError(f"{ckpt.source}: quantized ({method}): --merge averages expert weights, which are "
                               "stored as quantized codes; prune without --merge, or convert --dequantize it first")
    if options.scope != "per-layer":
        raise UnsupportedError(f"{ckpt.source}: quantized ({method}): --scope global is not offered for quantized "
                               "checkpoints; use --scope per-layer, or convert --dequantize it first")
    schemes = released.quantized_weights(ckpt.config, ckpt.tensors) or {}
    released.check_readable(schemes)   # (the calibration reads them)
    return released.codes_of(schemes)


def _config_fields(value, path=()):
    """(path, strings, keyed) of every field of a quantization config that could name modules: a string, a list of
    strings (a module matches the field if it matches any), or a dict's keys (keyed: which key matches first
    decides, as GPTQModel's `dynamic` and ModelOpt's `quantized_layers` are read)."""
    if isinstance(value, str):
        yield path, [value], False
    elif isinstance(value, list):
        strings = [v for v in value if isinstance(v, str)]
        if strings:
            yield path, strings, False
        for i, item in enumerate(value):
            if not isinstance(item, str):
                yield from _config_fields(item, path + (i,))
    elif isinstance(value, dict):
        if value:
            yield path + ("(keys)",), list(value), True
        for key, item in value.items():
            yield from _config_fields(item, path + (key,))


def _names_module(text: str, module: str, regex: bool) -> bool:
    """Whether a config string TEXT names MODULE as the tools read it: `re:` patterns (and GPTQModel's `dynamic`
    keys, REGEX) by re.match, wildcards by fnmatch, else the name itself or a dotted tail of it."""
    if regex or text.startswith(("re:", "+:", "-:")):
        pattern = text[3:] if text.startswith("re:") else text.removeprefix("+:").removeprefix("-:")
        try:
            return re.match(pattern, module) is not None
        except re.error:
            return False
    if any(c in text for c in "*?["):
        return fnmatch.fnmatchcase(module, text)
    return module == text or module.endswith("." + text)


def _check_renumbering(described: list[dict], pairs: list[tuple[str, str]], modules: set[str]) -> None:
    """UnsupportedError (before writing) if a quantization config in DESCRIBED says something else of a kept expert's
    module under its new number than under its old (PAIRS: (old, new) module names; MODULES: the checkpoint's): a
    pattern or list naming experts by number that the renumbering would point at other experts."""
    for config in described:
        autoround_config = autoround.is_autoround(config.get("quant_method"))
        for path, strings, keyed in _config_fields(config):
            regex = "dynamic" in path
            for old, new in pairs:
                if old == new:
                    continue
                if autoround_config and path == ("extra_config", "(keys)"):   # (the settings each resolves to)
                    said = [autoround.layer_settings(config, modules, name) for name in (old, new)]
                elif keyed:
                    said = [next((t for t in strings if _names_module(t, name, regex)), None) for name in (old, new)]
                else:
                    said = [any(_names_module(t, name, regex) for t in strings) for name in (old, new)]
                if said[0] != said[1]:
                    field = ".".join(map(str, path))
                    raise UnsupportedError(f"its quantization_config's {field} names {old} and {new} differently, so "
                                           f"pruning, which renumbers {old} to {new}, would change what it says of it; "
                                           "convert --dequantize it first")


def plan_prune(ckpt: Checkpoint, options: PruneOptions, progress=None):
    """Choose the kept experts and plan every output tensor (reads headers, runs a profile if needed;
    PROGRESS(label, done tokens, total tokens) follows its passes)."""
    from moetool.ops.inspect import inspect_checkpoint

    family = detect_family(ckpt.config)
    structure = inspect_checkpoint(ckpt)
    if family is None or not structure.moe_layers:
        raise UsageError(f"{ckpt.source}: no MoE layers to prune")
    released_codes = _check_quantized(ckpt, options)
    if family.prune_unsupported:
        raise UnsupportedError(f"{family.title}: {family.prune_unsupported}")
    check_choice(options)
    _, cfg, offset = family_context(ckpt)
    classifier = Classifier(family, offset, ckpt.tensors)
    matches = {name: classifier.classify(name) for name in ckpt.tensors}   # classified once, used below
    if options.merge and any(m.role in EXPERT_ROLES and m.expert is None and not m.guessed
                             for m in matches.values()):
        raise UnsupportedError("--merge supports experts stored one tensor per expert; convert to "
                               "--layout per-expert first")
    # groups as transformers' router selects them (topk_method and its config-class defaults included)
    groups, groups_used = (family.router.groups(cfg) if family.router else None) or (1, None)
    experts = structure.num_experts
    identity = family.zero_experts(cfg)   # identity experts (LongCat-Flash's): never removed
    sinks = family.sink_experts(cfg)   # router rows of experts top-k never picks (Inkling's shared ones): kept
    top_k = structure.top_k if isinstance(structure.top_k, int) else max(structure.top_k)
    keep = kept_count(experts, top_k, options, family)
    # layers whose experts a token table picks (DeepSeek-V4's hash layers): the removed experts' entries are
    # sent to similar kept experts, k distinct ones a token, so the table's width (top-k) cannot shrink
    table_layers = [layer for layer in structure.moe_layers if family.routes_by_table(cfg, layer)]
    if table_layers and keep < top_k:
        raise UsageError(f"{family.title}: keep at least {top_k} experts per layer: layers "
                         f"{', '.join(map(str, table_layers))} give each token {top_k} experts by a fixed token table")
    # the layers whose experts are compared: every one to --merge, else the token-table layers alone (their
    # remap needs it: a full read of the other layers' experts would be wasted); None: every layer
    compared = None if options.merge else table_layers
    check_group_routing(keep, top_k, groups, groups_used, family.router.group_score_experts if family.router else 2)
    similarity = scores = None
    if options.experts is not None:
        if sorted(options.experts) != structure.moe_layers or any(
                len(set(v)) != len(v) or not all(0 <= e < experts for e in v) for v in options.experts.values()):
            raise UsageError(f"--experts must list distinct experts (0..{experts - 1}) for each MoE layer "
                             f"{structure.moe_layers}")
        kept = {layer: sorted(v) for layer, v in options.experts.items()}
        mass = _scores(ckpt, structure, options, progress)[1] if options.merge or options.profile else None
    elif options.sequential:
        kept, mass, similarity, scores = sequential_choice(ckpt, structure, options, keep, groups,
                                                           (lambda: _similarity(ckpt, compared)) if compared != []
                                                           else None, progress, merge=options.merge)
    elif options.scope == "global":
        if groups > 1:
            raise UnsupportedError("--scope global with group-limited routing (n_group > 1) would unbalance "
                                   "the expert groups")
        scores, mass = _scores(ckpt, structure, options, progress)
        kept = _global_choice(scores, experts, keep, top_k)
    elif options.scope == "per-layer":
        scores, mass = _scores(ckpt, structure, options, progress)
        kept = choose_per_layer(scores, structure.moe_layers, experts, keep, groups)
    else:
        raise UsageError(f"--scope {options.scope}: use per-layer or global")
    counts = {len(v) for v in kept.values()}
    keep = max(counts)
    new_k = min(top_k, min(counts) + identity)   # (a token may still pick the identity experts, never removed)
    if compared != [] and similarity is None:
        similarity = _similarity(ckpt, compared)
    for layer in table_layers:   # (before any writing)
        table_similarity(similarity, layer)
    groups = _merge_groups(similarity, kept, mass, experts) if options.merge else None
    if released_codes:   # a quantized release: its config must say the same of every kept expert renumbered
        def module(name):   # (X.weight, X.qweight, X.weight_packed: the module X)
            return split_quant_suffix(name)[0].removesuffix(".weight")

        _check_renumbering(_quantization_described(ckpt), [
            (module(name), module(_renumbered(name, m, kept[m.layer].index(m.expert), classifier)))
            for name, m in matches.items() if m.layer in kept and m.role in EXPERT_ROLES and not m.aux
            and m.expert is not None and m.expert in kept[m.layer]], {module(name) for name in ckpt.tensors})

    tensors: list[OutputTensor] = []
    removed_params = removed_bytes = 0
    per_expert: dict[tuple, dict[int, TensorRef]] = {}   # (layer, role, aux name tail) -> expert -> tensor
    mtp = {name for name, m in matches.items() if family.is_mtp(cfg, name, m.layer)}

    def params(name, ref) -> int:   # the parameters a tensor holds: none for a scale, a packed one's codes'
        if matches[name].aux:
            return 0
        return released_codes[name][1].params(ref.shape) if name in released_codes else ref.numel

    for name in mtp:
        removed_bytes += ckpt.tensors[name].nbytes
        removed_params += params(name, ckpt.tensors[name])
    for name, ref in ckpt.tensors.items():
        m = matches[name]
        if m.layer in kept and m.role in EXPERT_ROLES and m.expert is not None:
            per_expert.setdefault((m.layer, m.role, name.rsplit(".", 1)[-1]), {})[m.expert] = ref
    for name, ref in ckpt.tensors.items():
        if name in mtp:
            continue
        m = matches[name]
        if m.layer in kept and m.role in EXPERT_ROLES and m.expert is not None:       # one tensor per expert
            if identity and m.expert >= experts:   # identity experts' gate and up (transformers' saves, never used)
                if len(counts) == 1:   # kept after the real experts, as transformers saves them
                    tensors.append(OutputTensor(_renumbered(name, m, keep + m.expert - experts, classifier),
                                                ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "identity expert"))
                else:   # (layers keeping different numbers load in moetool only, which needs none of them)
                    removed_bytes += ref.nbytes
                    removed_params += 0 if m.aux else ref.numel
                continue
            if m.expert not in kept[m.layer]:
                removed_bytes += ref.nbytes
                removed_params += params(name, ref)
                continue
            pieces = tensor_pieces(ref, ref.dtype)
            if groups is not None:
                siblings = per_expert[(m.layer, m.role, name.rsplit(".", 1)[-1])]
                group = groups[m.layer][m.expert]
                pieces = [computed_piece(_weighted([(siblings[e], w) for e, w in group], ref.dtype), ref.shape,
                                         ref.dtype)]
            tensors.append(OutputTensor(_renumbered(name, m, kept[m.layer].index(m.expert), classifier),
                                        ref.dtype, ref.shape, pieces, "kept expert"))
            continue
        if m.layer in kept and m.role == Role.ROUTER_HASH:   # expert ids: each removed one sent to a kept one
            tensors.append(OutputTensor(name, ref.dtype, ref.shape, [computed_piece(
                _remapped(ref, kept[m.layer], similarity[m.layer]), ref.shape, ref.dtype)], "token table remapped"))
            continue
        if m.layer in kept and m.aux and m.expert is None and not ref.shape:   # one scale all the experts share
            tensors.append(OutputTensor(name, ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "copied"))
            continue   # (ModelOpt's fused experts: experts.gate_up_proj_weight_scale_2, _input_scale)
        if m.layer in kept and (m.role in EXPERT_ROLES or m.role in EXPERT_INDEXED) and not m.guessed:
            rows, count = kept[m.layer], experts
            if (identity or sinks) and family.shapes.get(m.role, ("E",))[0] == "R":   # rows past the experts stay
                extra = identity + sinks   # (identity experts', then sinks')
                rows, count = rows + list(range(experts, experts + extra)), experts + extra
            sliced = _slice_experts(ref, m.role, rows, count, family.packed_experts)
            removed_bytes += ref.nbytes - sliced.nbytes
            if not m.aux and m.role not in family.buffers:   # (a release's codes: the values they hold)
                held = released_codes.get(name)
                removed_params += held[1].params(tuple(ref.shape)) - held[1].params(tuple(sliced.shape)) if held \
                    else ref.numel - prod(sliced.shape)
            tensors.append(sliced)
            continue
        tensors.append(OutputTensor(name, ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "copied"))

    config = json.loads(json.dumps(ckpt.config))
    root = (family.text_root(config) or (None, config))[1]   # (a wrapper's text model's config)
    _set_all(root, family.keys["num_experts"], keep)
    warnings = []
    if mtp:   # no calibration reaches them (transformers does not run them), so they cannot be pruned alike
        _set_all(root, MTP_KEYS, 0)
        warnings.append(f"dropped the {len(mtp)} tensors of the multi-token-prediction module(s), which transformers "
                        "does not run, so their experts could not be chosen alike; the output has none (no MTP "
                        "speculative decoding)")
    if len(counts) > 1:
        root[UNEVEN_EXPERTS_KEY] = {str(layer): len(v) for layer, v in kept.items()}
        warnings.append("layers keep different numbers of experts, which stock transformers cannot load: "
                        "load this checkpoint with moetool.load_model(path)")
    if new_k != top_k:
        if "top_k" not in family.keys:
            raise UsageError(f"cannot keep fewer experts ({min(counts)}) than {family.title}'s top-k of {top_k}, "
                             "which its config cannot lower")
        _set_all(root, family.keys.get("top_k", ()), new_k)
        warnings.append(f"top-k lowered from {top_k} to {new_k}: only {keep} experts are left")
    removed_mass = removed_share(mass, kept)
    report = PruneReport(ckpt.source, None, options.criterion, experts, keep, new_k, kept, removed_params,
                         removed_bytes, removed_mass, warnings, scores=scores)
    return tensors, config, report


def _global_choice(scores: dict[int, list[float]], experts: int, keep: int, top_k: int) -> dict[int, list[int]]:
    """Rank experts across layers: every layer keeps at least its top-k best, the remaining slots
    (keep x layers in all) go to the best scores anywhere."""
    layers = sorted(scores)
    total = keep * len(layers)
    kept = {layer: set(sorted(range(experts), key=lambda e: (-scores[layer][e], e))[:top_k]) for layer in layers}
    ranked = sorted(((scores[layer][e], -layer, -e) for layer in layers for e in range(experts)), reverse=True)
    slots = total - sum(len(v) for v in kept.values())
    for _, neg_layer, neg_e in ranked:
        if slots <= 0:
            break
        if -neg_e not in kept[-neg_layer]:
            kept[-neg_layer].add(-neg_e)
            slots -= 1
    return {layer: sorted(v) for layer, v in kept.items()}


def _merge_groups(similarity, kept: dict[int, list[int]], mass, experts: int
                  ) -> dict[int, dict[int, list[tuple[int, float]]]]:
    """For each kept expert, the experts folded into it with their weights (`merge_group`)."""
    if mass is None:
        raise UsageError("--merge weighs the experts it folds by their gate-weight mass, which this profile lacks "
                         "(a profile of a vLLM trace holds counts only)", hint="give --data, or a moetool profile")
    return {layer: merge_group(similarity[layer], keep, mass[layer], experts) for layer, keep in kept.items()}


def _similarity(ckpt: Checkpoint, layers: list[int] | None = None) -> dict[int, list[list[float]]]:
    """Per MoE layer (of LAYERS only, where given), the cosine similarity of every pair of experts' weights."""
    from moetool.ops.inspect import inspect_checkpoint

    return {s.layer: s.similarity for s in inspect_checkpoint(ckpt, experts=True if layers is None else layers).experts}


def _remapped(ref: TensorRef, kept: list[int], similarity: list[list[float]]):
    def compute():
        return remapped_table(ref.load(), kept, similarity)

    return compute


def _weighted(parts: list[tuple[TensorRef, float]], dtype: str):
    def compute():
        return sum(ref.load().float() * weight for ref, weight in parts).to(TORCH_DTYPES[dtype])

    return compute


def _renumbered(name: str, m, new: int, classifier: Classifier) -> str:
    """NAME (classified as M) with its expert index replaced by NEW (the slot of the family's template)."""
    old = m.expert
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == str(old) or part == f"expert_{old}":
            candidate = parts[:i] + [part.replace(str(old), str(new))] + parts[i + 1:]
            renamed = ".".join(candidate)
            check = classifier.classify(renamed)
            if check.expert == new and check.layer == m.layer and check.role == m.role:
                return renamed
    raise MoetoolError(f"{name}: cannot renumber expert {old}")


def _slice_experts(ref: TensorRef, role: Role, kept: list[int], experts: int, packed: bool = False
                   ) -> OutputTensor:
    """The kept experts of a tensor indexed by expert: on its first axis (fused expert tensors, router
    rows; DBRX packs experts as [E*I, H]) or its last (a [1, E] correction bias)."""
    shape = list(ref.shape)
    if role in EXPERT_INDEXED and len(shape) == 2 and shape[0] == 1:   # ERNIE's [1, E] bias
        axis = 1
    else:
        axis = 0
    if packed and role in EXPERT_ROLES:
        if shape[0] % experts:
            raise UnsupportedError(f"{ref.name}: {shape[0]} rows are not {experts} packed experts")
        shape[0] = shape[0] // experts * len(kept)
    elif shape[axis] != experts:
        raise UnsupportedError(f"{ref.name}: expected {experts} experts on axis {axis}, found {shape}")
    else:
        shape[axis] = len(kept)
    if axis == 0:
        per = ref.numel // experts // (ref.shape[-1] if len(ref.shape) > 1 else 1)
        if len(ref.shape) == 1:
            def compute():
                import torch

                return ref.load().index_select(0, torch.tensor(kept))
            pieces = [computed_piece(compute, tuple(shape), ref.dtype)]
        else:
            pieces = [rows_piece(ref, e * per, (e + 1) * per, ref.dtype) for e in kept]
    else:
        def compute():
            import torch

            return ref.load().index_select(1, torch.tensor(kept)).to(TORCH_DTYPES[ref.dtype])
        pieces = [computed_piece(compute, tuple(shape), ref.dtype)]
    return OutputTensor(ref.name, ref.dtype, tuple(shape), pieces, "sliced experts")


def _set_all(config: dict, keys: tuple[str, ...], value: int) -> None:
    """Set every one of KEYS the config has (convert keeps transformers 4's key beside 5's)."""
    for key in keys:
        if get_path(config, key) is not None:
            node = config
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value


def prune(ckpt: Checkpoint, out: Path, options: PruneOptions, *, force: bool = False, dry_run: bool = False,
          progress=None, analysis_progress=None) -> PruneReport:
    """Prune CKPT into OUT (atomically); with DRY_RUN only choose the experts and report. PROGRESS(bytes)
    follows the writing, ANALYSIS_PROGRESS(label, done tokens, total tokens) the calibration passes."""
    out = Path(out)
    if ckpt.kind == "gguf":   # llama.cpp files: expert byte ranges copied into a GGUF of the same layout
        return prune_gguf(ckpt, out, options, force=force, dry_run=dry_run, progress=progress,
                          analysis_progress=analysis_progress)
    refuse_inside_source(out, ckpt)
    if out.exists() and not force and not dry_run:   # before the calibration, not after it
        raise OutputExistsError(f"{out}: already exists", hint="use --force to replace it")
    start = time.perf_counter()
    tensors, config, report = plan_prune(ckpt, options, analysis_progress)
    if dry_run:
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    kept = "".join(f"- layer {layer}: experts {experts}\n" for layer, experts in report.kept.items())
    readme = (f"---\nbase_model: {ckpt.source}\ntags:\n- moetool\n- mixture-of-experts\n- pruned\n---\n\n"
              f"# {out.name}\n\nPruned from `{ckpt.source}` by moetool {__version__} ({report.criterion}): "
              f"{report.experts_before} -> {report.experts_after_text} experts per layer, "
              f"top-{report.top_k}.\n\n{kept}")
    write_checkpoint(out, plan_shards(tensors, options.max_shard_size), op="prune", config=config,
                     files=side_files(ckpt), readme=readme, force=force, progress=progress)
    report.out = str(out)
    report.seconds = round(time.perf_counter() - start, 3)
    return report
