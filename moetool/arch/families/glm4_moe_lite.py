"""GLM-4.7-Flash: DeepSeek-V3's tensor names, MLA attention and router; dense layers by mlp_layer_types."""

from dataclasses import replace

from moetool.arch.families._shared import mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(DEEPSEEK_V3, name="glm4_moe_lite", model_types=("glm4_moe_lite",), title="GLM-4.7-Flash",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True),
                     ("routed_scaling_factor", 1.8))),
                 is_moe_layer=mlp_layer_types(1),   # (transformers' config ignores first_k_dense_replace)
                 defaults=(("n_shared_experts", 1),),   # Glm4MoeLiteConfig's
                 notes="multi-head latent attention (MLA); MoE layers by mlp_layer_types; layers past "
                       "num_hidden_layers are MTP modules")
