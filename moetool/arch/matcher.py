"""Map tensor names to (role, layer, expert) using a family's templates.

Matching is a dictionary lookup: every run of digits in a name is replaced by
'#', so "model.layers.3.mlp.experts.17.up_proj.weight" and the template
"model.layers.{L}.mlp.experts.{E}.up_proj.weight" share one key; the digits
then fill the template's slots. This keeps 90,000-tensor checkpoints fast: a name's key and
where its numbers sit are found once per masked form (every digit masked, one C call), not by a
regular expression per name; classify_all reads the numbers of all names of a masked form at once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

from moetool.arch.schema import Family, Role

_DIGITS = re.compile(r"\d+")
_MASK = bytes.maketrans(b"0123456789", b"\xff" * 10)   # a byte no ASCII name holds
_SLOTS = re.compile(r"\{[LDE]\}|\d+")

# Companion tensors of quantized weights: suffix -> suffix of the weight they belong to.
# (bitsandbytes 4/8-bit, block FP8, compressed-tensors, MXFP4.)
AUX_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".weight.quant_state.bitsandbytes__nf4", ".weight"),
    (".weight.quant_state.bitsandbytes__fp4", ".weight"),
    (".weight.nested_quant_map", ".weight"),
    (".weight.nested_absmax", ".weight"),
    (".weight.quant_map", ".weight"),
    (".weight.absmax", ".weight"),
    (".weight_scale_inv", ".weight"),
    (".weight_zero_point", ".weight"),
    (".weight_g_idx", ".weight"),
    (".weight_global_scale", ".weight"),
    (".weight_shape", ".weight"),
    (".weight_scale", ".weight"),
    (".input_scale", ".weight"),     # served activations' scales (quantized at run time, never parameters)
    (".input_global_scale", ".weight"),
    (".input_zero_point", ".weight"),
    (".output_scale", ".weight"),
    (".output_global_scale", ".weight"),
    (".output_zero_point", ".weight"),
    (".weight_format", ".weight"),
    (".SCB", ".weight"),
    (".weight.scales", ".weight"),   # moetool's group-wise integers
    (".weight.zeros", ".weight"),
    (".weight_scale_2", ".weight"),  # ModelOpt NVFP4's per-tensor scale
    (".qscale_weight", ".weight"),   # Mistral's fp8: inverse weight scales, static activation scales
    (".qscale_act", ".weight"),
    (".k_scale", ".weight"),         # a quantized kv cache's scales (served, never parameters)
    (".v_scale", ".weight"),
    (".qzeros", ".weight"),          # AutoAWQ and GPTQ: X.qweight's zero points, scales, input groups
    (".scales", ".weight"),
    (".g_idx", ".weight"),
    ("_scales", ""),          # mxfp4: gate_up_proj_scales -> gate_up_proj
    ("_weight_scale_2", ""),  # ModelOpt's fused experts (Llama 4, gpt-oss): experts.gate_up_proj_weight_scale, ...
    ("_weight_scale", ""),
    ("_input_scale", ""),
)
AUX_ENDINGS = tuple(s for s, _ in AUX_SUFFIXES)
# 3-D experts tensors stored whole, [E, in, out] (Llama 4's and gpt-oss's hub forms), as ModelOpt exports them
# quantized, W beside W_weight_scale
FUSED_EXPERT_TENSORS = (".experts.gate_up_proj", ".experts.down_proj")
PACKED_SUFFIXES = ((".weight_packed", ".weight"), ("_blocks", ""), (".qweight", ".weight"))   # compressed-
# tensors, mxfp4, AutoAWQ and GPTQ

# DeepSeek-V4's hub form: X.scale beside X.weight (transformers renames it X.weight_scale_inv). Many
# families have real parameters named .scale (hyper-connections' attn_hc.scale, Inkling2's q_norm.scale),
# so a .scale is a companion only where its module's .weight is stored quantized: block FP8
# (F8_E4M3 / F8_E5M2, scales F8_E8M0 or F32) or packed FP4 e2m1 (I8, two values a byte).
SCALE_SUFFIX = (".scale", ".weight")
SCALED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "I8"})


def scale_companions(tensors) -> frozenset[str]:
    """The names in TENSORS (name -> anything with .dtype) that are X.scale companions of a quantized
    X.weight (SCALE_SUFFIX, SCALED_DTYPES)."""
    suffix, weight = SCALE_SUFFIX
    found = []
    for name in tensors:
        if name.endswith(suffix):
            ref = tensors.get(name[: -len(suffix)] + weight)
            if ref is not None and ref.dtype in SCALED_DTYPES:
                found.append(name)
    return frozenset(found)


SCALE_ENDINGS = (".scale", ".weight_scale_inv", ".weight_scale", ".qscale_weight")   # of X.weight: X.scale, ...


def unscaled_weights(tensors) -> list[str]:
    """The X.weight names in TENSORS stored quantized (SCALED_DTYPES) without any scale companion
    (SCALE_ENDINGS): a block-FP8 checkpoint cannot be read without them."""
    out = []
    for name, ref in tensors.items():
        if ref.dtype in SCALED_DTYPES and name.endswith(".weight"):
            stem = name[: -len(".weight")]
            if not any(stem + ending in tensors for ending in SCALE_ENDINGS):
                out.append(name)
    return out


def scale_of(tensors, weight: str):
    """The scale companion in TENSORS of the quantized weight named WEIGHT (X.weight_scale_inv, or X.scale
    where X.weight is SCALED_DTYPES), or None."""
    found = tensors.get(weight + "_scale_inv")
    if found is None and weight.endswith(SCALE_SUFFIX[1]) and tensors[weight].dtype in SCALED_DTYPES:
        stem = weight[: -len(SCALE_SUFFIX[1])]
        found = tensors.get(stem + SCALE_SUFFIX[0], tensors.get(stem + ".qscale_weight"))
    return found


def scale_owner(name: str) -> str:
    """The weight a SCALE_SUFFIX companion NAME belongs to (X.scale -> X.weight)."""
    suffix, weight = SCALE_SUFFIX
    return name[: -len(suffix)] + weight


class Match(NamedTuple):
    role: Role
    layer: int | None
    expert: int | None
    layout: str | None      # "per-expert" | "fused" | None (in both layouts / generic)
    aux: bool = False       # a quantization companion (scale, absmax, ...), not a parameter
    packed: bool = False    # several values per stored element (mxfp4 blocks, packed int4)
    guessed: bool = False   # role from generic name rules, not from a family template


def split_quant_suffix(name: str) -> tuple[str, bool, bool]:
    """Return (base weight name, is_aux, is_packed)."""
    if name.endswith(AUX_ENDINGS):
        for suffix, replacement in AUX_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)] + replacement, True, False
    for suffix, replacement in PACKED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + replacement, False, True
    return name, False, False


class NameGroup:
    """Names that classify alike (one masked form, one template): one Match but for the numbers.
    Those sit at the same places in each name; they are read, all at once, when first asked for."""

    __slots__ = ("match", "members", "names", "_layer_at", "_layer_offset", "_expert_at", "_layers", "_experts")

    def __init__(self, match: Match, members: list[int], names: list[str], layer_at: slice | None = None,
                 layer_offset: int = 0, expert_at: slice | None = None, *,
                 numbers: tuple[list, list] | None = None):
        self.match = match        # its layer and expert are None: each name's are in layers and experts
        self.members = members    # the names' positions in the list classified, ascending
        self.names = names
        self._layer_at, self._layer_offset, self._expert_at = layer_at, layer_offset, expert_at
        self._layers, self._experts = numbers or (None, None)

    @property
    def layers(self) -> list[int | None]:
        if self._layers is None:
            self._layers = _numbers(self.names, self._layer_at, self._layer_offset)
        return self._layers

    @property
    def experts(self) -> list[int | None]:
        if self._experts is None:
            self._experts = _numbers(self.names, self._expert_at)
        return self._experts


class _Candidate(NamedTuple):
    """One template that fits a digit-normalised key: where its layer/expert numbers sit."""

    role: Role
    layout: str | None
    layer_pos: int | None
    layer_offset: int
    expert_pos: int | None
    literals: tuple[tuple[int, str], ...]   # (position, digits) that must match exactly


class _Rule(NamedTuple):
    """How to classify every name that shares one digit-normalised key."""

    candidates: tuple[_Candidate, ...]   # from templates; empty: generic
    role: Role | None                    # generic role (when no candidates)
    layer_pos: int | None                # generic: index of the layer number among the name's numbers
    aux: bool
    packed: bool


class _Reader(NamedTuple):
    """A rule with its numbers' positions as slices: for the names of one masked form."""

    rule: _Rule
    candidates: tuple[tuple[_Candidate, slice | None, slice | None, tuple[tuple[slice, str], ...]], ...]
    layer: slice | None                  # generic: where the layer number sits


class Classifier:
    """Classifies every tensor name of a checkpoint: family templates first, generic rules after.

    Results are cached per digit-normalised name, so each distinct pattern is analysed once.
    """

    def __init__(self, family: Family | None, decoder_offset: int = 0, tensors=None):
        """TENSORS: the checkpoint's tensors (name -> ref), where given: its X.scale companions of quantized
        weights (`scale_companions`) are classified as such (their names alone do not tell)."""
        self.family = family
        self.companions = scale_companions(tensors) if tensors else frozenset()
        self._table: dict[str, list[_Candidate]] = {}
        self._rules: dict[str, _Rule] = {}
        self._readers: dict[bytes, _Reader] = {}   # by masked name
        if family is None:
            return
        layouts = [(None, family.common), ("per-expert", family.per_expert), ("fused", family.fused)]
        for layout, templates in layouts:
            for role, alternatives in (templates or {}).items():
                for template in (alternatives,) if isinstance(alternatives, str) else alternatives:
                    slots = _SLOTS.findall(template)
                    layer_pos = next((i for i, s in enumerate(slots) if s in ("{L}", "{D}")), None)
                    candidate = _Candidate(
                        role, layout, layer_pos,
                        decoder_offset if "{D}" in slots else 0,
                        slots.index("{E}") if "{E}" in slots else None,
                        tuple((i, s) for i, s in enumerate(slots) if s[0] != "{"))
                    self._table.setdefault(_SLOTS.sub("#", template), []).append(candidate)

    def strip_prefix(self, name: str) -> str:
        for old, new in self.family.name_prefixes if self.family else ():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def restore_prefix(self, original: str, name: str) -> str:
        """Give NAME (in template form) the prefix ORIGINAL had on disk (e.g. "language_model.")."""
        for old, new in self.family.name_prefixes if self.family else ():
            if original.startswith(old) and name.startswith(new):
                return old + name[len(new):]
        return name

    def _rule(self, name: str) -> _Rule:
        if name in self.companions:   # (every name of its digit-masked form, as layers alike are stored alike)
            base, aux, packed = scale_owner(self.strip_prefix(name)), True, False
        else:
            base, aux, packed = split_quant_suffix(self.strip_prefix(name))
        candidates = tuple(self._table.get(_DIGITS.sub("#", base), ()))
        if candidates:
            return _Rule(candidates, None, None, aux, packed)
        found = _LAYER.search(base)
        if found and in_other_tower(base):   # a vision/audio/talker tower's layers are not the decoder's
            found = None
        layer_pos = len(_DIGITS.findall(base[: found.start(1)])) if found else None
        role = Role.ROUTER_PARAM if self.family and any(part in base for part in self.family.router_parts) \
            else generic_role(base)
        return _Rule((), role, layer_pos, aux, packed)

    def _cached_rule(self, name: str) -> _Rule:
        key = _DIGITS.sub("#", name)
        rule = self._rules.get(key)
        if rule is None:
            rule = self._rules[key] = self._rule(name)
        return rule

    def _reader(self, name: str) -> _Reader:
        """How to classify every ASCII name of NAME's masked form: the rule, with the positions
        of its numbers turned into slices of the name."""
        spans = [slice(*found.span()) for found in _DIGITS.finditer(name)]
        rule = self._cached_rule(name)
        at = lambda pos: None if pos is None else spans[pos]
        candidates = tuple((c, at(c.layer_pos), at(c.expert_pos), tuple((spans[i], d) for i, d in c.literals))
                           for c in rule.candidates)
        return _Reader(rule, candidates, at(rule.layer_pos))

    def classify_all(self, names: list[str]) -> list[NameGroup]:
        """classify() of every name in NAMES, in groups, ordered by their first member.

        The names of one masked form have their numbers at the same places: a group's are read
        with one slice each, over all its names in C (map), and its template is chosen once
        (per name only where templates differ in literal digits, as Mixtral's w1/w2/w3)."""
        by_mask: defaultdict[bytes, list[int]] = defaultdict(list)
        groups: list[NameGroup] = []
        if all(map(str.isascii, names)):
            for i, masked in enumerate(map(bytes.translate, map(str.encode, names), repeat(_MASK))):
                by_mask[masked].append(i)
        else:   # \d also matches other scripts' digits: those names take the regex path, one by one
            for i, name in enumerate(names):
                if name.isascii():
                    by_mask[name.encode().translate(_MASK)].append(i)
                else:
                    m = self.classify(name)
                    groups.append(NameGroup(m._replace(layer=None, expert=None), [i], [name],
                                            numbers=([m.layer], [m.expert])))
        for masked, members in by_mask.items():
            groups.extend(self._classify_alike(self._reader_for(masked, names[members[0]]), names, members))
        groups.sort(key=lambda g: g.members[0])
        return groups

    def _classify_alike(self, reader: _Reader, names: list[str], members: list[int]) -> list[NameGroup]:
        """The groups of MEMBERS, names of READER's masked form."""
        rule, candidates = reader.rule, reader.candidates
        if not candidates or not candidates[0][3]:   # no template, or the first fits every name
            parts = {0 if candidates else -1: members}
        else:
            parts: dict[int, list[int]] = {}
            for i in members:
                parts.setdefault(_first_fit(candidates, names[i]), []).append(i)
        out = []
        for chosen, part in parts.items():
            alike = list(map(names.__getitem__, part))
            if chosen >= 0:
                c, layer, expert, _ = candidates[chosen]
                out.append(NameGroup(Match(c.role, None, None, c.layout, rule.aux, rule.packed), part, alike,
                                     layer, c.layer_offset, expert))
            elif self.family is not None and rule.role is not None:   # a generic role, one for the form
                out.append(NameGroup(Match(rule.role, None, None, None, rule.aux, rule.packed, True), part, alike,
                                     reader.layer))
            else:   # guessed name by name: an unknown family's experts, or names no template here fits
                guessed: dict[Match, tuple[list, list, list, list]] = {}
                for i, name, layer in zip(part, alike, _numbers(alike, reader.layer)):
                    m = self._generic(name, rule, layer)
                    columns = guessed.setdefault(m._replace(layer=None, expert=None), ([], [], [], []))
                    for column, value in zip(columns, (i, name, m.layer, m.expert)):
                        column.append(value)
                out.extend(NameGroup(m, index, alike_names, numbers=(layers, experts))
                           for m, (index, alike_names, layers, experts) in guessed.items())
        return out

    def classify(self, name: str) -> Match:
        if not name.isascii():   # \d also matches other scripts' digits: the regex path
            return self._classify(name, self._cached_rule(name), _DIGITS.findall(name))
        reader = self._reader_for(name.encode().translate(_MASK), name)
        rule = reader.rule
        chosen = _first_fit(reader.candidates, name)
        if chosen >= 0:
            c, layer, expert, _ = reader.candidates[chosen]
            # (tuple.__new__: Match(...) without NamedTuple's Python-level __new__, 2.5x faster)
            return tuple.__new__(Match, (c.role, None if layer is None else int(name[layer]) + c.layer_offset,
                                         None if expert is None else int(name[expert]), c.layout, rule.aux,
                                         rule.packed, False))
        return self._generic(name, rule, None if reader.layer is None else int(name[reader.layer]))

    def _reader_for(self, masked: bytes, name: str) -> _Reader:
        """The reader of names whose digits are masked to MASKED (built from NAME once, then cached)."""
        reader = self._readers.get(masked)
        if reader is None:
            reader = self._readers[masked] = self._reader(name)
        return reader

    def _classify(self, name: str, rule: _Rule, numbers: list[str]) -> Match:
        for c in rule.candidates:
            if c.literals and any(numbers[i] != digits for i, digits in c.literals):
                continue
            return Match(c.role, None if c.layer_pos is None else int(numbers[c.layer_pos]) + c.layer_offset,
                         None if c.expert_pos is None else int(numbers[c.expert_pos]), c.layout,
                         rule.aux, rule.packed)
        return self._generic(name, rule, int(numbers[rule.layer_pos]) if rule.layer_pos is not None else None)

    def _generic(self, name: str, rule: _Rule, layer: int | None) -> Match:
        if self.family is None:
            guess = generic_expert_match(name)
            if guess is not None:
                return guess
        return Match(rule.role or generic_role(name), layer, None, None, rule.aux, rule.packed, guessed=True)


def _numbers(names: list[str], where: slice | None, offset: int = 0) -> list[int | None]:
    """The number at WHERE (a slice) in each of NAMES (plus OFFSET), or None for each without one."""
    if where is None:
        return [None] * len(names)
    digits = list(map(itemgetter(where), names))
    value = {text: int(text) + offset for text in set(digits)}   # a few hundred numbers at most
    return list(map(value.__getitem__, digits))


# ---- generic classification: non-MoE tensors of any family, and unknown families ----

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|block|h|layer)\.(\d+)\.")
_EXPERT_PER = re.compile(r"\.experts?\.(?:expert_)?(\d+)\.(\w+?)(?:\.weight)?$")
_EXPERT_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj|w1|w2|w3|v1|input_linear\.weight|"
                           r"output_linear\.weight)$")
_ROUTER = re.compile(r"\.(?:gate|router)(?:\.layer|\.classifier|\.wg)?\.weight$")
_SHARED = re.compile(r"\.shared_(?:experts?|mlp)\.(\w+)\.weight$")
_SHARED_GATE = re.compile(r"\.shared_expert_gate\.weight$")   # Qwen2-MoE's sigmoid gate on the shared expert
_PROJ_ROLE = {
    "w1": "GATE", "gate_proj": "GATE", "gate": "GATE",
    "w3": "UP", "up_proj": "UP", "up": "UP", "wi": "UP", "fc1": "UP",
    "w2": "DOWN", "down_proj": "DOWN", "down": "DOWN", "wo": "DOWN", "fc2": "DOWN",
    "gate_up_proj": "GATE_UP", "input_linear": "GATE_UP",
    "output_linear": "DOWN", "input_linear.weight": "GATE_UP", "output_linear.weight": "DOWN",
    "v1": "UP",
}
_ATTN_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key_value",
               "kv_proj", "sinks", "in_proj", "out_proj", "conv1d", "mixer", "linear_attn", "A_log",
               "dt_bias", "dt_proj", "x_proj")


def layer_of(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


_TOKEN_EMBEDDINGS = ("embed_tokens", ".wte.", "word_embeddings", "tok_embeddings", "embed_positions", ".wpe.")
OTHER_MODALITIES = ("vision", "visual", "multi_modal_projector", "mm_projector", "audio", "image", "talker",
                    "code2wav")   # (the last two: Qwen3-Omni's speech decoder, its own MoE, and vocoder)
# modules of a multimodal wrapper that are not its text model (their layer lists are never the decoder's)
OTHER_TOWERS = ("visual", "vision", "audio", "talker", "code2wav", "sam_model", "vit",   # (vit: HY4-VL's)
                "qwen2_model")   # (DeepSeek-OCR 2's vision encoder)


def in_other_tower(module_name: str) -> bool:
    """Whether MODULE_NAME lies in a vision/audio/talker tower: a whole name component that is one of
    OTHER_TOWERS or starts with one and "_" (vision_tower, audio_encoder)."""
    return any(part == tower or part.startswith(tower + "_")
               for part in module_name.split(".") for tower in OTHER_TOWERS)


def generic_role(name: str) -> Role:
    """Best-effort role of a tensor no family template names (attention, norms, ...)."""
    if any(word in name for word in OTHER_MODALITIES) or in_other_tower(name):
        return Role.OTHER   # vision towers and projectors of multimodal checkpoints (HY4-VL's vit.*)
    last = name.rsplit(".", 2)
    tail = ".".join(last[-2:]).lower()
    if "lm_head" in name or name in ("output.weight", "embed_out.weight"):
        # a bias of its own is never tied with the embedding (ERNIE's use_bias, PhiMoE's lm_head_bias)
        return Role.LM_HEAD_BIAS if name.endswith(".bias") else Role.LM_HEAD
    dotted = "." + name
    if any(word in dotted for word in _TOKEN_EMBEDDINGS) or dotted.endswith(".shared.weight"):
        return Role.EMBED
    if "norm" in tail or tail.startswith("ln") or ".ln_" in name:
        return Role.NORM
    if any(word in name for word in _ATTN_WORDS):
        return Role.ATTN
    return Role.OTHER


def generic_expert_match(name: str) -> Match | None:
    """Guess expert, router and shared-expert tensors of an unknown family by common patterns."""
    base, aux, packed = split_quant_suffix(name)
    layer = layer_of(base)
    if layer is None:
        return None
    if found := _EXPERT_PER.search(base):
        kind = _PROJ_ROLE.get(found.group(2))
        if kind:
            return Match(Role[f"EXPERT_{kind}"], layer, int(found.group(1)), "per-expert", aux, packed, True)
    if found := _EXPERT_FUSED.search(base):
        kind = _PROJ_ROLE[found.group(1)]
        return Match(Role[f"EXPERT_{kind}"], layer, None, "fused", aux, packed, True)
    if found := _SHARED.search(base):
        kind = _PROJ_ROLE.get(found.group(1))
        if kind:
            return Match(Role[f"SHARED_{kind}"], layer, None, None, aux, packed, True)
    if _SHARED_GATE.search(base):
        return Match(Role.SHARED_ROUTER, layer, None, None, aux, packed, True)
    if _ROUTER.search(base) and "attn" not in base and "attention" not in base:
        return Match(Role.ROUTER, layer, None, None, aux, packed, True)
    return None


def _first_fit(candidates, name: str) -> int:
    """The index of the first of a reader's CANDIDATES whose literal digits NAME has, or -1."""
    for k, (_, _, _, literals) in enumerate(candidates):
        if not literals or not any(name[at] != digits for at, digits in literals):
            return k
    return -1
