"""Beam ("beam"): DeepSeek-V3's router (sigmoid + correction bias, always within the best topk_group of
n_group groups, weights renormalised) in fp32, Qwen-style experts without shared experts, MoE layers by
mlp_layer_types (three dense first by default); gated attention with sandwich norms and depth-scaled
residuals."""

from dataclasses import replace

from moetool.arch.families._shared import DENSE_MLP, EMBED_AND_HEAD, ROUTER_MLP_GATE, keys, mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Role

FAMILY = replace(
    DEEPSEEK_V3, name="beam", model_types=("beam",), title="Beam",
    router=replace(DEEPSEEK_V3.router, config_defaults=(
        ("n_group", 8), ("topk_group", 4), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5)),
        notes="groups ranked by the sum of their top-2 biased scores; routed_scaling_factor multiplies "
              "the experts' sum (BeamMoE), not the router's weights"),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",), expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE,
            Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    is_moe_layer=mlp_layer_types(first_dense=3),
    shared_ffn=None, num_shared=None,
    mtp=False,
    defaults=(),   # none of DeepSeek-V3's: its config class's own apply
    notes="gated attention (gate_proj, gate_bias); sliding attention with RoPE, full attention without; "
          "final logit soft-capping",
)
