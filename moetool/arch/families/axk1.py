"""SK Telecom A.X-K1 ("axk1"): DeepSeek-V3 (MLA attention, grouped sigmoid router with correction bias,
shared experts) with a post_mlp_layernorm on the MoE output, and MoE layers by mlp_layer_types. The hub
stores that norm at the decoder layer (layers.{L}.post_mlp_layernorm); transformers moves it into the MLP."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Config


def axk1_layer(cfg: Config, layer: int) -> bool:
    """As AXK1Config: mlp_layer_types[layer] == "sparse"; without it, from the legacy first_k_dense_replace
    (1) and moe_layer_freq (1)."""
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "sparse"
    first = cfg.get("first_k_dense_replace")
    freq = cfg.get("moe_layer_freq") or 1
    return layer >= (1 if first is None else first) and layer % freq == 0


FAMILY = replace(DEEPSEEK_V3, name="axk1", model_types=("axk1",), title="A.X-K1",
                 router=replace(DEEPSEEK_V3.router, config_defaults=(
                     ("n_group", 8), ("topk_group", 4), ("norm_topk_prob", True),
                     ("routed_scaling_factor", 2.5))),
                 is_moe_layer=axk1_layer,
                 defaults=(("n_shared_experts", 1),),   # AXK1Config's
                 renames=((".post_mlp_layernorm.", ".mlp.post_mlp_layernorm."),),
                 notes="multi-head latent attention (MLA, always with a q LoRA); RMSNorm on the MoE output "
                       "(post_mlp_layernorm; released checkpoints store one for dense layers too, which "
                       "transformers ignores)")
