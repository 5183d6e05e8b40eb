"""Arcee AFMoE ("afmoe", Trinity): Qwen-style experts, DeepSeek-style shared experts, a sigmoid router
with a selection-only expert bias (a frozen fp32 parameter), leading dense layers; gated attention."""

from moetool.arch.families._shared import DEEPSEEK_SHARED, DENSE_MLP, EMBED_AND_HEAD, QWEN_EXPERTS, QWEN_FUSED, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="afmoe",
    model_types=("afmoe",),
    title="Arcee AFMoE (Trinity)",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="route_scale", method_key=None,
                  config_defaults=(("route_scale", 1.0),)),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **DEEPSEEK_SHARED,
            Role.ROUTER: "model.layers.{L}.mlp.router.gate.weight",
            Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.expert_bias"},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=lambda cfg, layer: layer >= (cfg.get("num_dense_layers") or 0),
    shared_ffn=lambda cfg: (cfg.get("moe_intermediate_size") or 0) * (cfg.get("num_shared_experts") or 0),
    num_shared=lambda cfg: cfg.get("num_shared_experts") or 0,
    # _keep_in_fp32_modules_strict: expert_bias (its _keep_in_fp32_modules, the norms, apply to fp16 loads only)
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),
    router_module="model.layers.{L}.mlp.router",
    defaults=(("num_dense_layers", 1), ("num_shared_experts", 2)),   # AfmoeConfig's
    notes="weights renormalised (+1e-20) then x route_scale; sigmoid-gated attention output; "
          "sliding and full attention per layer_types",
)
