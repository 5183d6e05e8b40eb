"""MoE model types transformers knows and moetool does not support yet, with the reason: inspect
and every command that runs a model say it plainly instead of guessing silently."""

from __future__ import annotations

from moetool.arch.schema import Config

UNSUPPORTED: dict[str, str] = {
    "deepseek_v4": "DeepSeek-V4's first MoE layers route by a fixed token-to-expert table (DeepseekV4HashRouter "
                   "reads input_ids), not by router logits, and its layers mix several residual streams",
    "zaya": "ZAYA's router is an MLP fed by a router state carried from layer to layer, with an extra "
            "zero-compute skip expert",
    "ernie4_5_vl_moe": "ERNIE 4.5 VL holds two MoE blocks a layer (text and vision, with different expert sizes), "
                       "tokens sent to one or the other by their token type",
    "inkling_mm_model": "Inkling's multimodal checkpoints interleave gate and up rows in one w13_weight "
                        "(shared_w13_weight too, split into the shared experts' gate_proj and up_proj) and name "
                        "its text model model.llm., transforms moetool's tensor plan cannot express (its text "
                        "model alone, inkling_text, is supported)",
    "inkling2_text": "Inkling 2's hub checkpoints interleave gate and up rows in one w13_weight, pad the "
                     "vocabulary and rename tensors with a layer-index offset, transforms moetool's tensor plan "
                     "cannot express",
    "mistral_large4_text": "Mistral Large 4's hub names are Mistral's own (attention.wq, feed_forward.experts.{E}.w1, "
                           "no model. prefix), renamed by regex and its vision queries and keys permuted on load",
    "deepseek_ocr2": "DeepSeek-OCR 2's vision towers reach the model only through layer-numbered regex renames, "
                     "which moetool's own loaders (quantized, globally pruned checkpoints) cannot follow",
    "muse_spark_text": "Muse Spark's experts work in their own width (moe_hidden_size, entered by pre_expert_proj and "
                       "left by post_expert_proj around them), each expert's output is normalised "
                       "(experts.post_expert_norm) before it is weighted, and its router scales the logits by "
                       "output_multiplier",
    "hy_v4_vl_text": "HY4-VL's hub checkpoints hold its text model under model. (transformers moves it under "
                     "model.language_model. on load) with hy_v4's renames chained onto that move (linear_gate, "
                     "learnable_sink_param, hc_pre.hc_*), names moetool's templates and one-rename-per-tensor "
                     "Family.renames cannot express at once",
}
# wrappers whose text model is one of the above
UNSUPPORTED.update({"inkling2": UNSUPPORTED["inkling2_text"], "mistral_large4": UNSUPPORTED["mistral_large4_text"],
                    "muse_spark": UNSUPPORTED["muse_spark_text"], "hy_v4_vl": UNSUPPORTED["hy_v4_vl_text"]})


def unsupported_reason(config: Config | None) -> str | None:
    """Why moetool does not support CONFIG's model type (or its text model's), if it is listed."""
    if not config:
        return None
    types = [config.get("model_type")]
    if isinstance(config.get("text_config"), dict):
        types.append(config["text_config"].get("model_type"))
    return next((UNSUPPORTED[t] for t in types if isinstance(t, str) and t in UNSUPPORTED), None)
