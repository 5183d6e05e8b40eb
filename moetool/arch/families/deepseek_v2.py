from moetool.arch.families._shared import (
                                           DEEPSEEK_SHARED,
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           deepseek_num_shared,
                                           deepseek_shared_ffn,
                                           first_k_dense,
                                           keys,
)
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    title="DeepSeek-V2",
    router=Router("softmax", renormalize=False, group_limited=True, scaling_key="routed_scaling_factor",
                  notes="greedy, or group-limited (groups ranked by their best expert) when "
                        "topk_method is group_limited_greedy; transformers never renormalises",
                  config_defaults=(("topk_method", "greedy"),), group_score_experts=1),
    keys=keys(num_experts=("n_routed_experts", "num_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE, **DEEPSEEK_SHARED},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=first_k_dense,
    shared_ffn=deepseek_shared_ffn,
    num_shared=deepseek_num_shared,
    fp32_roles=frozenset({Role.ROUTER}),   # transformers: _keep_in_fp32_modules_strict = ["gate.weight"]
    notes="multi-head latent attention (MLA)",
)
