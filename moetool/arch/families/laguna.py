"""Poolside Laguna ("laguna"): Qwen-style experts, DeepSeek-style shared experts, a sigmoid router with a
selection-only correction bias (a frozen parameter) and weights always renormalised, the routed output x
moe_routed_scaling_factor; router logits tanh-softcapped when moe_router_logit_softcapping > 0; MoE layers by
mlp_layer_types (default: all but the first). The hub stores the bias as mlp.experts.e_score_correction_bias and
the shared expert as mlp.shared_expert (singular)."""

from moetool.arch.families._shared import (
    DEEPSEEK_SHARED,
    DENSE_MLP,
    EMBED_AND_HEAD,
    QWEN_EXPERTS,
    QWEN_FUSED,
    keys,
    mlp_layer_types,
)
from moetool.arch.schema import Family, Role, Router

MLP = "model.layers.{L}.mlp"
FAMILY = Family(
    name="laguna",
    model_types=("laguna",),
    title="Laguna",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="moe_routed_scaling_factor",
                  method_key=None, config_defaults=(("moe_routed_scaling_factor", 1.0),),
                  notes="logits tanh-softcapped by moe_router_logit_softcapping when > 0; no groups"),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",), expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, Role.ROUTER: f"{MLP}.gate.weight"},
    per_expert={**QWEN_EXPERTS, Role.ROUTER_CORRECTION: f"{MLP}.experts.e_score_correction_bias",
                Role.SHARED_GATE: f"{MLP}.shared_expert.gate_proj.weight",
                Role.SHARED_UP: f"{MLP}.shared_expert.up_proj.weight",
                Role.SHARED_DOWN: f"{MLP}.shared_expert.down_proj.weight"},
    fused={**QWEN_FUSED, **DEEPSEEK_SHARED, Role.ROUTER_CORRECTION: f"{MLP}.gate.e_score_correction_bias"},
    is_moe_layer=mlp_layer_types(1),   # mlp_layer_types, else all but the first (LagunaConfig's default)
    shared_ffn=lambda cfg: cfg.get("shared_expert_intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    defaults=(("shared_expert_intermediate_size", 512),),   # LagunaConfig's
    notes="sigmoid-gated (softplus) attention output; sliding and full attention per layer_types; attention "
          "heads per layer (num_attention_heads_per_layer)",
)
