from moetool.arch.families._shared import EMBED_AND_HEAD
from moetool.arch.families.granitemoe import GRANITE_FUSED, GRANITE_HUB, GRANITE_KEYS, GRANITE_ROUTER, GRANITE_SHARED
from moetool.arch.schema import Family

FAMILY = Family(
    name="granitemoehybrid",
    model_types=("granitemoehybrid",),
    title="Granite 4.0 hybrid (Mamba2 + attention, MoE)",
    router=GRANITE_ROUTER,
    # a dense variant (num_local_experts 0) has only the shared MLP, of shared_intermediate_size
    keys={**GRANITE_KEYS, "dense_ffn": ("shared_intermediate_size",)},
    common={**EMBED_AND_HEAD, **GRANITE_SHARED},
    per_expert=GRANITE_HUB,
    fused=GRANITE_FUSED,
    is_moe_layer=lambda cfg, layer: (cfg.get("num_local_experts") or 0) > 0,
    shared_ffn=lambda cfg: cfg.get("shared_intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    # transformers builds shared_mlp in every layer; without experts it is the layer's only MLP
    shared_in_dense_layers=True,
    notes="the shared MLP is always present (the dense MLP of a variant without experts); Mamba2 and "
          "attention layers per layer_types",
    router_module="model.layers.{L}.block_sparse_moe.router",
    router_output="topk",
    experts_module="model.layers.{L}.block_sparse_moe.experts",
)
