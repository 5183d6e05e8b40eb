from moetool.arch.families._shared import (
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           QWEN_SHARED,
                                           ROUTER_MLP_GATE,
                                           SOFTMAX_TOPK_NORM_KEY,
                                           keys,
                                           one_if,
                                           qwen_moe_layer,
                                           qwen_shared_ffn,
)
from moetool.arch.schema import Family

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    title="Qwen2-MoE / Qwen1.5-MoE",
    router=SOFTMAX_TOPK_NORM_KEY,
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE, **QWEN_SHARED},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=qwen_moe_layer,
    shared_ffn=qwen_shared_ffn,
    num_shared=one_if(qwen_shared_ffn),
    notes="shared expert output is scaled by sigmoid(shared_expert_gate(x))",
)
