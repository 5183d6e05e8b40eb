"""Hand-built checkpoint files for the bad-input tests.

Safetensors files are written byte by byte (8-byte little-endian header length,
JSON header, data buffer) so that tests can corrupt any part of them precisely.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}

MIXTRAL_CONFIG: dict[str, Any] = {
    "model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 4,
    "num_local_experts": 2, "num_experts_per_tok": 1, "vocab_size": 16, "tie_word_embeddings": False,
}


def expert_tensors(layer: int, expert: int) -> dict[str, list[int]]:
    """The three Mixtral per-expert weights of one expert (hidden 8, expert FFN 4)."""
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return {f"{prefix}.w1.weight": [4, 8], f"{prefix}.w3.weight": [4, 8], f"{prefix}.w2.weight": [8, 4]}


def mixtral_shapes(num_experts: int = 2) -> dict[str, list[int]]:
    """Name -> shape of every tensor of the tiny one-layer Mixtral."""
    shapes = {"model.embed_tokens.weight": [16, 8], "lm_head.weight": [16, 8],
              "model.layers.0.block_sparse_moe.gate.weight": [num_experts, 8]}
    for expert in range(num_experts):
        shapes.update(expert_tensors(0, expert))
    shapes.update({"model.layers.0.input_layernorm.weight": [8], "model.norm.weight": [8]})
    for proj in "qkvo":
        shapes[f"model.layers.0.self_attn.{proj}_proj.weight"] = [8, 8]
    return shapes


def layout(shapes: dict[str, list[int]], dtype: str = "F32") -> tuple[dict[str, Any], bytes]:
    """A valid header (tensors packed back to back in name order) and its data buffer."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = ITEMSIZE[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # Non-zero, deterministic bytes (1.0 in F32) so nothing looks like an all-zero placeholder.
    data = (b"\x00\x00\x80\x3f" * (offset // 4 + 1))[:offset]
    return header, data


def st_bytes(header: Any, data: bytes = b"", *, raw_header: bytes | None = None,
             length: int | None = None) -> bytes:
    """Serialize a safetensors file. RAW_HEADER replaces the JSON; LENGTH overrides the length field."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def valid_st_bytes(shapes: dict[str, list[int]] | None = None) -> bytes:
    header, data = layout(mixtral_shapes() if shapes is None else shapes)
    return st_bytes(header, data)


def write_config(folder: Path, config: Any = None, *, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_bytes(raw if raw is not None else json.dumps(MIXTRAL_CONFIG if config is None else config).encode())
    return path


def write_checkpoint(folder: Path, *, config: Any = None, shapes: dict[str, list[int]] | None = None,
                     weights: bytes | None = None, file_name: str = "model.safetensors") -> Path:
    """A folder with config.json and one weights file (valid unless WEIGHTS says otherwise)."""
    write_config(folder, config)
    (folder / file_name).write_bytes(valid_st_bytes(shapes) if weights is None else weights)
    return folder


def write_sharded(folder: Path, shards: dict[str, dict[str, list[int]]], *,
                  weight_map: dict[str, Any] | None = None, config: Any = None) -> Path:
    """A folder with config.json, several valid shards and model.safetensors.index.json.

    WEIGHT_MAP defaults to the true one (each tensor -> the shard that holds it).
    """
    write_config(folder, config)
    true_map = {}
    for file_name, shapes in shards.items():
        (folder / file_name).write_bytes(valid_st_bytes(shapes))
        true_map.update(dict.fromkeys(shapes, file_name))
    write_index(folder, {"metadata": {}, "weight_map": true_map if weight_map is None else weight_map})
    return folder


def write_index(folder: Path, index: Any = None, *, raw: bytes | None = None) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_bytes(raw if raw is not None else json.dumps(index).encode())
    return path


def split_shapes(shapes: dict[str, list[int]], parts: int = 2) -> list[dict[str, list[int]]]:
    """Split a tensor set into PARTS disjoint sets, round robin."""
    out: list[dict[str, list[int]]] = [{} for _ in range(parts)]
    for i, (name, shape) in enumerate(shapes.items()):
        out[i % parts][name] = shape
    return out


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ROOT (symlinks not followed), to prove nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
