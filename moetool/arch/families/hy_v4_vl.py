"""Tencent HY4-VL ("hy_v4_vl"): an image-text wrapper (HYV4VLForConditionalGeneration; text_config model_type
"hy_v4_vl_text") around Hy4's text model, whose MoE block, router and hub renames are hy_v4's. The hub holds the text
model under model. (transformers moves it under model.language_model. and then applies hy_v4's renames there), the
vision tower and projector under vit.*, which keep their hub names: transformers' own conversion renames them on
load (moetool's runner loads them through it). Its head's hyper-connection tensors are one more rename than hy_v4's
(hc_head.hc_pre.hc_head_*)."""

from dataclasses import replace

from moetool.arch.families.hy_v4 import FAMILY as HY_V4

FAMILY = replace(
    HY_V4, name="hy_v4_vl", model_types=("hy_v4_vl",), title="Tencent HY4-VL",
    config_root="text_config", root_keys=("tie_word_embeddings",),
    name_prefixes=(("model.language_model.", "model."),),
    router_module="model.language_model.layers.{L}.mlp.gate",   # in the wrapper transformers builds
    experts_module="model.language_model.layers.{L}.mlp.experts",
    # (the hub's head under its own hc_pre: model.hc_head.hc_pre.hc_head_fn, as transformers' chained renames
    # reversed name it)
    renames=(*((f".hc_head.hc_pre.hc_head_{part}", f".hc_head.hc_{part}") for part in ("fn", "base", "scale")),
             *HY_V4.renames),
    notes=HY_V4.notes + "; image-text wrapper: vision tensors (vit.*) are not the text model's",
)
