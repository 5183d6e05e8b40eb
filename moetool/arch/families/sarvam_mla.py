"""Sarvam MLA ("sarvam_mla", Sarvam-105B): a config only in transformers, which runs it as DeepSeek-V3
(DeepseekV3ForCausalLM: MLA, sigmoid router with correction bias, shared experts, leading dense layers);
the original config's num_experts / num_shared_experts / num_mtp_layers are aliases."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Config


def _num_shared(cfg: Config) -> int:
    """n_shared_experts, or the original config's num_shared_experts (an alias; 1 when neither is given)."""
    value = cfg.get("n_shared_experts")
    value = cfg.get("num_shared_experts") if value is None else value
    return 1 if value is None else value


FAMILY = replace(
    DEEPSEEK_V3, name="sarvam_mla", model_types=("sarvam_mla",), title="Sarvam MLA",
    router=replace(DEEPSEEK_V3.router, config_defaults=(   # SarvamMLAConfig's
        ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5))),
    keys={**DEEPSEEK_V3.keys, "num_experts": ("n_routed_experts", "num_experts", "num_local_experts")},
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * _num_shared(cfg),
    num_shared=_num_shared,
    defaults=(("first_k_dense_replace", 1),),
    notes="transformers runs it as DeepSeek-V3 (DeepseekV3ForCausalLM); layers past num_hidden_layers are MTP "
          "modules",
)
