from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Config, Family, Role, Router


def llama4_moe_layer(cfg: Config, layer: int) -> bool:
    if cfg.get("moe_layers") is not None:
        return layer in cfg["moe_layers"]
    return (layer + 1) % (cfg.get("interleave_moe_layer_step") or 1) == 0


FF = "model.layers.{L}.feed_forward"
FAMILY = Family(
    name="llama4",
    model_types=("llama4", "llama4_text"),
    title="Llama 4 (text)",
    router=Router("sigmoid of top-k logits", renormalize=False,
                  notes="the expert input is pre-scaled by the router score; one shared expert"),
    keys=keys(num_experts=("num_local_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",), dense_ffn=("intermediate_size_mlp",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: f"{FF}.router.weight",
            Role.SHARED_GATE: f"{FF}.shared_expert.gate_proj.weight",
            Role.SHARED_UP: f"{FF}.shared_expert.up_proj.weight",
            Role.SHARED_DOWN: f"{FF}.shared_expert.down_proj.weight",
            Role.DENSE_GATE: f"{FF}.gate_proj.weight",
            Role.DENSE_UP: f"{FF}.up_proj.weight",
            Role.DENSE_DOWN: f"{FF}.down_proj.weight"},
    # Quantized releases (e.g. Maverick-FP8) store one tensor per expert.
    per_expert={Role.EXPERT_GATE: FF + ".experts.{E}.gate_proj.weight",
                Role.EXPERT_UP: FF + ".experts.{E}.up_proj.weight",
                Role.EXPERT_DOWN: FF + ".experts.{E}.down_proj.weight"},
    fused={Role.EXPERT_GATE_UP: f"{FF}.experts.gate_up_proj",
           Role.EXPERT_DOWN: f"{FF}.experts.down_proj"},
    shapes={Role.EXPERT_GATE_UP: ("E", "H", "2I"), Role.EXPERT_DOWN: ("E", "I", "H")},
    is_moe_layer=llama4_moe_layer,
    shared_ffn=lambda cfg: cfg.get("intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    fused_transposed=True,
    config_root="text_config",
    name_prefixes=(("language_model.", ""), ("model.language_model.", "model.")),
    router_module="model.layers.{L}.feed_forward.router",
    router_output="llama4",
    experts_module=None,
    experts_indexed=False,
    transformers_reads_per_expert=False,
    bnb_linear_experts=True,
)
