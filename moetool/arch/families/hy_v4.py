"""Tencent Hy4 ("hy_v4", Hy4-preview): DeepSeek-V3's MoE block and names (sigmoid router with correction bias,
one group by default, router in fp32; n_shared_experts shared experts) with clamped SwiGLU experts, dense
layers by mlp_layer_types (the first without it), DSA-indexed MLA with a sigmoid output gate and attention
sinks, and hyper-connections (hc_mult streams). Its hub checkpoints store the experts fused already, but name
other tensors apart from transformers 5, which renames them on load: linear_gate (the attention's gate and
every MLP's gate projection) -> gate_proj, learnable_sink_param -> sinks, hc_[pre.]hc_{attn,mlp}_layer.hc_* ->
{attn,ffn}_hc.*, hc_[pre.]hc_head.hc_head_* -> hc_head.hc_*."""

from dataclasses import replace

from moetool.arch.families._shared import mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Role


def _hc(block: str, held: str) -> tuple[tuple[str, str], ...]:
    return tuple((f".{pre}{block}.hc_{part}", f".{held}.{part}") for pre in ("hc_pre.", "")
                 for part in ("fn", "base", "scale"))


HC = (*_hc("hc_attn_layer", "attn_hc"), *_hc("hc_mlp_layer", "ffn_hc"),
      *((f".{pre}hc_head.hc_head_{part}", f".hc_head.hc_{part}") for pre in ("hc_pre.", "")
        for part in ("fn", "base", "scale")))

# the MLPs' gate projections under either name (the hub's linear_gate, transformers 5's gate_proj)
GATES = {role: (DEEPSEEK_V3.common[role], DEEPSEEK_V3.common[role].replace(".gate_proj.", ".linear_gate."))
         for role in (Role.DENSE_GATE, Role.SHARED_GATE)}

FAMILY = replace(
    DEEPSEEK_V3, name="hy_v4", model_types=("hy_v4",), title="Tencent Hy4", per_expert=None,
    common={**DEEPSEEK_V3.common, **GATES},
    router=replace(DEEPSEEK_V3.router, config_defaults=(   # HYV4Config's
        ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.827))),
    is_moe_layer=mlp_layer_types(1),
    defaults=(("n_shared_experts", 1), ("tie_word_embeddings", False)),
    # transformers' _keep_in_fp32_modules_strict beyond the router's (transformers 5's names and the hub's)
    fp32_suffixes=("_hc.fn", "_hc.base", "_hc.scale", ".hc_fn", ".hc_base", ".hc_scale", "hc_head_fn",
                   "hc_head_base", "hc_head_scale", ".sinks", ".learnable_sink_param", "weights_proj.weight",
                   "k_norm.weight", "k_norm.bias", "lm_head.weight"),
    renames=(*HC, (".learnable_sink_param", ".sinks"), (".linear_gate.", ".gate_proj.")),
    notes="clamped SwiGLU experts; DSA-indexed MLA with an output gate and attention sinks; hyper-connections "
          "(hc_mult streams between layers); lm_head in fp32; model.mtp_layers.* are ignored by transformers",
)
