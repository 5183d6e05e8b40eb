"""DeepSeek-OCR 2 ("deepseek_ocr2"): an image-text wrapper (DeepseekOcr2ForConditionalGeneration; text_config
model_type "deepseek_ocr2_text") around a DeepSeek-V2 MoE text model with plain multi-head attention (q/k/v/o, no
MLA): DeepSeek-V2's router (softmax, greedy or group-limited top-k, never renormalised, x routed_scaling_factor;
fp32) and shared experts, dense layers by mlp_layer_types. The hub holds the text model under model. (held under
model.language_model.), experts one tensor per expert; its vision towers and projector (model.sam_model.*,
model.qwen2_model.*, model.projector.*, model.view_seperator) keep their hub names: transformers' own conversion
renames them on load (moetool's runner loads them through it)."""

from dataclasses import replace

from moetool.arch.families._shared import first_k_dense, mlp_layer_types
from moetool.arch.families.deepseek_v2 import FAMILY as DEEPSEEK_V2

FAMILY = replace(
    DEEPSEEK_V2, name="deepseek_ocr2", model_types=("deepseek_ocr2",), title="DeepSeek-OCR 2",
    is_moe_layer=mlp_layer_types(first_k_dense),   # (transformers builds its layers from mlp_layer_types alone)
    config_root="text_config", root_keys=("tie_word_embeddings",),
    defaults=(("n_routed_experts", 64), ("n_shared_experts", 2), ("moe_intermediate_size", 1407),
              ("intermediate_size", 11008)),   # DeepseekOcr2TextConfig's
    name_prefixes=(("model.language_model.", "model."),),
    router_module="model.language_model.layers.{L}.mlp.gate",   # in the wrapper transformers builds
    experts_module="model.language_model.layers.{L}.mlp.experts",
    notes="image-text wrapper; multi-head attention; vision tensors (sam_model.*, qwen2_model.*, projector.*) "
          "are not the text model's",
)
