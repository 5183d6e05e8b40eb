"""The tensor plan: what every output tensor of a checkpoint is made of, read from headers only.

Given a layout (per-expert or fused), a dtype and whether to dequantize, each output tensor is a
list of pieces: byte ranges of source files (layout and shard changes are pure byte
rearrangements) or small computations (casts, transposes, dequantization of one tensor or one
expert). `moetool convert` writes the plan; quantize reads its source through it and the runner
loads models with it. The writer streams pieces into shards, so memory stays at a few pieces
whatever the model size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from moetool.arch import Family, Role, detect_family
from moetool.arch.config_compat import v4_compatible
from moetool.arch.matcher import AUX_ENDINGS, Classifier, Match, scale_owner, split_quant_suffix
from moetool.checkpoint import Checkpoint, TensorRef
from moetool.checkpoint.checkpoint import SIDE_QUANTIZATION, TORCH_DTYPES
from moetool.checkpoint.pieces import ComputedRef, computed_piece, rows_piece, tensor_pieces
from moetool.checkpoint.writer import OutputTensor, Piece, ShardPlan, plan_shards, side_files
from moetool.errors import CheckpointFormatError, UnsupportedError
from moetool.quant import compressed_tensors as ct
from moetool.quant import released
from moetool.quant.config import recorded_formats
from moetool.quant.formats import stacked_slices

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
TORCH_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
EXPERT_WEIGHTS = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP)


@dataclass
class PlanOptions:
    dtype: str | None = None            # "bf16" | "fp16" | "fp32"; None keeps each tensor's dtype
    layout: str | None = None           # "per-expert" | "fused"; None keeps the source layout
    max_shard_size: int = 5_000_000_000
    dequantize: bool = False
    cast_fp32_roles: bool = False       # also cast router tensors a family keeps in fp32
    # name every tensor as transformers 5 holds it (the family's hub renames, row splits and joins), the
    # expert layout changed or not: the runner's loaders, never convert (which keeps the checkpoint's names)
    model_names: bool = False


@dataclass
class TensorPlan:
    source: str
    family: str | None
    source_layout: str | None
    target_layout: str | None
    tensors: list[OutputTensor]
    shards: list[ShardPlan]
    config: dict[str, Any] | None
    files: list[Path]                   # copied as they are (tokenizer, generation config, ...)
    actions: dict[str, int] = field(default_factory=dict)   # what was done, counted
    notes: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)   # output name -> the checkpoint's, of renamed tensors
    # output name -> the checkpoint's tensors it is made of, of every tensor named apart from the checkpoint by
    # the family's renames, row splits, joins and shards (quantize matches --rules under both names)
    origins: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "family": self.family, "source_layout": self.source_layout,
                "target_layout": self.target_layout, "tensors": len(self.tensors),
                "output_bytes": self.output_bytes, "shards": [{"file": s.file, "tensors": len(s.tensors),
                                                                "bytes": s.nbytes} for s in self.shards],
                "actions": self.actions, "files_copied": [f.name for f in self.files], "notes": self.notes}


def family_context(ckpt: Checkpoint) -> tuple[Family | None, dict[str, Any], int]:
    """The family, its effective config (Family.settings: a multimodal wrapper's text config merged
    in, the config class's defaults filled) and the layer offset of a seq2seq decoder."""
    config = ckpt.config or {}
    family = detect_family(ckpt.config)
    cfg = family.settings(config) if family else config
    offset = family.decoder_offset(cfg) if family and family.decoder_offset else 0
    return family, cfg, offset


@dataclass
class _Entry:
    name: str
    ref: TensorRef
    match: Match


class _Planner:
    def __init__(self, ckpt: Checkpoint, options: PlanOptions, *, dequantized: bool = False):
        self.ckpt, self.options = ckpt, options
        self.family, self.cfg, self.decoder_offset = family_context(ckpt)
        self.classifier = Classifier(self.family, self.decoder_offset, ckpt.tensors)
        self.recorded = recorded_formats(ckpt.config) or {}   # formats of a moetool-quantized checkpoint
        self.target_dtype = DTYPES[options.dtype] if options.dtype else None
        self.actions: dict[str, int] = defaultdict(int)
        self.notes: list[str] = []
        self.out: list[OutputTensor] = []
        self.renamed: dict[str, str] = {}   # output name -> source name (Family.renames)
        self.origins: dict[str, tuple[str, ...]] = {}   # output name -> source names (all hub-named tensors)
        self.config_dequantized = dequantized   # the config's quantization_config goes (set as weights are)

    # -- helpers
    def out_dtype(self, entry: _Entry) -> str:
        ref = entry.ref
        if self.target_dtype is None or ref.dtype not in FLOATS or ref.dtype == self.target_dtype:
            return ref.dtype
        if id(ref) in self.quantized:   # scales, absmax, code maps: casting them would change the weights
            self.actions["kept (quantization state)"] += 1
            return ref.dtype
        if self.family and (entry.match.role in self.family.fp32_roles or
                            entry.name.endswith(self.family.fp32_suffixes)) and ref.dtype == "F32" \
                and not self.options.cast_fp32_roles:
            self.actions["kept in fp32 (router)"] += 1
            return ref.dtype
        return self.target_dtype

    def name_for(self, original: str, role: Role, layout: str | None, layer: int | None,
                 expert: int | None) -> str:
        templates = self.family.templates(layout)
        template = templates[role]
        options = (template,) if isinstance(template, str) else template
        decoder = layer is not None and layer >= self.decoder_offset and any("{D}" in t for t in options) \
            and self.decoder_offset > 0
        tpl = next((t for t in options if ("{D}" in t) == decoder), options[0])
        local = layer - self.decoder_offset if decoder else layer
        name = tpl.replace("{L}", str(local)).replace("{D}", str(local)).replace("{E}", str(expert))
        return self.family.held_named(self.classifier.restore_prefix(original, name), layout == "fused")

    def emit(self, name: str, dtype: str, shape: tuple[int, ...], pieces: list[Piece], note: str,
             source_dtype: str | None = None) -> None:
        tensor = OutputTensor(name, dtype, tuple(shape), pieces, note)
        tensor.check()
        self.out.append(tensor)
        if source_dtype and source_dtype != dtype:
            self.actions[f"cast {source_dtype} -> {dtype}"] += 1

    # -- the plan
    def plan(self) -> tuple[str | None, str | None]:
        entries = [_Entry(n, r, self.classifier.classify(n)) for n, r in self.ckpt.tensors.items()]
        owners = self._companions(entries)
        self.quantized = {id(ref) for parts in owners.values() for ref in parts.values()} | {
            id(e.ref) for e in entries if e.name in owners}
        if self.options.dequantize:
            entries = self._dequantized(entries, owners)
        source_layout = self._source_layout(entries)
        target_layout = self.options.layout or source_layout
        changing = target_layout != source_layout and source_layout is not None
        if self.options.layout and self.family is None:
            raise UnsupportedError("the architecture is not known, so moetool cannot change its expert layout")
        if changing and (self.family is None or target_layout not in self.family.layouts):
            raise UnsupportedError(f"{self.family.name if self.family else 'this family'} has no {target_layout} "
                                   f"layout (its layouts: {', '.join(self.family.layouts) or 'none'})")
        if self.options.layout and source_layout is None:
            raise UnsupportedError("no expert tensors were found, so there is no layout to change")
        if changing and any(e.ref.dtype not in FLOATS for e in entries if e.match.role in EXPERT_WEIGHTS):
            raise UnsupportedError("the expert weights are quantized; changing their layout needs --dequantize")

        groups_done: set[int] = set()
        by_name = {e.name: e for e in entries}
        # layers whose gate and up the hub stores apart, stacked, where transformers 5 holds them joined: joined
        # under the model's names (Family.joins_stacked_gate_up)
        stacked = {e.match.layer for e in entries if e.match.layout == "fused" and e.match.role == Role.EXPERT_GATE} \
            if self.options.model_names and not changing and self.family and self.family.joins_stacked_gate_up \
            else set()
        for entry in entries:
            m = entry.match
            if changing and m.layout == source_layout and m.role in EXPERT_WEIGHTS:
                if m.layer not in groups_done:
                    groups_done.add(m.layer)
                    self._convert_expert_group(entries, m.layer, source_layout, target_layout)
                continue
            if m.layer in stacked and m.layout == "fused" and m.role in EXPERT_WEIGHTS:
                if m.layer not in groups_done:
                    groups_done.add(m.layer)
                    self._join_stacked(entries, m.layer)
                continue
            if m.layout is None and (changing or self.options.model_names) and \
                    self._hub_named(entry, by_name, "fused" if self.options.model_names else target_layout):
                continue
            if changing and m.layout == source_layout and not m.guessed:
                name = self.name_for(entry.name, m.role, target_layout, m.layer, m.expert)
                self.actions["renamed"] += 1
            else:
                name = entry.name
            dtype = self.out_dtype(entry)
            self.emit(name, dtype, entry.ref.shape, tensor_pieces(entry.ref, dtype), "copied", entry.ref.dtype)
        return source_layout, target_layout

    def _hub_named(self, entry: _Entry, by_name: dict[str, _Entry], target: str) -> bool:
        """Emit ENTRY under its other layout's name where the family names it apart from its role
        templates (Family.renames, row_splits, row_joins, row_shards); False where it does not."""
        fam = self.family
        if fam is None or not (fam.renames or fam.row_splits or fam.row_joins or fam.row_shards):
            return False
        name, dtype, fused = entry.name, self.out_dtype(entry), target == "fused"
        if fam.held_prefixes and not any(name.startswith(prefix) for pair in fam.held_prefixes for prefix in pair):
            return False   # (not the text model's: a wrapper's other towers keep their names)
        for hub, infix, shards_of in fam.row_shards:
            head, _, tail = hub.partition("{K}")
            if fused and head in name and tail in name.partition(head)[2]:   # shards -> one tensor
                number, _, rest = name.partition(head)[2].partition(tail)
                if not number.isdigit():
                    continue
                if number == "0":        # emitted with the first shard
                    before = name.partition(head)[0]
                    names = [f"{before}{head}{k}{tail}{rest}" for k in range(shards_of(self.cfg))]
                    missing = [n for n in names if n not in by_name]
                    if missing:
                        raise CheckpointFormatError(f"{missing[0]} is missing; {name} cannot be joined with it")
                    refs = [by_name[n].ref for n in names]
                    self.origins[f"{before}{infix}{rest}"] = tuple(names)
                    self.emit(f"{before}{infix}{rest}", dtype, (sum(r.shape[0] for r in refs), *refs[0].shape[1:]),
                              [p for r in refs for p in tensor_pieces(r, dtype)], "concatenated", entry.ref.dtype)
                return True
            if not fused and infix in name:   # one tensor -> equal row shards
                shards, total = shards_of(self.cfg), entry.ref.shape[0]
                if total % shards:
                    raise CheckpointFormatError(f"{name}: {total} rows do not split into {shards} equal shards")
                rows = total // shards
                for k in range(shards):
                    self.origins[name.replace(infix, f"{head}{k}{tail}")] = (name,)
                    self.emit(name.replace(infix, f"{head}{k}{tail}"), dtype, (rows, *entry.ref.shape[1:]),
                              [_rows(entry.ref, k * rows, (k + 1) * rows, dtype)], "split", entry.ref.dtype)
                return True
        # (one tensor, its parts, whether the one is split when fusing): row_splits split the hub's one
        # tensor into transformers 5's parts, row_joins join the hub's parts into transformers 5's one
        for whole, parts, split in ([(w, p, fused) for w, p in fam.row_splits] +
                                    [(w, p, not fused) for w, p in fam.row_joins]):
            if split and whole in name:       # rows [q | k | v] -> q, k, v
                start, total = 0, entry.ref.shape[0]
                for infix, rows_of in parts:
                    rows = rows_of(self.cfg)
                    if start + rows > total:
                        raise CheckpointFormatError(f"{name}: {total} rows, fewer than the config's "
                                                    f"{sum(r(self.cfg) for _, r in parts)}")
                    self.origins[name.replace(whole, infix)] = (name,)
                    self.emit(name.replace(whole, infix), dtype, (rows, *entry.ref.shape[1:]),
                              [_rows(entry.ref, start, start + rows, dtype)], "split", entry.ref.dtype)
                    start += rows
                if start != total:
                    raise CheckpointFormatError(f"{name}: {total} rows, where the config makes {start}")
                return True
            first = parts[0][0]
            if not split and any(infix in name for infix, _ in parts):
                if first not in name:       # emitted with the first part
                    return True
                names = [name.replace(first, infix) for infix, _ in parts]
                missing = [n for n in names if n not in by_name]
                if missing:
                    raise CheckpointFormatError(f"{missing[0]} is missing; {name} cannot be joined with it")
                refs = [by_name[n].ref for n in names]
                self.origins[name.replace(first, whole)] = tuple(names)
                self.emit(name.replace(first, whole), dtype, (sum(r.shape[0] for r in refs), *refs[0].shape[1:]),
                          [p for r in refs for p in tensor_pieces(r, dtype)], "concatenated", entry.ref.dtype)
                return True
        for hub, infix in fam.renames:
            old, new = (hub, infix) if fused else (infix, hub)
            if old in new and new in name:   # named so already (A.X-K1's .post_mlp_layernorm. -> .mlp.<it>)
                continue
            if old in name:
                out = fam.held_named(name.replace(old, new), fused)
                self.renamed[out] = name
                self.origins[out] = (name,)
                self.emit(out, dtype, entry.ref.shape, tensor_pieces(entry.ref, dtype), "copied", entry.ref.dtype)
                self.actions["renamed"] += 1
                return True
        return False

    def _source_layout(self, entries: list[_Entry]) -> str | None:
        layouts = {e.match.layout for e in entries if e.match.layout and e.match.role in EXPERT_WEIGHTS
                   and not e.match.guessed}
        if len(layouts) > 1:
            raise UnsupportedError("expert tensors are stored in both layouts; inspect the checkpoint first")
        return layouts.pop() if layouts else None

    # -- quantized weights and their companions
    def _companions(self, entries: list[_Entry]) -> dict[str, dict[str, TensorRef]]:
        """Quantized weight name -> its companion tensors by suffix (scales, absmax, SCB, ...)."""
        names = self.ckpt.tensors
        found: dict[str, dict[str, TensorRef]] = defaultdict(dict)
        companions = self.classifier.companions
        for e in entries:
            if e.name in companions:   # X.scale of a quantized X.weight (DeepSeek-V4's hub)
                found[scale_owner(e.name)]["scale"] = e.ref
                continue
            if not e.name.endswith(AUX_ENDINGS):
                continue
            if e.name.endswith("_scales"):   # mxfp4: X_scales belongs to X_blocks
                owner, key = e.name.removesuffix("_scales") + "_blocks", "scales"
            else:                            # X.weight.absmax, X.weight_scale_inv, X.SCB, ...
                owner = split_quant_suffix(e.name)[0]
                stem = owner.removesuffix(".weight")
                key = e.name[len(owner):] if e.name.startswith(owner) else e.name[len(stem):]
            # (a weight stored as packed codes: X.weight_packed, or GPTQ's and AWQ's X.qweight)
            owner = next((n for n in (owner, owner + "_packed", owner.removesuffix(".weight") + ".qweight")
                          if n in names), owner)
            if owner in names:
                found[owner][key.lstrip("._")] = e.ref
        return dict(found)

    def _dequantized(self, entries: list[_Entry], owners: dict[str, dict[str, TensorRef]]) -> list[_Entry]:
        """ENTRIES with each quantized weight replaced by a computed, dequantized reference and
        its companions dropped."""
        companions = {id(ref) for parts in owners.values() for ref in parts.values()}
        out = []
        for entry in entries:
            if id(entry.ref) in companions:
                continue
            parts = owners.get(entry.name)
            if parts is None:
                out.append(entry)
                continue
            ref = self._dequantize(entry.ref, parts)
            match = self.classifier.classify(ref.name) if ref.name != entry.name else entry.match
            out.append(_Entry(ref.name, ref, match))
        if len(out) != len(entries) or self.recorded:
            self.config_dequantized = True
        return self._restacked(out)

    def _restacked(self, entries: list[_Entry]) -> list[_Entry]:
        """Experts moetool stored one slice each (of a tensor the family stores stacked) stacked again."""
        slices = stacked_slices(self.ckpt.config)
        if not slices:
            return entries
        groups: dict[str, dict[int, TensorRef]] = defaultdict(dict)
        out = []
        for entry in entries:
            if entry.name in slices:
                stacked, expert = slices[entry.name]
                if not groups[stacked]:
                    out.append(stacked)   # its place in the order
                groups[stacked][expert] = entry.ref
            else:
                out.append(entry)
        for i, item in enumerate(out):
            if isinstance(item, str):
                refs = groups[item]
                first = refs[0]
                ref = ComputedRef(item, first.dtype, (len(refs), *first.shape),
                                  expert=lambda e, refs=refs, dtype=TORCH_DTYPES[first.dtype]: refs[e].load().to(dtype))
                out[i] = _Entry(item, ref, self.classifier.classify(item))
                self.actions["restacked experts"] += 1
        return out

    def _dequantize(self, ref: TensorRef, parts: dict[str, TensorRef]) -> ComputedRef:
        from moetool.quant import dequant

        out = self.target_dtype or "BF16"
        torch_out = TORCH_DTYPES[out]
        fmt = self.recorded.get(ref.name)
        if fmt is not None:
            blob = parts.get(f"quant_state.bitsandbytes__{fmt.kind}")
            shape = fmt.original_shape(ref.shape, blob.load if blob is not None else None, ref.name,
                                       {k: v.shape for k, v in parts.items()})
            self.actions[f"dequantized {fmt.id}"] += 1
            return ComputedRef(ref.name, out, shape, lambda: fmt.dequantize(
                {"": ref.load(), **{"." + k: v.load() for k, v in parts.items()}}, shape, torch_out, name=ref.name))
        if "scale" in parts and ref.dtype == "I8":   # FP4 e2m1, two a byte, a scale per group of inputs
            scale = parts["scale"]
            shape = dequant.fp4_shape(ref.shape, scale.shape, ref.name)
            self.actions["dequantized fp4"] += 1
            return ComputedRef(ref.name, out, shape, lambda: dequant.dequantize_fp4(ref.load(), scale.load(),
                                                                                    torch_out))
        scale = parts.get("scale_inv", parts.get("scale", parts.get("qscale_weight")))   # (Mistral's: qscale_weight)
        if scale is not None and ref.dtype.startswith("F8"):
            if len(ref.shape) not in (2, 3):
                raise UnsupportedError(f"{ref.name}: block-fp8 dequantization handles 2-D weights and 3-D expert "
                                       f"stacks, not {len(ref.shape)}-D")
            block = tuple((self.cfg.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
            if prod(scale.shape) == prod(ref.shape[:-2]):   # one scale a matrix: per tensor
                block = tuple(ref.shape[-2:])
            dequant.check_fp8_grid(ref.shape, scale.shape, block, ref.name)
            self.actions["dequantized fp8"] += 1
            if len(ref.shape) == 3:   # stacked experts [E, rows, cols], scales [E, rows/128, cols/128] (Step 3.7)
                return ComputedRef(ref.name, out, ref.shape, expert=lambda e: dequant.dequantize_fp8_block(
                    ref.load_slice(e), scale.load_slice(e), torch_out, block))
            return ComputedRef(ref.name, out, ref.shape, lambda: dequant.dequantize_fp8_block(
                ref.load(), scale.load(), torch_out, block))
        if "scales" in parts and ref.name.endswith("_blocks"):
            scales = parts["scales"]
            experts, rows, groups, _ = ref.shape
            self.actions["dequantized mxfp4"] += 1
            return ComputedRef(ref.name.removesuffix("_blocks"), out, (experts, groups * 32, rows),
                                expert=lambda e: dequant.dequantize_mxfp4(ref.load_slice(e), scales.load_slice(e),
                                                                          torch_out).T)   # [E, in, out]
        state = next((v for k, v in parts.items() if k.startswith("quant_state.bitsandbytes__")), None)
        if state is not None:
            self.actions["dequantized bitsandbytes 4-bit"] += 1
            shape = dequant.bnb4_shape(state.load(), ref.nbytes, name=ref.name,
                                       parts={k: v.shape for k, v in parts.items()})
            return ComputedRef(ref.name, out, shape, lambda: dequant.dequantize_bnb4(
                {"weight": ref.load(), **{k: v.load() for k, v in parts.items()}}, torch_out, name=ref.name))
        if "SCB" in parts:
            scb = parts["SCB"]
            self.actions["dequantized bitsandbytes int8"] += 1
            return ComputedRef(ref.name, out, ref.shape,
                                lambda: dequant.dequantize_bnb8(ref.load(), scb.load(), torch_out))
        raise UnsupportedError(f"{ref.name}: moetool cannot dequantize this form "
                               f"(companions: {', '.join(sorted(parts))})")

    # -- expert layout
    def _convert_expert_group(self, entries: list[_Entry], layer: int, source: str, target: str) -> None:
        fam = self.family
        have: dict[Role, dict[int | None, _Entry]] = defaultdict(dict)
        for e in entries:
            if e.match.layer == layer and e.match.layout == source and e.match.role in EXPERT_WEIGHTS:
                have[e.match.role][e.match.expert] = e
        any_entry = next(iter(next(iter(have.values())).values()))
        target_templates = fam.templates(target)
        self.actions["expert groups converted"] += 1

        if source == "per-expert" and Role.EXPERT_GATE in have and Role.EXPERT_GATE_UP in target_templates:
            experts = sorted(have[Role.EXPERT_DOWN])
            # gate and up of identity experts, past down's: in transformers 5's own saves (LongCat-Flash), not the hub's
            zero = fam.zero_expert_rows(self.cfg)
            gated = sorted(have[Role.EXPERT_GATE])
            if experts != list(range(len(experts))) or sorted(have[Role.EXPERT_UP]) != gated \
                    or gated not in (experts, list(range(len(experts) + zero))):
                raise UnsupportedError(f"layer {layer}: experts are incomplete; cannot fuse them")
            gates = [have[Role.EXPERT_GATE][e] for e in gated]
            ups = [have[Role.EXPERT_UP][e] for e in gated]
            downs = [have[Role.EXPERT_DOWN][e] for e in experts]
            n, (inter, hidden) = len(experts), gates[0].ref.shape
            zero -= len(gated) - n   # identity experts' rows still to add (zeros: never used)
            for group, shape in ((gates, (inter, hidden)), (ups, (inter, hidden)), (downs, (hidden, inter))):
                _same_shapes(group, shape, layer)
            dtype = self.out_dtype(gates[0])
            name_gu = self.name_for(any_entry.name, Role.EXPERT_GATE_UP, target, layer, None)
            name_d = self.name_for(any_entry.name, Role.EXPERT_DOWN, target, layer, None)
            if fam.fused_transposed:   # [E, H, 2I] and [E, I, H] (Llama 4)
                torch_dtype = TORCH_DTYPES[dtype]
                gate_up = [computed_piece(lambda g=g, u=u: _cat_t(g.ref.load(), u.ref.load(), torch_dtype),
                                     (hidden, 2 * inter), dtype) for g, u in zip(gates, ups)]
                down = [computed_piece(lambda d=d: d.ref.load().T.to(torch_dtype), (inter, hidden), dtype)
                        for d in downs]
                self.emit(name_gu, dtype, (n, hidden, 2 * inter), gate_up, "fused (transposed)", gates[0].ref.dtype)
                self.emit(name_d, dtype, (n, inter, hidden), down, "fused (transposed)", downs[0].ref.dtype)
            else:                      # [E, 2I, H] = stack(cat(gate_e, up_e)) and [E, H, I] = stack(down_e)
                gate_up = [p for g, u in zip(gates, ups) for p in tensor_pieces(g.ref, dtype) +
                           tensor_pieces(u.ref, dtype)]
                down = [p for d in downs for p in tensor_pieces(d.ref, dtype)]
                # transformers 5 holds gate_up rows for the identity experts too
                gate_up += [computed_piece(lambda: _zeros((2 * inter, hidden), dtype), (2 * inter, hidden), dtype)
                            for _ in range(zero)]
                self.emit(name_gu, dtype, (len(gated) + zero, 2 * inter, hidden), gate_up, "fused",
                          gates[0].ref.dtype)
                self.emit(name_d, dtype, (n, hidden, inter), down, "fused", downs[0].ref.dtype)
            return

        if source == "fused" and Role.EXPERT_GATE_UP in have and Role.EXPERT_GATE in target_templates:
            gu, dn = have[Role.EXPERT_GATE_UP][None], have[Role.EXPERT_DOWN][None]
            dtype = self.out_dtype(gu)
            torch_dtype = TORCH_DTYPES[dtype]
            # gate_up's rows past down's are identity experts' (LongCat-Flash): split as transformers 5 saves them
            n, downs = gu.ref.shape[0], dn.ref.shape[0]
            transposed = _stored_transposed(fam, self.cfg, gu.ref.shape, dn.ref.shape)
            if transposed:             # gate_up [E, H, 2I], down [E, I, H]
                hidden, two_inter = gu.ref.shape[1:]
            else:                      # gate_up [E, 2I, H], down [E, H, I]
                two_inter, hidden = gu.ref.shape[1:]
            inter = two_inter // 2
            gate_t = lambda e: gu.ref.load_slice(e)[:, :inter].T.to(torch_dtype)   # noqa: E731
            up_t = lambda e: gu.ref.load_slice(e)[:, inter:].T.to(torch_dtype)     # noqa: E731
            down_t = lambda e: dn.ref.load_slice(e).T.to(torch_dtype)             # noqa: E731
            for e in range(n):
                names = [self.name_for(gu.name, r, target, layer, e) for r in EXPERT_WEIGHTS[:3]]
                if transposed:
                    pieces = [[computed_piece(lambda e=e, f=f: f(e), shape, dtype)] for f, shape in
                              ((gate_t, (inter, hidden)), (up_t, (inter, hidden)), (down_t, (hidden, inter)))]
                else:                  # rows of the [E*2I, H] and [E*H, I] matrices: byte ranges
                    base = e * two_inter
                    pieces = [[rows_piece(gu.ref, base, base + inter, dtype)],
                              [rows_piece(gu.ref, base + inter, base + two_inter, dtype)],
                              [rows_piece(dn.ref, e * hidden, (e + 1) * hidden, dtype)]]
                parts = list(zip(names, pieces, ((inter, hidden), (inter, hidden), (hidden, inter))))
                for name, part, shape in parts if e < downs else parts[:2]:   # (an identity expert: no down)
                    self.emit(name, dtype, shape, part, "split", gu.ref.dtype)
            return

        if all("{E}" in _first(fam.per_expert.get(role)) and "{E}" not in _first(fam.fused.get(role))
               for role in have):
            self._stack_or_split(have, layer, source, target)
            return
        # Same roles in both layouts (Granite's 3-D hub tensors): only the names change.
        for role, by_expert in have.items():
            for expert, entry in by_expert.items():
                dtype = self.out_dtype(entry)
                self.emit(self.name_for(entry.name, role, target, layer, expert), dtype, entry.ref.shape,
                          tensor_pieces(entry.ref, dtype), "renamed", entry.ref.dtype)


    def _join_stacked(self, entries: list[_Entry], layer: int) -> None:
        """LAYER's gate and up, stored apart and stacked [E, I, H], joined expert by expert into gate_up_proj
        [E, 2I, H] (rows [gate_e; up_e] of each expert: byte ranges), and its down under the model's name."""
        have = {e.match.role: e for e in entries if e.match.layer == layer and e.match.layout == "fused"
                and e.match.role in EXPERT_WEIGHTS}
        gate, up, down = have.get(Role.EXPERT_GATE), have.get(Role.EXPERT_UP), have.get(Role.EXPERT_DOWN)
        if up is None or Role.EXPERT_GATE_UP in have:
            raise CheckpointFormatError(f"layer {layer}: {gate.name} has no stacked up_proj of its own to be joined "
                                        "with")
        if tuple(up.ref.shape) != tuple(gate.ref.shape) or len(gate.ref.shape) != 3:
            raise CheckpointFormatError(f"{up.name}: shape {list(up.ref.shape)}, where {gate.name} is "
                                        f"{list(gate.ref.shape)}; cannot join them as [E, I, H] stacks")
        n, inter, hidden = gate.ref.shape
        dtype = self.out_dtype(gate)
        pieces = [rows_piece(ref, e * inter, (e + 1) * inter, dtype) for e in range(n) for ref in (gate.ref, up.ref)]
        self.emit(self.name_for(gate.name, Role.EXPERT_GATE_UP, "fused", layer, None), dtype, (n, 2 * inter, hidden),
                  pieces, "joined", gate.ref.dtype)
        self.actions["stacked gate and up joined"] += 1
        if down is not None:
            dtype = self.out_dtype(down)
            self.emit(self.name_for(down.name, Role.EXPERT_DOWN, "fused", layer, None), dtype, down.ref.shape,
                      tensor_pieces(down.ref, dtype), "renamed", down.ref.dtype)

    def _stack_or_split(self, have, layer: int, source: str, target: str) -> None:
        """The same roles, one tensor per expert on one side and stacked on the other (GPT-OSS):
        expert e is rows [e*a, (e+1)*a) of the stacked [E, a, b] tensor seen as a matrix."""
        for role, by_expert in have.items():
            if source == "fused":
                entry = by_expert[None]
                count, rows = entry.ref.shape[0], entry.ref.shape[1]
                dtype = self.out_dtype(entry)
                for e in range(count):
                    self.emit(self.name_for(entry.name, role, target, layer, e), dtype, entry.ref.shape[1:],
                              [rows_piece(entry.ref, e * rows, (e + 1) * rows, dtype)], "split", entry.ref.dtype)
                continue
            experts = sorted(by_expert)
            if experts != list(range(len(experts))):
                raise UnsupportedError(f"layer {layer}: experts are incomplete; cannot stack them")
            first = by_expert[0]
            _same_shapes([by_expert[e] for e in experts], tuple(first.ref.shape), layer)
            dtype = self.out_dtype(first)
            pieces = [p for e in experts for p in tensor_pieces(by_expert[e].ref, dtype)]
            self.emit(self.name_for(first.name, role, target, layer, None), dtype, (len(experts), *first.ref.shape),
                      pieces, "stacked", first.ref.dtype)


def _stored_transposed(fam: Family, cfg: dict, gate_up: tuple, down: tuple) -> bool:
    """Whether fused experts of these shapes are stored [E, in, out]: the family's form, but for a family
    transformers transposes as it loads (transposed_on_load), which also reads the [E, out, in] form it
    holds (and writes): that one where the shapes say so (gate_up [E, 2I, H] or down [E, H, I], H the
    hidden size)."""
    if not fam.transposed_on_load:
        return fam.fused_transposed
    hidden = cfg.get("hidden_size")
    held = (gate_up[2] == hidden and gate_up[1] != hidden) or (down[1] == hidden and down[2] != hidden)
    return not held


def _same_shapes(entries: list[_Entry], shape: tuple[int, ...], layer: int) -> None:
    """Experts stacked into one tensor must share one shape: an odd one would be scrambled into it."""
    for e in entries:
        if tuple(e.ref.shape) != shape:
            raise CheckpointFormatError(f"{e.name}: shape {list(e.ref.shape)}, where layer {layer}'s experts "
                                        f"make {list(shape)}; cannot stack the experts into one tensor")


def _rows(ref: TensorRef, start: int, stop: int, dtype: str) -> Piece:
    """Rows [start, stop) of REF; elements of a 1-D one (a bias)."""
    if len(ref.shape) > 1:
        return rows_piece(ref, start, stop, dtype)
    torch_dtype = TORCH_DTYPES[dtype]
    return computed_piece(lambda: ref.load()[start:stop].to(torch_dtype), (stop - start,), dtype)


def _first(template) -> str:
    """A template, or the first of its alternatives ("" when absent)."""
    return (template if isinstance(template, str) else template[0]) if template else ""


def _zeros(shape: tuple[int, ...], dtype: str):
    import torch

    return torch.zeros(shape, dtype=TORCH_DTYPES[dtype])


def _cat_t(gate, up, dtype):
    import torch

    return torch.cat([gate.T, up.T], dim=1).to(dtype)


def plan_tensors(ckpt: Checkpoint, options: PlanOptions) -> TensorPlan:
    """Plan a conversion: every output tensor and the pieces it is made of (reads headers only)."""
    if ckpt.root is None:
        raise UnsupportedError("convert needs the weights; open the checkpoint without headers_only")
    if ckpt.kind == "gguf":
        raise UnsupportedError(f"{ckpt.source}: convert writes safetensors from safetensors or .bin checkpoints; "
                               "a GGUF file is llama.cpp's", hint="prune a GGUF as it is, or convert the model it "
                               "was made from")
    stored = None
    if options.dequantize:   # (moetool's own compressed-tensors layout first: its formats are moetool's)
        stored = ct.recorded_formats(ckpt.config, ckpt.tensors) or released.quantized_weights(ckpt.config,
                                                                                               ckpt.tensors)
    if stored:   # another tool's quantized checkpoint: its weights read as dequantized tensors, in --dtype
        # (convert's default: bf16, as for every quantized form; a model load casts them itself)
        ckpt = released.dequantized_view(ckpt, stored, DTYPES.get(options.dtype) or
                                         (None if options.model_names else "BF16"))
    planner = _Planner(ckpt, options, dequantized=bool(stored))
    source_layout, target_layout = planner.plan()
    config = _edited_config(ckpt, planner, options)
    files = side_files(ckpt)
    if stored:   # (a side description of the quantization, kept, would make the dequantized output read as quantized)
        files = [f for f in files if f.name not in SIDE_QUANTIZATION]
    if target_layout == "fused" and source_layout != "fused":
        planner.notes.append("the fused layout loads in transformers 5 only (transformers 4 reads per-expert)")
    shards = plan_shards(planner.out, options.max_shard_size)
    return TensorPlan(ckpt.source, planner.family.name if planner.family else None, source_layout,
                       target_layout, planner.out, shards, config, files, dict(planner.actions), planner.notes,
                       planner.renamed, planner.origins)


def _edited_config(ckpt: Checkpoint, planner: _Planner, options: PlanOptions) -> dict[str, Any] | None:
    """Edit the source JSON (never a config class round trip), keeping keys transformers 4.57 reads."""
    if ckpt.config is None:
        return None
    config = json.loads(json.dumps(ckpt.config))
    dtype = planner.target_dtype or ("BF16" if planner.config_dequantized else None)   # (only what was dequantized)
    if dtype:
        config["torch_dtype"] = TORCH_NAME[dtype]
        if "dtype" in config:
            config["dtype"] = TORCH_NAME[dtype]
    if planner.config_dequantized:
        config.pop("quantization_config", None)
        planner.notes.append("quantization_config removed")
        if config.pop("expert_dtype", None) is not None:   # (DeepSeek-V4-Flash's: its experts' fp4, as stored)
            planner.notes.append("expert_dtype removed")
    notes = v4_compatible(config, planner.family)
    planner.notes.extend(notes)
    return config
