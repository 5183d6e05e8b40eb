"""Muse Spark ("muse_spark", Muse-Spark-Open-816B-A42B): an image-text-audio wrapper
(MuseSparkForConditionalGeneration, the only class transformers runs its text model muse_spark_text with) whose
text model's MoE layers (mlp_layer_types "sparse"; "dense" ones hold a SwiGLU MLP) are a latent MoE: the router
reads the hidden states, the routed experts work in moe_hidden_size (shape symbol X), between pre_expert_proj
(+ pre_expert_norm) and post_expert_proj, which every token passes through (counted as always active); each
expert's output is normalised by experts.post_expert_norm (one weight shared by all experts, kept whole by
prune, left alone by quantize) before it is weighted. Router: sigmoid of the fp32 logits x output_multiplier,
top-k on score + correction bias, weights renormalised (eps 1e-15) x routed_scaling_factor, in fp32. No shared
expert. Hub checkpoints hold the experts fused (transformers has no conversion for this type): one layout."""

from moetool.arch.families._shared import DENSE_MLP, EMBED_AND_HEAD, in_wrapper, keys, mlp_layer_types
from moetool.arch.schema import Family, Role, Router

MLP = "model.layers.{L}.mlp"

TEXT = Family(
    name="muse_spark",
    model_types=("muse_spark",),
    title="Muse Spark",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="routed_scaling_factor",
                  method_key=None, config_defaults=(("routed_scaling_factor", 1.0),),
                  notes="sigmoid of the fp32 logits x output_multiplier; top-k on score + correction bias, "
                        "weights by the score, renormalised; no groups"),
    keys=keys(num_experts=("num_local_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",), expert_hidden=("moe_hidden_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, Role.ROUTER: f"{MLP}.gate.weight",
            Role.ROUTER_CORRECTION: f"{MLP}.gate.e_score_correction_bias"},
    per_expert=None,
    fused={Role.EXPERT_GATE_UP: f"{MLP}.experts.gate_up_proj", Role.EXPERT_DOWN: f"{MLP}.experts.down_proj"},
    shapes={Role.EXPERT_GATE_UP: ("E", "2I", "X"), Role.EXPERT_DOWN: ("E", "X", "I")},   # X: moe_hidden_size
    is_moe_layer=mlp_layer_types(0),   # MuseSparkTextConfig: every layer sparse without mlp_layer_types
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),   # _keep_in_fp32_modules_strict
    fp32_suffixes=(".post_attention_residual_gate.gate", ".post_feedforward_residual_gate.gate"),
    experts_output_module=f"{MLP}.post_expert_proj",
    not_experts=(".mlp.pre_expert_proj.weight", ".mlp.post_expert_proj.weight"),   # (counted as other)
    # MuseSparkTextConfig's
    defaults=(("num_local_experts", 256), ("num_experts_per_tok", 8), ("moe_intermediate_size", 4096),
              ("moe_hidden_size", 4096), ("intermediate_size", 16384), ("tie_word_embeddings", False)),
    transformers_reads_per_expert=False,
    notes="image-text-audio wrapper; latent MoE (moe_hidden_size) between pre_expert_proj and post_expert_proj; "
          "each expert's output RMS-normalised (experts.post_expert_norm, shared) before weighting; gated "
          "attention, sliding and full (NoPE) layers, residual gates in fp32; logits x output_multiplier, then "
          "tanh-softcapped; vision and audio tensors (model.vision_tower.*, model.audio_tower.*, "
          "model.vision_adapter.*, model.vision_projection.*) are not the text model's",
)

# (MuseSparkForConditionalGeneration ties nothing: no _tied_weights_keys)
FAMILY = in_wrapper(TEXT, root_keys=("tie_word_embeddings",))
