"""Step 3.7 (StepFun, Step-3.7-Flash): an image-text wrapper (Step3p7ForConditionalGeneration, the only class
transformers runs its text model with; text_config model_type "step3p5") around a DeepSeek-like MoE text model:
a sigmoid router whose correction bias (router_bias) only selects, weights always renormalised, the routed
output x moe_router_scaling_factor; one shared expert (share_expert_dim) a MoE layer; dense layers by
mlp_layer_types (the hub's moe_layers_enum: 0-2 dense); SwiGLU experts, shared expert and dense MLPs clamped
per layer (swiglu_limits, swiglu_limits_shared), which moetool runs as transformers does; MTP layers past
num_hidden_layers. The hub holds the text model under model. (held under model.language_model.), the experts
as stacked [E, I, H] gate_proj and up_proj and [E, H, I] down_proj under moe., the shared expert as
share_expert: transformers renames them and joins gate and up expert by expert into gate_up_proj [E, 2I, H]
(joins_stacked_gate_up); moetool's loaders do the same. The per-expert layout is moetool's own."""

from moetool.arch.families._shared import DENSE_MLP, EMBED_AND_HEAD, keys, mlp_layer_types
from moetool.arch.schema import Config, Family, Role, Router

L, HUB = "model.layers.{L}.", "model.layers.{L}.moe."
SHARED = {role: (f"{L}mlp.shared_experts.{proj}.weight", f"{L}share_expert.{proj}.weight")   # held, hub
          for role, proj in ((Role.SHARED_GATE, "gate_proj"), (Role.SHARED_UP, "up_proj"),
                             (Role.SHARED_DOWN, "down_proj"))}



def _moe_layers_enum(cfg: Config, layer: int) -> bool:
    """Without mlp_layer_types, as Step3p7TextConfig reads the hub's moe_layers_enum (MoE layer numbers, a
    comma-separated string or a list), else every layer from 3 on."""
    listed = cfg.get("moe_layers_enum")
    if listed is None:
        return layer >= 3
    items = listed.split(",") if isinstance(listed, str) else listed
    return layer in {int(i) for i in items if str(i).strip()}


def _shared_ffn(cfg: Config) -> int:
    """share_expert_dim (or its alias share_expert_dims); Step3p7TextConfig's 1280 without either."""
    value = cfg.get("share_expert_dim", cfg.get("share_expert_dims"))
    return 1280 if value is None else value


FAMILY = Family(
    name="step3p7",
    model_types=("step3p7",),
    title="Step 3.7",
    router=Router("sigmoid", renormalize=True, correction_bias=True, scaling_key="moe_router_scaling_factor",
                  method_key=None, config_defaults=(("moe_router_scaling_factor", 1.0),),
                  notes="top-k on sigmoid + correction bias, weights by the sigmoid; no groups"),
    keys=keys(num_experts=("n_routed_experts", "num_local_experts", "moe_num_experts"),
              top_k=("num_experts_per_tok", "moe_top_k"), expert_ffn=("moe_intermediate_size",)),
    common={**EMBED_AND_HEAD, **DENSE_MLP, **SHARED,
            Role.ROUTER: (f"{L}mlp.gate.weight", f"{HUB}gate.weight"),
            Role.ROUTER_CORRECTION: (f"{L}mlp.gate.e_score_correction_bias", f"{HUB}router_bias")},
    per_expert={Role.EXPERT_GATE: HUB + "experts.{E}.gate_proj.weight",
                Role.EXPERT_UP: HUB + "experts.{E}.up_proj.weight",
                Role.EXPERT_DOWN: HUB + "experts.{E}.down_proj.weight"},
    # transformers 5's form, and the hub's stacked one beside it (gate and up apart: joins_stacked_gate_up)
    fused={Role.EXPERT_GATE_UP: f"{L}mlp.experts.gate_up_proj",
           Role.EXPERT_DOWN: (f"{L}mlp.experts.down_proj", f"{HUB}down_proj.weight"),
           Role.EXPERT_GATE: f"{HUB}gate_proj.weight", Role.EXPERT_UP: f"{HUB}up_proj.weight"},
    is_moe_layer=mlp_layer_types(_moe_layers_enum),
    shared_ffn=_shared_ffn,
    num_shared=lambda cfg: 1,   # every MoE block builds its shared expert
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    config_root="text_config",
    defaults=(("moe_intermediate_size", 1280), ("intermediate_size", 11264)),   # Step3p7TextConfig's
    root_keys=("tie_word_embeddings",),
    name_prefixes=(("model.language_model.", "model."),),
    router_module="model.language_model.layers.{L}.mlp.gate",   # in the wrapper transformers builds
    experts_module="model.language_model.layers.{L}.mlp.experts",
    mtp=True,
    transformers_reads_per_expert=False,
    renames=((".moe.gate.weight", ".mlp.gate.weight"), (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
             (".share_expert.", ".mlp.shared_experts.")),
    notes="image-text wrapper; routed experts, shared expert and dense MLPs clamped per layer (swiglu_limits, "
          "swiglu_limits_shared); gated attention (g_proj), sliding and full attention; vision tensors "
          "(vision_model.*, vit_large_projector.*) are not the text model's; layers past num_hidden_layers are MTP",
)
