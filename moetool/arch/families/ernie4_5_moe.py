from moetool.arch.families._shared import DEEPSEEK_SHARED, EMBED_AND_HEAD, QWEN_EXPERTS, QWEN_FUSED, keys
from moetool.arch.schema import Config, Family, Role, Router


def ernie_moe_layer(cfg: Config, layer: int) -> bool:
    end = cfg.get("moe_layer_end_index", -1)
    end = cfg["num_hidden_layers"] - 1 if end is None or end == -1 else end
    return ((layer + 1) % (cfg.get("moe_layer_interval") or 1) == 0
            and (cfg.get("moe_layer_start_index") or 0) <= layer <= end)


def shared_size(cfg: Config) -> int:
    return (cfg.get("moe_intermediate_size") or 0) * (cfg.get("moe_num_shared_experts") or 0)


# use_bias: true gives every MLP (dense layers' and the shared experts, not the routed ones) biases
BIASES = {Role.SHARED_GATE_BIAS: "model.layers.{L}.mlp.shared_experts.gate_proj.bias",
          Role.SHARED_UP_BIAS: "model.layers.{L}.mlp.shared_experts.up_proj.bias",
          Role.SHARED_DOWN_BIAS: "model.layers.{L}.mlp.shared_experts.down_proj.bias",
          Role.DENSE_GATE_BIAS: "model.layers.{L}.mlp.gate_proj.bias",
          Role.DENSE_UP_BIAS: "model.layers.{L}.mlp.up_proj.bias",
          Role.DENSE_DOWN_BIAS: "model.layers.{L}.mlp.down_proj.bias"}

FAMILY = Family(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    title="ERNIE 4.5 MoE",
    router=Router("softmax", renormalize=True, correction_bias=True,
                  notes="top-k on probabilities + correction bias; weights renormalised"),
    keys=keys(num_experts=("moe_num_experts", "num_experts"), top_k=("moe_k", "num_experts_per_tok"),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DEEPSEEK_SHARED,
            Role.ROUTER: "model.layers.{L}.mlp.gate.weight",
            Role.DENSE_GATE: "model.layers.{L}.mlp.gate_proj.weight",
            Role.DENSE_UP: "model.layers.{L}.mlp.up_proj.weight",
            Role.DENSE_DOWN: "model.layers.{L}.mlp.down_proj.weight",
            **BIASES},
    per_expert={**QWEN_EXPERTS,
                Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.moe_statics.e_score_correction_bias"},
    fused={**QWEN_FUSED,
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.moe_statics.e_score_correction_bias"},
    shapes={Role.ROUTER_CORRECTION: ("1", "E")},
    is_moe_layer=ernie_moe_layer,
    shared_ffn=shared_size,
    num_shared=lambda cfg: cfg.get("moe_num_shared_experts") or 0,
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),
    role_keys=dict.fromkeys(BIASES, "use_bias"),
    mtp=True,
)
