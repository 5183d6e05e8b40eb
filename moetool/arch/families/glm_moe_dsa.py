"""GLM-5 ("glm_moe_dsa"): DeepSeek-V3.2's model (MLA with the DSA lightning indexer, whose top-k some
layers share) and DeepSeek-V3's tensor names, router and shared experts; dense layers by mlp_layer_types."""

from dataclasses import replace

from moetool.arch.families._shared import first_k_dense, mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(DEEPSEEK_V3, name="glm_moe_dsa", model_types=("glm_moe_dsa",), title="GLM-5 (MoE, DSA)",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(   # GlmMoeDsaConfig's
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5))),
                 is_moe_layer=mlp_layer_types(first_k_dense),   # 3 dense layers by default
                 defaults=(("n_shared_experts", 1), ("first_k_dense_replace", 3)),
                 notes="MLA with DeepSeek sparse attention (indexer); MoE layers by mlp_layer_types; layers past "
                       "num_hidden_layers are MTP modules")
