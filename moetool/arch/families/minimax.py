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
    name="minimax",
    model_types=("minimax",),
    title="MiniMax-Text-01",
    router=SOFTMAX_TOPK_RENORM,
    keys=keys(num_experts=("num_local_experts", "num_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common=EMBED_AND_HEAD,
    per_expert=MIXTRAL_EXPERTS,
    fused={**ROUTER_MLP_GATE, **QWEN_FUSED},
    buffer_suffixes=("self_attn.slope_rate", "self_attn.query_decay", "self_attn.key_decay",
                     "self_attn.diagonal_decay"),
    notes="hybrid lightning (linear) and softmax attention layers",
)
