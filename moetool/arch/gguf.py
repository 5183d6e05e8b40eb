"""GGUF (llama.cpp) tensor names and metadata keys, as moetool family data.

llama.cpp names every tensor ``blk.{L}.<name>.weight|bias`` and stores each layer's routed
experts stacked, expert axis outermost: in numpy order ``ffn_{gate,up}_exps`` are [E, I, H],
``ffn_down_exps`` [E, H, I] and the router ``ffn_gate_inp`` [E, H] -- the shapes of
moetool's fused layout, so the role/shape vocabulary of arch/schema.py applies unchanged.
Metadata keys are ``{arch}.block_count``, ``{arch}.expert_count``, ...; the GGUF checkpoint
source strips the ``{arch}.`` prefix, so the keys below are the bare suffixes.

``gguf_family(config, names)`` gives the GGUF view of a registry family: the family's
structure (which roles it has, its router, which routers are buffers) with llama.cpp's names
and keys. The llama.cpp architecture strings are those of gguf-py's ``MODEL_ARCH_NAMES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from moetool.arch.schema import Config, Family, Role, Router

BLK = "blk.{L}."

# role -> llama.cpp tensor name; expert roles hold all experts of a layer (the "fused" layout)
TENSORS: dict[Role, str] = {
    Role.EMBED: "token_embd.weight",
    Role.LM_HEAD: "output.weight",
    Role.ROUTER: BLK + "ffn_gate_inp.weight",
    Role.ROUTER_BIAS: BLK + "ffn_gate_inp.bias",
    Role.ROUTER_CORRECTION: BLK + "exp_probs_b.bias",
    Role.EXPERT_GATE: BLK + "ffn_gate_exps.weight",
    Role.EXPERT_UP: BLK + "ffn_up_exps.weight",
    Role.EXPERT_DOWN: BLK + "ffn_down_exps.weight",
    Role.EXPERT_GATE_UP: BLK + "ffn_gate_up_exps.weight",
    Role.EXPERT_GATE_BIAS: BLK + "ffn_gate_exps.bias",
    Role.EXPERT_UP_BIAS: BLK + "ffn_up_exps.bias",
    Role.EXPERT_DOWN_BIAS: BLK + "ffn_down_exps.bias",
    Role.EXPERT_GATE_UP_BIAS: BLK + "ffn_gate_up_exps.bias",
    Role.SHARED_GATE: BLK + "ffn_gate_shexp.weight",
    Role.SHARED_UP: BLK + "ffn_up_shexp.weight",
    Role.SHARED_DOWN: BLK + "ffn_down_shexp.weight",
    Role.SHARED_ROUTER: BLK + "ffn_gate_inp_shexp.weight",
    Role.DENSE_GATE: BLK + "ffn_gate.weight",
    Role.DENSE_UP: BLK + "ffn_up.weight",
    Role.DENSE_DOWN: BLK + "ffn_down.weight",
    Role.Q_NORM: BLK + "attn_q_norm.weight",
    Role.K_NORM: BLK + "attn_k_norm.weight",
}
EXPERT_WEIGHTS = frozenset({Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP,
                            Role.EXPERT_GATE_BIAS, Role.EXPERT_UP_BIAS, Role.EXPERT_DOWN_BIAS,
                            Role.EXPERT_GATE_UP_BIAS})
# Old GGUFs (llama.cpp before April 2024) store Mixtral's experts one tensor each.
PER_EXPERT: dict[Role, str] = {
    Role.EXPERT_GATE: BLK + "ffn_gate.{E}.weight",
    Role.EXPERT_UP: BLK + "ffn_up.{E}.weight",
    Role.EXPERT_DOWN: BLK + "ffn_down.{E}.weight",
}
GATE_UP_MARK = "ffn_gate_up_exps.weight"   # a file storing gate and up together
# Name parts of tensors that stack a layer's experts on their outermost axis in any architecture
# (prune's fallback for such tensors a family's templates do not list, e.g. expert biases).
EXPERT_STACKED_MARKS = ("_exps.", ".ffn_gate_inp.", ".exp_probs_b.")
# Name parts of token tables (each token's expert ids: DeepSeek-V4's hash layers, llama.cpp's deepseek4
# ffn_gate_tid2eid), whose values name experts: a GGUF prune cannot renumber them
TOKEN_TABLE_MARKS = ("_tid2eid.",)
BLK_LAYER = r"^blk\.(\d+)\."            # the layer number of a per-layer tensor name

# Attention and state-space mixers (any one of them per layer): classified as attention.
_MIXERS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_q_a", "attn_q_b",
           "attn_kv_a_mqa", "attn_kv_b", "attn_k_b", "attn_v_b", "attn_sinks", "attn_gate",
           "ssm_in", "ssm_conv1d", "ssm_x", "ssm_dt", "ssm_a", "ssm_d", "ssm_out", "ssm_ba", "ssm_beta",
           "ssm_alpha", "shortconv.in_proj", "shortconv.out_proj")
# GLM-4.5's multi-token-prediction block adds these to a full layer past the last one; listed so
# that they get their layer number (inspect counts everything in such a layer as MTP).
_NEXTN = ("nextn.eh_proj", "nextn.embed_tokens", "nextn.enorm", "nextn.hnorm", "nextn.shared_head_head",
          "nextn.shared_head_norm")
# Qwen3-Next / Qwen3.5's A_log is written bare ("blk.L.ssm_a": no .weight in convert_hf_to_gguf.py)
ATTENTION: tuple[str, ...] = tuple(f"{BLK}{stem}.{kind}" for stem in _MIXERS + _NEXTN
                                   for kind in ("weight", "bias")) + (BLK + "ssm_a",)
# Per-layer norms (every layer has at least one), so that they count in their layer.
_NORMS = ("attn_norm", "attn_norm_2", "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_post_norm",
          "ffn_post_norm", "attn_q_a_norm", "attn_kv_a_norm", "attn_output_norm", "layer_out_norm",
          "attn_sub_norm", "ffn_sub_norm", "ssm_norm", "ssm_dt_norm", "ssm_b_norm", "ssm_c_norm")
_QK_NORMS = ("attn_q_norm", "attn_k_norm")   # roles of their own in families that have Q_NORM/K_NORM


# Per-layer tensors of no role of their own, listed with the norms (whose bucket is "other") so that
# they count in their layer: LFM2's short-convolution kernel, counted as "other" under its hub name
# (model.layers.L.conv.conv.weight) too.
_OTHER = ("shortconv.conv",)


def _norms(qk: bool) -> tuple[str, ...]:
    return tuple(f"{BLK}{stem}.{kind}" for stem in _NORMS + (_QK_NORMS if qk else ()) + _OTHER
                 for kind in ("weight", "bias"))
# Generated tables llama.cpp stores, which are no parameters of the model.
BUFFER_SUFFIXES = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# An HF role stored as several llama.cpp tensors.
SPLIT_ROLES: dict[Role, tuple[Role, ...]] = {
    Role.EXPERT_GATE_UP: (Role.EXPERT_GATE, Role.EXPERT_UP),
    Role.EXPERT_GATE_UP_BIAS: (Role.EXPERT_GATE_BIAS, Role.EXPERT_UP_BIAS),
    Role.SHARED_GATE_UP: (Role.SHARED_GATE, Role.SHARED_UP),
}
MOE_ROLES = (Role.ROUTER, Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.SHARED_GATE,
             Role.SHARED_UP, Role.SHARED_DOWN, Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)

# Metadata keys (without the "{arch}." prefix) for inspect's canonical fields.
KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("block_count",),
    "hidden": ("embedding_length",),
    "vocab": ("vocab_size",),          # or the length of tokenizer.ggml.tokens (the source fills it in)
    "dense_ffn": ("feed_forward_length",),
    "num_experts": ("expert_count",),
    "top_k": ("expert_used_count",),
    "expert_ffn": ("expert_feed_forward_length", "feed_forward_length"),   # Mixtral has only the latter
    "tie": (),                          # tied when output.weight is absent
}
# Other metadata keys inspect reads (all without the prefix).
SHARED_COUNT = "expert_shared_count"
SHARED_FFN = "expert_shared_feed_forward_length"   # all shared experts together
DENSE_LEAD = "leading_dense_block_count"
MOE_STEP = "interleave_moe_layer_step"             # Llama 4
MOE_EVERY = "moe_every_n_layers"                   # ERNIE 4.5
NEXTN = "nextn_predict_layers"                     # GLM-4.5 MTP blocks, counted in block_count
GATING_FUNC = "expert_gating_func"
WEIGHTS_NORM = "expert_weights_norm"
WEIGHTS_SCALE = "expert_weights_scale"
GROUP_COUNT = "expert_group_count"
GROUP_USED = "expert_group_used_count"
CONTEXT = "context_length"
ARCH_KEY = "general.architecture"
TOKENS_KEY = "tokenizer.ggml.tokens"
# split sets (llama.cpp's gguf-split; gguf-py's GGUFWriter split_max_tensors/size)
SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS = "split.count", "split.no", "split.tensors.count"

# llama.cpp's expert_gating_func values (llama-hparams.h: none, softmax, sigmoid, softmax_weight)
GATING: dict[int, str] = {1: "softmax", 2: "sigmoid", 3: "softmax over top-k logits"}
# Renormalisation of the chosen weights that llama.cpp's graph fixes per architecture when the
# file has no expert_weights_norm (families whose HF config decides it with a key).
LLAMA_CPP_NORM: dict[str, bool] = {"qwen2moe": False, "qwen3moe": True, "qwen3next": True, "olmoe": False,
                                   "lfm2moe": True}   # lfm2.cpp: build_moe_ffn(..., norm_w=true, ...)
# Shared experts llama.cpp always builds for an architecture when the file gives no count.
DEFAULT_SHARED: dict[str, int] = {"llama4": 1, "hunyuan-moe": 1}


def _by_experts(moe: str, dense: str) -> Callable[[Config], str]:
    return lambda cfg: moe if cfg.get("expert_count") else dense


# llama.cpp architecture -> registry family name (or a rule choosing one from the metadata)
ARCHS: dict[str, str | Callable[[Config], str]] = {
    "llama": _by_experts("mixtral", "llama"),      # Mixtral is llama with experts
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "qwen3next": "qwen3_next",
    # DeepSeek-V3/R1 and Kimi-K2 are written as deepseek2 with sigmoid gating and exp_probs_b
    "deepseek2": lambda cfg: "deepseek_v3" if cfg.get(GATING_FUNC) == 2 else "deepseek_v2",
    "glm4moe": "glm4_moe",
    "gpt-oss": "gpt_oss",
    "olmoe": "olmoe",
    "granitemoe": lambda cfg: "granitemoeshared" if cfg.get(SHARED_FFN) else "granitemoe",
    "granitehybrid": "granitemoehybrid",
    "llama4": "llama4",
    "dots1": "dots1",
    "ernie4_5-moe": "ernie4_5_moe",
    "hunyuan-moe": "hunyuan_v1_moe",
    "minimax-m2": "minimax_m2",
    "phimoe": "phimoe",
    "dbrx": "dbrx",
    "jamba": "jamba",
    "qwen35moe": "qwen3_5_moe",
    "lfm2moe": "lfm2_moe",
    "exaone-moe": "exaone_moe",
    "afmoe": "afmoe",
    # dense sources
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}
GENERIC = "gguf"   # family name of an architecture not listed above


def family_name(cfg: Config) -> str | None:
    """The registry family of a GGUF's metadata (prefix-stripped, with model_type = arch)."""
    rule = ARCHS.get(cfg.get("model_type"))
    return rule(cfg) if callable(rule) else rule


def gguf_moe_layer(cfg: Config, layer: int) -> bool | None:
    """Whether the metadata makes LAYER an MoE layer; None where it does not say (inspect then
    decides from the tensors the layer holds, as llama.cpp's loader does)."""
    if not cfg.get("expert_count"):
        return False
    lead = cfg.get(DENSE_LEAD)
    if isinstance(lead, int) and layer < lead:
        return False
    step = cfg.get(MOE_STEP) or cfg.get(MOE_EVERY)
    if isinstance(step, int) and step > 0:
        return (layer + 1) % step == 0
    return True if isinstance(lead, int) else None


def gguf_num_layers(cfg: Config) -> int | None:
    blocks = cfg.get("block_count")
    if not isinstance(blocks, int):
        return blocks
    nextn = cfg.get(NEXTN)
    return blocks - nextn if isinstance(nextn, int) and 0 <= nextn <= blocks else blocks


def gguf_num_shared(cfg: Config) -> int:
    count = cfg.get(SHARED_COUNT)
    if isinstance(count, int):
        return count
    return DEFAULT_SHARED.get(cfg.get("model_type"), 1 if cfg.get(SHARED_FFN) else 0)


def gguf_shared_ffn(cfg: Config) -> int:
    size = cfg.get(SHARED_FFN)
    if isinstance(size, int) and size:
        return size
    expert = cfg.get("expert_feed_forward_length") or cfg.get("feed_forward_length") or 0
    return expert * gguf_num_shared(cfg) if isinstance(expert, int) else 0


def _router(base: Router | None, cfg: Config, arch: str) -> Router:
    score = GATING.get(cfg.get(GATING_FUNC)) or (base.score if base else "softmax")
    if WEIGHTS_NORM in cfg:
        renorm: bool | str = WEIGHTS_NORM
    elif base is not None and isinstance(base.renormalize, bool):
        renorm = base.renormalize
    else:
        renorm = LLAMA_CPP_NORM.get(arch, False)
    return Router(score, renormalize=renorm, correction_bias=bool(base and base.correction_bias),
                  group_limited=bool(base and base.group_limited) or GROUP_COUNT in cfg,
                  scaling_key=WEIGHTS_SCALE,
                  notes=base.notes if base and base.score == score else "",
                  group_keys=(GROUP_COUNT, GROUP_USED), method_key=None)


def gguf_family(cfg: Config, names: Iterable[str]) -> Family:
    """The GGUF view of the family a file's metadata names (a generic one for an unknown
    architecture: ``family.name == GENERIC``)."""
    from moetool.arch import get_family

    arch = str(cfg.get("model_type"))
    name = family_name(cfg)
    base = get_family(name) if name else None
    moe = bool(cfg.get("expert_count")) if base is None else not base.dense
    if base is not None:
        roles: set[Role] = set()
        for templates in (base.common, base.per_expert or {}, base.fused or {}):
            for role in templates:
                roles.update(SPLIT_ROLES.get(role, (role,)))
    else:
        roles = {Role.EMBED, Role.LM_HEAD, Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN}
    if moe:
        roles.update(MOE_ROLES)
        if any(n.endswith(GATE_UP_MARK) for n in names):
            roles -= {Role.EXPERT_GATE, Role.EXPERT_UP}
            roles.add(Role.EXPERT_GATE_UP)
            if Role.EXPERT_GATE_BIAS in roles:
                roles -= {Role.EXPERT_GATE_BIAS, Role.EXPERT_UP_BIAS}
                roles.add(Role.EXPERT_GATE_UP_BIAS)
    roles.update((Role.EMBED, Role.LM_HEAD))
    common: dict[Role, str | tuple[str, ...]] = {r: TENSORS[r] for r in roles if r in TENSORS
                                                 and r not in EXPERT_WEIGHTS}
    common[Role.ATTN] = ATTENTION
    common[Role.NORM] = _norms(Role.Q_NORM not in roles)
    fused = {r: TENSORS[r] for r in roles if r in EXPERT_WEIGHTS} if moe else None
    fields = dict(
        gguf_arch=arch, keys=KEYS, common=common, per_expert=PER_EXPERT if moe else None, fused=fused,
        is_moe_layer=gguf_moe_layer, num_layers=gguf_num_layers, decoder_offset=None, top_k=None,
        shared_ffn=gguf_shared_ffn if moe else None, num_shared=gguf_num_shared if moe else None,
        shapes={}, buffer_suffixes=BUFFER_SUFFIXES, config_root=None, name_prefixes=(),
        packed_experts=False, fused_transposed=False, shared_in_dense_layers=False, role_keys={}, defaults=(),
        router=_router(base.router if base else None, cfg, arch) if moe else None)
    if base is None:
        return Family(name=GENERIC, model_types=(), title=f"unknown llama.cpp architecture {arch!r}",
                      dense=not moe, **fields)
    return replace(base, **fields)


# ---------------------------------------------------------------- running GGUF models with transformers
# A GGUF of these families maps back onto transformers' model: its config from the metadata, its
# tensors onto the hub names (the per-expert templates of the family for routers and experts, the
# table below for the rest), each tensor dequantized as it is read.

LAYER = "model.layers.{L}."
# llama.cpp name -> transformers name of the tensors that are no experts or routers (Llama style)
LLAMA_STYLE_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    BLK + "attn_norm.weight": LAYER + "input_layernorm.weight",
    BLK + "ffn_norm.weight": LAYER + "post_attention_layernorm.weight",
    BLK + "attn_q_norm.weight": LAYER + "self_attn.q_norm.weight",
    BLK + "attn_k_norm.weight": LAYER + "self_attn.k_norm.weight",
    **{f"{BLK}attn_{gguf}.{kind}": f"{LAYER}self_attn.{hf}_proj.{kind}"
       for gguf, hf in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")},
}
# roles whose transformers names come from the family's per-expert templates
ROUTED_ROLES = (Role.ROUTER, Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.SHARED_GATE,
                Role.SHARED_UP, Role.SHARED_DOWN, Role.SHARED_ROUTER, Role.DENSE_GATE, Role.DENSE_UP,
                Role.DENSE_DOWN)
# config key -> metadata key, shared by the Llama-style architectures
LLAMA_STYLE_KEYS: dict[str, str] = {
    "max_position_embeddings": CONTEXT, "num_hidden_layers": "block_count", "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "head_dim": "attention.key_length",
}
ROPE_BASE, ROPE_SCALING = "rope.freq_base", "rope.scaling.type"
ROPE_FACTOR, ROPE_ORIGINAL = "rope.scaling.factor", "rope.scaling.original_context_length"
HEAD_COUNT, HEAD_COUNT_KV = "attention.head_count", "attention.head_count_kv"
BOS_KEY, EOS_KEY = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"


@dataclass(frozen=True)
class RunnableArch:
    """How a GGUF of one family maps back onto transformers' model."""

    model_type: str
    architecture: str
    keys: dict[str, str]                 # config key -> metadata key (without the "{arch}." prefix)
    fixed: dict[str, Any]                # config values llama.cpp's graph fixes for the architecture
    # convert_hf_to_gguf.py reorders q/k rows per head for llama.cpp's rope (LlamaModel.permute):
    # llama.cpp tensor stem -> metadata key of its head count
    permuted_heads: dict[str, str] = field(default_factory=dict)
    # whether layers without routed experts are listed in the config (Qwen's mlp_only_layers)
    dense_layers_key: str | None = None


_QWEN_MOE_KEYS = {**LLAMA_STYLE_KEYS, "num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
                  "moe_intermediate_size": "expert_feed_forward_length"}
RUNNABLE: dict[str, RunnableArch] = {   # registry family -> its mapping
    "qwen3_moe": RunnableArch("qwen3_moe", "Qwen3MoeForCausalLM", _QWEN_MOE_KEYS,
                              {"norm_topk_prob": LLAMA_CPP_NORM["qwen3moe"], "decoder_sparse_step": 1},
                              dense_layers_key="mlp_only_layers"),
    "qwen2_moe": RunnableArch("qwen2_moe", "Qwen2MoeForCausalLM",
                              {**_QWEN_MOE_KEYS, "shared_expert_intermediate_size": SHARED_FFN},
                              {"norm_topk_prob": LLAMA_CPP_NORM["qwen2moe"], "decoder_sparse_step": 1},
                              dense_layers_key="mlp_only_layers"),
    "mixtral": RunnableArch("mixtral", "MixtralForCausalLM",
                            {**LLAMA_STYLE_KEYS, "num_local_experts": "expert_count",
                             "num_experts_per_tok": "expert_used_count"},
                            {"sliding_window": None},
                            permuted_heads={"attn_q": HEAD_COUNT, "attn_k": HEAD_COUNT_KV}),
}


def transformers_config(cfg: Config, runnable: RunnableArch, *, vocab_size: int, tied: bool,
                        dense_layers: list[int]) -> dict[str, Any]:
    """The config.json a GGUF's metadata stands for (transformers 5 keys)."""
    out: dict[str, Any] = {"model_type": runnable.model_type, "architectures": [runnable.architecture]}
    out.update({key: cfg[source] for key, source in runnable.keys.items() if source in cfg})
    out.setdefault("head_dim", out["hidden_size"] // out["num_attention_heads"])
    out.update(runnable.fixed)
    if WEIGHTS_NORM in cfg and "norm_topk_prob" in out:
        out["norm_topk_prob"] = bool(cfg[WEIGHTS_NORM])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.get(ROPE_BASE, 10000.0))}
    scaling = cfg.get(ROPE_SCALING, "none")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(cfg[ROPE_FACTOR]))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = cfg.get(ROPE_ORIGINAL, out.get("max_position_embeddings"))
    elif scaling != "none":
        raise ValueError(f"rope scaling {scaling!r}")
    out["rope_parameters"] = rope
    out["vocab_size"] = vocab_size
    out["tie_word_embeddings"] = tied
    if runnable.dense_layers_key:
        out[runnable.dense_layers_key] = dense_layers
    return out
