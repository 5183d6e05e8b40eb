"""`moetool upcycle`: a dense checkpoint becomes an MoE checkpoint whose experts start as copies
(or fine-grained segments) of the dense MLP.

Streams like convert: attention, norms and embeddings are byte ranges of the source; each
expert's gate/up rows are byte ranges too; only what changes is computed (a down-projection
column slice, noise, dropped neurons, the router).

Targets: Mixtral, GLM-4.5 (DeepSeek-V3-style routing) and OLMoE from Llama/Mistral; Qwen2-MoE
from Qwen2; Qwen3-MoE from Qwen3; Mixtral from Gemma 1/2/3. Exact at initialisation except where
a warning says why not (OLMoE's query/key norms, Gemma 2/3's extra norms and soft-capping) or when
noise, dropped neurons or several sources are asked for.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.arch import Role, detect_family, get_family
from moetool.arch.config_compat import v4_compatible
from moetool.arch.matcher import Classifier
from moetool.checkpoint import Checkpoint, TensorRef
from moetool.checkpoint.checkpoint import TORCH_DTYPES
from moetool.checkpoint.pieces import computed_piece, rows_piece, tensor_pieces
from moetool.checkpoint.writer import (
    OutputTensor,
    plan_shards,
    refuse_inside_source,
    side_files,
    write_checkpoint,
)
from moetool.errors import CheckpointFormatError, ConfigError, UnsupportedError, UsageError

log = logging.getLogger(__name__)

# dense source family -> (default target family, transformers class of the target)
# dense source family -> target families whose attention equals the source's (the first is the default)
TARGETS = {"llama": ("mixtral", "glm4_moe", "olmoe"), "mistral": ("mixtral", "glm4_moe", "olmoe"),
           "qwen2": ("qwen2_moe",),
           "qwen3": ("qwen3_moe",), "gemma": ("mixtral",), "gemma2": ("mixtral",), "gemma3": ("mixtral",)}
# What Mixtral cannot express of Gemma 2/3 (Gemma 1's (1 + w) norms, scaled embeddings and tied head
# are rewritten exactly): the reason the upcycled model's output differs.
INEXACT = {"gemma2": "Gemma 2 normalises around the MLP (pre/post feed-forward norms, dropped), soft-caps "
                     "attention and final logits and alternates sliding-window layers; Mixtral does none of "
                     "these, so the MoE's output differs from the dense model's",
           "gemma3": "Gemma 3 normalises around the MLP (pre/post feed-forward norms, dropped) and normalises "
                     "queries and keys (dropped), with its own sliding-window pattern; Mixtral does none of "
                     "these, so the MoE's output differs from the dense model's"}
GEMMA = ("gemma", "gemma2", "gemma3")
INEXACT_TARGETS = {"olmoe": "OLMoE normalises queries and keys (q_norm/k_norm, started at 1), which the dense "
                            "model does not, so the MoE's output differs from the dense model's"}
DENSE_MLP = (Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


@dataclass
class UpcycleOptions:
    experts: int = 8
    top_k: int = 2
    target: str | None = None           # target family; default by source family (TARGETS)
    router_init: str = "random"         # "random" | "zeros" | "hidden-kmeans" | "prompts"
    router_std: float = 0.02
    noise: float = 0.0                  # relative Gaussian noise on each expert copy
    drop_ratio: float = 0.0             # Drop-Upcycling: share of each expert's neurons re-initialised
    granularity: int = 1                # split each FFN into G segments: N*G experts, top-k K*G
    layers: list[int] | None = None     # MoE layers (None: all)
    seed: int = 0
    data: Path | None = None            # hidden-kmeans calibration text (default: the built-in corpus)
    max_tokens: int = 4096
    prompts: Path | None = None         # router-init prompts: JSON list, one list of prompts per expert
    average_shared: bool = False        # several sources: average their non-expert tensors
    shared_experts: int = 0             # Qwen2-MoE: a shared expert of S x FFN that starts as the dense MLP
    max_shard_size: int = 5_000_000_000
    command: str = ""


@dataclass
class UpcyclePlan:
    source: str
    source_family: str
    target_family: str
    experts: int
    top_k: int
    moe_layers: list[int]
    tensors: list[OutputTensor]
    config: dict[str, Any]
    files: list[Path]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        shards = plan_shards(self.tensors, 5_000_000_000)
        return {"source": self.source, "source_family": self.source_family, "target_family": self.target_family,
                "experts": self.experts, "top_k": self.top_k, "moe_layers": self.moe_layers,
                "tensors": len(self.tensors), "output_bytes": sum(s.nbytes for s in shards),
                "warnings": self.warnings, "files_copied": [f.name for f in self.files]}


def _generator(seed: int, *parts: int):
    import torch

    value = seed
    for part in parts:
        value = value * 1_000_003 + part
    return torch.Generator().manual_seed(value % (2**63))


def plan_upcycle(ckpt: Checkpoint, options: UpcycleOptions, others: list[Checkpoint] = ()) -> UpcyclePlan:
    """Plan the MoE checkpoint (reads headers only).

    Args:
        others: more dense models of the same architecture (Branch-Train-MiX): expert e takes its MLP
            from source e mod (1 + len(others)); attention, norms and embeddings come from CKPT, or
            are averaged over all sources with options.average_shared.
    """
    for src in (ckpt, *others):
        if src.kind == "gguf":
            raise UnsupportedError(f"{src.source}: upcycle reads safetensors and .bin checkpoints, not GGUF")
    source = detect_family(ckpt.config)
    if source is None or not source.dense:
        raise UsageError(f"{ckpt.source}: upcycle needs a dense model (Llama, Mistral, Qwen3); this is "
                         f"{source.title if source else 'an unknown architecture'}")
    allowed = TARGETS.get(source.name, ())
    target_name = options.target or (allowed[0] if allowed else None)
    if not allowed or target_name not in ARCHITECTURES:
        pairs = "; ".join(f"{name} -> {'/'.join(targets)}" for name, targets in TARGETS.items())
        raise UnsupportedError(f"upcycling {source.title} into {target_name or 'an MoE'} is not supported yet "
                               f"(supported: {pairs})")
    if target_name not in allowed:
        raise UnsupportedError(f"{source.title} upcycles into {'/'.join(allowed)}, whose attention matches its own")
    target = get_family(target_name)
    if options.experts < 1 or options.top_k < 1 or options.top_k > options.experts:
        raise UsageError("--top-k must be between 1 and --experts")
    if options.shared_experts and target.shared_ffn is None:
        raise UsageError(f"{target.title} has no shared experts (--shared-experts works for Qwen2-MoE and "
                         "GLM-4.5 / DeepSeek-V3-style targets)")
    if options.granularity < 1 or not 0 <= options.drop_ratio <= 1 or not 0 <= options.noise <= 1 \
            or not 0 <= options.router_std <= 1:
        raise UsageError("--granularity must be >= 1, --drop-ratio, --noise and --router-std in [0, 1]")
    config = json.loads(json.dumps(ckpt.config))
    layers, inter, hidden = (_positive(ckpt, config, key)
                             for key in ("num_hidden_layers", "intermediate_size", "hidden_size"))
    _refuse_inexact_attention(ckpt, config, source, target, layers)
    if inter % options.granularity:
        raise UsageError(f"--granularity {options.granularity} does not divide the FFN size {inter}")
    moe_layers = sorted(set(options.layers)) if options.layers is not None else list(range(layers))
    if not moe_layers:
        raise UsageError(f"--layers selects none of the {layers} layers: an MoE needs at least one MoE layer")
    if any(not 0 <= layer < layers for layer in moe_layers):
        raise UsageError(f"--layers must be between 0 and {layers - 1}")
    if target_name in ("mixtral", "olmoe") and len(moe_layers) != layers:
        raise UnsupportedError(f"{target.title} has no dense layers: every layer becomes MoE (drop --layers)")
    if target_name == "glm4_moe" and moe_layers != list(range(layers - len(moe_layers), layers)):
        raise UnsupportedError("GLM-4.5 keeps only its first layers dense: --layers must be the last layers")

    n = options.experts * options.granularity
    k = options.top_k * options.granularity
    seg = inter // options.granularity
    sources = [ckpt, *others]
    for other in others:
        if detect_family(other.config) is not source or set(other.tensors) != set(ckpt.tensors) or any(
                other.tensors[t].shape != ckpt.tensors[t].shape for t in ckpt.tensors):
            raise UsageError(f"{other.source}: not the same architecture and shapes as {ckpt.source}")
    classifier = Classifier(source)
    tensors: list[OutputTensor] = []
    dense = [_dense_mlp(src, source, classifier, layers, inter, hidden) for src in sources]
    gemma = source.name in GEMMA
    for name, ref in ckpt.tensors.items():
        m = classifier.classify(name)
        if m.role in DENSE_MLP and m.layer in moe_layers:
            continue
        if gemma:
            tensors.extend(_from_gemma(name, ref, m.role, config, target))
            continue
        if options.average_shared and others:
            refs = [src.tensors[name] for src in sources]
            tensors.append(OutputTensor(name, ref.dtype, ref.shape,
                                        [computed_piece(_average(refs), ref.shape, ref.dtype)], "averaged"))
        else:
            tensors.append(OutputTensor(name, ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "copied"))

    templates = target.templates("per-expert")

    def out_name(role: Role, layer: int, expert: int | None = None) -> str:
        tpl = templates[role]
        return tpl.replace("{L}", str(layer)).replace("{E}", str(expert))

    router_rows = (_router_rows(ckpt, source, options, moe_layers)
                   if options.router_init in ("hidden-kmeans", "prompts") else {})
    for layer in moe_layers:
        dtype = dense[0][layer][Role.DENSE_GATE].dtype
        for role, width in ((Role.Q_NORM, config["num_attention_heads"]), (Role.K_NORM, config["num_key_value_heads"])):
            if role in templates:   # OLMoE's query/key norms over the whole projection, started at 1
                size = width * config.get("head_dim", hidden // config["num_attention_heads"])
                tensors.append(OutputTensor(templates[role].replace("{L}", str(layer)), dtype, (size,),
                                            [computed_piece(_ones((size,), dtype), (size,), dtype)], "q/k norm"))
        if Role.ROUTER_CORRECTION in templates:   # DeepSeek-V3-style selection bias, zero at the start
            tensors.append(OutputTensor(templates[Role.ROUTER_CORRECTION].replace("{L}", str(layer)), "F32", (n,),
                                        [computed_piece(_zeros((n,), "F32"), (n,), "F32")],
                                        "router correction bias"))
        tensors.append(OutputTensor(out_name(Role.ROUTER, layer), dtype, (n, hidden),
                                    [computed_piece(_router(options, layer, n, hidden, dtype, router_rows.get(layer)),
                                               (n, hidden), dtype)],
                                    "router"))
        if target.shared_ffn is not None:
            tensors.extend(_shared_expert(target, options, layer, dense[0][layer], hidden, dtype))
        for e in range(n):
            g = e % options.granularity
            parts = dense[(e // options.granularity) % len(sources)][layer]
            gate, up, down = parts[Role.DENSE_GATE], parts[Role.DENSE_UP], parts[Role.DENSE_DOWN]
            segment = (g * seg, (g + 1) * seg)
            changed = options.noise > 0 or options.drop_ratio > 0
            for role, ref in ((Role.EXPERT_GATE, gate), (Role.EXPERT_UP, up)):
                piece = (computed_piece(_expert_part(options, ref, role, layer, e, segment, n), (seg, hidden), dtype)
                         if changed else rows_piece(ref, segment[0], segment[1], dtype))
                tensors.append(OutputTensor(out_name(role, layer, e), dtype, (seg, hidden), [piece], "expert"))
            # down: the segment's columns, times G so that the renormalised top-k*G sum is the dense MLP
            tensors.append(OutputTensor(out_name(Role.EXPERT_DOWN, layer, e), dtype, (hidden, seg), [computed_piece(
                _expert_part(options, down, Role.EXPERT_DOWN, layer, e, segment, n), (hidden, seg), dtype)],
                "expert"))
    for tensor in tensors:
        tensor.check()

    if gemma:   # Mixtral reads hidden_act; the embedding now carries its scale and the head is untied
        config["hidden_act"] = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        config["tie_word_embeddings"] = False
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types"):
            config.pop(key, None)
    config["model_type"] = target_name
    config["architectures"] = [ARCHITECTURES[target_name]]
    config["num_experts_per_tok"] = k
    if target_name == "mixtral":
        config.update(num_local_experts=n, intermediate_size=seg)
    elif target_name == "olmoe":
        config.update(num_experts=n, intermediate_size=seg, norm_topk_prob=True, clip_qkv=None)
    elif target_name == "glm4_moe":
        # DeepSeek-V3 routing (sigmoid, correction bias, shared experts) on the source's own attention
        config.update(n_routed_experts=n, moe_intermediate_size=seg, n_shared_experts=options.shared_experts
                      * options.granularity, first_k_dense_replace=layers - len(moe_layers), n_group=1, topk_group=1,
                      norm_topk_prob=True, routed_scaling_factor=1.0, partial_rotary_factor=1.0, use_qk_norm=False,
                      attention_bias=False, num_nextn_predict_layers=0)
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    else:
        config.update(num_experts=n, moe_intermediate_size=seg, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[i for i in range(layers) if i not in moe_layers])
    if target_name == "qwen2_moe":
        config["shared_expert_intermediate_size"] = options.shared_experts * inter
        # Qwen2-MoE derives its own (alternating) window pattern when layer_types is absent: give Qwen2's
        config["layer_types"] = ["sliding_attention" if sliding else "full_attention"
                                 for sliding in _sliding_layers(config, layers)]
    if source.name == "qwen3" and config.get("use_sliding_window") and not any(_sliding_layers(config, layers)):
        config["use_sliding_window"] = False   # no Qwen3 layer slides (max_window_layers); Qwen3-MoE would slide all
    config.setdefault("router_aux_loss_coef", 0.001)
    notes = v4_compatible(config, target)
    warnings = [w for w in (INEXACT.get(source.name), INEXACT_TARGETS.get(target_name)) if w]
    log.debug("config: %s", "; ".join(notes))
    window = config.get("sliding_window")
    if source.name == "mistral" and target_name == "glm4_moe" and window and window < config.get(
            "max_position_embeddings", math.inf):
        warnings.append(f"Mistral attends through a sliding window of {window} tokens, GLM-4.5 to the whole "
                        f"context: on sequences longer than {window} tokens the MoE's output differs")
    if others:
        warnings.append(f"{len(sources)} sources: experts come from different models, so the MoE equals none of them")
    if options.noise or options.drop_ratio:
        warnings.append("--noise/--drop-ratio: the experts differ from the dense MLP, so the MoE's output does too")
    files = side_files(ckpt)
    return UpcyclePlan(ckpt.source, source.name, target_name, n, k, moe_layers, tensors, config, files, warnings)


def _positive(ckpt: Checkpoint, config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{ckpt.source}: config.json has no {key} (a positive integer), which upcycle needs")
    return value


def _dense_mlp(ckpt: Checkpoint, family, classifier: Classifier, layers: int, inter: int,
               hidden: int) -> dict[int, dict[Role, TensorRef]]:
    """Every layer's dense gate/up/down, checked against the config: experts are byte ranges of
    these, so a tensor smaller than the config says would be read past its end."""
    found: dict[int, dict[Role, TensorRef]] = {layer: {} for layer in range(layers)}
    for name, ref in ckpt.tensors.items():
        m = classifier.classify(name)
        if m.role in DENSE_MLP and m.layer in found:
            want = (hidden, inter) if m.role == Role.DENSE_DOWN else (inter, hidden)
            if tuple(ref.shape) != want:
                raise CheckpointFormatError(f"{ckpt.source}: {name} is {list(ref.shape)}, but hidden_size {hidden} "
                                            f"and intermediate_size {inter} make it {list(want)}")
            found[m.layer][m.role] = ref
    for layer, parts in found.items():
        for role in DENSE_MLP:
            if role not in parts:
                name = family.templates(None)[role].replace("{L}", str(layer))
                raise CheckpointFormatError(f"{ckpt.source}: {name} is missing (layer {layer} of {layers})")
    return found


def _sliding_layers(config: dict, layers: int) -> list[bool]:
    """Which layers of a Qwen2/Qwen3 model attend through a sliding window, by transformers' rule:
    none without use_sliding_window, else layer_types, else the layers from max_window_layers on."""
    if not config.get("use_sliding_window") or config.get("sliding_window", 4096) is None:   # 4096: its default
        return [False] * layers
    types = config.get("layer_types") or ["sliding_attention" if i >= config.get("max_window_layers", 28)
                                          else "full_attention" for i in range(layers)]
    return [t == "sliding_attention" for t in types]


def _refuse_inexact_attention(ckpt: Checkpoint, config: dict, source, target, layers: int) -> None:
    """Refuse what the target's attention or MLP cannot hold: transformers would drop it on load,
    silently changing the model."""
    if config.get("mlp_bias"):
        raise UnsupportedError(f"{ckpt.source}: mlp_bias is set, and {target.title}'s experts have no biases")
    held = {"mixtral": "Mixtral's attention has no biases", "glm4_moe": "GLM-4.5 has no attention output bias"}
    if config.get("attention_bias") and target.name in held:
        hint = ("OLMoE's attention holds them (--family olmoe), though OLMoE is not exact either"
                if "olmoe" in TARGETS[source.name] else None)
        raise UnsupportedError(f"{ckpt.source}: attention_bias is set (biases on the q/k/v/o projections), and "
                               f"{held[target.name]}", hint=hint)
    sliding = _sliding_layers(config, layers) if source.name == "qwen3" else []
    if any(sliding) and not all(sliding):
        raise UnsupportedError(
            f"{ckpt.source}: Qwen3 applies its sliding window on layers {[i for i, s in enumerate(sliding) if s]} "
            "only (max_window_layers), Qwen3-MoE on every layer, so the MoE would differ from the dense model",
            hint="if no sequence exceeds sliding_window, set use_sliding_window to false in config.json first")


def _shared_expert(target, options: UpcycleOptions, layer: int, parts: dict[Role, TensorRef], hidden: int,
                   dtype: str) -> list[OutputTensor]:
    """The shared expert: S copies of the dense MLP side by side (down scaled by 1/S, so it computes
    the dense MLP) carrying half the output, the routed experts the other half: Qwen2-MoE's gate
    starts at sigmoid(0) = 1/2; an ungated shared expert (GLM-4.5, DeepSeek-V3) is scaled by 1/2
    itself. Zero-size when S = 0."""
    import torch

    templates = target.templates("per-expert")
    copies = options.shared_experts
    gated = Role.SHARED_ROUTER in templates
    scale = (1.0 if gated else 0.5) / copies if copies else 1.0
    out = []
    for role, dense_role in ((Role.SHARED_GATE, Role.DENSE_GATE), (Role.SHARED_UP, Role.DENSE_UP),
                             (Role.SHARED_DOWN, Role.DENSE_DOWN)):
        ref = parts[dense_role]
        shape = (hidden, ref.shape[1] * copies) if role == Role.SHARED_DOWN else (ref.shape[0] * copies, hidden)

        def compute(ref=ref, role=role):
            weight = ref.load().float()
            if role == Role.SHARED_DOWN:
                return torch.cat([weight * scale] * copies, dim=1).to(TORCH_DTYPES[dtype])
            return torch.cat([weight] * copies, dim=0).to(TORCH_DTYPES[dtype])

        pieces = [computed_piece(compute, shape, dtype)] if copies else []
        out.append(OutputTensor(templates[role].replace("{L}", str(layer)), dtype, shape, pieces, "shared expert"))
    if gated:
        gate_name = templates[Role.SHARED_ROUTER].replace("{L}", str(layer))
        out.append(OutputTensor(gate_name, dtype, (1, hidden), [computed_piece(
            _zeros((1, hidden), dtype), (1, hidden), dtype)], "shared expert gate"))
    return out


def _from_gemma(name: str, ref: TensorRef, role: Role, config: dict, target) -> list[OutputTensor]:
    """A Gemma tensor as Mixtral holds it: RMSNorm weights w -> 1 + w (Gemma scales by 1 + w), the
    embedding times sqrt(hidden) (Gemma scales its input embeddings) with the unscaled matrix as an
    untied lm_head; norms around the MLP and on queries/keys (Gemma 2/3) have no place and are dropped."""
    import torch

    tail = name.rsplit(".", 2)[-2] if "." in name else name
    if tail in ("pre_feedforward_layernorm", "post_feedforward_layernorm", "q_norm", "k_norm"):
        return []
    dtype = TORCH_DTYPES[ref.dtype]
    if role == Role.NORM:
        return [OutputTensor(name, ref.dtype, ref.shape, [computed_piece(
            lambda: (ref.load().float() + 1.0).to(dtype), ref.shape, ref.dtype)], "norm 1 + w")]
    if role == Role.EMBED:
        scale = config["hidden_size"] ** 0.5
        head = target.templates("per-expert")[Role.LM_HEAD]
        return [OutputTensor(name, ref.dtype, ref.shape, [computed_piece(
                    lambda: ref.load() * torch.tensor(scale, dtype=dtype), ref.shape, ref.dtype)], "scaled embedding"),
                OutputTensor(head, ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "untied lm_head")]
    return [OutputTensor(name, ref.dtype, ref.shape, tensor_pieces(ref, ref.dtype), "copied")]


def _ones(shape: tuple[int, ...], dtype: str):
    def compute():
        import torch

        return torch.ones(shape, dtype=TORCH_DTYPES[dtype])

    return compute


def _zeros(shape: tuple[int, ...], dtype: str):
    def compute():
        import torch

        return torch.zeros(shape, dtype=TORCH_DTYPES[dtype])

    return compute


def _average(refs: list[TensorRef]):
    def compute():

        return (sum(r.load().float() for r in refs) / len(refs)).to(TORCH_DTYPES[refs[0].dtype])

    return compute


def _router(options: UpcycleOptions, layer: int, n: int, hidden: int, dtype: str, rows=None):
    def compute():
        import torch

        if options.router_init == "zeros":
            return torch.zeros(n, hidden, dtype=TORCH_DTYPES[dtype])
        if rows is not None:
            base = rows
        else:
            base = torch.randn(options.experts, hidden, generator=_generator(options.seed, layer)) * options.router_std
        # the G segments of one original expert share its row: they are chosen together
        return base.repeat_interleave(options.granularity, dim=0).to(TORCH_DTYPES[dtype])

    if options.router_init not in ("random", "zeros", "hidden-kmeans", "prompts"):
        raise UsageError(f"--router-init {options.router_init}: use random, zeros, hidden-kmeans or prompts")
    return compute


def _mlp_inputs(ckpt: Checkpoint, family, layers: list[int], batches) -> dict[int, list]:
    """The input of each listed layer's MLP (what the router will see), per batch of token ids."""
    import torch

    from moetool.runner.device import pick_device
    from moetool.runner.model import load_model

    loaded = load_model(ckpt, device=pick_device(None), dtype=torch.float32, mode="auto")
    seen: dict[int, list] = {layer: [] for layer in layers}
    handles = [loaded.model.get_submodule(family.mlp_module.replace("{L}", str(layer))).register_forward_pre_hook(
        lambda module, args, layer=layer: seen[layer].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu()))
        for layer in layers]
    try:
        with torch.no_grad():
            for ids in batches:
                loaded.base_forward(ids.to(loaded.device))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _balanced_assign(similarity, capacity: int):
    """Each point to its most similar cluster that still has room (points most sure of their
    cluster first): clusters of equal size, so that the experts start equally loaded."""
    import torch

    order = torch.argsort(similarity.max(dim=1).values, descending=True).tolist()
    preference = torch.argsort(similarity, dim=1, descending=True).tolist()
    room = [capacity] * similarity.shape[1]
    assigned = [0] * similarity.shape[0]
    for point in order:
        for cluster in preference[point]:
            if room[cluster]:
                room[cluster] -= 1
                assigned[point] = cluster
                break
    return torch.tensor(assigned)


def _kmeans(points, k: int, seed: int, iterations: int = 20):
    """Balanced spherical k-means on unit rows of POINTS (k-means++ start); returns k centroids."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randint(0, points.shape[0], (1,), generator=gen)]
    while centroids.shape[0] < k:
        distance = (1 - (points @ centroids.T).max(dim=1).values).clamp_min(0)
        weights = distance / distance.sum() if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, points[torch.multinomial(weights, 1, generator=gen)]])
    capacity = -(-points.shape[0] // k)
    for _ in range(iterations):
        assigned = _balanced_assign(points @ centroids.T, capacity)
        for c in range(k):
            members = points[assigned == c]
            if len(members):
                mean = members.mean(dim=0)
                centroids[c] = mean / mean.norm().clamp_min(1e-12)
    return centroids


def _prompt_ids(ckpt: Checkpoint, options: UpcycleOptions) -> list[list[list[int]]]:
    """The token ids of each prompt of --prompts (a JSON list of one list of prompts per expert), each checked:
    a text that is not blank and gives at least one token id inside the model's vocabulary."""

    where = options.prompts
    try:
        groups = json.loads(Path(where).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        groups = None
    if not (isinstance(groups, list) and all(isinstance(g, list) and g for g in groups)):
        raise UsageError(f"{where}: not a JSON list of non-empty prompt lists (one list of texts per expert)")
    if len(groups) != options.experts:
        raise UsageError(f"{where}: {len(groups)} prompt lists for {options.experts} experts")
    for e, group in enumerate(groups, 1):
        for n, prompt in enumerate(group, 1):
            if not isinstance(prompt, str) or not prompt.strip():
                raise UsageError(f"{where}: list {e}, prompt {n} is {json.dumps(prompt)[:40]}: each prompt must be "
                                 "a text that is not blank")
    vocab = (ckpt.config or {}).get("vocab_size")
    out = []
    for e, group in enumerate(groups, 1):
        out.append([])
        for n, prompt in enumerate(group, 1):
            ids = _tokenized([prompt], ckpt)
            if not ids:
                raise UsageError(f"{where}: list {e}, prompt {n} gives no tokens with the model's tokenizer")
            if isinstance(vocab, int) and max(ids) >= vocab:
                raise UsageError(f"{where}: list {e}, prompt {n} gives token id {max(ids)}, outside the model's "
                                 f"vocabulary of {vocab}")
            out[-1].append(ids)
    return out


def _router_rows(ckpt: Checkpoint, family, options: UpcycleOptions, layers: list[int]) -> dict[int, object]:
    """Router rows from hidden states: k-means centroids of the MLP inputs of calibration text
    (hidden-kmeans), or each expert's mean MLP input over its prompts (prompts, as mergekit-moe)."""
    import torch

    from moetool.runner import data

    if options.router_init == "prompts":
        if options.prompts is None:
            raise UsageError("--router-init prompts needs --prompts FILE (a JSON list of prompt lists, one per expert)")
        per_expert = [[torch.tensor([ids]) for ids in group] for group in _prompt_ids(ckpt, options)]
        rows = {layer: [] for layer in layers}
        for prompts in per_expert:
            seen = _mlp_inputs(ckpt, family, layers, prompts)
            for layer in layers:
                rows[layer].append(torch.cat(seen[layer]).mean(dim=0))
        means = {layer: torch.stack(r) for layer, r in rows.items()}
    else:
        texts = data.read_texts(options.data or Path("builtin"))
        ids = data.pack(_tokenized(texts, ckpt), seq_len=256, max_tokens=options.max_tokens,
                        vocab_size=(ckpt.config or {}).get("vocab_size"),
                        max_positions=(ckpt.config or {}).get("max_position_embeddings"))
        seen = _mlp_inputs(ckpt, family, layers, ids.split(8))
        means = {}
        for layer in layers:
            # Spherical k-means on the centred hidden states, then rows orthogonal to the mean state:
            # a router has no bias, so the mean (shared by every token) must not favour any expert.
            points = torch.cat(seen[layer])
            mu = points.mean(dim=0)
            centred = points - mu
            centroids = _kmeans(centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12), options.experts,
                                options.seed + layer)
            unit_mu = mu / mu.norm().clamp_min(1e-12)
            means[layer] = centroids - (centroids @ unit_mu)[:, None] * unit_mu
    # unit rows scaled to the norm a random row of --router-std would have
    scale = options.router_std * math.sqrt(next(iter(means.values())).shape[1])
    return {layer: m / m.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale for layer, m in means.items()}


def _expert_part(options: UpcycleOptions, ref: TensorRef, role: Role, layer: int, expert: int,
                 rows: tuple[int, int], n: int):
    """One expert's slice of a dense MLP matrix, with noise and dropped neurons applied."""
    def compute():
        import torch

        weight = ref.load().float()
        part = weight[:, rows[0]:rows[1]] if role == Role.EXPERT_DOWN else weight[rows[0]:rows[1]]
        part = part.clone()
        gen = _generator(options.seed, layer, expert, int(role == Role.EXPERT_DOWN) + 2 * int(role == Role.EXPERT_UP))
        if options.noise > 0:
            part += torch.randn(part.shape, generator=gen) * options.noise * weight.std()
        if options.drop_ratio > 0:
            neurons = part.shape[1] if role == Role.EXPERT_DOWN else part.shape[0]
            count = round(options.drop_ratio * neurons)
            chosen = torch.randperm(neurons, generator=_generator(options.seed, layer, expert, 7))[:count]
            fresh = torch.randn(part.shape, generator=gen) * weight.std() + weight.mean()
            if role == Role.EXPERT_DOWN:
                part[:, chosen] = fresh[:, chosen]
            else:
                part[chosen] = fresh[chosen]
        if role == Role.EXPERT_DOWN:
            # G segments sum to the MLP; with a shared expert gated by sigmoid(0) = 1/2 carrying the
            # other half, the routed experts carry half
            part *= options.granularity * (0.5 if options.shared_experts else 1.0)
        return part.to(TORCH_DTYPES[ref.dtype]).contiguous()

    return compute


def upcycle(ckpt: Checkpoint, out: Path, options: UpcycleOptions, *, force: bool = False, progress=None,
            others: list[Checkpoint] = ()) -> dict[str, Any]:
    """Write the upcycled checkpoint into OUT (atomically); return the plan summary and timing."""
    out = Path(out)
    refuse_inside_source(out, ckpt, *others)
    plan = plan_upcycle(ckpt, options, others)
    start = time.perf_counter()
    readme = (f"---\nbase_model: {plan.source}\ntags:\n- moetool\n- mixture-of-experts\n- upcycled\n---\n\n"
              f"# {out.name}\n\nUpcycled from `{plan.source}` by moetool {__version__}:\n\n"
              f"```\n{options.command or 'moetool upcycle'}\n```\n\n- {plan.target_family}: {plan.experts} "
              f"experts, top-{plan.top_k}, MoE layers {plan.moe_layers}\n")
    write_checkpoint(out, plan_shards(plan.tensors, options.max_shard_size), op="upcycle", config=plan.config,
                     files=plan.files, readme=readme, force=force, progress=progress)
    return {**plan.summary(), "out": str(out), "seconds": round(time.perf_counter() - start, 3)}


def _tokenized(texts: list[str], ckpt: Checkpoint) -> list[int]:
    """TEXTS tokenized with the dense model's own tokenizer; without one, an error saying what
    upcycle can do instead (it takes no token ids)."""
    from moetool.runner import data

    try:
        return data.tokenize(texts, ckpt.root)
    except data.DataError as exc:
        raise data.DataError(str(exc), hint="--router-init hidden-kmeans and prompts tokenize text with the dense "
                             "model's tokenizer: add its tokenizer files to the folder, or use --router-init "
                             "random") from None
