"""Qwen4-Exp (text): Qwen3.5 MoE's MoE block and names (every layer MoE, a sigmoid-gated shared expert,
softmax top-k, weights renormalised by norm_topk_prob), with hyper-connections (hc_count residual streams
mixed by attn_/mlp_hyper_connection around each block), gated-DeltaNet and indexed (QSA) attention, and
hashed n-gram per-layer embeddings (ple.*) in some linear-attention layers. The image-text wrapper
(qwen4_exp) keeps the text config in text_config, tensors under model.language_model."""

from dataclasses import replace

from moetool.arch.families._shared import SOFTMAX_TOPK_NORM_KEY
from moetool.arch.families.qwen3_5_moe import FAMILY as QWEN3_5_MOE

FAMILY = replace(
    QWEN3_5_MOE, name="qwen4_exp", model_types=("qwen4_exp_text", "qwen4_exp"), title="Qwen4-Exp (text)",
    buffer_suffixes=(".layer_multipliers", ".ngram_heads_offsets", ".ngram_heads_vocab_sizes"),   # PLE hashing
    # the hub stores each PLE n-gram embedding in split_ngram_parts row shards (transformers joins them on load)
    row_shards=((".ngram_embedding.shard_{K}.", ".ngram_embedding.", lambda cfg: cfg.get("split_ngram_parts") or 512),),
    router=replace(SOFTMAX_TOPK_NORM_KEY, config_defaults=(("norm_topk_prob", True),)),   # Qwen4ExpTextConfig's
    notes="every layer MoE; shared expert output scaled by sigmoid(shared_expert_gate(x)); hyper-connections "
          "(hidden states of hc_count x hidden_size between layers); gated-DeltaNet and indexed attention; "
          "mtp.* tensors are ignored by transformers",
)
