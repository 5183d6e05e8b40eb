from moetool.arch.families._shared import EMBED_AND_HEAD, MIXTRAL_EXPERTS, QWEN_FUSED, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="phimoe",
    model_types=("phimoe",),
    title="PhiMoE (Phi-3.5-MoE)",
    router=Router("sparsemixer", renormalize=False,
                  notes="top-2 by masked argmax; weights are masked-softmax probabilities"),
    keys=keys(num_experts=("num_local_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common=EMBED_AND_HEAD,
    per_expert=MIXTRAL_EXPERTS,
    fused={Role.ROUTER: "model.layers.{L}.mlp.router.weight", **QWEN_FUSED},
    # transformers' sparsemixer routes to two experts whatever num_experts_per_tok says
    top_k=lambda cfg: 2,
    router_module="model.layers.{L}.mlp.router",
    router_output="topk",
    min_kept=(2, "its sparsemixer router always picks two experts"),
)
