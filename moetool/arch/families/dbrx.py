from moetool.arch.schema import Family, Role, Router

FFN = "transformer.blocks.{L}.ffn"
FAMILY = Family(
    name="dbrx",
    model_types=("dbrx",),
    title="DBRX",
    router=Router("softmax", renormalize=True,
                  notes="weights divided by their p-norm, p = moe_normalize_expert_weights"),
    keys={"num_layers": ("n_layers", "num_hidden_layers"), "hidden": ("d_model", "hidden_size"),
          "vocab": ("vocab_size",), "tie": ("tie_word_embeddings",),
          "num_experts": ("ffn_config.moe_num_experts",), "top_k": ("ffn_config.moe_top_k",),
          "expert_ffn": ("ffn_config.ffn_hidden_size",)},
    common={Role.EMBED: "transformer.wte.weight", Role.LM_HEAD: "lm_head.weight"},
    per_expert=None,
    # Experts packed along the first axis: [E*I, H]; w2 is stored transposed.
    fused={Role.ROUTER: f"{FFN}.router.layer.weight",
           Role.EXPERT_GATE: f"{FFN}.experts.mlp.w1",
           Role.EXPERT_UP: f"{FFN}.experts.mlp.v1",
           Role.EXPERT_DOWN: f"{FFN}.experts.mlp.w2"},
    shapes={Role.EXPERT_GATE: ("E*I", "H"), Role.EXPERT_UP: ("E*I", "H"), Role.EXPERT_DOWN: ("E*I", "H")},
    packed_experts=True,
    router_module="transformer.blocks.{L}.ffn.router",
    router_output="logits",
    experts_module=None,
)
