"""Xiaomi MiMo-V2-Flash ("mimo_v2_flash"): GLM-4.7-Flash's layout (DeepSeek-V3 expert names and router,
MoE layers by mlp_layer_types, the first dense by default) without shared experts; hybrid sliding and full
attention, the sliding layers with attention sinks (the hub's self_attn.attention_sink_bias)."""

from dataclasses import replace

from moetool.arch.families.glm4_moe_lite import FAMILY as GLM4_MOE_LITE
from moetool.arch.schema import SHARED_ROLES

FAMILY = replace(
    GLM4_MOE_LITE, name="mimo_v2_flash", model_types=("mimo_v2_flash",), title="MiMo-V2-Flash",
    router=replace(GLM4_MOE_LITE.router, config_defaults=(   # MiMoV2FlashConfig's (routed_scaling_factor None: 1.0)
        ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 1.0))),
    common={role: t for role, t in GLM4_MOE_LITE.common.items() if role not in SHARED_ROLES},
    shared_ffn=None, num_shared=None, defaults=(),
    renames=((".self_attn.attention_sink_bias", ".self_attn.sinks"),),
    notes="no shared experts; MoE layers by mlp_layer_types (default: all but the first); sliding-window "
          "layers have attention sinks and more key/value heads",
)
