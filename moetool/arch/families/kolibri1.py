"""Kolibri-1 ("kolibri1"): Qwen-style experts in every layer, DeepSeek-style shared experts
(shared_expert_intermediate_size), a router in fp32 that picks the top-k of logits + a correction bias (an fp32
buffer) and weights them by the sigmoid of the chosen logits, renormalised by norm_topk_prob (default off). The
hub names the bias moe.router.expert_bias and the post-norms post_attn_norm / post_ffn_norm."""

from moetool.arch.families._shared import (
                                           DEEPSEEK_SHARED,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           every_layer,
                                           keys,
                                           one_if,
                                           qwen_shared_ffn,
)
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="kolibri1",
    model_types=("kolibri1",),
    title="Kolibri-1",
    router=Router("sigmoid", renormalize="norm_topk_prob", correction_bias=True, method_key=None,
                  config_defaults=(("norm_topk_prob", False),),
                  notes="experts chosen by the top-k of logits + correction bias (the bias on the logits, not "
                        "on sigmoid scores); weights the sigmoid of the chosen logits; no groups, no scaling"),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **ROUTER_MLP_GATE, **DEEPSEEK_SHARED},
    per_expert={**QWEN_EXPERTS, Role.ROUTER_CORRECTION: "model.layers.{L}.moe.router.expert_bias"},
    fused={**QWEN_FUSED, Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    is_moe_layer=every_layer,
    shared_ffn=qwen_shared_ffn,
    num_shared=one_if(qwen_shared_ffn),
    defaults=(("shared_expert_intermediate_size", 512),),   # Kolibri1Config's
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),   # _keep_in_fp32_modules_strict
    renames=((".post_attn_norm.", ".post_self_attn_layernorm."), (".post_ffn_norm.", ".post_mlp_layernorm.")),
    notes="every layer MoE; sliding and full attention per layer_types; post-attention and post-MLP norms",
)
