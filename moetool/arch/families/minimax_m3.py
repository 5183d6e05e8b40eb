"""MiniMax-M3 (text model, minimax_m3_vl_text): MiniMax-M2's sigmoid router (top-k on sigmoid +
e_score_correction_bias, weights renormalised) with one shared expert (mlp.shared_experts) beside the
routed ones; the routed output is multiplied by routed_scaling_factor before the shared expert's is added.
Experts, shared expert and dense MLPs use a clamped alpha-SwiGLU ((up + 1) * gate * sigmoid(alpha * gate)),
gate and up stored together (gate_up_proj). Which layers are MoE: mlp_layer_types ("sparse"/"dense"), or
moe_layer_freq in a raw config.json. transformers has no conversion mapping for the text model type: its
checkpoints are in the fused layout (the image-text wrapper minimax_m3_vl's hub names are not)."""

from moetool.arch.families._shared import EMBED_AND_HEAD, QWEN_FUSED, ROUTER_MLP_GATE, keys
from moetool.arch.schema import Config, Family, Role, Router

LAYER = "model.layers.{L}"


def _moe_layer(cfg: Config, layer: int) -> bool:
    """MiniMaxM3VLTextConfig: mlp_layer_types, else moe_layer_freq, else every layer sparse."""
    types = cfg.get("mlp_layer_types")
    if types is not None:
        return layer < len(types) and types[layer] == "sparse"
    freq = cfg.get("moe_layer_freq")
    if freq is not None:
        return layer < len(freq) and bool(freq[layer])
    return True


FAMILY = Family(
    name="minimax_m3",
    model_types=("minimax_m3_vl_text",),
    title="MiniMax-M3 (text)",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="routed_scaling_factor",
                  notes="top-k on sigmoid + correction bias, weights renormalised; no groups; the routed "
                        "output x routed_scaling_factor", config_defaults=(("routed_scaling_factor", 2.0),)),
    keys=keys(num_experts=("num_local_experts", "num_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("intermediate_size",), dense_ffn=("dense_intermediate_size",)),
    common={**EMBED_AND_HEAD, **ROUTER_MLP_GATE,
            Role.ROUTER_CORRECTION: f"{LAYER}.mlp.gate.e_score_correction_bias",
            Role.SHARED_GATE_UP: f"{LAYER}.mlp.shared_experts.gate_up_proj.weight",
            Role.SHARED_DOWN: f"{LAYER}.mlp.shared_experts.down_proj.weight",
            Role.DENSE_GATE_UP: f"{LAYER}.mlp.gate_up_proj.weight",
            Role.DENSE_DOWN: f"{LAYER}.mlp.down_proj.weight"},
    per_expert=None,
    fused=QWEN_FUSED,
    is_moe_layer=_moe_layer,
    shared_ffn=lambda cfg: cfg.get("shared_intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    mtp=True,
    # MiniMaxM3VLTextConfig's defaults
    defaults=(("shared_intermediate_size", 3072), ("dense_intermediate_size", 12288)),
    notes="clamped alpha-SwiGLU (swiglu_alpha, swiglu_limit) everywhere; Gemma-style (1 + w) RMSNorms; "
          "partial RoPE and a block-sparse lightning indexer on minimax_m3_sparse layers; mtp.* tensors are "
          "ignored by transformers",
)
