"""Flint ("flint", RecursiveSI): Qwen3-MoE's names and layer rule (mlp_only_layers, default the first
two) with a sigmoid router (no bias; weights renormalised by norm_topk_prob) in fp32, and a Qwen2-MoE
shared expert added in full (no shared_expert_gate); attention with per-head sinks, which the hub calls
self_attn.softmax_offset."""

from moetool.arch.families._shared import (
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           QWEN_SHARED,
                                           ROUTER_MLP_GATE,
                                           keys,
                                           one_if,
                                           qwen_moe_layer,
                                           qwen_shared_ffn,
)
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="flint",
    model_types=("flint",),
    title="Flint",
    router=Router("sigmoid", renormalize="norm_topk_prob", config_defaults=(("norm_topk_prob", True),),
                  notes="top-k on sigmoid scores, no correction bias; router in fp32"),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE,
            **{role: t for role, t in QWEN_SHARED.items() if role is not Role.SHARED_ROUTER}},
    per_expert={**QWEN_EXPERTS, Role.ATTN_SINK: "model.layers.{L}.self_attn.softmax_offset"},
    fused={**QWEN_FUSED, Role.ATTN_SINK: "model.layers.{L}.self_attn.sinks"},
    is_moe_layer=qwen_moe_layer,
    shared_ffn=qwen_shared_ffn,
    num_shared=one_if(qwen_shared_ffn),
    defaults=(("mlp_only_layers", [0, 1]), ("shared_expert_intermediate_size", 1024)),   # FlintConfig's
    fp32_roles=frozenset({Role.ROUTER, Role.ATTN_SINK}),   # _keep_in_fp32_modules_strict
    notes="attention sinks (hub: softmax_offset); sliding and full attention per layer_types",
)
