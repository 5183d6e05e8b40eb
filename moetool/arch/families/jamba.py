from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Config, Family, Role, Router


def jamba_moe_layer(cfg: Config, layer: int) -> bool:
    return layer % (cfg.get("expert_layer_period") or 2) == (cfg.get("expert_layer_offset") or 0)


FF = "model.layers.{L}.feed_forward"
FAMILY = Family(
    name="jamba",
    model_types=("jamba",),
    title="Jamba",
    router=Router("softmax", renormalize=False),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: f"{FF}.router.weight",
            Role.DENSE_GATE: f"{FF}.gate_proj.weight",
            Role.DENSE_UP: f"{FF}.up_proj.weight",
            Role.DENSE_DOWN: f"{FF}.down_proj.weight"},
    per_expert={Role.EXPERT_GATE: FF + ".experts.{E}.gate_proj.weight",
                Role.EXPERT_UP: FF + ".experts.{E}.up_proj.weight",
                Role.EXPERT_DOWN: FF + ".experts.{E}.down_proj.weight"},
    fused={Role.EXPERT_GATE_UP: f"{FF}.experts.gate_up_proj",
           Role.EXPERT_DOWN: f"{FF}.experts.down_proj"},
    is_moe_layer=jamba_moe_layer,
    notes="hybrid Mamba and attention layers",
    router_module="model.layers.{L}.feed_forward.router",
    router_output="topk",
    experts_module="model.layers.{L}.feed_forward.experts",
    min_kept=(2, "transformers builds a dense MLP instead of experts for a layer of one expert"),
)
