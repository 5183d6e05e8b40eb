"""NVIDIA Nemotron-H / Nemotron 3 ("nemotron_h", Nemotron-3-Nano-30B-A3B): hybrid Mamba2, attention, MLP and
MoE blocks, one mixer a layer (layers_block_type, or the hub's hybrid_override_pattern M/*/-/E). Experts
are not gated: down(relu2(up(x))), so only up_proj and down_proj; one shared expert of the same form; a
DeepSeek-V3 router (sigmoid, correction bias, groups) kept in fp32. The hub stores backbone.*, transformers 5
model.*. Dense Nemotron-H models (no E layers) share the model type. Latent MoE (Nemotron 3 Super:
moe_latent_size set): the router and the shared expert read the hidden states, the routed experts work in the
latent space between fc1_latent_proj (hidden -> latent) and fc2_latent_proj (latent -> hidden), which every
token passes through (counted as always active)."""

from dataclasses import replace

from moetool.arch.families._shared import DEEPSEEK_V3_ROUTER, keys
from moetool.arch.schema import Config, Family, Role

PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
DEFAULT_TYPES = ["linear_attention", "moe", "full_attention", "mlp"]   # NemotronHConfig's


def layer_types(cfg: Config) -> list[str]:
    """The block types as transformers reads them: layers_block_type, else the hub's pattern string."""
    types = cfg.get("layers_block_type")
    if isinstance(types, list):
        return types
    pattern = cfg.get("hybrid_override_pattern")
    return [PATTERN[c] for c in pattern] if isinstance(pattern, str) else DEFAULT_TYPES


def templates(root: str) -> dict[Role, str]:
    mixer = root + ".layers.{L}.mixer"
    return {Role.EMBED: f"{root}.embeddings.weight",
            Role.ROUTER: f"{mixer}.gate.weight",
            Role.ROUTER_CORRECTION: f"{mixer}.gate.e_score_correction_bias",
            Role.SHARED_UP: f"{mixer}.shared_experts.up_proj.weight",
            Role.SHARED_DOWN: f"{mixer}.shared_experts.down_proj.weight",
            Role.DENSE_UP: f"{mixer}.up_proj.weight",
            Role.DENSE_DOWN: f"{mixer}.down_proj.weight"}


MIXER = "model.layers.{L}.mixer"
FAMILY = Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    title="Nemotron-H / Nemotron 3 (hybrid Mamba2, MoE)",
    router=replace(DEEPSEEK_V3_ROUTER, config_defaults=(("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True),
                                                        ("routed_scaling_factor", 1.0))),
    keys=keys(num_experts=("n_routed_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",), expert_hidden=("moe_latent_size",)),
    common={Role.LM_HEAD: "lm_head.weight"},
    per_expert={**templates("backbone"),
                Role.EXPERT_UP: "backbone.layers.{L}.mixer.experts.{E}.up_proj.weight",
                Role.EXPERT_DOWN: "backbone.layers.{L}.mixer.experts.{E}.down_proj.weight"},
    fused={**templates("model"),
           Role.EXPERT_UP: f"{MIXER}.experts.up_proj",
           Role.EXPERT_DOWN: f"{MIXER}.experts.down_proj"},
    shapes={Role.EXPERT_UP: ("E", "I", "X"), Role.EXPERT_DOWN: ("E", "X", "I")},   # X: moe_latent_size, else H
    num_layers=lambda cfg: len(layer_types(cfg)),
    is_moe_layer=lambda cfg, layer: layer_types(cfg)[layer] == "moe",
    is_dense_layer=lambda cfg, layer: layer_types(cfg)[layer] == "mlp",
    # transformers builds one shared MLP (moe_shared_expert_intermediate_size, else intermediate_size) always
    shared_ffn=lambda cfg: cfg.get("moe_shared_expert_intermediate_size") or cfg.get("intermediate_size") or 0,
    num_shared=lambda cfg: 1,
    defaults=(("moe_shared_expert_intermediate_size", 7688), ("intermediate_size", 21504)),   # NemotronHConfig's
    buffers=frozenset({Role.ROUTER_CORRECTION}),
    fp32_roles=frozenset({Role.ROUTER, Role.ROUTER_CORRECTION}),   # _keep_in_fp32_modules_strict
    renames=(("backbone.", "model."),),
    mtp=True,
    router_module=f"{MIXER}.gate",
    experts_module=f"{MIXER}.experts",
    experts_output_module=f"{MIXER}.fc2_latent_proj",
    min_kept=(2, "its router ranks expert groups by their best two experts (n_group 1 included)"),
    notes="non-gated relu2 experts (up_proj, down_proj); one mixer a layer (Mamba2, attention, MLP or MoE); "
          "mtp.* tensors are ignored by transformers",
)
