"""Cohere Command A MoE ("cohere2_moe"): Qwen-style experts and router names, DeepSeek-style shared
experts averaged with (not added to) the routed output, a parallel attention/MLP block, leading dense
layers of their own FFN size."""

from moetool.arch.families._shared import (
                                           DEEPSEEK_SHARED,
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           keys,
)
from moetool.arch.schema import Config, Family, Router


def cohere2_moe_layer(cfg: Config, layer: int) -> bool:
    """MoE where mlp_layer_types says "sparse" (the config class derives it from first_k_dense_replace)."""
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] != "dense"
    return layer >= (cfg.get("first_k_dense_replace") or 0)


def cohere2_moe_shared_ffn(cfg: Config) -> int:
    return (cfg.get("intermediate_size") or 0) * (cfg.get("num_shared_experts") or 0)


FAMILY = Family(
    name="cohere2_moe",
    model_types=("cohere2_moe",),
    title="Cohere Command A MoE",
    # expert_selection_fn "softmax" (the default): softmax over the top-k logits; "sigmoid": sigmoid of the
    # top-k logits, divided by their sum iff norm_topk_prob
    router=Router("softmax over top-k logits", renormalize=False, selection_key="expert_selection_fn",
                  selections=(("sigmoid", "sigmoid of the top-k logits", "norm_topk_prob"),),
                  config_defaults=(("expert_selection_fn", "softmax"), ("norm_topk_prob", True))),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",), dense_ffn=("prefix_dense_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE, **DEEPSEEK_SHARED},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=cohere2_moe_layer,
    shared_ffn=cohere2_moe_shared_ffn,
    num_shared=lambda cfg: cfg.get("num_shared_experts") or 0,
    notes="shared experts are combined per shared_expert_combination_strategy (\"average\": (routed + "
          "shared) / 2); parallel attention and MLP; logits x logit_scale",
)
