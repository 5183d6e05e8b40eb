"""Tencent Hy3 ("hy_v3", Hy3-preview): MiniMax-M2's router (sigmoid top-k on scores + a selection-only
correction bias, weights renormalised) scaled by router_scaling_factor, DeepSeek-style shared experts and
dense layers by mlp_layer_types. The hub names the router mlp.router.gate, the bias mlp.expert_bias and the
shared experts mlp.shared_mlp; transformers renames them on load (its conversion mapping)."""

from moetool.arch.families._shared import (
                                           DEEPSEEK_SHARED,
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           keys,
                                           mlp_layer_types,
)
from moetool.arch.schema import Family, Role, Router

HUB_SHARED = {role: t.replace(".shared_experts.", ".shared_mlp.") for role, t in DEEPSEEK_SHARED.items()}

FAMILY = Family(
    name="hy_v3",
    model_types=("hy_v3",),
    title="Tencent Hy3",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="router_scaling_factor",
                  method_key=None, config_defaults=(("router_scaling_factor", 2.826),),
                  notes="top-k on sigmoid + correction bias; weights renormalised (+1e-20), then x "
                        "router_scaling_factor; router in fp32"),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP},
    per_expert={**QWEN_EXPERTS, **HUB_SHARED,
                Role.ROUTER: "model.layers.{L}.mlp.router.gate.weight",
                Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.expert_bias"},
    fused={**QWEN_FUSED, **DEEPSEEK_SHARED, **ROUTER_MLP_GATE,
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.e_score_correction_bias"},
    is_moe_layer=mlp_layer_types(first_dense=1),
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * (cfg.get("num_shared_experts") or 0),
    num_shared=lambda cfg: cfg.get("num_shared_experts") or 0,
    defaults=(("num_shared_experts", 1),),   # HYV3Config's
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),
    mtp=True,
    notes="shared experts added in fp32 (enable_moe_fp32_combine); q/k norms; layers past num_hidden_layers "
          "are MTP modules",
)
