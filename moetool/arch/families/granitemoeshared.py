from moetool.arch.families._shared import EMBED_AND_HEAD
from moetool.arch.families.granitemoe import GRANITE_FUSED, GRANITE_HUB, GRANITE_KEYS, GRANITE_ROUTER, GRANITE_SHARED
from moetool.arch.schema import Family


def shared_size(cfg) -> int:
    return cfg.get("shared_intermediate_size") or 0


FAMILY = Family(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    title="Granite MoE with shared expert",
    router=GRANITE_ROUTER,
    keys=GRANITE_KEYS,
    common={**EMBED_AND_HEAD, **GRANITE_SHARED},
    per_expert=GRANITE_HUB,
    fused=GRANITE_FUSED,
    shared_ffn=shared_size,
    num_shared=lambda cfg: 1 if shared_size(cfg) else 0,
    router_module="model.layers.{L}.block_sparse_moe.router",
    router_output="topk",
    experts_module="model.layers.{L}.block_sparse_moe.experts",
)
