from moetool.arch.families._shared import EMBED_AND_HEAD, QWEN_EXPERTS, QWEN_FUSED, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    title="Hunyuan MoE",
    router=Router("softmax", renormalize=True, notes="router runs in fp32; moe_topk may differ per layer"),
    keys=keys(num_experts=("num_experts", "num_local_experts"), top_k=("moe_topk", "num_experts_per_tok"),
              expert_ffn=("intermediate_size",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: "model.layers.{L}.mlp.gate.wg.weight",
            Role.SHARED_GATE: "model.layers.{L}.mlp.shared_mlp.gate_proj.weight",
            Role.SHARED_UP: "model.layers.{L}.mlp.shared_mlp.up_proj.weight",
            Role.SHARED_DOWN: "model.layers.{L}.mlp.shared_mlp.down_proj.weight"},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    shared_ffn=lambda cfg: cfg.get("intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    fp32_roles=frozenset({Role.ROUTER}),
)
