"""Thinking Machines Inkling's text model ("inkling_text", transformers' InklingForCausalLM). Its router
(mlp.gate) holds n_routed_experts + n_shared_experts rows: the routed experts are chosen by sigmoid + a
correction bias (routed only), and the weights are the sigmoids of the chosen and of the shared experts,
normalised together (the shared experts act as sinks, never picked by top-k), times route_scale and the gate's
learned global_scale; the shared experts' share (shared_gammas) weights each of them per token. The shared
experts are stacked 3-D parameters (shared_experts.gate_proj / up_proj [N, S, H], down_proj [N, H, S]). Layers
mix sliding and full attention with short convolutions and a relative position bias; mlp_layer_types says
which are dense. Its hub checkpoints are the multimodal wrapper's (inkling_mm_model: not supported)."""

from moetool.arch.families._shared import DENSE_MLP, EMBED_AND_HEAD, QWEN_FUSED, keys, mlp_layer_types
from moetool.arch.schema import Family, Role, Router

MLP = "model.layers.{L}.mlp"
FAMILY = Family(
    name="inkling",
    model_types=("inkling_text",),
    title="Inkling",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="route_scale", method_key=None,
                  config_defaults=(("route_scale", 8.0),),
                  notes="fp32; the chosen experts' sigmoids normalised together with the shared experts' "
                        "(router rows past the routed ones), times route_scale and the gate's global_scale"),
    keys=keys(num_experts=("n_routed_experts",), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",), tie=(),   # (never tied: its _tied_weights_keys is empty)
              sink_experts=("n_shared_experts",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP,
            Role.ROUTER: f"{MLP}.gate.weight",
            Role.ROUTER_CORRECTION: f"{MLP}.gate.e_score_correction_bias",
            Role.SHARED_GATE: f"{MLP}.shared_experts.gate_proj",
            Role.SHARED_UP: f"{MLP}.shared_experts.up_proj",
            Role.SHARED_DOWN: f"{MLP}.shared_experts.down_proj"},
    per_expert=None,
    fused=QWEN_FUSED,
    is_moe_layer=mlp_layer_types(0),   # (InklingTextConfig: every layer sparse without mlp_layer_types)
    shared_ffn=lambda cfg: cfg.get("moe_intermediate_size") or 0,   # each shared expert's width
    num_shared=lambda cfg: cfg.get("n_shared_experts") or 0,
    # the router scores R = E + N rows (N shared experts, never chosen); shared experts stacked, N of them
    shapes={Role.ROUTER: ("R", "H"), Role.SHARED_GATE: ("N", "S", "H"), Role.SHARED_UP: ("N", "S", "H"),
            Role.SHARED_DOWN: ("N", "H", "S")},
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),
    fp32_suffixes=("_sconv.conv1d.weight", ".gate.global_scale"),   # its _keep_in_fp32_modules_strict
    mtp=True,   # model.mtp.* (transformers ignores it)
    defaults=(("n_shared_experts", 2), ("n_routed_experts", 256), ("num_experts_per_tok", 6),
              ("moe_intermediate_size", 3072), ("intermediate_size", 24576), ("num_hidden_layers", 66),
              ("hidden_size", 6144), ("vocab_size", 201024)),   # InklingTextConfig's
    notes="shared experts scored by the router as sinks beside the routed ones; short convolutions and a "
          "relative position bias in every layer",
)
