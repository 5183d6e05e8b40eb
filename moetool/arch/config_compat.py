"""Keep configs readable by transformers 4.57 as well as 5.x, by editing their JSON.

transformers 5 renames some keys when it saves a config (§1.4 of the architecture
notes); a checkpoint saved by it may lack the key version 4 reads. We add the
version-4 key beside the new one and never remove anything.
"""

from __future__ import annotations

from typing import Any

from moetool.arch.schema import Family

# model_type -> {key transformers 4 reads: key transformers 5 may have written instead}
V4_KEYS: dict[str, dict[str, str]] = {
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "qwen2_moe": {"num_experts": "num_local_experts"},
    "qwen3_next": {"num_experts": "num_local_experts"},
}
# granitemoehybrid: layer_types values transformers 5 rewrote
LAYER_TYPES_V4 = {"linear_attention": "mamba", "full_attention": "attention"}


def v4_compatible(config: dict[str, Any], family: Family | None) -> list[str]:
    """Add version-4 keys to CONFIG in place; return what was added."""
    notes = []
    for v4_key, v5_key in V4_KEYS.get(config.get("model_type", ""), {}).items():
        if v4_key not in config and v5_key in config:
            config[v4_key] = config[v5_key]
            notes.append(f"config: added {v4_key} (read by transformers 4) beside {v5_key}")
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        notes.append("config: added rope_theta/rope_scaling (read by transformers 4) from rope_parameters")
    if config.get("model_type") == "granitemoehybrid" and isinstance(config.get("layer_types"), list) \
            and any(t in LAYER_TYPES_V4 for t in config["layer_types"]) and "layers_block_type" not in config:
        config["layers_block_type"] = [LAYER_TYPES_V4.get(t, t) for t in config["layer_types"]]
        notes.append("config: added layers_block_type (read by transformers 4) from layer_types")
    return notes
