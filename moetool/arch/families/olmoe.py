from moetool.arch.families._shared import (
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           SOFTMAX_TOPK_NORM_KEY,
                                           keys,
)
from moetool.arch.schema import Family, Role

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe", "flex_olmo"),
    title="OLMoE",
    router=SOFTMAX_TOPK_NORM_KEY,
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common={**EMBED_AND_HEAD, **ROUTER_MLP_GATE,
            Role.Q_NORM: "model.layers.{L}.self_attn.q_norm.weight",
            Role.K_NORM: "model.layers.{L}.self_attn.k_norm.weight"},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
)
