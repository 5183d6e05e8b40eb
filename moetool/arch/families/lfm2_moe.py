"""LFM2-MoE (LiquidAI LFM2-8B-A1B): hybrid short-convolution and attention layers, the first
num_dense_layers dense; experts in feed_forward with Mixtral's w1/w3/w2 names."""

from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Config, Family, Role, Router


def lfm2_moe_layer(cfg: Config, layer: int) -> bool:
    dense = cfg.get("num_dense_layers")
    return layer >= (2 if dense is None else dense)


FF = "model.layers.{L}.feed_forward"
FAMILY = Family(
    name="lfm2_moe",
    model_types=("lfm2_moe",),
    title="LFM2-MoE",
    router=Router("sigmoid", renormalize="norm_topk_prob", correction_bias="use_expert_bias",
                  scaling_key="routed_scaling_factor",
                  notes="top-k on sigmoid + expert_bias (use_expert_bias); logits in the activation dtype; "
                        "renormalised with +1e-6; no groups",
                  config_defaults=(("norm_topk_prob", True), ("routed_scaling_factor", 1.0),
                                   ("use_expert_bias", True))),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",), tie=("tie_word_embeddings", "tie_embedding")),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: f"{FF}.gate.weight",
            Role.ROUTER_CORRECTION: f"{FF}.expert_bias",
            Role.DENSE_GATE: f"{FF}.w1.weight",
            Role.DENSE_UP: f"{FF}.w3.weight",
            Role.DENSE_DOWN: f"{FF}.w2.weight"},
    per_expert={Role.EXPERT_GATE: FF + ".experts.{E}.w1.weight",
                Role.EXPERT_UP: FF + ".experts.{E}.w3.weight",
                Role.EXPERT_DOWN: FF + ".experts.{E}.w2.weight"},
    fused={Role.EXPERT_GATE_UP: f"{FF}.experts.gate_up_proj",
           Role.EXPERT_DOWN: f"{FF}.experts.down_proj"},
    is_moe_layer=lfm2_moe_layer,
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),   # transformers builds expert_bias as an fp32 buffer
    role_keys={Role.ROUTER_CORRECTION: "use_expert_bias"},   # no expert_bias when use_expert_bias is false
    defaults=(("use_expert_bias", True),),   # Lfm2MoeConfig's
    router_module="model.layers.{L}.feed_forward.gate",
    experts_module="model.layers.{L}.feed_forward.experts",
    notes="hybrid short-convolution and attention layers (layer_types); tied embeddings (hub key tie_embedding)",
)
