"""Zyphra ZAYA1 ("zaya", transformers' ZayaForCausalLM; ZAYA1-8B): every layer is an MoE of top-1 routing
(transformers allows num_experts_per_tok 1 only) with one extra SKIP expert that computes nothing. Its router
(mlp.gate) is an MLP: down_proj (H -> router_hidden_size), plus, from layer 1 on, the previous layer's router
state x router_states_scale (the state travels between decoder layers as their second output and input), then
router_mlp (RMSNorm, fc1, fc2 with GELU, out_proj -> num_experts + 1 classes). The classes' softmax plus the
balancing_biases buffer (fp32, a selection-only bias) picks the expert, weighted by its softmax probability;
a pick of the skip class (the last) adds nothing to the token's output. transformers' router returns those
picks masked to expert 0 at weight 0, so moetool recomputes them from its logits (router_output "topk-skip").
Attention is CCA (convolved q/k, delayed values); the residual stream is kept in fp32 between layers. The hub
stores the experts fused, as transformers holds them (no per-expert form). (transformers 5.24's from_pretrained
sets each router's skip bias, balancing_biases[-1], to -1 whatever the checkpoint holds: its _init_weights writes
it unguarded; moetool loads the model itself in every mode, with the checkpoint's values.)"""

from moetool.arch.families._shared import EMBED_AND_HEAD, QWEN_FUSED, keys
from moetool.arch.schema import Family, Role, Router

GATE = "model.layers.{L}.mlp.gate"
FAMILY = Family(
    name="zaya",
    model_types=("zaya",),
    title="ZAYA",
    router=Router("softmax", renormalize=False, correction_bias=True, method_key=None,
                  notes="an MLP router fed the previous layer's router state; chosen on softmax + balancing "
                        "biases; a skip expert (zero output) beside the real ones"),
    keys=keys(num_experts=("num_experts",), top_k=("num_experts_per_tok",), expert_ffn=("moe_intermediate_size",),
              router_hidden=("router_hidden_size",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: f"{GATE}.router_mlp.out_proj.weight",   # (its rows are the experts'; the rest of the
            Role.ROUTER_CORRECTION: f"{GATE}.balancing_biases"},  # router MLP is indexed by no expert)
    per_expert=None,
    fused=QWEN_FUSED,
    skip_experts=1,
    # the router scores R = E + 1 classes (the skip expert last) from a router_hidden_size (G) state; the experts
    # hold the real experts' rows only
    shapes={Role.ROUTER: ("R", "G"), Role.ROUTER_CORRECTION: ("R",)},
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),   # (an fp32 buffer, kept so by a bf16 load)
    router_output="topk-skip",
    resets_stored_buffers=True,
    router_parts=(".mlp.gate.",),   # (the router MLP's weights but out_proj, whose rows are the experts')
    defaults=(("num_experts", 16), ("num_experts_per_tok", 1), ("moe_intermediate_size", 2048),
              ("router_hidden_size", 256), ("hidden_size", 2048), ("num_hidden_layers", 40),
              ("vocab_size", 262272), ("tie_word_embeddings", True)),   # ZayaConfig's
    notes="a skip expert (zero output) beside the real ones; an MLP router carrying a state from layer to layer; "
          "CCA attention",
)
