from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Family, Role, Router

MOE = "model.layers.{L}.block_sparse_moe"
GRANITE_ROUTER = Router("softmax over top-k logits", renormalize=False)
GRANITE_KEYS = keys(num_experts=("num_local_experts",), top_k=("num_experts_per_tok",),
                    expert_ffn=("intermediate_size",))
# The hub already stores experts as 3-D tensors, under other names than transformers 5 uses.
GRANITE_HUB = {Role.ROUTER: f"{MOE}.router.layer.weight",
               Role.EXPERT_GATE_UP: f"{MOE}.input_linear.weight",
               Role.EXPERT_DOWN: f"{MOE}.output_linear.weight"}
GRANITE_FUSED = {Role.ROUTER: f"{MOE}.router.weight",
                 Role.EXPERT_GATE_UP: f"{MOE}.experts.gate_up_proj",
                 Role.EXPERT_DOWN: f"{MOE}.experts.down_proj"}
GRANITE_SHARED = {Role.SHARED_GATE_UP: "model.layers.{L}.shared_mlp.input_linear.weight",
                  Role.SHARED_DOWN: "model.layers.{L}.shared_mlp.output_linear.weight"}

FAMILY = Family(
    name="granitemoe",
    model_types=("granitemoe",),
    title="Granite MoE",
    router=GRANITE_ROUTER,
    keys=GRANITE_KEYS,
    common=EMBED_AND_HEAD,
    per_expert=GRANITE_HUB,
    fused=GRANITE_FUSED,
    router_module="model.layers.{L}.block_sparse_moe.router",
    router_output="topk",
    experts_module="model.layers.{L}.block_sparse_moe.experts",
)
