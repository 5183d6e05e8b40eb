"""Qwen3-Next: Qwen2-MoE's tensor names, shared expert and router; hybrid attention; MTP."""

from dataclasses import replace

from moetool.arch.families.qwen2_moe import FAMILY as QWEN2_MOE

FAMILY = replace(
    QWEN2_MOE, name="qwen3_next", model_types=("qwen3_next",), title="Qwen3-Next", mtp=True,
    notes="hybrid gated-DeltaNet (linear) and full attention; mtp.* tensors are ignored by transformers",
)
