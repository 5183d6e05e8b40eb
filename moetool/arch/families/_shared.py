"""Pieces several family files share: config keys, templates, MoE-layer rules, routers."""

from __future__ import annotations

from collections.abc import Callable

from moetool.arch.schema import Config, Role, Router, get_path

BASE_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers",),
    "hidden": ("hidden_size",),
    "vocab": ("vocab_size",),
    "tie": ("tie_word_embeddings",),
    "dense_ffn": ("intermediate_size",),
}


def keys(**overrides: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {**BASE_KEYS, **overrides}


EMBED_AND_HEAD = {Role.EMBED: "model.embed_tokens.weight", Role.LM_HEAD: "lm_head.weight"}

# Llama-style dense MLP, used by dense layers of MoE models and by dense sources.
DENSE_MLP = {
    Role.DENSE_GATE: "model.layers.{L}.mlp.gate_proj.weight",
    Role.DENSE_UP: "model.layers.{L}.mlp.up_proj.weight",
    Role.DENSE_DOWN: "model.layers.{L}.mlp.down_proj.weight",
}

# Qwen2-MoE pattern (also Qwen3, DeepSeek, GLM, dots1, OLMoE, ERNIE, Hunyuan experts).
QWEN_EXPERTS = {
    Role.EXPERT_GATE: "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
    Role.EXPERT_UP: "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
    Role.EXPERT_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
}
QWEN_FUSED = {
    Role.EXPERT_GATE_UP: "model.layers.{L}.mlp.experts.gate_up_proj",
    Role.EXPERT_DOWN: "model.layers.{L}.mlp.experts.down_proj",
}
ROUTER_MLP_GATE = {Role.ROUTER: "model.layers.{L}.mlp.gate.weight"}

# Mixtral pattern (also MiniMax, PhiMoE on disk).
MIXTRAL_EXPERTS = {
    Role.ROUTER: "model.layers.{L}.block_sparse_moe.gate.weight",
    Role.EXPERT_GATE: "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    Role.EXPERT_UP: "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    Role.EXPERT_DOWN: "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
}

# DeepSeek-style shared experts ("shared_experts", plural).
DEEPSEEK_SHARED = {
    Role.SHARED_GATE: "model.layers.{L}.mlp.shared_experts.gate_proj.weight",
    Role.SHARED_UP: "model.layers.{L}.mlp.shared_experts.up_proj.weight",
    Role.SHARED_DOWN: "model.layers.{L}.mlp.shared_experts.down_proj.weight",
}
# Qwen2-MoE-style shared expert (singular) with its sigmoid gate.
QWEN_SHARED = {
    Role.SHARED_GATE: "model.layers.{L}.mlp.shared_expert.gate_proj.weight",
    Role.SHARED_UP: "model.layers.{L}.mlp.shared_expert.up_proj.weight",
    Role.SHARED_DOWN: "model.layers.{L}.mlp.shared_expert.down_proj.weight",
    Role.SHARED_ROUTER: "model.layers.{L}.mlp.shared_expert_gate.weight",
}


def every_layer(cfg: Config, layer: int) -> bool:
    return True


def qwen_moe_layer(cfg: Config, layer: int) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: MoE unless listed in mlp_only_layers, every decoder_sparse_step."""
    step = cfg.get("decoder_sparse_step") or 1
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 1)) or 0
    return layer not in (cfg.get("mlp_only_layers") or []) and experts > 0 and (layer + 1) % step == 0


def first_k_dense(cfg: Config, layer: int) -> bool:
    """DeepSeek-V2/V3, GLM-4.5, dots1: the first first_k_dense_replace layers are dense."""
    return layer >= (cfg.get("first_k_dense_replace") or 0)


def deepseek_shared_ffn(cfg: Config) -> int:
    return (cfg.get("moe_intermediate_size") or 0) * (cfg.get("n_shared_experts") or 0)


def deepseek_num_shared(cfg: Config) -> int:
    return cfg.get("n_shared_experts") or 0


def qwen_shared_ffn(cfg: Config) -> int:
    return cfg.get("shared_expert_intermediate_size") or 0


def one_if(size_fn):
    """Number of shared experts: one when its size is non-zero."""
    return lambda cfg: 1 if size_fn(cfg) else 0


SOFTMAX_TOPK_RENORM = Router("softmax", renormalize=True)
SOFTMAX_TOPK_NORM_KEY = Router("softmax", renormalize="norm_topk_prob")
# transformers' DeepSeek-V3 router (GLM-4.5 and dots1 too) always selects within the best topk_group of
# n_group groups: it has no topk_method (a config's is ignored)
DEEPSEEK_V3_ROUTER = Router("sigmoid", renormalize="norm_topk_prob", correction_bias=True,
                            group_limited=True, scaling_key="routed_scaling_factor",
                            notes="groups ranked by the sum of their top-2 biased scores", method_key=None,
                            config_defaults=(("n_group", 8), ("topk_group", 4), ("norm_topk_prob", True),
                                             ("routed_scaling_factor", 2.5)))


def nested(cfg: Config, path: str, default=None):
    value = get_path(cfg, path)
    return default if value is None else value


def dense_family(*, name: str, title: str, model_types: tuple[str, ...], **extra):
    """A dense upcycling source: one Llama-style MLP per layer, no experts."""
    from moetool.arch.schema import Family

    return Family(name=name, model_types=model_types, title=title, router=None, keys=keys(),
                  common={**EMBED_AND_HEAD, **DENSE_MLP}, per_expert=None, fused=None,
                  is_moe_layer=lambda cfg, layer: False, dense=True, router_module=None, router_output=None,
                  experts_module=None, mlp_module="model.layers.{L}.mlp", **extra)


def mlp_layer_types(first_dense: int | Callable[[Config, int], bool]):
    """MoE layers as transformers reads mlp_layer_types ("sparse" / "dense" per layer); without it, as
    the config class builds it: the first FIRST_DENSE layers dense, the rest sparse (or FIRST_DENSE's
    rule, e.g. first_k_dense, where the config's first_k_dense_replace decides)."""
    fallback = first_dense if callable(first_dense) else lambda cfg, layer: layer >= first_dense

    def is_moe(cfg: Config, layer: int) -> bool:
        types = cfg.get("mlp_layer_types")
        if isinstance(types, list) and layer < len(types):
            return types[layer] == "sparse"
        return fallback(cfg, layer)
    return is_moe


TEXT_MODEL = "model.language_model."   # where a multimodal wrapper built whole holds its text model


def _under(template, prefix: str):
    if template is None:
        return None
    if isinstance(template, tuple):
        return tuple(_under(t, prefix) for t in template)
    return prefix + template[len("model."):] if template.startswith("model.") else template


def in_wrapper(family, prefix: str = TEXT_MODEL, **changes):
    """FAMILY as the text model inside a multimodal wrapper that transformers builds whole (its
    ForConditionalGeneration: Qwen3-VL-MoE, GLM-4.5V): every template under "model." moved under
    PREFIX, where both the hub checkpoint and the built model hold the text model; the lm_head stays."""
    from dataclasses import replace

    def moved(templates):
        return None if templates is None else {role: _under(t, prefix) for role, t in templates.items()}

    family = replace(family, **changes)
    return replace(family, common=moved(family.common), per_expert=moved(family.per_expert),
                   fused=moved(family.fused), router_module=_under(family.router_module, prefix),
                   experts_module=_under(family.experts_module, prefix),
                   experts_output_module=_under(family.experts_output_module, prefix), config_root="text_config")
