"""Small GGUF files written with gguf-py's GGUFWriter from the tiny transformers models.

Names and keys follow llama.cpp's convert_hf_to_gguf.py: attention, norms, embeddings, routers
and shared experts through gguf-py's own TensorNameMap; routed experts stacked expert-outermost
as ``blk.L.ffn_{gate,up,down}_exps`` ([E, I, H] / [E, H, I] in numpy order), fused HF gate/up
split apart (GPT-OSS interleaved, Llama 4 and GPT-OSS transposed back). Tensor types: F32, F16,
Q8_0 and Q4_0 (gguf.quants.quantize), and K-quants (Q4_K, Q6_K) as raw blocks of the right size;
tensors whose rows do not fill whole blocks fall back to F16, 1-D tensors stay F32 (as llama.cpp).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

FAMILY_ARCH = {   # tiny family -> gguf-py MODEL_ARCH member
    "mixtral": "LLAMA", "qwen2_moe": "QWEN2MOE", "qwen3_moe": "QWEN3MOE", "deepseek_v2": "DEEPSEEK2",
    "deepseek_v3": "DEEPSEEK2", "glm4_moe": "GLM4_MOE", "gpt_oss": "GPT_OSS", "olmoe": "OLMOE",
    "granitemoe": "GRANITE_MOE", "granitemoeshared": "GRANITE_MOE", "llama4_text": "LLAMA4",
    "dots1": "DOTS1", "ernie4_5_moe": "ERNIE4_5_MOE", "hunyuan_v1_moe": "HUNYUAN_MOE",
    "qwen3_5_moe_text": "QWEN35MOE", "lfm2_moe": "LFM2MOE", "exaone_moe": "EXAONE_MOE", "afmoe": "AFMOE",
}
# the registry family inspect must recognise for each
EXPECTED_FAMILY = {f: f for f in FAMILY_ARCH} | {"llama4_text": "llama4", "qwen3_5_moe_text": "qwen3_5_moe"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_DENSE = re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$")


def build(family: str, seed: int = 0, **overrides):
    """The tiny transformers model of FAMILY (tests/tiny.py), optionally with other config values."""
    import torch
    import transformers

    from tests.tiny import TINY, build_model

    if not overrides:
        return build_model(family, seed)
    cls_name, kwargs = TINY[family]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _experts(family: str, name: str, t: np.ndarray, cfg) -> list[tuple[str, np.ndarray]] | None:
    """The llama.cpp tensors of a fused transformers-5 expert tensor, or None if NAME is not one."""
    found = _LAYER.search(name)
    if found is None or ".experts." not in name:
        return None
    blk = f"blk.{found.group(1)}."
    tail = name.rsplit(".experts.", 1)[1]
    if family == "gpt_oss":   # [E, H, 2I], gate/up interleaved on the last axis; down [E, I, H]
        if tail == "gate_up_proj":
            return [(blk + "ffn_gate_exps.weight", t[..., ::2].transpose(0, 2, 1)),
                    (blk + "ffn_up_exps.weight", t[..., 1::2].transpose(0, 2, 1))]
        if tail == "gate_up_proj_bias":
            return [(blk + "ffn_gate_exps.bias", t[..., ::2]), (blk + "ffn_up_exps.bias", t[..., 1::2])]
        if tail == "down_proj":
            return [(blk + "ffn_down_exps.weight", t.transpose(0, 2, 1))]
        if tail == "down_proj_bias":
            return [(blk + "ffn_down_exps.bias", t)]
    if family == "llama4_text":   # [E, H, 2I] concatenated; down [E, I, H]
        half = t.shape[-1] // 2
        if tail == "gate_up_proj":
            return [(blk + "ffn_gate_exps.weight", t[..., :half].transpose(0, 2, 1)),
                    (blk + "ffn_up_exps.weight", t[..., half:].transpose(0, 2, 1))]
        if tail == "down_proj":
            return [(blk + "ffn_down_exps.weight", t.transpose(0, 2, 1))]
    if tail == "gate_up_proj":    # [E, 2I, H]: rows :I gate, I: up
        half = t.shape[1] // 2
        return [(blk + "ffn_gate_exps.weight", t[:, :half]), (blk + "ffn_up_exps.weight", t[:, half:])]
    if tail == "down_proj":
        return [(blk + "ffn_down_exps.weight", t)]
    raise AssertionError(f"unhandled expert tensor {name}")


def gguf_tensors(family: str, model) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in numpy order) for every parameter of MODEL."""
    import gguf

    cfg = model.config
    arch = getattr(gguf.MODEL_ARCH, FAMILY_ARCH[family])
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        t = tensor.detach().float().numpy()
        if name == "lm_head.weight" and tied:
            continue   # convert_hf_to_gguf writes no output.weight for tied embeddings
        experts = _experts(family, name, t, cfg)
        if experts is not None:
            out.extend(experts)
            continue
        found = _LAYER.search(name)
        blk = f"blk.{found.group(1)}." if found else ""
        if name.endswith(("e_score_correction_bias", "expert_bias")):   # AFMoE, LFM2-MoE: expert_bias
            out.append((blk + "exp_probs_b.bias", t))
        elif name.endswith("linear_attn.dt_bias"):   # Qwen3-Next / Qwen3.5: dt_proj.bias
            out.append((blk + "ssm_dt.bias", t))
        elif name.endswith(("linear_attn.conv1d.weight", "conv.conv.weight")):   # [C, 1, K] squeezed to [C, K]
            out.append((tmap.get_name(name, try_suffixes=(".weight",)), t.squeeze(1)))
        elif name.endswith("shared_mlp.input_linear.weight"):    # Granite: [2S, H], gate rows first
            half = t.shape[0] // 2
            out += [(blk + "ffn_gate_shexp.weight", t[:half]), (blk + "ffn_up_shexp.weight", t[half:])]
        elif name.endswith("shared_mlp.output_linear.weight"):
            out.append((blk + "ffn_down_shexp.weight", t))
        elif name.endswith("block_sparse_moe.router.weight"):
            out.append((blk + "ffn_gate_inp.weight", t))
        elif (dense := _DENSE.search(name)) and tmap.get_name(name, try_suffixes=(".weight",)) is None:
            # a dense layer in an architecture llama.cpp builds MoE-only (Qwen2-MoE's mlp_only_layers):
            # named as the other architectures name dense MLPs
            out.append((f"{blk}ffn_{dense.group(1)}.weight", t))
        else:
            mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise AssertionError(f"{family}: no llama.cpp name for {name}")
            if not mapped.endswith((".weight", ".bias", ".ssm_a")):   # A_log stays bare: blk.L.ssm_a
                mapped += ".weight"   # attention sinks
            out.append((mapped, t))
    return out


def gguf_metadata(family: str, model) -> dict:
    """GGUFWriter method name -> value, as convert_hf_to_gguf.py writes them for FAMILY."""
    import gguf

    c = model.config
    md: dict = {"add_block_count": c.num_hidden_layers, "add_context_length": c.max_position_embeddings,
                "add_embedding_length": c.hidden_size, "add_head_count": c.num_attention_heads,
                "add_head_count_kv": c.num_key_value_heads,
                "add_token_list": [f"t{i}" for i in range(c.vocab_size)]}
    dense_ffn = getattr(c, "intermediate_size_mlp", None) or getattr(c, "intermediate_size", None)
    if dense_ffn is not None:   # Qwen3.5 MoE has none (convert_hf_to_gguf.py then writes no feed_forward_length)
        md["add_feed_forward_length"] = dense_ffn
    experts = next(getattr(c, k) for k in ("num_local_experts", "num_experts", "n_routed_experts",
                                           "moe_num_experts") if getattr(c, k, None))
    top_k = next(getattr(c, k) for k in ("num_experts_per_tok", "moe_topk", "moe_k") if getattr(c, k, None))
    md |= {"add_expert_count": experts, "add_expert_used_count": top_k if isinstance(top_k, int) else top_k[0]}
    if family != "mixtral":
        md["add_expert_feed_forward_length"] = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    if family == "qwen2_moe":
        md["add_expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1"):
        md |= {"add_leading_dense_block_count": c.first_k_dense_replace,
               "add_expert_shared_count": c.n_shared_experts,
               "add_expert_weights_scale": float(c.routed_scaling_factor),
               "add_expert_weights_norm": bool(getattr(c, "norm_topk_prob", False)),
               "add_expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX if family == "deepseek_v2"
               else gguf.ExpertGatingFuncType.SIGMOID,
               "add_vocab_size": c.vocab_size}
        if getattr(c, "n_group", None):
            md |= {"add_expert_group_count": c.n_group, "add_expert_group_used_count": c.topk_group}
    if family == "glm4_moe":
        md["add_nextn_predict_layers"] = 0
    if family == "granitemoeshared":
        md["add_expert_shared_feed_forward_length"] = c.shared_intermediate_size
    if family == "llama4_text":
        md["add_interleave_moe_layer_step"] = c.interleave_moe_layer_step
    if family == "ernie4_5_moe":
        md |= {"add_leading_dense_block_count": c.moe_layer_start_index,
               "add_moe_every_n_layers": c.moe_layer_interval,
               "add_expert_shared_count": c.moe_num_shared_experts}
    if family == "hunyuan_v1_moe":
        md |= {"add_expert_shared_feed_forward_length": c.intermediate_size}
    if family == "qwen3_5_moe_text":   # as Qwen3-Next (ssm.* and full_attention_interval: not read by inspect)
        md["add_expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    if family == "lfm2_moe":   # LFM2MoeModel: sigmoid gating, no expert_weights_norm / _scale; KV heads per layer
        md |= {"add_head_count_kv": [c.num_key_value_heads if t == "full_attention" else 0 for t in c.layer_types],
               "add_leading_dense_block_count": c.num_dense_layers,
               "add_expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID, "add_vocab_size": c.vocab_size,
               "add_shortconv_l_cache": c.conv_L_cache}
    if family == "exaone_moe":   # ExaoneMoEModel: no expert_gating_func (llama.cpp's graph is sigmoid)
        md |= {"add_expert_shared_count": c.num_shared_experts,
               "add_expert_shared_feed_forward_length": c.moe_intermediate_size * c.num_shared_experts,
               "add_expert_weights_scale": float(c.routed_scaling_factor),
               "add_expert_weights_norm": bool(c.norm_topk_prob),
               "add_leading_dense_block_count": c.first_k_dense_replace,
               "add_nextn_predict_layers": 0}
    if family == "afmoe":   # AfmoeModel: no expert_gating_func (sigmoid in llama.cpp's graph)
        md |= {"add_expert_shared_count": c.num_shared_experts, "add_leading_dense_block_count": c.num_dense_layers,
               "add_expert_weights_scale": float(c.route_scale), "add_sliding_window": c.sliding_window}
        if getattr(c, "route_norm", None) is not None:
            md["add_expert_weights_norm"] = bool(c.route_norm)
    return md


def tensor_type(qtype: str, array: np.ndarray):
    """The ggml type a tensor is written in: QTYPE where its rows fill whole blocks, else F16;
    1-D tensors in F32 (llama.cpp keeps norms and biases in F32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    want = T[qtype]
    if array.ndim < 2 or want == T.F32:
        return T.F32
    block, _ = gguf.GGML_QUANT_SIZES[want]
    return want if array.shape[-1] % block == 0 else T.F16


def encode(array: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16):
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    # K-quants: gguf-py cannot quantize them; raw blocks of the right byte size
    return rng.integers(0, 256, size=gguf.quant_shape_to_byte_shape(array.shape, qtype), dtype=np.uint8)


def write_gguf(path: Path, arch: str, metadata: dict, tensors: list[tuple[str, np.ndarray]], *,
               qtype: str = "F32", split_max_tensors: int = 0, seed: int = 0) -> list[Path]:
    """Write a GGUF file (or split set); returns the files written."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    for method, value in metadata.items():
        getattr(writer, method)(value)
    for name, array in tensors:
        t = tensor_type(qtype, array)
        data = encode(array, t, rng)
        writer.add_tensor(name, data, raw_dtype=None if t in (gguf.GGMLQuantizationType.F32,
                                                               gguf.GGMLQuantizationType.F16) else t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return [path]


def write_family(family: str, path: Path, *, qtype: str = "F32", split_max_tensors: int = 0,
                 model=None, drop: tuple[str, ...] = (), metadata: dict | None = None) -> list[Path]:
    """FAMILY's tiny model as GGUF at PATH (tensors named in DROP left out, METADATA overriding)."""
    import gguf

    model = model if model is not None else build(family)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, FAMILY_ARCH[family])]
    tensors = [(n, a) for n, a in gguf_tensors(family, model) if n not in drop]
    md = gguf_metadata(family, model) | (metadata or {})
    return write_gguf(path, arch, md, tensors, qtype=qtype, split_max_tensors=split_max_tensors)


# ---------------------------------------------------------------- byte-level damage

def tensor_info_offsets(path: Path, name: str) -> dict[str, int]:
    """File offsets of the fields of NAME's tensor info: 'dims' (first dim), 'type', 'offset'."""
    import gguf

    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    pos = t.field.offset + 8 + len(name.encode())
    n_dims = len(t.shape)
    dims = pos + 4
    type_at = dims + 8 * n_dims
    return {"dims": dims, "type": type_at, "offset": type_at + 4, "n_dims": n_dims}


def patch(path: Path, at: int, fmt: str, value) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack(fmt, value))
