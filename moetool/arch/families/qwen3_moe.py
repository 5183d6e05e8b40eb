from moetool.arch.families._shared import (
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           SOFTMAX_TOPK_NORM_KEY,
                                           keys,
                                           qwen_moe_layer,
)
from moetool.arch.schema import Family

FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    title="Qwen3-MoE",
    router=SOFTMAX_TOPK_NORM_KEY,
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=qwen_moe_layer,
)
