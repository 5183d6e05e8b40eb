from moetool.arch.families._shared import (
                                           EMBED_AND_HEAD,
                                           MIXTRAL_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           SOFTMAX_TOPK_RENORM,
                                           keys,
)
from moetool.arch.schema import Family

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    title="Mixtral",
    router=SOFTMAX_TOPK_RENORM,
    keys=keys(num_experts=("num_local_experts", "num_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common=EMBED_AND_HEAD,
    per_expert=MIXTRAL_EXPERTS,
    fused={**ROUTER_MLP_GATE, **QWEN_FUSED},
)
