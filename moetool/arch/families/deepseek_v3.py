from moetool.arch.families._shared import (
                                           DEEPSEEK_SHARED,
                                           DEEPSEEK_V3_ROUTER,
                                           DENSE_MLP,
                                           EMBED_AND_HEAD,
                                           QWEN_EXPERTS,
                                           QWEN_FUSED,
                                           ROUTER_MLP_GATE,
                                           deepseek_num_shared,
                                           deepseek_shared_ffn,
                                           first_k_dense,
                                           keys,
)
from moetool.arch.schema import Family, Role

FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    title="DeepSeek-V3 / R1 / Kimi-K2",
    router=DEEPSEEK_V3_ROUTER,
    keys=keys(num_experts=("n_routed_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **ROUTER_MLP_GATE, **DEEPSEEK_SHARED,
            Role.ROUTER_CORRECTION: "model.layers.{L}.mlp.gate.e_score_correction_bias"},
    per_expert=QWEN_EXPERTS,
    fused=QWEN_FUSED,
    is_moe_layer=first_k_dense,
    shared_ffn=deepseek_shared_ffn,
    num_shared=deepseek_num_shared,
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),
    mtp=True,
    defaults=(("first_k_dense_replace", 3), ("n_shared_experts", 1)),   # DeepseekV3Config's
    min_kept=(2, "its router ranks expert groups by their best two experts (n_group 1 included)"),
    notes="multi-head latent attention (MLA); layers past num_hidden_layers are MTP modules",
)
