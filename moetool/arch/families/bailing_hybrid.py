"""inclusionAI Bailing hybrid ("bailing_hybrid", Ling/Ring 2.5): DeepSeek-V3's MoE in transformers (sigmoid
router with correction bias and groups, experts, shared experts) with MoE layers by mlp_layer_types (else all
from first_k_dense_replace on), MLA attention in every layer_group_size-th layer and KDA linear attention in
the others; layers past num_hidden_layers are MTP. Bailing hub names, renamed by transformers on load:
word_embeddings, attention.* (dense for o_proj; f_proj, dt_bias and A_log under forget_gate), the correction
bias as mlp.gate.expert_bias, and q/k/v_conv1d joined into one conv1d."""

from dataclasses import replace

from moetool.arch.families._shared import QWEN_EXPERTS, QWEN_FUSED, keys
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Config, Role


def bailing_hybrid_layer(cfg: Config, layer: int) -> bool:
    """As transformers: mlp_layer_types[layer] == "sparse"; without it, from first_k_dense_replace (2) on."""
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "sparse"
    return layer >= cfg["first_k_dense_replace"]


def _qkv_rows(cfg: Config) -> int:
    """Rows of each of q/k/v_conv1d: linear_num_heads x linear_head_dim (transformers' config sets them from
    num_attention_heads and head_dim, then overwrites head_dim with qk_rope_head_dim)."""
    heads = cfg.get("linear_num_heads") or cfg["num_attention_heads"]
    return heads * (cfg.get("linear_head_dim") or cfg["head_dim"])


CONV = tuple((f".attention.{p}_conv1d.", _qkv_rows) for p in "qkv")
common = {role: t for role, t in DEEPSEEK_V3.common.items() if role not in (Role.EMBED, Role.ROUTER_CORRECTION)}

FAMILY = replace(
    DEEPSEEK_V3, name="bailing_hybrid", model_types=("bailing_hybrid",), title="Bailing hybrid (Ling/Ring 2.5)",
    # BailingHybridConfig's names (n_group, norm_topk_prob are aliases) and defaults
    router=replace(DEEPSEEK_V3.router, renormalize="moe_renormalize", group_keys=("num_expert_group", "topk_group"),
                   config_defaults=(("num_expert_group", 8), ("topk_group", 4), ("moe_renormalize", True),
                                    ("routed_scaling_factor", 2.5))),
    keys=keys(num_experts=("num_experts", "num_local_experts", "n_routed_experts"),
              top_k=("num_experts_per_token", "num_experts_per_tok"), expert_ffn=("moe_intermediate_size",)),
    common=common,
    per_expert={**QWEN_EXPERTS, Role.EMBED: "model.word_embeddings.weight",
                Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.expert_bias"},
    fused={**QWEN_FUSED, Role.EMBED: "model.embed_tokens.weight",
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    is_moe_layer=bailing_hybrid_layer,
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * cfg["num_shared_experts"],
    num_shared=lambda cfg: cfg["num_shared_experts"],
    defaults=(("first_k_dense_replace", 2), ("num_shared_experts", 1), ("head_dim", 128)),
    renames=((".attention.f_proj.", ".self_attn.forget_gate.f_proj."),
             (".attention.dt_bias", ".self_attn.forget_gate.dt_bias"),
             (".attention.A_log", ".self_attn.forget_gate.A_log"),
             (".attention.dense.", ".self_attn.o_proj."),
             (".attention.", ".self_attn.")),
    row_joins=((".self_attn.conv1d.", CONV),),
    fp32_suffixes=("conv1d.weight", ".dt_bias", ".A_log"),   # _keep_in_fp32_modules_strict beyond the router
    notes="MLA attention every layer_group_size-th layer, KDA linear attention in the others; the hub's "
          "q/k/v_conv1d are one conv1d in transformers 5; layers past num_hidden_layers are MTP modules",
)
