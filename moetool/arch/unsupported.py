"""MoE model types transformers knows and moetool does not support yet, with the reason: inspect
and every command that runs a model say it plainly instead of guessing silently."""

from __future__ import annotations

from moetool.arch.schema import Config

UNSUPPORTED: dict[str, str] = {
    "ernie4_5_vl_moe": "ERNIE 4.5 VL's hub checkpoints keep each MoE layer's text and vision experts in one list "
                       "(mlp.experts.{0..2E-1}: the first moe_num_experts are text experts of moe_intermediate_size"
                       "[0] rows, the rest vision experts of moe_intermediate_size[1]), which transformers splits by "
                       "index into mlp.text_moe.experts and mlp.vision_moe.experts as it fuses them, store both "
                       "routers transposed ([H, E]: mlp.gate.weight, and mlp.gate.weight_1 for vision) and both "
                       "routers' correction biases as one [2, E] mlp.moe_statics.e_score_correction_bias chunked "
                       "between them: transforms moetool's tensor plan cannot express (its expert templates have no "
                       "index range, and it transposes only fused expert stacks); and as the two MoE blocks share "
                       "num_experts, text experts could not be pruned without the vision ones",
    "inkling_mm_model": "Inkling's multimodal checkpoints interleave gate and up rows in one w13_weight "
                        "(shared_w13_weight too, split into the shared experts' gate_proj and up_proj) and name "
                        "its text model model.llm., transforms moetool's tensor plan cannot express (its text "
                        "model alone, inkling_text, is supported)",
    "inkling2_text": "Inkling 2's hub checkpoints interleave gate and up rows in one w13_weight, pad the "
                     "vocabulary and rename tensors with a layer-index offset, transforms moetool's tensor plan "
                     "cannot express",
    "mistral_large4_text": "Mistral Large 4's text model alone has no causal-LM class in transformers "
                           "(MistralLarge4TextModel has no head; only the wrapper "
                           "MistralLarge4ForConditionalGeneration runs it); its checkpoints are the mistral_large4 "
                           "wrapper's, which moetool runs",
    "muse_spark_text": "transformers has no causal-LM class for Muse Spark's text model alone (MuseSparkTextModel has "
                       "no LM head; only the wrapper MuseSparkForConditionalGeneration runs it): moetool supports "
                       "Muse Spark's checkpoints as the wrapper's (model_type muse_spark)",
    "minimax_m3_vl": "MiniMax-M3's image-text release stores its text model under language_model.model., "
                     "whose tensors transformers renames and joins on load in ways moetool's tensor plan cannot "
                     "follow (its text model alone, minimax_m3_vl_text, is supported)",
    "hy_v4_vl_text": "HY4-VL's text model alone has no causal-LM class in transformers (its head is "
                     "HYV4VLForConditionalGeneration's); its checkpoints are the hy_v4_vl wrapper's, which moetool "
                     "runs",
    "deepseek_ocr2_text": "DeepSeek-OCR 2's text model alone has no causal-LM class in transformers "
                          "(DeepseekOcr2TextModel has no head); its checkpoints are the deepseek_ocr2 wrapper's, "
                          "which moetool runs",
}
# wrappers whose text model is one of the above
UNSUPPORTED.update({"inkling2": UNSUPPORTED["inkling2_text"]})


def listed_reason(config: Config | None) -> str | None:
    """The reason listed for CONFIG's model type (or its text model's), if it is listed (see
    moetool.arch.unsupported_reason, which first asks whether a family claims the config)."""
    if not config:
        return None
    types = [config.get("model_type")]
    if isinstance(config.get("text_config"), dict):
        types.append(config["text_config"].get("model_type"))
    return next((UNSUPPORTED[t] for t in types if isinstance(t, str) and t in UNSUPPORTED), None)
