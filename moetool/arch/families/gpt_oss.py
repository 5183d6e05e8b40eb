from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    title="GPT-OSS",
    router=Router("softmax over top-k logits", renormalize=False,
                  notes="router has a bias; weights = softmax of the k selected logits"),
    keys=keys(num_experts=("num_local_experts", "num_experts"),
              top_k=("num_experts_per_tok", "experts_per_token"), expert_ffn=("intermediate_size",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: "model.layers.{L}.mlp.router.weight",
            Role.ROUTER_BIAS: "model.layers.{L}.mlp.router.bias",
            Role.EXPERT_GATE_UP_BIAS: "model.layers.{L}.mlp.experts.gate_up_proj_bias",
            Role.EXPERT_DOWN_BIAS: "model.layers.{L}.mlp.experts.down_proj_bias"},
    # moetool's own one-tensor-per-expert form (what `quantize` stores; transformers does not load
    # it): expert e of each fused tensor, in the same orientation ([H, 2I] gate/up interleaved, [I, H])
    per_expert={Role.EXPERT_GATE_UP: "model.layers.{L}.mlp.experts.{E}.gate_up_proj.weight",
                Role.EXPERT_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj.weight"},
    # The hub stores the transformers layout: transposed, gate/up interleaved on the last axis.
    fused={Role.EXPERT_GATE_UP: "model.layers.{L}.mlp.experts.gate_up_proj",
           Role.EXPERT_DOWN: "model.layers.{L}.mlp.experts.down_proj"},
    shapes={Role.EXPERT_GATE_UP: ("E", "H", "2I"), Role.EXPERT_DOWN: ("E", "I", "H"),
            Role.EXPERT_DOWN_BIAS: ("E", "H")},
    fused_transposed=True,
    transformers_reads_per_expert=False,
    notes="experts use a clamped SwiGLU with biases; gate/up interleaved; released as MXFP4",
    router_module="model.layers.{L}.mlp.router",
    router_output="topk",
)
