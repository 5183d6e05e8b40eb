"""Qwen3.5 MoE (text): Qwen2-MoE's expert, router and shared-expert names; every layer MoE; hybrid
gated-DeltaNet and full attention; MTP. The hub's vision-language wrapper (model_type qwen3_5_moe) keeps
the text model's config in text_config and its tensors under model.language_model."""

from moetool.arch.families._shared import (
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           QWEN_SHARED,
                                           ROUTER_MLP_GATE,
                                           SOFTMAX_TOPK_RENORM,
                                           every_layer,
                                           keys,
                                           one_if,
                                           qwen_shared_ffn,
)
from moetool.arch.schema import Family

FAMILY = Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe_text", "qwen3_5_moe"),
    title="Qwen3.5 MoE (text)",
    router=SOFTMAX_TOPK_RENORM,
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **ROUTER_MLP_GATE, **QWEN_SHARED},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=every_layer,
    shared_ffn=qwen_shared_ffn,
    num_shared=one_if(qwen_shared_ffn),
    config_root="text_config",
    defaults=(("shared_expert_intermediate_size", 512),),   # Qwen3_5MoeTextConfig's
    name_prefixes=(("model.language_model.", "model."),),
    mtp=True,
    notes="every layer MoE, weights always renormalised; shared expert output scaled by "
          "sigmoid(shared_expert_gate(x)); hybrid gated-DeltaNet (linear) and full attention; mtp.* tensors "
          "are ignored by transformers; vision tensors (model.visual.*) of the wrapper are not the text model's",
)
