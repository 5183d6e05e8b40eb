"""GLM-4.5 / 4.6: DeepSeek-V3's tensor names and router, with its own MTP layer."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(DEEPSEEK_V3, name="glm4_moe", defaults=(),   # (not DeepSeek-V3's)
                 model_types=("glm4_moe",), title="GLM-4.5 / 4.6",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True))),
                 notes="layers past num_hidden_layers are MTP modules")
