"""Rebuild examples/tiny-deepseek-v3: a random-weight DeepSeek-V3-architecture checkpoint (bf16, ~0.4 MB).

It exists so that `moetool inspect` has something to show on a fresh clone with no network.
Run: python examples/make_tiny_deepseek.py
"""

from pathlib import Path

import torch
import transformers

OUT = Path(__file__).parent / "tiny-deepseek-v3"

config = transformers.DeepseekV3Config(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
model.save_pretrained(OUT)
(OUT / "generation_config.json").unlink(missing_ok=True)
print(f"wrote {OUT}")
