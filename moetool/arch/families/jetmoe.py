from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="jetmoe",
    model_types=("jetmoe",),
    title="JetMoE",
    router=Router("softmax over top-k logits", renormalize=False),
    keys=keys(num_experts=("num_local_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common=EMBED_AND_HEAD,
    per_expert=None,
    fused={Role.ROUTER: "model.layers.{L}.mlp.router.layer.weight",
           Role.EXPERT_GATE_UP: "model.layers.{L}.mlp.input_linear.weight",
           Role.EXPERT_DOWN: "model.layers.{L}.mlp.output_linear.weight",
           Role.MOE_OUTPUT_BIAS: "model.layers.{L}.mlp.bias"},
    notes="attention is also a mixture of experts (counted as attention, fully active)",
    router_module="model.layers.{L}.mlp.router",
    router_output="jetmoe",
    experts_module=None,
    prune_unsupported=("the attention experts share num_local_experts with the MLP experts, so the MLP "
                       "experts cannot be removed alone"),
)
