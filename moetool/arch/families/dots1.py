"""dots.llm1: DeepSeek-V3's tensor names and router, without MTP layers or MLA."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(DEEPSEEK_V3, name="dots1", defaults=(),   # (not DeepSeek-V3's)
                 model_types=("dots1",), title="dots.llm1", mtp=False, notes="",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", False))))
