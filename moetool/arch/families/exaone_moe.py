"""EXAONE MoE (K-EXAONE): DeepSeek-V3's router and expert names, the hub's correction bias beside the
router (mlp.e_score_correction_bias, moved into mlp.gate by transformers 5); dense layers by
mlp_layer_types (default: the first first_k_dense_replace); MTP."""

from dataclasses import replace

from moetool.arch.families._shared import keys
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Config, Role


def exaone_moe_layer(cfg: Config, layer: int) -> bool:
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "sparse"
    dense = cfg.get("first_k_dense_replace")
    return layer >= (1 if dense is None else dense)


def shared_ffn(cfg: Config) -> int:
    shared = cfg.get("num_shared_experts")
    return (cfg.get("moe_intermediate_size") or 0) * (1 if shared is None else shared)


def num_shared(cfg: Config) -> int:
    shared = cfg.get("num_shared_experts")
    return 1 if shared is None else shared


_COMMON = {role: name for role, name in DEEPSEEK_V3.common.items() if role is not Role.ROUTER_CORRECTION}
FAMILY = replace(
    DEEPSEEK_V3, name="exaone_moe", model_types=("exaone_moe",), title="EXAONE MoE (K-EXAONE)",
    router=replace(DEEPSEEK_V3.router, config_defaults=(
        ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5))),
    keys=keys(num_experts=("num_experts", "n_routed_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common=_COMMON,
    per_expert={**DEEPSEEK_V3.per_expert,
                Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.e_score_correction_bias"},
    fused={**DEEPSEEK_V3.fused,
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    is_moe_layer=exaone_moe_layer,
    shared_ffn=shared_ffn,
    num_shared=num_shared,
    defaults=(),   # none of DeepSeek-V3's: its config class's own apply
    notes="sliding-window and full attention layers; mtp.* tensors are ignored by transformers",
)
