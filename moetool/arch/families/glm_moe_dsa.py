"""GLM-5 ("glm_moe_dsa"): DeepSeek-V3.2's model (MLA with the DSA lightning indexer, whose top-k some
layers share) and DeepSeek-V3's tensor names, router and shared experts; dense layers by mlp_layer_types."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Config


def mlp_layer_types_or_first_k(cfg: Config, layer: int) -> bool:
    """As transformers: mlp_layer_types[layer] == "sparse"; without it, the first first_k_dense_replace
    layers are dense (GlmMoeDsaConfig's default 3, in `defaults`)."""
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "sparse"
    return layer >= (cfg.get("first_k_dense_replace") or 0)


FAMILY = replace(DEEPSEEK_V3, name="glm_moe_dsa", model_types=("glm_moe_dsa",), title="GLM-5 (MoE, DSA)",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(   # GlmMoeDsaConfig's
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5))),
                 is_moe_layer=mlp_layer_types_or_first_k,
                 defaults=(("n_shared_experts", 1), ("first_k_dense_replace", 3)),
                 notes="MLA with DeepSeek sparse attention (indexer); MoE layers by mlp_layer_types; layers past "
                       "num_hidden_layers are MTP modules")
