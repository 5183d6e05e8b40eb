"""Solar Open (Upstage, "solar_open"): GLM-4.5's MoE block (sigmoid router with correction bias, shared
experts) and names under Llama attention; every layer MoE (its config has no first_k_dense_replace), no MTP."""

from dataclasses import replace

from moetool.arch.families._shared import every_layer
from moetool.arch.families.glm4_moe import FAMILY as GLM4_MOE

FAMILY = replace(GLM4_MOE, name="solar_open", model_types=("solar_open",), title="Solar Open",
                 router=replace(GLM4_MOE.router, config_defaults=(   # SolarOpenConfig's
                     ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 1.0))),
                 is_moe_layer=every_layer,
                 defaults=(("n_shared_experts", 1),),
                 mtp=False,
                 notes="every layer MoE; transformers runs GLM-4.5's MoE block")
