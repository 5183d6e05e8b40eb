"""LARA-mini ("lara_mini", Lara-4-Mini): Qwen3-Next's names (gated DeltaNet, sliding and full attention per
layer_types) with every layer MoE, a softmax top-k router (renormalised by norm_topk_prob) computed in fp32 and
a shared expert added in full (no shared_expert_gate). Its hub checkpoints store the experts fused already,
but keep the DeltaNet's input projections in one linear_attn.in_proj (rows [q | k | v | z | b | a]) and name
its gated norm out_norm: transformers splits it into in_proj_qkv / in_proj_z / in_proj_b / in_proj_a and
renames out_norm to norm on load."""

from moetool.arch.families._shared import (
                                           EMBED_AND_HEAD,
                                           QWEN_FUSED,
                                           QWEN_SHARED,
                                           ROUTER_MLP_GATE,
                                           every_layer,
                                           keys,
                                           one_if,
                                           qwen_shared_ffn,
)
from moetool.arch.schema import Config, Family, Role, Router


def _key_dim(cfg: Config) -> int:
    return (cfg.get("linear_num_key_heads") or 0) * (cfg.get("linear_key_head_dim") or 0)


def _value_dim(cfg: Config) -> int:
    return (cfg.get("linear_num_value_heads") or 0) * (cfg.get("linear_value_head_dim") or 0)


IN_PROJ = (".linear_attn.in_proj.", (
    (".linear_attn.in_proj_qkv.", lambda cfg: 2 * _key_dim(cfg) + _value_dim(cfg)),
    (".linear_attn.in_proj_z.", _value_dim),
    (".linear_attn.in_proj_b.", lambda cfg: cfg.get("linear_num_value_heads") or 0),
    (".linear_attn.in_proj_a.", lambda cfg: cfg.get("linear_num_value_heads") or 0)))

FAMILY = Family(
    name="lara_mini",
    model_types=("lara_mini",),
    title="LARA-mini",
    router=Router("softmax", renormalize="norm_topk_prob", config_defaults=(("norm_topk_prob", True),),
                  notes="softmax over the experts in fp32, top-k, renormalised by norm_topk_prob"),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **ROUTER_MLP_GATE,
            **{role: t for role, t in QWEN_SHARED.items() if role is not Role.SHARED_ROUTER}},
    per_expert=None,
    fused=QWEN_FUSED,
    is_moe_layer=every_layer,
    shared_ffn=qwen_shared_ffn,
    num_shared=one_if(qwen_shared_ffn),
    # LaraMiniConfig's
    defaults=(("shared_expert_intermediate_size", 512), ("tie_word_embeddings", True), ("linear_num_key_heads", 8),
              ("linear_num_value_heads", 16), ("linear_key_head_dim", 128), ("linear_value_head_dim", 128)),
    row_splits=(IN_PROJ,),
    renames=((".linear_attn.out_norm.", ".linear_attn.norm."),),
    notes="gated DeltaNet, sliding and full attention per layer_types (the full ones without RoPE); every "
          "layer MoE",
)
