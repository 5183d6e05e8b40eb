"""Mistral 4 (Mistral-Small-4): DeepSeek-V3's layout (MLA attention, shared expert, first_k_dense_replace
dense layers) with a softmax router: groups ranked by the sum of their best two scores, no correction bias,
the router not held in fp32. transformers has Mistral4ForCausalLM but registers it for no auto causal-LM
class (moetool's runner builds it directly); no conversion mapping, so the fused layout is the only one."""

from dataclasses import replace

from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.schema import Role

FAMILY = replace(
    DEEPSEEK_V3, name="mistral4", model_types=("mistral4",), title="Mistral 4",
    router=replace(DEEPSEEK_V3.router, score="softmax", correction_bias=False,
                   notes="softmax; groups ranked by the sum of their top-2 scores",
                   config_defaults=(("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True),
                                    ("routed_scaling_factor", 1.0))),
    common={r: t for r, t in DEEPSEEK_V3.common.items() if r != Role.ROUTER_CORRECTION},
    per_expert=None, buffers=frozenset(), fp32_roles=frozenset(), mtp=False,
    defaults=(("first_k_dense_replace", 0), ("n_shared_experts", 1)),
    # the image-text release (Mistral-Small-4: a Mistral 3 wrapper, text_config mistral4) keeps the text
    # model under language_model.model. (as transformers saves it) or model.language_model., the head
    # under language_model.lm_head., the vision tower and projector at the top
    config_root="text_config", root_keys=("tie_word_embeddings",),   # (the wrapper's own, as transformers reads it)
    name_prefixes=(("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")),
    notes="multi-head latent attention (MLA); experts fused on the hub (no per-expert form in transformers)",
)
