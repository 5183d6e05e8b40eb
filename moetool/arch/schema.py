"""The vocabulary of architecture data: roles, router semantics, family specs.

A family file (moetool/arch/families/*.py) is data: config keys, tensor-name
templates with {L} (layer), {D} (decoder layer of a seq2seq model) and {E}
(expert) mapped to roles, expected shapes, and router semantics. A few small
functions (which layers are MoE, derived sizes) are the only code a family has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any


class Role(str, Enum):
    """What a tensor is for, independent of how a family names it."""

    EMBED = "embed"
    LM_HEAD = "lm_head"
    LM_HEAD_BIAS = "lm_head_bias"              # not tied with the embedding when the weight is (ERNIE's use_bias)
    ATTN = "attn"
    NORM = "norm"
    Q_NORM = "q_norm"                         # norms on queries and keys (OLMoE)
    K_NORM = "k_norm"
    ATTN_SINK = "attn_sink"                   # a learned softmax logit per head, named apart where it is
                                              # kept in fp32 (Flint)
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"                # a parameter added to router logits
    ROUTER_CORRECTION = "router_correction"    # selection-only bias (DeepSeek-V3 style)
    ROUTER_SCALE = "router_scale"              # per-expert factor on the chosen experts' weights (Gemma 4)
    ROUTER_PARAM = "router_param"              # a router's own weights indexed by no expert (ZAYA's router MLP)
    ROUTER_HASH = "router_hash"                # token id -> its top-k experts, a fixed table (DeepSeek-V4's hash
                                               # layers)
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    EXPERT_GATE_UP = "expert_gate_up"          # gate and up stored together
    EXPERT_GATE_UP_BIAS = "expert_gate_up_bias"
    EXPERT_GATE_BIAS = "expert_gate_bias"      # GGUF: gate biases stored apart from up (gpt-oss)
    EXPERT_UP_BIAS = "expert_up_bias"
    EXPERT_DOWN_BIAS = "expert_down_bias"
    MOE_OUTPUT_BIAS = "moe_output_bias"        # JetMoE: one bias added after the experts
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    SHARED_GATE_UP = "shared_gate_up"
    SHARED_ROUTER = "shared_router"            # Qwen2-MoE's sigmoid gate on the shared expert
    SHARED_GATE_BIAS = "shared_gate_bias"      # ERNIE's use_bias
    SHARED_UP_BIAS = "shared_up_bias"
    SHARED_DOWN_BIAS = "shared_down_bias"
    DENSE_GATE = "dense_gate"
    DENSE_UP = "dense_up"
    DENSE_DOWN = "dense_down"
    DENSE_GATE_UP = "dense_gate_up"            # gate and up of a dense MLP stored together (MiniMax-M3)
    DENSE_GATE_BIAS = "dense_gate_bias"
    DENSE_UP_BIAS = "dense_up_bias"
    DENSE_DOWN_BIAS = "dense_down_bias"
    OTHER = "other"


# Parameter-count categories (what inspect reports) for every role.
CATEGORY: dict[Role, str] = {
    Role.EMBED: "embedding", Role.LM_HEAD: "lm_head", Role.LM_HEAD_BIAS: "lm_head", Role.ATTN: "attention",
    Role.NORM: "other",
    Role.Q_NORM: "attention", Role.K_NORM: "attention", Role.ATTN_SINK: "attention",
    Role.ROUTER: "router", Role.ROUTER_BIAS: "router", Role.ROUTER_CORRECTION: "router",
    Role.ROUTER_SCALE: "router", Role.ROUTER_HASH: "router", Role.ROUTER_PARAM: "router", Role.SHARED_ROUTER: "router",
    Role.EXPERT_GATE: "routed_experts", Role.EXPERT_UP: "routed_experts",
    Role.EXPERT_DOWN: "routed_experts", Role.EXPERT_GATE_UP: "routed_experts",
    Role.EXPERT_GATE_UP_BIAS: "routed_experts", Role.EXPERT_UP_BIAS: "routed_experts",
    Role.EXPERT_GATE_BIAS: "routed_experts",
    Role.EXPERT_DOWN_BIAS: "routed_experts", Role.MOE_OUTPUT_BIAS: "other",
    Role.SHARED_GATE: "shared_experts", Role.SHARED_UP: "shared_experts",
    Role.SHARED_DOWN: "shared_experts", Role.SHARED_GATE_UP: "shared_experts",
    Role.SHARED_GATE_BIAS: "shared_experts", Role.SHARED_UP_BIAS: "shared_experts",
    Role.SHARED_DOWN_BIAS: "shared_experts",
    Role.DENSE_GATE: "dense_mlp", Role.DENSE_UP: "dense_mlp", Role.DENSE_DOWN: "dense_mlp",
    Role.DENSE_GATE_UP: "dense_mlp",
    Role.DENSE_GATE_BIAS: "dense_mlp", Role.DENSE_UP_BIAS: "dense_mlp", Role.DENSE_DOWN_BIAS: "dense_mlp",
    Role.OTHER: "other",
}
CATEGORIES = ("embedding", "lm_head", "attention", "router", "routed_experts", "shared_experts",
              "dense_mlp", "other")

EXPERT_ROLES = frozenset(r for r, c in CATEGORY.items() if c == "routed_experts")
SHARED_ROLES = frozenset(r for r, c in CATEGORY.items() if c == "shared_experts") | {Role.SHARED_ROUTER}
DENSE_ROLES = frozenset(r for r, c in CATEGORY.items() if c == "dense_mlp")
MOE_LAYER_ROLES = EXPERT_ROLES | {Role.ROUTER, Role.ROUTER_BIAS, Role.ROUTER_CORRECTION, Role.ROUTER_SCALE,
                                  Role.ROUTER_HASH, Role.MOE_OUTPUT_BIAS}

# Expected shapes, in symbols: H hidden, X the routed experts' input and output size (the family's
# "expert_hidden" key where the experts work in a latent space, else H), I expert FFN, S shared FFN, D dense FFN,
# E routed experts, V vocabulary, K experts a token, N shared experts (stacked: Inkling), R router rows (E + the
# family's zero-computation experts + its sink rows: Family.zero_experts, Family.sink_experts), G the width of a
# router that is an MLP (its "router_hidden" key: ZAYA's router_hidden_size). Expert roles are given per
# expert; a template without {E} (fused layout) holds all experts, so "E" is prepended.
DEFAULT_SHAPES: dict[Role, tuple[str, ...]] = {
    Role.EMBED: ("V", "H"), Role.LM_HEAD: ("V", "H"),
    Role.ROUTER: ("E", "H"), Role.ROUTER_BIAS: ("E",), Role.ROUTER_CORRECTION: ("E",), Role.ROUTER_SCALE: ("E",),
    Role.ROUTER_HASH: ("V", "K"),
    Role.EXPERT_GATE: ("I", "H"), Role.EXPERT_UP: ("I", "H"), Role.EXPERT_DOWN: ("H", "I"),
    Role.EXPERT_GATE_UP: ("2I", "H"), Role.EXPERT_GATE_UP_BIAS: ("2I",),
    Role.EXPERT_UP_BIAS: ("I",), Role.EXPERT_DOWN_BIAS: ("H",), Role.MOE_OUTPUT_BIAS: ("H",),
    Role.EXPERT_GATE_BIAS: ("I",),
    Role.SHARED_GATE: ("S", "H"), Role.SHARED_UP: ("S", "H"), Role.SHARED_DOWN: ("H", "S"),
    Role.SHARED_GATE_UP: ("2S", "H"), Role.SHARED_ROUTER: ("1", "H"),
    Role.SHARED_GATE_BIAS: ("S",), Role.SHARED_UP_BIAS: ("S",), Role.SHARED_DOWN_BIAS: ("H",),
    Role.DENSE_GATE: ("D", "H"), Role.DENSE_UP: ("D", "H"), Role.DENSE_DOWN: ("H", "D"),
    Role.DENSE_GATE_UP: ("2D", "H"),
    Role.DENSE_GATE_BIAS: ("D",), Role.DENSE_UP_BIAS: ("D",), Role.DENSE_DOWN_BIAS: ("H",),
}


@dataclass(frozen=True)
class Router:
    """How a family turns router logits into expert choices and weights."""

    score: str                      # "softmax" | "sigmoid" | "softmax over top-k" | "sparsemixer" | ...
    renormalize: bool | str         # True/False, or the config key that decides
    correction_bias: bool | str = False   # selection by score + bias, weights by the score (or the deciding key)
    group_limited: bool = False     # choose groups first (n_group / topk_group)
    scaling_key: str | None = None  # config key of a factor applied to the weights
    notes: str = ""
    group_keys: tuple[str, str] = ("n_group", "topk_group")   # config keys: groups, groups kept
    # config key choosing between greedy and group-limited selection (None: transformers always selects
    # by groups when group_limited), and the values of it that select by groups
    method_key: str | None = "topk_method"
    group_methods: tuple[str, ...] = ("group_limited_greedy",)
    # transformers' config-class defaults of the router keys above, for a config.json that omits them
    config_defaults: tuple[tuple[str, Any], ...] = ()
    # experts a group's score is taken from: DeepSeek-V3 sums each group's best two, V2 takes its best one
    group_score_experts: int = 2
    # a config key choosing the score function, and (value, score, renormalize) for the values that
    # change it from the above (Cohere2-MoE's expert_selection_fn "sigmoid")
    selection_key: str | None = None
    selections: tuple[tuple[str, str, bool | str], ...] = ()

    def resolved(self, cfg: Config) -> Router:
        """This router as the config makes it: its score function chosen, its correction bias present or not."""
        router = self
        if self.selection_key is not None:
            chosen = self.setting(cfg, self.selection_key)
            for value, score, renormalize in self.selections:
                if chosen == value:
                    router = replace(router, score=score, renormalize=renormalize)
        if isinstance(self.correction_bias, str):
            router = replace(router, correction_bias=bool(self.setting(cfg, self.correction_bias)))
        return router

    def setting(self, cfg: Config, key: str) -> Any:
        """Config KEY as transformers reads it: the config's value, else its config class's default."""
        value = cfg.get(key)
        return dict(self.config_defaults).get(key) if value is None else value

    def groups(self, cfg: Config) -> tuple[int, int | None] | None:
        """(groups, groups kept) when transformers' router selects experts within the best groups of
        more than one, else None (greedy selection, or a single group)."""
        if not self.group_limited:
            return None
        if self.method_key is not None and self.setting(cfg, self.method_key) not in self.group_methods:
            return None
        groups, kept = (self.setting(cfg, key) for key in self.group_keys)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 1:
            return None
        return groups, kept if isinstance(kept, int) and not isinstance(kept, bool) else None


Config = dict[str, Any]
MTP_MARK = "mtp"                         # in the names of MTP tensors not numbered as layers (Qwen3-Next, ERNIE)
MTP_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")   # config keys counting the MTP modules (Sarvam: the alias)
# the config key a globally pruned checkpoint records each layer's expert count under (layers keep different numbers)
UNEVEN_EXPERTS_KEY = "moetool_experts_per_layer"
Template = str | tuple[str, ...]   # one name template, or alternatives (encoder/decoder)


@dataclass(frozen=True)
class Family:
    """One architecture family, described as data."""

    name: str
    model_types: tuple[str, ...]
    title: str
    router: Router | None
    # canonical field -> config keys to try in order (dotted paths reach nested dicts)
    keys: dict[str, tuple[str, ...]]
    # role templates present in both layouts, and those of each layout (None: layout absent)
    common: dict[Role, Template]
    per_expert: dict[Role, Template] | None
    fused: dict[Role, Template] | None
    is_moe_layer: Callable[[Config, int], bool] = lambda cfg, layer: True
    # which layers that are not MoE hold a dense MLP; None: every one (Nemotron-H: only its "mlp" blocks,
    # its Mamba and attention blocks have none)
    is_dense_layer: Callable[[Config, int], bool] | None = None
    shared_ffn: Callable[[Config], int] | None = None   # S; None: no shared experts
    num_shared: Callable[[Config], int] | None = None   # shared experts per MoE layer
    num_layers: Callable[[Config], int] | None = None   # seq2seq: encoder + decoder
    decoder_offset: Callable[[Config], int] | None = None  # {D} -> layer {D} + offset
    top_k: Callable[[Config], int] | None = None          # when no config key holds it
    shapes: dict[Role, tuple[str, ...]] = field(default_factory=dict)  # overrides, full shape
    buffers: frozenset[Role] = frozenset()   # stored, but buffers (not parameters) in transformers
    buffer_suffixes: tuple[str, ...] = ()    # other stored buffers, by name ending
    # where a wrapper keeps its text model's config: "text_config" (multimodal wrappers); a dotted path reaches one
    # nested deeper (Qwen3-Omni's "thinker_config.text_config"); alternatives: the first the config holds
    config_root: str | tuple[str, ...] | None = None
    name_prefixes: tuple[tuple[str, str], ...] = ()  # (old, new) prefix rewrites before matching
    mtp: bool = False                        # layers >= num_hidden_layers, and mtp* tensors, are MTP modules
    dense: bool = False                      # a dense (non-MoE) upcycling source
    packed_experts: bool = False             # experts stacked on axis 0 as [E*I, ...] (DBRX)
    fused_transposed: bool = False           # fused experts are [E, in, out] (Llama 4, GPT-OSS), not [E, out, in]
    # the fused experts are stored [E, in, out] (fused_transposed) but transformers 5 holds them [E, out, in],
    # transposing them as it loads them (its Transpose conversion: Qwen3-VL-MoE); moetool's loaders do too
    transposed_on_load: bool = False
    fp32_roles: frozenset[Role] = frozenset()  # kept in fp32 by transformers; convert leaves their dtype
    fp32_suffixes: tuple[str, ...] = ()        # other tensors kept so, by name ending (Kimi Linear's dt_bias)
    # the transformers-5 module whose forward routes tokens (encoder/decoder alternatives for seq2seq),
    # and what it returns: "topk" (logits, weights, index) | "topk-probs" (softmax probabilities, weights,
    # index: Gemma 4) | "topk-skip" (logits [T, R], weights, index, ...: "topk" with the picks of the skip experts
    # masked to expert 0 at weight 0, recomputed from the logits: ZAYA) | "llama4" (scores, logits) | "logits"
    # (logits only: DBRX) | "jetmoe" (..., logits) | "switch" (dispatch, top prob, logits) | "nllb"
    # (dispatch, combine weights, logits) | None (not supported by the runner)
    router_module: Template | None = "model.layers.{L}.mlp.gate"
    router_output: str | None = "topk"
    # the experts module, called as experts(hidden [T,H], index [T,k], weights [T,k]) -> [T,H]
    # (for saliency); None where the family's experts take another form
    experts_module: str | None = "model.layers.{L}.mlp.experts"
    # a Linear the experts' output passes through before it joins the hidden states (Nemotron-H's latent MoE:
    # fc2_latent_proj; an nn.Identity where the config has no latent space): saliency is measured after it
    experts_output_module: str | None = None
    # tensors no template names that are the router's own, indexed by no expert, by name part (ZAYA's router MLP
    # under mlp.gate.: its down_proj, fc1, fc2, norm, router_states_scale): counted as router parameters
    router_parts: tuple[str, ...] = ()
    # tensors whose names say "expert" that are no expert's, by name ending: inspect does not flag them as expert
    # tensors no template fits (Muse Spark's pre_expert_proj / post_expert_proj, which every token passes through)
    not_experts: tuple[str, ...] = ()
    # transformers' eager experts forward indexes a fused expert tensor one expert at a time
    # (gate_up_proj[e]); False where it multiplies the whole stack at once (Llama 4's bmm)
    experts_indexed: bool = True
    # transformers 5 loads the per-expert layout itself (fusing on load); False where it does not
    # (GPT-OSS's per-expert form is moetool's own; Llama 4's is read only for quantized releases)
    transformers_reads_per_expert: bool = True
    # transformers 5 holds the experts in nn.Linear modules when it loads a bitsandbytes checkpoint
    # (Llama 4's SequentialLlama4TextExperts), so stock bitsandbytes checkpoints quantize them
    bnb_linear_experts: bool = False
    # transformers' from_pretrained re-initialises a stored buffer after loading it (ZAYA's skip bias, set to -1
    # by its _init_weights whatever the checkpoint holds): moetool loads such models itself in every mode, with
    # the stored values, so that full and streamed runs route alike
    resets_stored_buffers: bool = False
    # a dense family's MLP module (its input is what an upcycled router will see)
    mlp_module: str | None = None
    prune_unsupported: str | None = None     # why experts cannot be removed from this family, if so
    # the fewest experts a layer may keep and still run as an MoE in transformers, and why
    min_kept: tuple[int, str] = (1, "")
    # the shared MLP is in every layer: in a dense layer (no routed experts) it is the layer's MLP and
    # is counted as such (Granite 4.0 hybrid, whose dense variant has num_local_experts 0)
    shared_in_dense_layers: bool = False
    # roles that MoE layer L does not hold although the family names them (DeepSeek-V4: its hash-routed layers
    # hold a token table and no correction bias, its other MoE layers the converse); None: every one held
    absent_roles: Callable[[Config, int], frozenset[Role]] | None = None
    # the dense MLP roles are held in the MoE layers too, beside the experts (LongCat-Flash's two MLPs a layer,
    # its templates' alternatives)
    dense_in_moe_layers: bool = False
    # the factor on the MLP widths (S, D) of layer L where the config widens some layers' MLPs (Gemma 4's
    # use_double_wide_mlp: twice intermediate_size in the layers reusing earlier keys and values); None: 1
    mlp_width_factor: Callable[[Config, int], int] | None = None
    # roles stored only when a config key is true (ERNIE's MLP biases: use_bias)
    role_keys: dict[Role, str] = field(default_factory=dict)
    # tensors no role template names whose hub (per-expert layout) names differ from transformers 5's (the
    # family's WeightRenaming in transformers' conversion mapping): (hub infix, transformers-5 infix) pairs,
    # applied when the layout changes
    renames: tuple[tuple[str, str], ...] = ()
    # a hub tensor whose rows are several transformers-5 tensors (Sarvam's query_key_value): (hub infix,
    # ((transformers-5 infix, its rows from the config), ...)); split into them when the experts are fused,
    # their rows concatenated back when they are split
    row_splits: tuple[tuple[str, tuple[tuple[str, Callable[[Config], int]], ...]], ...] = ()
    # the converse: transformers-5 tensors whose rows are several hub tensors (Kimi Linear's q/k/v_conv1d,
    # concatenated into conv1d): (transformers-5 infix, ((hub infix, its rows from the config), ...)); joined
    # when the experts are fused, split back when they are split
    row_joins: tuple[tuple[str, tuple[tuple[str, Callable[[Config], int]], ...]], ...] = ()
    # hub tensors that are row shards of one transformers-5 tensor (Qwen4-Exp's n-gram
    # embedding): (hub infix with {K} for the shard number, transformers-5 infix, shards from the config);
    # joined when the experts are fused, split back into equal shards when they are split
    row_shards: tuple[tuple[str, str, Callable[[Config], int]], ...] = ()
    # (hub prefix, transformers 5's held prefix) pairs of a family whose hub names differ from transformers 5's in
    # their root prefix as well as in the infixes of its renames, which transformers would apply again to a name
    # of the hub's prefix with its own infix (Mistral Large 4: hub layers.{L}.gate, held
    # model.language_model.layers.{L}.mlp.gate; layers.{L}.mlp.gate would load as ...mlp.mlp.gate): a name moetool
    # writes in transformers 5's form (the fused layout's, the renames' infixes) takes the held prefix, one in the
    # hub's form (the per-expert layout's, renamed back) the hub's; the renames apply only to names under these
    # prefixes (a wrapper's other towers keep theirs, for transformers to rename)
    held_prefixes: tuple[tuple[str, str], ...] = ()
    # skip experts the router scores after the real (and identity) experts: a pick of one adds nothing to the
    # token's output (ZAYA's one, a fixed count no config key gives); counted among zero_experts
    skip_experts: int = 0
    notes: str = ""
    # set on the GGUF view of a family (moetool/arch/gguf.py): the llama.cpp architecture string;
    # its templates are llama.cpp tensor names and its keys GGUF metadata keys
    gguf_arch: str | None = None
    # transformers' config-class defaults of structure keys a config.json may omit (the router's are
    # Router.config_defaults): read as transformers reads them (`settings`)
    defaults: tuple[tuple[str, Any], ...] = ()
    # config keys transformers reads from a wrapper's own config, never its text_config (config_root), when it
    # builds the wrapper whole (Qwen3-VL-MoE's tie_word_embeddings): from the config that holds the text
    # model's (Qwen3-Omni's thinker_config); absent there, the defaults above hold
    root_keys: tuple[str, ...] = ()

    def settings(self, config: Config) -> Config:
        """CONFIG as the family's functions read it: the text model's part of a wrapper merged in
        (config_root), then the config class's defaults for the keys it leaves out."""
        cfg = dict(config)
        found = self.text_root(config)
        if found is not None:
            holder, text = found
            cfg.update(text)
            for key in self.root_keys:
                cfg[key] = holder.get(key)
        for key, value in self.defaults:
            if cfg.get(key) is None:
                cfg[key] = value
        return cfg

    def text_root(self, config: Config) -> tuple[Config, Config] | None:
        """(the config holding the text model's, the text model's config) of a wrapper's CONFIG (config_root:
        the first of its paths CONFIG holds), or None where CONFIG is the text model's own."""
        roots = (self.config_root,) if isinstance(self.config_root, str) else self.config_root or ()
        for root in roots:
            text = get_path(config, root)
            if isinstance(text, dict):
                holder = get_path(config, root.rpartition(".")[0]) if "." in root else config
                return holder, text
        return None

    def held_named(self, name: str, held: bool) -> str:
        """NAME with its hub prefix made transformers 5's held one (HELD), or its held prefix the hub's
        (held_prefixes); NAME itself where it has neither."""
        for hub, kept in self.held_prefixes:
            old, new = (hub, kept) if held else (kept, hub)
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def is_mtp(self, cfg: Config, name: str, layer: int | None) -> bool:
        """Whether tensor NAME (of LAYER) belongs to a multi-token-prediction module, which
        transformers neither loads nor runs."""
        if not self.mtp:
            return False
        if MTP_MARK in name:
            return True
        layers = first_key(cfg, self.keys.get("num_layers", ()))
        return layer is not None and isinstance(layers, int) and layer >= layers

    def zero_experts(self, cfg: Config) -> int:
        """Zero-computation experts the router scores after the real ones, which hold no weights and which its
        top-k may pick: identity experts ("zero_experts" key: LongCat-Flash's, whose output is the token times
        its weight), then the family's skip experts (skip_experts: ZAYA's, whose output is zero)."""
        return self._count(cfg, "zero_experts") + self.skip_experts

    def zero_expert_rows(self, cfg: Config) -> int:
        """Rows transformers 5's fused gate_up holds for the zero-computation experts past the real experts'
        (LongCat-Flash's, never used: its shape starts with R); 0 where it holds the real experts' only (ZAYA)."""
        return self.zero_experts(cfg) if self.shapes.get(Role.EXPERT_GATE_UP, ("E",))[0] == "R" else 0

    def sink_experts(self, cfg: Config) -> int:
        """Router rows after the routed (and identity) experts that top-k never picks ("sink_experts" key:
        Inkling's shared experts, scored as sinks in the normalisation of the chosen experts' weights)."""
        return self._count(cfg, "sink_experts")

    def _count(self, cfg: Config, key: str) -> int:
        value = first_key(cfg, self.keys.get(key, ()))
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    def routes_by_table(self, cfg: Config, layer: int) -> bool:
        """Whether MoE layer LAYER picks its experts by a fixed token-id table (Role.ROUTER_HASH: DeepSeek-V4's
        hash layers), its router's scores only weighting the experts picked."""
        named = any(Role.ROUTER_HASH in (t or {}) for t in (self.common, self.per_expert, self.fused))
        return named and not (self.absent_roles is not None and Role.ROUTER_HASH in self.absent_roles(cfg, layer))

    @property
    def joins_stacked_gate_up(self) -> bool:
        """Whether the fused layout names gate and up both apart, each stacked over the experts [E, I, H] (as
        the hub stores them), and joined (gate_up_proj [E, 2I, H], as transformers 5 holds them, joining them
        expert by expert on load: Step 3.7's Concatenate(dim=1)); moetool's loaders join them so too."""
        fused = self.fused or {}
        return all(role in fused for role in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_GATE_UP))

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(n for n, t in (("per-expert", self.per_expert), ("fused", self.fused)) if t is not None)

    def templates(self, layout: str | None) -> dict[Role, Template]:
        specific = self.per_expert if layout == "per-expert" else self.fused
        return {**self.common, **(specific or {})}


def get_path(cfg: Config, path: str) -> Any:
    """Look up a dotted path ("ffn_config.moe_top_k") in a config dict; None if absent."""
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def first_key(cfg: Config, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = get_path(cfg, key)
        if value is not None:
            return value
    return None
