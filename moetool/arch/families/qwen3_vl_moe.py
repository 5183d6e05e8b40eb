"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B): Qwen3-MoE's text model (softmax router, weights
always renormalised, no shared expert) inside the image-text wrapper Qwen3VLMoeForConditionalGeneration,
which transformers alone runs; the text model's tensors live under model.language_model., the vision
tower's under model.visual. The hub stores the experts fused and transposed (gate_up_proj [E, H, 2I],
down_proj [E, I, H]); transformers 5 transposes them to [E, 2I, H] / [E, H, I] as it loads, where the
shapes differ, and saves that held form; moetool's loaders read both (transposed_on_load) and its own
fused output is the held form (fused_transposed False), which needs no transpose, so square experts
(H == 2I or H == I, where the two forms cannot be told apart) read right too. The per-expert layout is
moetool's own."""

from moetool.arch.families._shared import QWEN_EXPERTS, QWEN_FUSED, SOFTMAX_TOPK_RENORM, in_wrapper
from moetool.arch.families.qwen3_moe import FAMILY as QWEN3_MOE
from moetool.arch.schema import Role

FAMILY = in_wrapper(
    QWEN3_MOE, name="qwen3_vl_moe", model_types=("qwen3_vl_moe",), title="Qwen3-VL-MoE",
    router=SOFTMAX_TOPK_RENORM,
    per_expert=QWEN_EXPERTS, fused=QWEN_FUSED,
    shapes={Role.EXPERT_GATE_UP: ("E", "H", "2I"), Role.EXPERT_DOWN: ("E", "I", "H")},
    fused_transposed=False, transposed_on_load=True, transformers_reads_per_expert=False,
    root_keys=("tie_word_embeddings",), defaults=(("tie_word_embeddings", False),),   # the wrapper's own
    notes="image-text wrapper; experts stored fused [E, in, out], transposed on load; vision tensors "
          "(model.visual.*) are not the text model's",
)
