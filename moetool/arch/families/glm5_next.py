"""GLM-5.3-Flash ("glm5_next", text model glm5_next_text): DeepSeek-V3's MoE block and names (sigmoid router
with correction bias and group limit, router weight and bias in fp32, n_shared_experts shared experts) with
clamped SwiGLU (swiglu_limit) experts, dense layers by mlp_layer_types (the first 3 without it), Kimi Delta
Attention and DSA-indexed MLA layers, and hyper-connections (hc_mult residual streams between layers). Only
the image-text wrapper Glm5NextForConditionalGeneration runs it (the text model has no causal-LM class):
tensors under model.language_model., the vision tower's under model.visual. As Kimi Linear's, the hub keeps
the forget gate's tensors on the attention and q/k/v_conv1d apart (transformers joins them into conv1d),
and names the hyper-connections hc_attn_* / hc_ffn_* (transformers: attn_hc.* / ffn_hc.*)."""

from dataclasses import replace

from moetool.arch.families._shared import in_wrapper, mlp_layer_types
from moetool.arch.families.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moetool.arch.families.kimi_linear import FAMILY as KIMI_LINEAR
from moetool.arch.families.kimi_linear import conv_joins, conv_rows

HC = tuple((f".hc_{block}_{part}", f".{block}_hc.{part}") for block in ("attn", "ffn")
           for part in ("fn", "base", "scale"))

FAMILY = in_wrapper(
    DEEPSEEK_V3, name="glm5_next", model_types=("glm5_next",), title="GLM-5.3-Flash (glm5_next)",
    router=replace(DEEPSEEK_V3.router, config_defaults=(   # Glm5NextTextConfig's
        ("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5))),
    is_moe_layer=mlp_layer_types(3),
    defaults=(("n_shared_experts", 1), ("tie_word_embeddings", False)),
    root_keys=("tie_word_embeddings",),   # (the wrapper's own, as transformers reads it)
    # transformers' _keep_in_fp32_modules_strict beyond the router's (hub names and transformers 5's)
    fp32_suffixes=("conv1d.weight", ".dt_bias", ".A_log", ".attn_hc.base", ".attn_hc.scale", ".ffn_hc.base",
                   ".ffn_hc.scale", ".hc_attn_base", ".hc_attn_scale", ".hc_ffn_base", ".hc_ffn_scale"),
    renames=KIMI_LINEAR.renames + HC,
    row_joins=conv_joins(conv_rows(64, 128)),   # Glm5NextTextConfig's defaults
    notes="image-text wrapper; clamped SwiGLU experts; Kimi Delta Attention and DSA-indexed MLA layers; "
          "hyper-connections (hc_mult streams between layers); vision tensors (model.visual.*) are not the "
          "text model's; layers past num_hidden_layers are MTP modules",
)
