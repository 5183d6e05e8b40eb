from moetool.arch.families._shared import EMBED_AND_HEAD
from moetool.arch.families.granitemoe import GRANITE_FUSED, GRANITE_HUB, GRANITE_KEYS, GRANITE_ROUTER, GRANITE_SHARED
from moetool.arch.schema import Family

FAMILY = Family(
    name="granitemoehybrid",
    model_types=("granitemoehybrid",),
    title="Granite 4.0 hybrid (Mamba2 + attention, MoE)",
    router=GRANITE_ROUTER,
    keys=GRANITE_KEYS,
    common={**EMBED_AND_HEAD, **GRANITE_SHARED},
    per_expert=GRANITE_HUB,
    fused=GRANITE_FUSED,
    is_moe_layer=lambda cfg, layer: (cfg.get("num_local_experts") or 0) > 0,
    shared_ffn=lambda cfg: cfg.get("shared_intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    notes="the shared MLP is always present; Mamba2 and attention layers per layer_types",
    router_module="model.layers.{L}.block_sparse_moe.router",
    router_output="topk",
    experts_module="model.layers.{L}.block_sparse_moe.experts",
)
