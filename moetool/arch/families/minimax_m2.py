from moetool.arch.families._shared import EMBED_AND_HEAD, MIXTRAL_EXPERTS, QWEN_FUSED, ROUTER_MLP_GATE, keys
from moetool.arch.schema import Family, Role, Router

FAMILY = Family(
    name="minimax_m2",
    model_types=("minimax_m2",),
    title="MiniMax-M2",
    router=Router("sigmoid", renormalize=True, correction_bias=True,
                  notes="top-k on sigmoid + correction bias; no groups, no scaling factor"),
    keys=keys(num_experts=("num_local_experts", "num_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",)),
    common=EMBED_AND_HEAD,
    per_expert={**MIXTRAL_EXPERTS,
                Role.ROUTER_CORRECTION: "model.layers.{L}.block_sparse_moe.e_score_correction_bias"},
    fused={**ROUTER_MLP_GATE, **QWEN_FUSED,
           Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.e_score_correction_bias"},
    buffers=frozenset({Role.ROUTER_CORRECTION}),
)
