"""Sarvam MoE ("sarvam_moe", Sarvam-30B): GLM-4.5's model in transformers (its router, experts, shared
experts and leading dense layers), with Bailing-style hub names: word_embeddings, one fused
attention.query_key_value ([q | k | v] rows), attention.dense, query/key_layernorm and the correction bias
as mlp.gate.expert_bias. transformers renames and splits these on load (its conversion mapping)."""

from dataclasses import replace

from moetool.arch.families._shared import QWEN_EXPERTS, QWEN_FUSED
from moetool.arch.families.glm4_moe import FAMILY as GLM4_MOE
from moetool.arch.schema import Config, Role

# SarvamMoEConfig's defaults where config.json leaves a key out
DEFAULTS = (("first_k_dense_replace", 1), ("head_dim", 64), ("num_key_value_heads", 4))


def _head_dim(cfg: Config) -> int:
    return cfg["head_dim"]


def _kv_rows(cfg: Config) -> int:
    return cfg["num_key_value_heads"] * _head_dim(cfg)


def _num_shared(cfg: Config) -> int:
    """n_shared_experts, or the original config's num_shared_experts (an alias in transformers; 1 when
    neither is given)."""
    value = cfg.get("n_shared_experts")
    value = cfg.get("num_shared_experts") if value is None else value
    return 1 if value is None else value


common = {role: t for role, t in GLM4_MOE.common.items() if role not in (Role.EMBED, Role.ROUTER_CORRECTION)}

FAMILY = replace(
    GLM4_MOE, name="sarvam_moe", model_types=("sarvam_moe",), title="Sarvam MoE",
    # SarvamMoEConfig's defaults (routed_scaling_factor 2.5 where GLM's is 1.0)
    router=replace(GLM4_MOE.router, config_defaults=(("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True),
                                                     ("routed_scaling_factor", 2.5))),
    keys={**GLM4_MOE.keys, "num_experts": ("n_routed_experts", "num_experts", "num_local_experts")},
    common=common,
    per_expert={**QWEN_EXPERTS, Role.EMBED: "model.word_embeddings.weight",
                Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.expert_bias"},
    fused={**QWEN_FUSED, Role.EMBED: "model.embed_tokens.weight",
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * _num_shared(cfg),
    defaults=DEFAULTS,
    num_shared=lambda cfg: _num_shared(cfg),
    renames=((".attention.dense.", ".self_attn.o_proj."),
             (".attention.query_layernorm.", ".self_attn.q_norm."),
             (".attention.key_layernorm.", ".self_attn.k_norm.")),
    row_splits=((".attention.query_key_value.", (
        (".self_attn.q_proj.", lambda cfg: cfg["num_attention_heads"] * _head_dim(cfg)),
        (".self_attn.k_proj.", _kv_rows), (".self_attn.v_proj.", _kv_rows))),),
    notes="transformers runs it as GLM-4.5 (Glm4MoeForCausalLM); the hub's fused query_key_value is split "
          "into q/k/v_proj in the fused layout",
)
