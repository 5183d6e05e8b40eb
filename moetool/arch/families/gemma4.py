"""Gemma 4 (text; the MoE is gemma-4-26B-A4B): with enable_moe_block every layer runs its dense GeGLU MLP
(mlp.*, counted as a shared expert) beside 128 routed GeGLU experts (layers.{L}.experts, stored fused on
the hub: transformers has no per-expert form). The router (layers.{L}.router) reads the residual stream
through its own scale-free RMSNorm and a learnt `scale`, takes softmax top-k, renormalises, then multiplies
each chosen weight by `per_expert_scale`. Without enable_moe_block (E2B, E4B, 31B) no layer has experts.
The image/audio-text wrapper (gemma4) keeps the text config in text_config, tensors under
model.language_model. With use_double_wide_mlp (E2B) the MLPs of the layers that reuse an earlier layer's keys
and values (the last num_kv_shared_layers) are twice intermediate_size wide."""

from moetool.arch.families._shared import EMBED_AND_HEAD, keys
from moetool.arch.schema import Config, Family, Role, Router


def _mlp_width_factor(cfg: Config, layer: int) -> int:
    """2 in the key-value sharing layers of a use_double_wide_mlp config (transformers' Gemma4TextMLP:
    kv_sharing_modes "reuse", the last num_kv_shared_layers layers), else 1."""
    shared = cfg.get("num_kv_shared_layers") or 0
    layers = cfg.get("num_hidden_layers") or 0
    return 2 if cfg.get("use_double_wide_mlp") and shared and layer >= layers - shared else 1


LAYER = "model.layers.{L}"
FAMILY = Family(
    name="gemma4",
    model_types=("gemma4_text", "gemma4"),
    title="Gemma 4 (text)",
    router=Router("softmax", renormalize=True,
                  notes="router input: RMSNorm(residual) x scale / sqrt(H); weights renormalised, then x "
                        "per_expert_scale"),
    keys=keys(num_experts=("num_experts",), top_k=("top_k_experts",), expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD,
            Role.ROUTER: f"{LAYER}.router.proj.weight",
            Role.ROUTER_SCALE: f"{LAYER}.router.per_expert_scale",
            Role.SHARED_GATE: f"{LAYER}.mlp.gate_proj.weight",
            Role.SHARED_UP: f"{LAYER}.mlp.up_proj.weight",
            Role.SHARED_DOWN: f"{LAYER}.mlp.down_proj.weight"},
    per_expert=None,
    fused={Role.EXPERT_GATE_UP: f"{LAYER}.experts.gate_up_proj", Role.EXPERT_DOWN: f"{LAYER}.experts.down_proj"},
    is_moe_layer=lambda cfg, layer: bool(cfg.get("enable_moe_block")) and (cfg.get("num_experts") or 0) > 0,
    shared_ffn=lambda cfg: cfg.get("intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    # the MLP is in every layer; without experts it is the layer's only MLP
    shared_in_dense_layers=True,
    mlp_width_factor=_mlp_width_factor,
    buffer_suffixes=(".layer_scalar",),
    config_root="text_config",
    name_prefixes=(("model.language_model.", "model."),),
    router_module=f"{LAYER}.router",
    router_output="topk-probs",
    experts_module=f"{LAYER}.experts",
    notes="dense MLP and routed experts side by side in every layer, each with its own norms; GeGLU "
          "(gelu_pytorch_tanh); sliding and full attention; the hub layout is transformers' fused one",
)
