"""A `llama-quantize --tensor-type-file` from an expert allocation.

GGUF stores each layer's experts stacked per projection (`blk.L.ffn_gate_exps.weight`, ...),
so llama.cpp could take a type per layer and projection; moetool gives all three projections of a
layer one type: the parameter-weighted mean bits it gave that layer's experts, rounded to the
nearest llama.cpp type. Patterns are anchored regular
expressions, as llama-quantize searches them in tensor names.
"""

from __future__ import annotations

import re

from moetool.arch import Role
from moetool.arch.gguf import TENSORS

# llama.cpp type name -> bits per weight (block bytes * 8 / block size, from ggml's type traits)
LLAMA_TYPES = (("q2_K", 2.625), ("q3_K", 3.4375), ("q4_K", 4.5), ("q5_K", 5.5), ("q6_K", 6.5625),
               ("q8_0", 8.5), ("bf16", 16.0))
# the stacked expert weights of a layer; gate and up fused where the converter was asked to
# (convert_hf_to_gguf.py --fuse-gate-up-exps): a line matching no tensor is harmless
EXPERT_WEIGHTS = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP)


def nearest_type(bits: float) -> str:
    return min(LLAMA_TYPES, key=lambda t: (abs(t[1] - bits), t[1]))[0]


def tensor_type_lines(experts) -> list[str]:
    """One `pattern=type` line per MoE layer and projection, from ExpertQuant rows."""
    per_layer: dict[int, list[float]] = {}
    for e in experts:
        bits, params = per_layer.get(e.layer, [0.0, 0])
        per_layer[e.layer] = [bits + e.bits * e.params, params + e.params]
    lines = []
    for layer, (bits, params) in sorted(per_layer.items()):
        kind = nearest_type(bits / params)
        lines += [f"^{re.escape(TENSORS[role].format(L=layer))}$={kind}" for role in EXPERT_WEIGHTS]
    return lines
