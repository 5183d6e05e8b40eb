"""Header sets shaped like released models, written as sparse files.

Each shard is a real safetensors header followed by a hole up to the full file
size (``truncate``), so a 688 GB DeepSeek-V3 costs a few MB of disk. The shapes,
dtypes and shard counts follow the models' published config.json and index files.
"""

from __future__ import annotations

import json
import struct
from math import ceil, prod
from pathlib import Path

BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}

# name: (total, active, which active figure the model card uses) -- see README "Parameter counts"
PUBLISHED = {
    "deepseek_v3": (671e9, 37e9, "active_params"),
    "mixtral_8x7b": (46.7e9, 12.9e9, "active_params_with_embedding"),
    "qwen3_30b_a3b": (30.5e9, 3.3e9, "active_params_with_embedding"),
    "gpt_oss_20b": (20.9e9, 3.6e9, "active_params"),
}


def _fp8(name: str, shape: tuple[int, int]) -> list[tuple[str, str, tuple]]:
    """A block-FP8 linear weight and its 128x128 inverse scales (DeepSeek-V3 format)."""
    scale = (ceil(shape[0] / 128), ceil(shape[1] / 128))
    return [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", scale)]


def deepseek_v3() -> tuple[dict, list, int]:
    H, V, D, F, E, L = 7168, 129280, 18432, 2048, 256, 61
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": V,
              "hidden_size": H, "intermediate_size": D, "moe_intermediate_size": F, "num_hidden_layers": L,
              "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
              "n_routed_experts": E, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
              "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
              "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
              "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
              "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}
    tensors = [("model.embed_tokens.weight", "BF16", (V, H))]
    for layer in range(L + 1):   # layer 61 is the multi-token-prediction module
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", "BF16", (H,)),
                    (p + "post_attention_layernorm.weight", "BF16", (H,)),
                    (p + "self_attn.q_a_layernorm.weight", "BF16", (1536,)),
                    (p + "self_attn.kv_a_layernorm.weight", "BF16", (512,))]
        tensors += _fp8(p + "self_attn.q_a_proj.weight", (1536, H))
        tensors += _fp8(p + "self_attn.q_b_proj.weight", (128 * 192, 1536))
        tensors += _fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (576, H))
        tensors += _fp8(p + "self_attn.kv_b_proj.weight", (128 * 256, 512))
        tensors += _fp8(p + "self_attn.o_proj.weight", (H, 128 * 128))
        if layer < 3:
            for proj, shape in (("gate_proj", (D, H)), ("up_proj", (D, H)), ("down_proj", (H, D))):
                tensors += _fp8(p + f"mlp.{proj}.weight", shape)
            continue
        tensors += [(p + "mlp.gate.weight", "BF16", (E, H)), (p + "mlp.gate.e_score_correction_bias", "F32", (E,))]
        for e in range(E):
            for proj, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
                tensors += _fp8(p + f"mlp.experts.{e}.{proj}.weight", shape)
        for proj, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
            tensors += _fp8(p + f"mlp.shared_experts.{proj}.weight", shape)
        if layer == L:
            tensors += [(p + "enorm.weight", "BF16", (H,)), (p + "hnorm.weight", "BF16", (H,)),
                        (p + "eh_proj.weight", "BF16", (H, 2 * H)), (p + "shared_head.norm.weight", "BF16", (H,)),
                        (p + "shared_head.head.weight", "BF16", (V, H)), (p + "embed_tokens.weight", "BF16", (V, H))]
    tensors += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (V, H))]
    return config, tensors, 163


def mixtral_8x7b() -> tuple[dict, list, int]:
    H, V, F, E, L = 4096, 32000, 14336, 8, 32
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": H,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
              "num_local_experts": E, "num_experts_per_tok": 2, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "rope_theta": 1e6}
    tensors = [("model.embed_tokens.weight", "BF16", (V, H))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", "BF16", (H,)), (p + "post_attention_layernorm.weight", "BF16", (H,)),
                    (p + "self_attn.q_proj.weight", "BF16", (H, H)), (p + "self_attn.k_proj.weight", "BF16", (1024, H)),
                    (p + "self_attn.v_proj.weight", "BF16", (1024, H)), (p + "self_attn.o_proj.weight", "BF16", (H, H)),
                    (p + "block_sparse_moe.gate.weight", "BF16", (E, H))]
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            tensors += [(q + "w1.weight", "BF16", (F, H)), (q + "w2.weight", "BF16", (H, F)),
                        (q + "w3.weight", "BF16", (F, H))]
    tensors += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (V, H))]
    return config, tensors, 19


def qwen3_30b_a3b() -> tuple[dict, list, int]:
    H, V, F, E, L = 2048, 151936, 768, 128, 48
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": V,
              "hidden_size": H, "intermediate_size": 6144, "moe_intermediate_size": F, "num_hidden_layers": L,
              "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": E,
              "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    tensors = [("model.embed_tokens.weight", "BF16", (V, H))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", "BF16", (H,)), (p + "post_attention_layernorm.weight", "BF16", (H,)),
                    (p + "self_attn.q_proj.weight", "BF16", (4096, H)),
                    (p + "self_attn.k_proj.weight", "BF16", (512, H)),
                    (p + "self_attn.v_proj.weight", "BF16", (512, H)),
                    (p + "self_attn.o_proj.weight", "BF16", (H, 4096)),
                    (p + "self_attn.q_norm.weight", "BF16", (128,)), (p + "self_attn.k_norm.weight", "BF16", (128,)),
                    (p + "mlp.gate.weight", "BF16", (E, H))]
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            tensors += [(q + "gate_proj.weight", "BF16", (F, H)), (q + "up_proj.weight", "BF16", (F, H)),
                        (q + "down_proj.weight", "BF16", (H, F))]
    tensors += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (V, H))]
    return config, tensors, 16


def gpt_oss_20b() -> tuple[dict, list, int]:
    H, V, F, E, L = 2880, 201088, 2880, 32, 24
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": V, "hidden_size": H,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 64, "num_key_value_heads": 8,
              "head_dim": 64, "num_local_experts": E, "num_experts_per_tok": 4, "experts_per_token": 4,
              "tie_word_embeddings": False, "swiglu_limit": 7.0,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    tensors = [("model.embed_tokens.weight", "BF16", (V, H))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        tensors += [(p + "input_layernorm.weight", "BF16", (H,)), (p + "post_attention_layernorm.weight", "BF16", (H,)),
                    (a + "q_proj.weight", "BF16", (4096, H)), (a + "q_proj.bias", "BF16", (4096,)),
                    (a + "k_proj.weight", "BF16", (512, H)), (a + "k_proj.bias", "BF16", (512,)),
                    (a + "v_proj.weight", "BF16", (512, H)), (a + "v_proj.bias", "BF16", (512,)),
                    (a + "o_proj.weight", "BF16", (H, 4096)), (a + "o_proj.bias", "BF16", (H,)),
                    (a + "sinks", "BF16", (64,)),
                    (p + "mlp.router.weight", "BF16", (E, H)), (p + "mlp.router.bias", "BF16", (E,))]
        x = p + "mlp.experts."
        tensors += [(x + "gate_up_proj_blocks", "U8", (E, 2 * F, H // 32, 16)),
                    (x + "gate_up_proj_scales", "U8", (E, 2 * F, H // 32)),
                    (x + "gate_up_proj_bias", "BF16", (E, 2 * F)),
                    (x + "down_proj_blocks", "U8", (E, H, F // 32, 16)),
                    (x + "down_proj_scales", "U8", (E, H, F // 32)),
                    (x + "down_proj_bias", "BF16", (E, H))]
    tensors += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (V, H))]
    return config, tensors, 3


MODELS = {"deepseek_v3": deepseek_v3, "mixtral_8x7b": mixtral_8x7b, "qwen3_30b_a3b": qwen3_30b_a3b,
          "gpt_oss_20b": gpt_oss_20b}


def write_header_set(name: str, root: Path) -> Path:
    """Write MODELS[name] into ROOT as config.json + sparse shards + index; return ROOT."""
    config, tensors, n_shards = MODELS[name]()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    sizes = [prod(shape) * BYTES[dtype] for _, dtype, shape in tensors]
    per_shard = sum(sizes) / n_shards
    groups: list[list[int]] = [[] for _ in range(n_shards)]
    running = 0
    for i, nbytes in enumerate(sizes):
        groups[min(n_shards - 1, int(running // per_shard))].append(i)
        running += nbytes
    weight_map = {}
    for s, members in enumerate(groups):
        file_name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            tname, dtype, shape = tensors[i]
            header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
            weight_map[tname] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / file_name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root
