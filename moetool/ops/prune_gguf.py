"""`moetool prune FILE.gguf OUT.gguf`: remove routed experts from a llama.cpp file without
requantizing.

Every MoE layer keeps the same experts count (GGUF has one ``{arch}.expert_count`` per model).
The kept experts' byte ranges of every tensor stacked by expert (``ffn_{gate,up,down}_exps``,
``ffn_gate_up_exps``, their biases, the router ``ffn_gate_inp``, ``exp_probs_b``) are copied as
they are; old per-expert Mixtral tensors (``ffn_gate.{E}``) are kept or dropped and renumbered;
``expert_count`` (and ``expert_used_count`` when it exceeds the experts left) are updated; all
other metadata, the alignment, the tensor order and the split layout are the source's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from moetool.arch.gguf import (
    BLK_LAYER,
    EXPERT_STACKED_MARKS,
    GROUP_COUNT,
    GROUP_USED,
    NEXTN,
    PER_EXPERT,
    TOKEN_TABLE_MARKS,
    gguf_family,
    gguf_num_layers,
)
from moetool.arch.matcher import Classifier
from moetool.arch.schema import EXPERT_ROLES
from moetool.checkpoint import Checkpoint
from moetool.checkpoint.gguf_write import DROP, TensorEdit, check_outputs, write_edited_gguf
from moetool.checkpoint.writer import refuse_inside_source
from moetool.errors import ConfigError, UnsupportedError, UsageError
from moetool.ops.prune_choice import (
    EXPERT_INDEXED,
    PruneOptions,
    PruneReport,
    check_choice,
    check_group_routing,
    choice_scores,
    choose_per_layer,
    kept_count,
    removed_share,
    sequential_choice,
)

WEIGHT_ROLES = frozenset(EXPERT_ROLES) - {r for r in EXPERT_ROLES if r.value.endswith("_bias")}
_LAYER = re.compile(BLK_LAYER)


def _check_options(options: PruneOptions) -> None:
    check_choice(options)
    if options.merge:
        raise UnsupportedError("--merge averages expert weights, which a GGUF file holds quantized: GGUF prune "
                               "copies the kept experts' bytes as they are; merge the safetensors model, then "
                               "convert it")
    if options.scope == "global":
        raise UnsupportedError("--scope global gives layers different expert counts, but a GGUF file holds one "
                               "expert count per model (its expert_count key): use --scope per-layer")
    if options.scope != "per-layer":
        raise UsageError(f"--scope {options.scope}: use per-layer or global")


def _scores(ckpt: Checkpoint, structure, classifier: Classifier, options: PruneOptions, progress=None):
    return choice_scores(ckpt, structure, options,
                         lambda: _weight_norms(ckpt, classifier, structure.moe_layers, structure.num_experts),
                         progress)


def _weight_norms(ckpt: Checkpoint, classifier: Classifier, layers: list[int], experts: int) -> dict[int, list[float]]:
    """Each expert's weight norm (gate, up, down together), dequantized one expert slice at a time."""
    import numpy as np

    squares = {layer: [0.0] * experts for layer in layers}
    for name, ref in ckpt.tensors.items():
        m = classifier.classify(name)
        if m.layer not in squares or m.role not in WEIGHT_ROLES or m.guessed:
            continue
        for e in range(experts) if m.expert is None else (m.expert,):
            values = ref.read_expert(e, experts) if m.expert is None else ref.load()
            squares[m.layer][e] += float(np.square(values, dtype=np.float64).sum())
    return {layer: [v ** 0.5 for v in values] for layer, values in squares.items()}


def plan_prune_gguf(ckpt: Checkpoint, options: PruneOptions, progress=None):
    """Choose the kept experts; return (tensor edits, metadata updates, report)."""
    from moetool.ops.inspect import inspect_checkpoint

    _check_options(options)
    structure = inspect_checkpoint(ckpt)
    if not structure.moe_layers:
        raise UsageError(f"{ckpt.source}: no MoE layers to prune")
    config = ckpt.config or {}
    table = next((name for name in ckpt.tensors if any(mark in name for mark in TOKEN_TABLE_MARKS)), None)
    if table is not None:   # (its values are expert ids, which the removed experts' renumbering would break)
        raise UnsupportedError(f"{ckpt.source}: {table} picks each token's experts by a fixed table, which moetool "
                               "remaps only in safetensors checkpoints",
                               hint="prune the safetensors checkpoint, then convert it to GGUF with llama.cpp")
    family = gguf_family(config, ckpt.tensors)
    classifier = Classifier(family)
    experts, layers = structure.num_experts, structure.moe_layers
    arch = config.get("model_type")
    top_k = structure.top_k
    if not isinstance(top_k, int):
        raise ConfigError(f"{ckpt.shards[0].path}: has no {arch}.expert_used_count (the top-k), so the experts kept "
                          "cannot be checked against it nor the top-k lowered")
    keep = kept_count(experts, top_k, options)
    groups = config.get(GROUP_COUNT) or 1
    if config.get(GROUP_COUNT) == 1 and keep == 1:   # llama.cpp asserts fewer groups than experts (more: below)
        raise UsageError(f"{arch}.{GROUP_COUNT} is 1: keep at least 2 experts, as llama.cpp needs more experts than "
                         "groups")
    check_group_routing(keep, top_k, groups, config.get(GROUP_USED))
    if options.experts is not None:
        if sorted(options.experts) != layers or any(
                len(set(v)) != len(v) or not all(0 <= e < experts for e in v) for v in options.experts.values()):
            raise UsageError(f"--experts must list distinct experts (0..{experts - 1}) for each MoE layer {layers}")
        kept = {layer: sorted(v) for layer, v in options.experts.items()}
        if groups > 1:
            size = experts // groups
            if any(len(v) % groups or len(v) // groups < 2 or
                   any(sum(1 for e in v if e // size == g) != len(v) // groups for g in range(groups))
                   for v in kept.values()):
                raise UsageError(f"group-limited routing with {groups} groups of {size}: --experts must keep the "
                                 "same number of experts in every group, at least 2")
        mass = scores = None
    elif options.sequential:   # on the GGUF's transformers view
        kept, mass, _, scores = sequential_choice(ckpt, structure, options, keep, groups, progress=progress)
    else:
        scores, mass = _scores(ckpt, structure, classifier, options, progress)
        kept = choose_per_layer(scores, layers, experts, keep, groups)
    new_k = min(top_k, keep)

    edits: dict[str, TensorEdit | None] = {}
    removed_params = removed_bytes = 0
    nextn = config.get(NEXTN)
    first_mtp = gguf_num_layers(config) if isinstance(nextn, int) and nextn > 0 else None
    mtp = 0
    for name, ref in ckpt.tensors.items():
        m = classifier.classify(name)
        layer = m.layer
        if layer is None and (found := _LAYER.match(name)):
            layer = int(found.group(1))
        if first_mtp is not None and layer is not None and layer >= first_mtp:
            edits[name] = DROP   # a multi-token-prediction block: no routing reaches it (see prune.py)
            removed_bytes += ref.nbytes
            mtp += 1
            continue
        stacked = ((m.role in EXPERT_ROLES or m.role in EXPERT_INDEXED) and not m.guessed) or \
            any(mark in name for mark in EXPERT_STACKED_MARKS)
        if m.role in EXPERT_ROLES and m.expert is not None and not m.guessed:   # one tensor per expert
            if layer not in kept:
                raise UnsupportedError(f"{name}: experts in layer {layer}, which is not an MoE layer moetool prunes")
            if m.expert in kept[layer]:
                new = kept[layer].index(m.expert)
                edits[name] = TensorEdit(name=PER_EXPERT[m.role].format(L=layer, E=new)) if new != m.expert \
                    else TensorEdit()
            else:
                edits[name] = DROP
                removed_bytes += ref.nbytes
                removed_params += ref.numel
            continue
        if not stacked or not ref.shape:
            continue
        if layer not in kept:
            raise UnsupportedError(f"{name}: stacks experts in layer {layer}, which is not an MoE layer moetool "
                                   "prunes (a multi-token-prediction block?); the file would keep two expert "
                                   "counts")
        gone = experts - len(kept[layer])
        edits[name] = TensorEdit(kept=tuple(kept[layer]), experts=experts)
        removed_bytes += ref.nbytes // experts * gone
        if m.role not in family.buffers:
            removed_params += ref.numel // experts * gone

    metadata = {f"{arch}.expert_count": keep}
    warnings = []
    if mtp:
        metadata |= {f"{arch}.block_count": first_mtp, f"{arch}.{NEXTN}": 0}
        warnings.append(f"dropped the {nextn} multi-token-prediction block(s) ({mtp} tensors), which no "
                        "calibration reaches, so their experts could not be chosen alike; the output has none "
                        "(no MTP speculative decoding)")
    if new_k != top_k:
        metadata[f"{arch}.expert_used_count"] = new_k
        warnings.append(f"top-k lowered from {top_k} to {new_k}: only {keep} experts are left")
    report = PruneReport(ckpt.source, None, options.criterion,
                         experts, keep, new_k, kept, removed_params, removed_bytes, removed_share(mass, kept),
                         warnings, scores=scores)
    return edits, metadata, report


def prune_gguf(ckpt: Checkpoint, out: Path, options: PruneOptions, *, force: bool = False, dry_run: bool = False,
               progress=None, analysis_progress=None) -> PruneReport:
    """Prune the GGUF file or split set CKPT into OUT (a .gguf name; a split set is written as
    OUT's stem with the source's part numbering), atomically; with DRY_RUN only report."""
    out = Path(out)
    sources = [shard.path for shard in ckpt.shards]
    refuse_inside_source(out, ckpt)
    check_outputs(sources, out, force=force or dry_run)   # a bad or taken name fails before any work
    start = time.perf_counter()
    edits, metadata, report = plan_prune_gguf(ckpt, options, analysis_progress)
    if dry_run:
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    written = write_edited_gguf(sources, out, edits, metadata, force=force, progress=progress)
    report.out = str(written[0]) if len(written) == 1 else str(out)
    report.seconds = round(time.perf_counter() - start, 3)
    return report
