"""JetBrains Mellum ("mellum"): Qwen3-MoE's names and router (softmax top-k, norm_topk_prob), MoE
layers by mlp_layer_types (all sparse by default), sliding and full attention with their own RoPE; an
optional MTP module (mtp.*), which transformers ignores."""

from dataclasses import replace

from moetool.arch.families._shared import mlp_layer_types
from moetool.arch.families.qwen3_moe import FAMILY as QWEN3_MOE

FAMILY = replace(QWEN3_MOE, name="mellum", model_types=("mellum",), title="Mellum",
                 router=replace(QWEN3_MOE.router, config_defaults=(("norm_topk_prob", True),)),
                 is_moe_layer=mlp_layer_types(first_dense=0),
                 mtp=True,
                 notes="sliding and full attention per layer_types, each with its own RoPE; mtp.* tensors are "
                       "ignored by transformers")
