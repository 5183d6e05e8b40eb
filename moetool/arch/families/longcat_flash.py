"""Meituan LongCat-Flash ("longcat_flash": LongCat-Flash-Chat / -Thinking, 560B): zero-computation
experts and shortcut-connected MoE. Its router scores n_routed_experts + zero_expert_num experts (a
softmax in fp32, chosen by score + correction bias, never renormalised, scaled by routed_scaling_factor);
an index past the real experts picks an identity expert, which returns the token's hidden state times
its weight and holds no weights. Each of the num_layers decoder layers holds two MLA attention blocks
(self_attn.0/1), two dense MLPs (mlps.0/1) and one MoE (mlp) fed beside the first dense MLP and added
after the second."""

from moetool.arch.families._shared import EMBED_AND_HEAD, QWEN_EXPERTS, QWEN_FUSED, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="longcat_flash",
    model_types=("longcat_flash",),
    title="LongCat-Flash",
    router=Router("softmax", renormalize=False, correction_bias=True, scaling_key="routed_scaling_factor",
                  method_key=None, config_defaults=(("routed_scaling_factor", 6.0),),
                  notes="identity (zero-computation) experts beside the real ones"),
    keys=keys(num_layers=("num_layers",), num_experts=("n_routed_experts",), top_k=("moe_topk",),
              expert_ffn=("expert_ffn_hidden_size",), dense_ffn=("ffn_hidden_size",),
              zero_experts=("zero_expert_num",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: "model.layers.{L}.mlp.router.classifier.weight",
            Role.ROUTER_BIAS: "model.layers.{L}.mlp.router.classifier.bias",   # (with router_bias)
            Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.router.e_score_correction_bias",
            # two dense MLPs a layer
            **{role: tuple(f"model.layers.{{L}}.mlps.{i}.{part}_proj.weight" for i in (0, 1))
               for role, part in ((Role.DENSE_GATE, "gate"), (Role.DENSE_UP, "up"), (Role.DENSE_DOWN, "down"))}},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    # the router scores R = E + zero_expert_num experts; transformers 5's fused gate_up_proj holds rows for
    # the identity experts too (never used, and absent from the hub's per-expert checkpoints)
    shapes={Role.ROUTER: ("R", "H"), Role.ROUTER_BIAS: ("R",), Role.ROUTER_CORRECTION: ("R",),
            Role.EXPERT_GATE_UP: ("R", "2I", "H")},
    role_keys={Role.ROUTER_BIAS: "router_bias"},
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    dense_in_moe_layers=True,
    transformers_reads_per_expert=False,   # (transformers 5.24 refuses the hub's: its gate_up_proj has R rows)
    mtp=True,   # model.mtp.* (transformers ignores it)
    router_module="model.layers.{L}.mlp.router",
    defaults=(("num_layers", 28), ("n_routed_experts", 512), ("zero_expert_num", 256), ("moe_topk", 12),
              ("expert_ffn_hidden_size", 2048), ("ffn_hidden_size", 12288)),
    notes="zero-computation (identity) experts; two attention blocks and two dense MLPs a layer beside its MoE",
)
