"""A GGUF checkpoint seen as the transformers checkpoint it was converted from.

The runner builds models from transformers checkpoints. For the families of arch/gguf.py's
RUNNABLE, this gives a GGUF that form: a config.json dict made from the metadata, and every
tensor under its hub name (routed experts one tensor per expert) as a float32 ComputedRef that
reads only the rows asked for -- one expert of a stacked ``_exps`` tensor is one contiguous byte
range -- and dequantizes them with gguf-py. The q/k rows convert_hf_to_gguf.py reordered for
llama.cpp's rope are put back. The tensor plan and the streamed runner then treat it like any
other checkpoint.
"""

from __future__ import annotations

import re

from moetool.arch import Role, get_family
from moetool.arch.gguf import (
    BLK,
    BLK_LAYER,
    BOS_KEY,
    BUFFER_SUFFIXES,
    EOS_KEY,
    LLAMA_STYLE_NAMES,
    ROUTED_ROLES,
    RUNNABLE,
    TENSORS,
    RunnableArch,
    family_name,
    transformers_config,
)
from moetool.checkpoint.checkpoint import Checkpoint
from moetool.checkpoint.gguf import GgufTensorRef, matrix_rows
from moetool.checkpoint.pieces import ComputedRef
from moetool.errors import CheckpointFormatError, UnsupportedError

VIEW_KIND = "gguf-transformers"
_LAYER = re.compile(BLK_LAYER)
_DENSE = frozenset({Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN})


def runnable_family(ckpt: Checkpoint) -> str:
    """The registry family of a GGUF checkpoint moetool can run; UnsupportedError otherwise."""
    name = family_name(ckpt.config or {})
    if name not in RUNNABLE:
        raise UnsupportedError(
            f"{ckpt.source}: running a GGUF model is supported for {', '.join(sorted(RUNNABLE))}; this file is "
            f"llama.cpp architecture {ckpt.config.get('model_type')!r}" + (f" ({name})" if name else ""),
            hint="profile the safetensors checkpoint it was made from; prune takes that profile with --profile")
    return name


def transformers_view(ckpt: Checkpoint) -> Checkpoint:
    """CKPT (a GGUF checkpoint) as a transformers checkpoint: kind VIEW_KIND, hub tensor names,
    config.json keys, tensors dequantized to float32 when read."""
    name = runnable_family(ckpt)
    runnable, family = RUNNABLE[name], get_family(name)
    cfg = ckpt.config or {}
    names = _name_table(family, runnable)
    tensors: dict[str, ComputedRef] = {}
    router_layers, dense_layers = set(), set()
    for gguf_name, ref in ckpt.tensors.items():
        if gguf_name.endswith(BUFFER_SUFFIXES):
            continue   # tables llama.cpp generates (rope factors); transformers computes its own
        found = _LAYER.match(gguf_name)
        layer = int(found.group(1)) if found else None
        masked = gguf_name if layer is None else BLK + gguf_name[found.end():]
        target = names.get(masked)
        if target is None:
            raise UnsupportedError(f"{ckpt.source}: tensor {gguf_name!r} has no transformers counterpart "
                                   f"in moetool's {family.title} mapping")
        template, role = target
        if role == Role.ROUTER:
            router_layers.add(layer)
        elif role in _DENSE:
            dense_layers.add(layer)
        hf = template.replace("{L}", str(layer)) if layer is not None else template
        heads = _heads(cfg, runnable, masked)
        if "{E}" in hf:   # a stacked expert tensor: one tensor per expert
            for e in range(ref.shape[0]):
                tensors[hf.replace("{E}", str(e))] = DequantizedRef(hf.replace("{E}", str(e)), ref, e, ref.shape[1:])
        else:
            tensors[hf] = DequantizedRef(hf, ref, None, _shape(role, ref), heads=heads)
    embed = ckpt.tensors.get(TENSORS[Role.EMBED])
    if embed is None:
        raise CheckpointFormatError(f"{ckpt.source}: has no {TENSORS[Role.EMBED]}")
    try:
        config = transformers_config(cfg, runnable, vocab_size=embed.shape[0],
                                     tied=TENSORS[Role.LM_HEAD] not in ckpt.tensors,
                                     dense_layers=sorted(dense_layers - router_layers))
    except (KeyError, ValueError) as exc:
        raise UnsupportedError(f"{ckpt.source}: the metadata cannot be mapped to a transformers config ({exc})") \
            from None
    meta = ckpt.gguf_metadata or {}
    for key, hf_key in ((BOS_KEY, "bos_token_id"), (EOS_KEY, "eos_token_id")):
        if isinstance(meta.get(key), int):
            config[hf_key] = meta[key]
    return Checkpoint(ckpt.source, VIEW_KIND, ckpt.root, config, tensors, ckpt.shards, list(ckpt.notes),
                      gguf_metadata=ckpt.gguf_metadata)


def _name_table(family, runnable: RunnableArch) -> dict[str, tuple[str, object]]:
    """Masked llama.cpp name ("blk.{L}.ffn_gate_exps.weight") -> (transformers template, role)."""
    table: dict[str, tuple[str, object]] = {k: (v, None) for k, v in LLAMA_STYLE_NAMES.items()}
    templates = family.templates("per-expert")
    for role in ROUTED_ROLES:
        if role in templates and role in TENSORS:
            hf = templates[role]
            table[TENSORS[role]] = (hf if isinstance(hf, str) else hf[0], role)
    return table


def _heads(cfg, runnable: RunnableArch, masked: str) -> int | None:
    """The head count whose rows convert_hf_to_gguf.py permuted in this tensor, if it did."""
    stem = masked.removeprefix(BLK).split(".")[0]
    key = runnable.permuted_heads.get(stem)
    return int(cfg[key]) if key else None


def _shape(role, ref: GgufTensorRef) -> tuple[int, ...]:
    """transformers' shape: the GGUF one, but a shared-expert gate is a [1, H] linear layer."""
    if role == Role.SHARED_ROUTER:
        return (1, ref.numel)
    return ref.shape


class DequantizedRef(ComputedRef):
    """A GGUF tensor, or expert EXPERT of a stacked one, as float32: reads only the bytes of the rows
    asked for (ggml blocks run along the last axis, so a row is whole blocks) and dequantizes them."""

    def __init__(self, name: str, source: GgufTensorRef, expert: int | None, shape, heads: int | None = None):
        super().__init__(name, "F32", tuple(shape))
        self.source, self.expert, self.heads = source, expert, heads
        self.rows = matrix_rows(self.numel, self.shape)

    def load(self):
        return self.load_rows(0, self.rows).reshape(self.shape)

    def load_slice(self, index):
        return self.load()[index]

    def load_rows(self, start: int, stop: int):
        import torch

        if self.heads:   # rows are permuted within each head: read whole heads, put them back
            per_head = self.rows // self.heads
            first, last = start // per_head * per_head, -(-stop // per_head) * per_head
            block = _unpermute(self._read(first, last), (last - first) // per_head)
            return torch.from_numpy(block[start - first:stop - first])
        return torch.from_numpy(self._read(start, stop))

    def _read(self, start: int, stop: int):
        import numpy as np

        base = (self.expert or 0) * self.rows   # an expert's rows follow the experts before it
        return np.ascontiguousarray(self.source.read_rows(base + start, base + stop), dtype=np.float32)


def _unpermute(rows, heads: int):
    """Undo LlamaModel.permute of convert_hf_to_gguf.py (reshape(heads, 2, d/2, ...).swapaxes(1, 2))
    on whole heads of rows."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, per_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
