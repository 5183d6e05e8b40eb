"""DeepSeek-V4 ("deepseek_v4": V4-Flash, V4-Pro). Every layer is MoE: n_routed_experts clamped-SwiGLU experts
and one shared expert (moe_intermediate_size wide, whatever n_shared_experts says), routed by sqrt(softplus)
scores (scoring_func) with a correction bias for selection, weights renormalised and scaled by
routed_scaling_factor. The first layers ("hash_moe" in mlp_layer_types; num_hash_layers in older configs,
3 by default) choose their experts by a fixed token-id table instead (gate.tid2eid [V, k]): the router's
scores only weight them, and those layers have no correction bias. Hyper-connections carry hc_mult residual
streams between layers; attention is sliding-window MQA with compressed (CSA/HCA) key-value entries.

Hub names are DeepSeek's own (transformers renames them on load): layers.{L}.ffn.experts.{E}.w1/w3/w2 (gate,
up, down), ffn.gate.weight / .bias / .tid2eid, ffn.shared_experts.w1/w3/w2, attn.wq_a ..., attn_norm,
ffn_norm, hc_attn_fn ..., embed, head and norm at the top, without transformers' model. prefix (its saves
keep model.: both are read)."""

from moetool.arch.families._shared import keys
from moetool.arch.schema import Config, Family, Role, Router

HASH_LAYERS = 3   # DeepseekV4Config.default_num_hash_layers


def is_hash_layer(cfg: Config, layer: int) -> bool:
    """Whether LAYER picks its experts by the token table, as DeepseekV4Config builds mlp_layer_types."""
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "hash_moe"
    hashed = cfg.get("num_hash_layers")
    return layer < (hashed if isinstance(hashed, int) else HASH_LAYERS)


def _absent(cfg: Config, layer: int) -> frozenset[Role]:
    return frozenset({Role.ROUTER_CORRECTION} if is_hash_layer(cfg, layer) else {Role.ROUTER_HASH})


def _infixes(hub: str, held: str, parts: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """(hub infix, transformers-5 infix) of each part renamed under HUB -> HELD (a trailing dot: a module's
    weight, none: a parameter of its own)."""
    return tuple((f"{hub}{a}{'' if a in BARE else '.'}", f"{held}{b}{'' if a in BARE else '.'}")
                 for a, b in parts.items())


BARE = {"ape", "attn_sink"}   # parameters, not modules with a .weight
# (the hub's attn.kv_norm, which the per-expert layout writes: transformers' own saves name it attn.norm)
ATTENTION = {"wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv": "kv_proj", "wo_a": "o_a_proj", "wo_b": "o_b_proj",
             "q_norm": "q_a_norm", "kv_norm": "kv_norm", "norm": "kv_norm", "attn_sink": "sinks"}
COMPRESSOR = {"ape": "position_bias", "wkv": "kv_proj", "wgate": "gate_proj", "norm": "kv_norm"}
INDEXER = {"wq_b": "q_b_proj", "weights_proj": "scorer.weights_proj"}
HC = tuple((f".hc_{block}_{part}", f".{block}_hc.{part}") for block in ("attn", "ffn")
           for part in ("fn", "base", "scale"))
HC_HEAD = ("hc_head.hc_fn", "hc_head.hc_base", "hc_head.hc_scale")

RENAMES = (*_infixes(".attn.indexer.compressor.", ".self_attn.compressor.indexer.", COMPRESSOR),
           *_infixes(".attn.indexer.", ".self_attn.compressor.indexer.", INDEXER),
           *_infixes(".attn.compressor.", ".self_attn.compressor.", COMPRESSOR),
           *_infixes(".attn.", ".self_attn.", ATTENTION),
           (".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."), *HC,
           (".attn.", ".self_attn."))   # (any other attention tensor: transformers renames the module alone)

HUB = "model.layers.{L}.ffn."
HELD = "model.layers.{L}.mlp."

FAMILY = Family(
    name="deepseek_v4",
    model_types=("deepseek_v4",),
    title="DeepSeek-V4",
    router=Router("sqrtsoftplus", renormalize=True, correction_bias=True, scaling_key="routed_scaling_factor",
                  notes="there the router's scores only weight the experts its table (tid2eid) picks",
                  method_key=None, selection_key="scoring_func",
                  selections=(("softmax", "softmax", True), ("sigmoid", "sigmoid", True)),
                  config_defaults=(("scoring_func", "sqrtsoftplus"), ("routed_scaling_factor", 1.5))),
    keys=keys(num_experts=("n_routed_experts", "num_local_experts"), top_k=("num_experts_per_tok",),
              expert_ffn=("moe_intermediate_size",), dense_ffn=()),
    common={Role.EMBED: "model.embed_tokens.weight"},
    per_expert={
        Role.LM_HEAD: "head.weight",   # (transformers saves the hub's name of it, and model.embed_tokens)
        Role.ROUTER: HUB + "gate.weight", Role.ROUTER_CORRECTION: HUB + "gate.bias",
        Role.ROUTER_HASH: HUB + "gate.tid2eid",
        Role.EXPERT_GATE: HUB + "experts.{E}.w1.weight", Role.EXPERT_UP: HUB + "experts.{E}.w3.weight",
        Role.EXPERT_DOWN: HUB + "experts.{E}.w2.weight",
        Role.SHARED_GATE: HUB + "shared_experts.w1.weight", Role.SHARED_UP: HUB + "shared_experts.w3.weight",
        Role.SHARED_DOWN: HUB + "shared_experts.w2.weight",
    },
    fused={
        Role.LM_HEAD: "lm_head.weight",
        Role.ROUTER: HELD + "gate.weight", Role.ROUTER_CORRECTION: HELD + "gate.e_score_correction_bias",
        Role.ROUTER_HASH: HELD + "gate.tid2eid",
        Role.EXPERT_GATE_UP: HELD + "experts.gate_up_proj", Role.EXPERT_DOWN: HELD + "experts.down_proj",
        Role.SHARED_GATE: HELD + "shared_experts.gate_proj.weight",
        Role.SHARED_UP: HELD + "shared_experts.up_proj.weight",
        Role.SHARED_DOWN: HELD + "shared_experts.down_proj.weight",
    },
    absent_roles=_absent,
    shared_ffn=lambda cfg: cfg.get("moe_intermediate_size") or 0,   # DeepseekV4MLP: intermediate_size, one of it
    num_shared=lambda cfg: 1,
    buffers=frozenset({Role.ROUTER_CORRECTION, Role.ROUTER_HASH}),
    fp32_roles=frozenset({Role.ROUTER_CORRECTION}),
    # transformers' _keep_in_fp32_modules_strict beyond the correction bias (its names and the hub's)
    # (every norm: input_layernorm, q_a_norm, kv_norm, the compressors' and the top's, and the hub's names of them)
    fp32_suffixes=(*(name for pair in HC for name in pair), *HC_HEAD, "hc_head_fn", "hc_head_base", "hc_head_scale",
                   ".sinks", ".attn_sink",
                   ".position_bias", ".ape", "norm.weight"),
    # the hub's names without transformers' model. prefix (transformers adds it, and renames the top's)
    name_prefixes=(("layers.", "model.layers."), ("embed.", "model.embed_tokens."), ("norm.", "model.norm."),
                   ("hc_head_", "model.hc_head.hc_")),
    renames=RENAMES,
    mtp=True,   # mtp.* (num_nextn_predict_layers): transformers ignores them
    notes="hash-routed first layers (token table); sqrt(softplus) router; clamped SwiGLU experts (swiglu_limit); "
          "hyper-connections (hc_mult streams); compressed sliding-window attention; mtp.* ignored",
)
