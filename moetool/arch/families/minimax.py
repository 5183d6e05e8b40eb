"""MiniMax-Text-01: Mixtral's experts and router; lightning (linear) attention layers."""

from dataclasses import replace

from moetool.arch.families.mixtral import FAMILY as MIXTRAL

FAMILY = replace(
    MIXTRAL, name="minimax", model_types=("minimax",), title="MiniMax-Text-01",
    buffer_suffixes=("self_attn.slope_rate", "self_attn.query_decay", "self_attn.key_decay",
                     "self_attn.diagonal_decay"),
    notes="hybrid lightning (linear) and softmax attention layers",
)
