"""What prune chooses, for safetensors and GGUF alike: the options, the report, how many experts
each layer keeps and which."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.arch import Role
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.profile import (
    ProfileOptions,
    calibration_defaults,
    calibration_ids,
    layer_profile,
    routing_profile,
    routing_structure,
)
from moetool.runner import distributed

log = logging.getLogger(__name__)

CRITERIA = ("frequency", "soft-count", "reap", "ean", "weight-norm", "random")
PROFILE_FIELD = {"frequency": "counts", "soft-count": "weight_mass", "reap": "saliency", "ean": "activation_norm"}
# router-side tensors indexed by expert on their last axis
EXPERT_INDEXED = (Role.ROUTER, Role.ROUTER_BIAS, Role.ROUTER_CORRECTION, Role.ROUTER_SCALE)


@dataclass
class PruneOptions:
    keep: int | None = None             # experts kept per layer
    experts: dict[int, list[int]] | None = None   # or: the experts kept in each MoE layer, explicitly
    ratio: float | None = None          # share of experts removed per layer
    criterion: str = "frequency"
    profile: Path | None = None         # a `moetool profile --json` file
    calibration: ProfileOptions | None = None   # data to profile when no --profile (None: the built-in corpus)
    merge: bool = False                 # fold removed experts into their most similar kept expert
    scope: str = "per-layer"            # "per-layer" (same count everywhere) | "global" (ranked across layers)
    sequential: bool = False            # score each layer on the outputs of the already-pruned earlier layers
    seed: int = 0
    max_shard_size: int = 5_000_000_000


@dataclass
class PruneReport:
    source: str
    out: str | None
    criterion: str
    experts_before: int
    experts_after: int
    top_k: int
    kept: dict[int, list[int]]
    params_removed: int
    bytes_removed: int
    routing_mass_removed: float | None  # share of gate-weight mass the removed experts carried
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0                # the whole run: calibration, choice and writing
    # per MoE layer, each expert's score by the criterion, as the choice saw it (with --sequential: measured
    # after the earlier layers were pruned); None with --experts
    scores: dict[int, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "moetool_version": __version__, **self.__dict__,
                "kept": {str(k): v for k, v in self.kept.items()},
                "scores": None if self.scores is None else {str(k): [round(v, 6) for v in values]
                                                            for k, values in self.scores.items()},
                "experts_per_layer": {str(k): len(v) for k, v in self.kept.items()}}

    @property
    def experts_after_text(self) -> str:
        """"6", or "4-7" when the layers keep different numbers (--scope global); experts_after is the
        largest, the count the config holds."""
        counts = sorted({len(v) for v in self.kept.values()}) or [self.experts_after]
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def kept_count(experts: int, top_k: int, options: PruneOptions, family=None) -> int:
    """How many experts every layer keeps (at least FAMILY's minimum)."""
    if sum(x is not None for x in (options.keep, options.ratio, options.experts)) != 1:
        raise UsageError("give exactly one of --keep N, --ratio r and --experts SPEC")
    if options.experts is not None:
        counts = {len(v) for v in options.experts.values()}
        if len(counts) != 1:
            raise UsageError("--experts: every MoE layer must keep the same number of experts (per-layer scope)")
        keep = counts.pop()
    else:
        keep = options.keep if options.keep is not None else experts - round(options.ratio * experts)
    if not 1 <= keep <= experts:
        raise UsageError(f"cannot keep {keep} of {experts} experts per layer")
    least, why = family.min_kept if family is not None else (1, "")
    if keep < least:
        raise UsageError(f"{family.title}: keep at least {least} experts per layer ({why})")
    return keep


def choice_scores(ckpt, structure, options: PruneOptions, weight_norms, progress=None
                  ) -> tuple[dict[int, list[float]] | None, dict[int, list] | None]:
    """Per MoE layer: the criterion's score of each expert (None with --experts), and its gate-weight
    mass: from a profile, or calibration when the criterion or --merge needs routing (None where
    nothing routed, or the profile holds none, as one from a vLLM trace). WEIGHT_NORMS() gives the
    experts' weight norms (weight-norm). (The options were checked first: check_choice.)"""
    layers = structure.moe_layers
    routed = options.experts is None and options.criterion in PROFILE_FIELD
    profile = None
    if calibrates(options) or options.profile is not None:
        profile = routing_profile(ckpt, structure, profile=options.profile, calibration=options.calibration,
                                  saliency=routed and options.criterion in ("reap", "ean"), progress=progress)
    mass = None
    if profile is not None and all(profile[layer].get("weight_mass") is not None for layer in layers):
        mass = {layer: profile[layer]["weight_mass"] for layer in layers}
    if options.experts is not None:
        return None, mass
    if options.criterion == "weight-norm":   # the experts' own weights: no routing needed
        return weight_norms(), mass
    if options.criterion == "random":   # torch's generator: the same experts for a seed, safetensors or GGUF
        import torch

        gen = torch.Generator().manual_seed(options.seed)
        return {layer: torch.rand(structure.num_experts, generator=gen).tolist() for layer in layers}, mass
    field = PROFILE_FIELD[options.criterion]
    if any(profile[layer].get(field) is None for layer in layers):
        raise UsageError(f"the profile has no {field}", hint="for reap and ean, profile with --saliency; a "
                         "profile of a vLLM trace holds expert counts only")
    if any(v is None for layer in layers for v in profile[layer][field]):   # JSON writes NaN as null
        raise UsageError(f"the profile's {field} holds null (NaN) values: the model's weights or activations "
                         "are not finite", hint="moetool inspect --check-values finds the tensors")
    return {layer: [float(v) for v in profile[layer][field]] for layer in layers}, mass


def calibrates(options: PruneOptions) -> bool:
    """Whether the choice runs the model on calibration data (else the data options go unused)."""
    routed = options.experts is None and options.criterion in PROFILE_FIELD
    return options.profile is None and (routed or options.merge or options.sequential)


def check_group_routing(keep: int, top_k: int, groups: int, groups_used: int | None, best_of: int = 2) -> None:
    """Refuse (before any work) a KEEP that group-limited routing over GROUPS cannot take: every group
    keeps the same number, at least BEST_OF (a group's score sums its best BEST_OF: two for DeepSeek-V3
    and llama.cpp, one for DeepSeek-V2), and a token's GROUPS_USED best groups must still hold its
    top-k experts, or the router picks among masked ones."""
    if groups <= 1:
        return
    if keep % groups:
        raise UsageError(f"group-limited routing with {groups} groups: keep a multiple of {groups} experts "
                         "per layer, so that every group keeps the same number")
    if keep // groups < best_of:
        raise UsageError(f"group-limited routing ranks each group by its best {best_of} experts: keep at least "
                         f"{best_of} per group ({best_of * groups} per layer)")
    if groups_used and groups_used * (keep // groups) < min(top_k, keep):
        raise UsageError(f"keeping {keep} experts in {groups} groups, a token's {groups_used} best groups hold "
                         f"{groups_used * (keep // groups)} experts, fewer than its top-{min(top_k, keep)}",
                         hint=f"keep at least {-(-top_k // groups_used) * groups} experts per layer")


def removed_share(mass: dict[int, list] | None, kept: dict[int, list[int]]) -> float | None:
    """The share of the gate-weight MASS the experts not KEPT carried (None without a mass)."""
    if mass is None:
        return None
    total = sum(sum(v) for v in mass.values()) or 1.0
    return sum(v for layer, values in mass.items() for e, v in enumerate(values) if e not in kept[layer]) / total


def choose_per_layer(scores: dict[int, list[float]], layers: list[int], experts: int, keep: int,
                     groups: int = 1) -> dict[int, list[int]]:
    """The KEEP best-scored experts of every layer; with group-limited routing (GROUPS > 1) the
    same number in every group (`check_group_routing` said how many may be kept)."""
    size, per_group = experts // groups, keep // groups   # choose within each group: groups stay equal
    return {layer: sorted(e for g in range(groups) for e in sorted(
                range(g * size, (g + 1) * size), key=lambda e: (-scores[layer][e], e))[:per_group])
            for layer in layers}


def merge_group(similarity: list[list[float]], keep: list[int], mass: list[float], experts: int
                ) -> dict[int, list[tuple[int, float]]]:
    """For each kept expert of one layer, the experts folded into it with their weights: every removed
    expert goes to its most similar kept expert (SIMILARITY: cosine of the expert weights), weighted
    by the routing MASS each carried (M-SMoE's frequency-weighted merge)."""
    members = {k: [k] for k in keep}
    for e in range(experts):
        if e not in members:
            members[max(keep, key=lambda k: (similarity[e][k], -k))].append(e)
    groups = {}
    for k, group in members.items():
        total = sum(mass[e] for e in group) or float(len(group))
        groups[k] = [(e, (mass[e] or (0 if total else 1)) / total) for e in group]
    return groups


def table_similarity(similarity: dict[int, list[list[float]]] | None, layer: int) -> list[list[float]]:
    """The expert similarity a token-table LAYER's remap needs (inspect's expert statistics skip a layer whose
    experts they cannot read, with the reason: then this says so)."""
    if similarity is None or layer not in similarity:
        raise UnsupportedError(f"layer {layer}: its token table sends a removed expert's tokens to the most similar "
                               "kept expert, and that layer's expert weights could not be compared",
                               hint="moetool inspect --experts says why")
    return similarity[layer]


def remapped_table(table, kept: list[int], similarity: list[list[float]], *, renumber: bool = True, rows: int = 16384):
    """A token table (TABLE [V, k]: each token's experts, DeepSeek-V4's hash layers) for a layer keeping KEPT: each
    removed expert's entries go to the kept expert most similar to it (SIMILARITY: cosine of the experts' weights,
    where --merge folds it) that the token's row does not hold already, else to the most similar kept one; the ids
    renumbered as the pruned layer numbers its kept experts (RENUMBER), else the original ones. In chunks of ROWS
    tokens (a [rows, E] score matrix at a time)."""
    import torch

    experts = len(similarity)
    sim = torch.tensor(similarity, dtype=torch.float64)
    is_kept = torch.zeros(experts, dtype=torch.bool)
    is_kept[kept] = True
    sim[:, ~is_kept] = float("-inf")   # (only kept experts are candidates)
    out = table.long().clone()
    for start in range(0, out.shape[0], rows):
        part = out[start:start + rows]
        held = torch.zeros(part.shape[0], experts, dtype=torch.bool)
        held.scatter_(1, part.clamp(0, experts - 1), is_kept[part.clamp(0, experts - 1)])   # the row's kept ones
        for j in range(part.shape[1]):
            gone = ~is_kept[part[:, j]]
            if not gone.any():
                continue
            scores = sim[part[gone, j]]                            # [removed slots, E]
            free = scores.masked_fill(held[gone], float("-inf"))
            # (argmax: the first of equal scores, the lowest-numbered kept expert)
            choice = torch.where(torch.isinf(free.max(-1).values), scores.argmax(-1), free.argmax(-1))
            part[gone, j] = choice
            held[gone.nonzero().squeeze(1), choice] = True
    if renumber:
        number = torch.full((experts,), -1, dtype=torch.long)
        number[sorted(kept)] = torch.arange(len(kept))
        out = number[out]
    return out.to(table.dtype)


def check_choice(options: PruneOptions) -> None:
    """Refuse, before any work, an unknown criterion and what --sequential cannot combine with."""
    if options.criterion not in CRITERIA:
        raise UsageError(f"--criterion {options.criterion}: use one of {', '.join(CRITERIA)}")
    if not options.sequential:
        return
    if options.experts is not None or options.profile is not None:
        raise UsageError("--sequential scores each layer as the earlier ones are pruned, on calibration data; "
                         "it takes neither --experts nor --profile (a profile is of the unpruned model)")
    if options.criterion in ("random", "weight-norm"):
        raise UsageError(f"--sequential scores experts by routing; --criterion {options.criterion} does not use "
                         "routing, so it would choose the same experts without it")
    if options.scope != "per-layer":
        raise UsageError("--sequential chooses layer by layer: use --scope per-layer")


def sequential_choice(ckpt, structure, options: PruneOptions, keep: int, groups: int = 1, similarity=None,
                      progress=None, *, merge: bool = False
                      ) -> tuple[dict[int, list[int]], dict[int, list[float]], Any, dict[int, list[float]]]:
    """The kept experts, gate-weight mass and scores of every MoE layer, chosen layer by layer on the streamed
    runner: each layer's criterion is measured on the hidden states of the already-pruned earlier
    layers, then the layer is pruned in place. SIMILARITY (a callable giving, per MoE layer, the experts'
    pairwise weight similarity) is returned third, the scores fourth: with MERGE, removed experts are merged in
    place into the most similar kept ones; the token tables of layers that route by one (remapped_table) follow
    it too."""
    import torch

    from moetool.runner.device import pick_device, pick_dtype
    from moetool.runner.engine import micro_batches, run
    from moetool.runner.model import check_runnable, load_model, runnable
    from moetool.runner.sequential import experts_modules
    from moetool.runner.sequential_prune import SequentialPrune

    check_runnable(ckpt)   # (the options were checked before any work: check_choice)
    model_ckpt = runnable(ckpt)
    calibration = calibration_defaults(ckpt, options.calibration)
    world = distributed.world_from_env()
    device = pick_device(calibration.device, local_rank=world.local_rank if world.distributed else None)
    distributed.init(world, device)
    loaded = load_model(model_ckpt, device=device, dtype=pick_dtype(calibration.dtype, device), mode="streamed",
                        trust_remote_code=calibration.trust_remote_code)   # streamed: no weight read yet
    layers = routing_structure(ckpt)[1]   # MoE layer -> (experts, top-k)
    if merge:   # merging in place needs transformers 5's stacked experts: refuse now
        for layer in layers:
            try:
                stacked = len(experts_modules(loaded.layers[layer])) == 1
            except UnsupportedError:   # transposed, interleaved or with biases
                stacked = False
            if not stacked:
                raise UnsupportedError(f"{loaded.family.title}: --merge with --sequential merges experts in place, "
                                       "which needs each layer's experts in one stacked [gate; up] experts module "
                                       "without biases; use --merge without --sequential")
    similarity = similarity() if similarity is not None else None
    cfg = loaded.family.settings(loaded.config)
    ids = calibration_ids(model_ckpt, calibration, default="builtin", vocab_size=structure.vocab_size)
    field = PROFILE_FIELD[options.criterion]
    mass: dict[int, list[float]] = {}
    scores: dict[int, list[float]] = {}

    def choose(layer, totals):
        measured = layer_profile(layer, totals, calibration).__dict__
        mass[layer] = measured["weight_mass"]
        scores[layer] = [float(v) for v in measured[field]]
        experts = layers[layer][0]
        kept = choose_per_layer(scores, [layer], experts, keep, groups)[layer]
        log.info("layer %d: kept experts %s (%s, measured after the earlier layers were pruned)", layer, kept,
                 options.criterion)
        merged = merge_group(similarity[layer], kept, mass[layer], experts) if merge else None
        remap = None
        if loaded.family.routes_by_table(cfg, layer):
            def remap(table, kept=kept, sim=table_similarity(similarity, layer)):
                return remapped_table(table, kept, sim, renumber=False)
        return kept, merged, remap

    first, count = distributed.share(ids.shape[0], world)   # torchrun: each rank its share of the sequences
    pruner = SequentialPrune(loaded.model, loaded.family, loaded.config, layers, choose,
                             saliency=options.criterion in ("reap", "ean"), device=device, seq_len=ids.shape[1],
                             distributed=world.distributed)
    try:
        with torch.no_grad():
            run(loaded, micro_batches(ids[first:first + count], calibration.batch_size, first), calibrate=pruner,
                progress=progress, offload_dir=calibration.offload_dir)
    finally:
        pruner.close()
    return pruner.kept, mass, similarity, scores


def parse_experts(spec: str) -> dict[int, list[int]]:
    """"3:0,1,5;4:2,3,7" -> {3: [0, 1, 5], 4: [2, 3, 7]} (the experts kept per MoE layer)."""
    try:
        return {int(layer): [int(e) for e in experts.split(",") if e.strip()]
                for layer, experts in (part.split(":", 1) for part in spec.split(";") if part.strip())}
    except ValueError:
        raise UsageError(f"--experts {spec!r}: use LAYER:E,E,...;LAYER:E,... (experts kept per layer)") from None
