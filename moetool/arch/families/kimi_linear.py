"""Kimi Linear (Moonshot, "kimi_linear"): DeepSeek-V3's MoE (sigmoid router with correction bias, shared
experts, leading dense layers by mlp_layer_types) under Kimi Delta Attention (linear) and MLA layers. The
hub keeps Mixtral-style names (block_sparse_moe, w1/w2/w3), the forget gate's tensors on the attention and
q/k/v_conv1d apart; transformers renames them and concatenates the convolutions into conv1d."""

from collections.abc import Callable
from dataclasses import replace

from moetool.arch.families._shared import (
    DEEPSEEK_V3_ROUTER,
    EMBED_AND_HEAD,
    QWEN_FUSED,
    first_k_dense,
    keys,
    mlp_layer_types,
)
from moetool.arch.schema import Config, Family, Role
from moetool.errors import ConfigError


def _num_shared(cfg: Config) -> int:
    """num_shared_experts, or its alias n_shared_experts; KimiLinearConfig's 1 without either."""
    value = cfg.get("num_shared_experts")
    value = cfg.get("n_shared_experts") if value is None else value
    return 1 if value is None else value


def conv_rows(heads: int, head_dim: int) -> Callable[[Config], int]:
    """Rows of each of q/k/v_conv1d: heads x head size, read as transformers reads them (linear_attn_config,
    where hub configs keep them, then the top level, where a config transformers saved has them, then
    the config class's defaults HEADS and HEAD_DIM)."""
    def rows(cfg: Config) -> int:
        nested = cfg.get("linear_attn_config") or {}
        values = [nested.get(key, cfg.get(top, default))
                  for key, top, default in (("num_heads", "linear_num_heads", heads),
                                            ("head_dim", "linear_head_dim", head_dim))]
        if not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(f"config.json: linear attention heads and head size {values} are not positive integers")
        return values[0] * values[1]
    return rows


def conv_joins(rows: Callable[[Config], int]) -> tuple:
    """The hub's q/k/v_conv1d joined into transformers' conv1d, ROWS each."""
    return ((".self_attn.conv1d.", tuple((f".self_attn.{x}_conv1d.", rows) for x in "qkv")),)


HUB, T5 = "model.layers.{L}.block_sparse_moe.", "model.layers.{L}.mlp."


def _mlp(prefix: str) -> dict[Role, str]:
    return {Role.ROUTER: prefix + "gate.weight", Role.ROUTER_CORRECTION: prefix + "gate.e_score_correction_bias",
            Role.SHARED_GATE: prefix + "shared_experts.gate_proj.weight",
            Role.SHARED_UP: prefix + "shared_experts.up_proj.weight",
            Role.SHARED_DOWN: prefix + "shared_experts.down_proj.weight",
            Role.DENSE_GATE: prefix + "gate_proj.weight", Role.DENSE_UP: prefix + "up_proj.weight",
            Role.DENSE_DOWN: prefix + "down_proj.weight"}


FAMILY = Family(
    name="kimi_linear",
    model_types=("kimi_linear",),
    title="Kimi Linear",
    router=replace(DEEPSEEK_V3_ROUTER, renormalize="moe_renormalize", group_keys=("num_expert_group", "topk_group"),
                   config_defaults=(("num_expert_group", 1), ("topk_group", 1), ("moe_renormalize", True),
                                    ("routed_scaling_factor", 2.446))),   # KimiLinearConfig's
    keys=keys(num_experts=("num_experts", "num_local_experts", "n_routed_experts"),
              top_k=("num_experts_per_token", "num_experts_per_tok"), expert_ffn=("moe_intermediate_size",)),
    common=dict(EMBED_AND_HEAD),
    per_expert={**_mlp(HUB), Role.EXPERT_GATE: HUB + "experts.{E}.w1.weight",
                Role.EXPERT_UP: HUB + "experts.{E}.w3.weight", Role.EXPERT_DOWN: HUB + "experts.{E}.w2.weight"},
    fused={**_mlp(T5), **QWEN_FUSED},
    is_moe_layer=mlp_layer_types(first_k_dense),   # first_k_dense_replace: 1 by default
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * _num_shared(cfg),
    num_shared=_num_shared,
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),
    fp32_suffixes=(".dt_bias",),   # transformers' _keep_in_fp32_modules_strict
    min_kept=(2, "its router ranks expert groups by their best two experts (one group included)"),
    defaults=(("first_k_dense_replace", 1),),
    renames=tuple((f".self_attn.{n}", f".self_attn.forget_gate.{n}") for n in ("f_a_proj.", "f_b_proj.", "dt_bias",
                                                                              "A_log")),
    row_joins=conv_joins(conv_rows(32, 128)),   # KimiLinearConfig's defaults
    notes="Kimi Delta Attention (linear) and MLA layers; MoE layers by mlp_layer_types",
)
