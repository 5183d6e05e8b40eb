"""DeepSeek-V3.2 ("deepseek_v32"): DeepSeek-V3's MoE block, router and names, with the DSA indexer in its
attention; MoE layers by mlp_layer_types (DeepseekV32Config fills it from first_k_dense_replace, 3 by
default, and saves both)."""

from dataclasses import replace

from moetool.arch.families._shared import first_k_dense, mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(DEEPSEEK_V3, name="deepseek_v32", model_types=("deepseek_v32",), title="DeepSeek-V3.2",
                 is_moe_layer=mlp_layer_types(first_k_dense),
                 notes="multi-head latent attention (MLA) with the DSA indexer; MoE layers by mlp_layer_types; "
                       "layers past num_hidden_layers are MTP modules")
