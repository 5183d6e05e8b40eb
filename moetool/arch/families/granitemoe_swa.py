"""Granite MoE with sliding-window attention ("granitemoe_swa"): Granite MoE with a shared MLP, whose
attention has per-layer sliding windows and learnt per-head sinks. transformers has no conversion
mapping for it, so checkpoints hold its in-memory (fused) names only."""

from dataclasses import replace

from moetool.arch.families.granitemoeshared import FAMILY as GRANITEMOESHARED

FAMILY = replace(
    GRANITEMOESHARED, name="granitemoe_swa", model_types=("granitemoe_swa",),
    title="Granite MoE with sliding-window attention", per_expert=None,
    notes="sliding and full attention per layer_types, with learnt attention sinks (self_attn.sinks); "
          "the one layout is transformers 5's fused names",
)
