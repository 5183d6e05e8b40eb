"""GGUF files that can be run: the tiny models (or the built-in one) written with everything
convert_hf_to_gguf.py writes for llama.cpp to run them.

On top of tests/gguf_fixtures.py: rope base, norm epsilon, key/value lengths, the q/k row
permutation of LlamaModel (Mixtral), and a tokenizer in llama.cpp's "gpt2" (byte-level BPE)
form from a tokenizer.json: tokens, token types, merges, bos/eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.gguf_fixtures import FAMILY_ARCH, build, gguf_metadata, gguf_tensors, write_gguf

RUNNABLE = ("qwen3_moe", "qwen2_moe", "mixtral")


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """LlamaModel.permute of convert_hf_to_gguf.py (written out independently of moetool's inverse)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def runnable_metadata(family: str, model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    md = gguf_metadata(family, model) | {
        "add_rope_freq_base": float(rope.get("rope_theta", 10000.0)),
        "add_layer_norm_rms_eps": float(c.rms_norm_eps),
        "add_key_length": head_dim, "add_value_length": head_dim,
        "add_rope_dimension_count": head_dim,
    }
    if family == "qwen3_moe":
        md["add_expert_weights_norm"] = bool(c.norm_topk_prob)
    return md


def tokenizer_metadata(tokenizer_json: Path) -> dict:
    """llama.cpp's gpt2-style tokenizer keys for a byte-level BPE tokenizer.json with GPT-2's
    pre-tokenizer regex (as the built-in model's; convert_hf_to_gguf.py names it "gpt-2")."""
    import gguf

    spec = json.loads(Path(tokenizer_json).read_text())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    first = min(special) if special else 0
    return {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": "gpt-2", "add_token_list": tokens,
            "add_token_types": types, "add_token_merges": merges, "add_bos_token_id": first,
            "add_eos_token_id": first, "add_add_bos_token": False}


def write_runnable(family: str, path: Path, *, model=None, qtype: str = "F32", tokenizer: Path | None = None,
                   split_max_tensors: int = 0, metadata: dict | None = None) -> list[Path]:
    """FAMILY's tiny model (or MODEL) as a GGUF llama.cpp could run; returns the files written."""
    import gguf

    model = model if model is not None else build(family, **({"norm_topk_prob": True}
                                                            if family == "qwen3_moe" else {}))
    c = model.config
    tensors = []
    for name, array in gguf_tensors(family, model):
        if family == "mixtral" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
            array = llama_permute(array, heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):   # llama.cpp stores the shared-expert gate 1-D
            array = array.reshape(-1)
        tensors.append((name, array))
    md = runnable_metadata(family, model)
    if tokenizer is not None:
        md |= tokenizer_metadata(tokenizer)
    md |= metadata or {}
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, FAMILY_ARCH[family])]
    return write_gguf(path, arch, md, tensors, qtype=qtype, split_max_tensors=split_max_tensors)
