"""Tiny real models of every supported family, built offline with transformers.

Each entry gives the transformers config class name and the smallest kwargs that
still exercise the family's MoE structure (dense layers, shared experts, biases).
"""

from __future__ import annotations

import json
from pathlib import Path

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

TINY: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                      num_local_experts=4, num_experts_per_tok=2,
                                      layer_types=["linear_attention", "full_attention"])),
    "minimax_m2": ("MiniMaxM2Config", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                           num_local_experts=4, num_experts_per_tok=2,
                                           head_dim=8, rotary_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20, num_hidden_layers=3,
                                         num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                         head_dim=8)),
    "qwen3_next": ("Qwen3NextConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=20, num_hidden_layers=2,
                                           num_experts=4, num_experts_per_tok=2, head_dim=8,
                                           layer_types=["linear_attention", "full_attention"],
                                           linear_num_value_heads=2, linear_num_key_heads=2,
                                           linear_key_head_dim=8, linear_value_head_dim=8)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(COMMON, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=20, num_hidden_layers=2,
                                                      num_experts=4, num_experts_per_tok=2, head_dim=8,
                                                      layer_types=["linear_attention", "full_attention"],
                                                      linear_num_value_heads=2, linear_num_key_heads=2,
                                                      linear_key_head_dim=8, linear_value_head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                  num_experts=4, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                             num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                             qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                             num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                             qk_nope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1)),
    "glm4_moe": ("Glm4MoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                       num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                       num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
                                       n_group=1, topk_group=1)),
    "dots1": ("Dots1Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                  num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                  num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
                                  n_group=1, topk_group=1)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                                num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                                num_experts_per_tok=2, kv_lora_rank=8, q_lora_rank=12,
                                                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                                n_group=1, topk_group=1)),
    "exaone_moe": ("ExaoneMoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                           num_hidden_layers=3, num_experts=4, num_shared_experts=1,
                                           num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
                                           n_group=1, topk_group=1)),
    "lfm2_moe": ("Lfm2MoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                       num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                       num_dense_layers=1, layer_types=["conv", "full_attention", "conv"])),
    "gpt_oss": ("GptOssConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                     num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                     layer_types=["sliding_attention", "full_attention"])),
    "llama4_text": ("Llama4TextConfig", dict(COMMON, intermediate_size=16, intermediate_size_mlp=24,
                                             num_hidden_layers=2, num_local_experts=4,
                                             num_experts_per_tok=1, interleave_moe_layer_step=2,
                                             head_dim=8)),
    "granitemoe": ("GraniteMoeConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                            num_local_experts=4, num_experts_per_tok=2)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(COMMON, intermediate_size=16,
                                                        shared_intermediate_size=20, num_hidden_layers=2,
                                                        num_local_experts=4, num_experts_per_tok=2)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(COMMON, intermediate_size=16,
                                                        shared_intermediate_size=20, num_hidden_layers=2,
                                                        num_local_experts=4, num_experts_per_tok=2,
                                                        layer_types=["mamba", "attention"],
                                                        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                                        mamba_n_groups=1, mamba_expand=2)),
    "phimoe": ("PhimoeConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                    num_local_experts=4, num_experts_per_tok=2)),
    "jetmoe": ("JetMoeConfig", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                    num_key_value_heads=2, kv_channels=8, intermediate_size=16,
                                    num_local_experts=4, num_experts_per_tok=2,
                                    max_position_embeddings=64)),
    "dbrx": ("DbrxConfig", dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
                                ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))),
    "jamba": ("JambaConfig", dict(COMMON, intermediate_size=16, num_hidden_layers=4, num_experts=4,
                                  num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                                  attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
                                  mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                  use_mamba_kernels=False)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                                num_hidden_layers=3, moe_num_experts=4, moe_k=2,
                                                moe_num_shared_experts=1, moe_layer_start_index=1,
                                                moe_layer_interval=1, head_dim=8)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(COMMON, intermediate_size=16, num_hidden_layers=2,
                                                  num_experts=4, moe_topk=2, head_dim=8)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(COMMON, intermediate_size=16, prefix_dense_intermediate_size=24,
                                             num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                             num_shared_experts=1, first_k_dense_replace=1, head_dim=8,
                                             sliding_window_pattern=2, bos_token_id=1, eos_token_id=2)),
    "sarvam_moe": ("SarvamMoEConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                           num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                           num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
                                           n_group=1, topk_group=1, initializer_range=0.02)),
    # DeepSeek-V3.2 (the deepseek_v3 family): DeepSeek-V3 with the DSA indexer in every layer
    "deepseek_v32": ("DeepseekV32Config", dict(COMMON, num_key_value_heads=4, intermediate_size=24,
                                               moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=4,
                                               n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                               kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                               qk_nope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1,
                                               index_topk=4, index_head_dim=8, index_n_heads=2)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(COMMON, num_key_value_heads=4, intermediate_size=24,
                                            moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=4,
                                            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                            kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                            qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
                                            index_topk=4, index_head_dim=8, index_n_heads=2,
                                            indexer_types=["full", "full", "shared"])),
    "solar_open": ("SolarOpenConfig", dict(COMMON, moe_intermediate_size=16, num_hidden_layers=2,
                                           n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                           head_dim=8, n_group=1, topk_group=1)),
    "sarvam_mla": ("SarvamMLAConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                           num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1,
                                           num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8,
                                           q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                           n_group=1, topk_group=1)),
    "kimi_linear": ("KimiLinearConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                             num_hidden_layers=3, num_experts=4, num_shared_experts=1,
                                             num_experts_per_token=2, first_k_dense_replace=1, kv_lora_rank=8,
                                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                             linear_head_dim=8, linear_num_heads=4, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2,
                                             layer_types=["linear_attention", "full_attention", "linear_attention"])),
    "afmoe": ("AfmoeConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                  num_dense_layers=1, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                                  head_dim=8, global_attn_every_n_layers=2, sliding_window=16, route_scale=2.0)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(COMMON, intermediate_size=16, shared_intermediate_size=20,
                                                   num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                   sliding_window=16)),
    "switch_transformers": ("SwitchTransformersConfig", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=16,
                                                             num_layers=2, num_decoder_layers=2, num_heads=4,
                                                             num_experts=4, num_sparse_encoder_layers=1,
                                                             num_sparse_decoder_layers=1, expert_capacity=8,
                                                             decoder_start_token_id=0)),
    "nllb-moe": ("NllbMoeConfig", dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4,
                                       encoder_ffn_dim=16, decoder_ffn_dim=16, num_experts=4,
                                       encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=8,
                                       max_position_embeddings=64, decoder_start_token_id=0)),
    "qwen4_exp_text": ("Qwen4ExpTextConfig", dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                                  num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                                  layer_types=["linear_attention", "full_attention"],
                                                  linear_num_value_heads=2, linear_num_key_heads=2,
                                                  linear_key_head_dim=8, linear_value_head_dim=8, hc_count=2,
                                                  hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                                                  indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
                                                  ple_layer_ids=[1], ple_embed_dim=16, heads_per_ngram=2,
                                                  ngram_vocab_size_base=32, make_ngram_vocab_size_divisible_by=8,
                                                  split_ngram_parts=2, eos_token_id=2)),
    "gemma4_text": ("Gemma4TextConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2, head_dim=8,
                                             global_head_dim=8, num_global_key_value_heads=1, attention_k_eq_v=True,
                                             enable_moe_block=True, num_experts=4, top_k_experts=2,
                                             moe_intermediate_size=16, hidden_size_per_layer_input=0,
                                             layer_types=["sliding_attention", "full_attention"],
                                             sliding_window=16)),
    "hy_v3": ("HYV3Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                 num_experts=4, num_experts_per_tok=2, num_shared_experts=1, head_dim=8)),
    "axk1": ("AXK1Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=8,
                                q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                n_group=2, topk_group=1, bos_token_id=1, eos_token_id=2)),
    "flint": ("FlintConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=20, num_hidden_layers=3, num_experts=4,
                                  num_experts_per_tok=2, head_dim=8, mlp_only_layers=[0], sliding_window=16,
                                  layer_types=["full_attention", "sliding_attention", "full_attention"])),
    "mellum": ("MellumConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                    num_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                    mlp_layer_types=["dense", "sparse", "sparse"],
                                    layer_types=["full_attention", "sliding_attention", "full_attention"])),
    "beam": ("BeamConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                num_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1)),
    "axk2": ("AXK2Config", dict(COMMON, num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16,
                                num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                v_head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, gated_norm_rank=4,
                                bos_token_id=1, eos_token_id=2)),
    "nemotron_h": ("NemotronHConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                           moe_shared_expert_intermediate_size=20, n_routed_experts=4,
                                           num_experts_per_tok=2, head_dim=8, routed_scaling_factor=1.5,
                                           layers_block_type=["linear_attention", "moe", "full_attention",
                                                              "moe", "mlp"],
                                           mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                                           chunk_size=16)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                                num_hidden_layers=3, n_routed_experts=4, num_experts_per_tok=2,
                                                head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                                                routed_scaling_factor=1.5, sliding_window=8,
                                                layer_types=["full_attention", "sliding_attention",
                                                             "full_attention"])),
    "bailing_hybrid": ("BailingHybridConfig", dict(COMMON, num_key_value_heads=4, intermediate_size=24,
                                                   moe_intermediate_size=16, num_hidden_layers=3, num_experts=4,
                                                   num_experts_per_tok=2, n_shared_experts=1,
                                                   first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
                                                   qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                                   head_dim=8, n_group=2, topk_group=1, layer_group_size=2,
                                                   num_mtp_layers=0, pad_token_id=0, eos_token_id=2)),
    "laguna": ("LagunaConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=20, num_hidden_layers=3, num_experts=4,
                                    num_experts_per_tok=2, head_dim=8, moe_routed_scaling_factor=1.5,
                                    moe_router_logit_softcapping=5.0, sliding_window=8,
                                    layer_types=["full_attention", "sliding_attention", "full_attention"])),
    "kolibri1": ("Kolibri1Config", dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                        norm_topk_prob=True, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
    "minimax_m3_vl_text": ("MiniMaxM3VLTextConfig", dict(COMMON, intermediate_size=16, shared_intermediate_size=20,
                                                          dense_intermediate_size=24, num_hidden_layers=3,
                                                          num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                          bos_token_id=1, eos_token_id=2,
                                                          mlp_layer_types=["dense", "sparse", "sparse"],
                                                          layer_types=["full_attention", "minimax_m3_sparse",
                                                                       "full_attention"], index_n_heads=2,
                                                          index_head_dim=8, index_block_size=4, index_topk_blocks=2)),
    "dots3_note_text": ("Dots3NoteTextConfig", dict(COMMON, intermediate_size=24, moe_intermediate_size=16,
                                                    shared_experts_intermediate_size=20, num_hidden_layers=3,
                                                    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                                    mlp_layer_types=["dense", "sparse", "sparse"], n_group=1,
                                                    topk_group=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                                    qk_nope_head_dim=4, v_head_dim=8, head_dim=8, num_key_value_heads=4,
                                                    layer_types=["indexed_attention", "sliding_attention",
                                                                 "indexed_attention"], sliding_window=8,
                                                    index_n_heads=2, index_head_dim=8, index_topk=4,
                                                    swa_num_attention_heads=2, swa_num_key_value_heads=2,
                                                    swa_q_lora_rank=12, swa_kv_lora_rank=8, swa_head_dim=8,
                                                    swa_qk_nope_head_dim=4, swa_v_head_dim=8,
                                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mistral4": ("Mistral4Config", dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                        qk_nope_head_dim=4, v_head_dim=8, head_dim=8, n_group=2, topk_group=1,
                                        pad_token_id=0)),
    # multimodal wrappers whose text model is an MoE, built whole (ForConditionalGeneration): the text
    # model in text_config, a one-block vision tower (counted in the checkpoint's parameters, never run)
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", dict(
        text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3, num_experts=4,
                         num_experts_per_tok=2, head_dim=8, mlp_only_layers=[1],
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]))),
    "glm4v_moe": ("Glm4vMoeConfig", dict(
        text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         head_dim=8, n_group=1, topk_group=1,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                              mrope_section=[1, 1, 0])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=1, spatial_merge_size=1, image_size=8))),
    "glm5_next": ("Glm5NextConfig", dict(
        text_config=dict(COMMON, num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16,
                         num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         mlp_layer_types=["dense", "sparse", "sparse"], kv_lora_rank=8, q_lora_rank=12,
                         qk_nope_head_dim=8, v_head_dim=8, index_topk=8, index_head_dim=8, index_n_heads=2,
                         index_kpool=4, indexer_types=["full", "full", "shared"],
                         layer_types=["linear_attention", "indexed_attention", "indexed_attention"],
                         linear_head_dim=8, linear_num_heads=4, hc_mult=2, hc_sinkhorn_iters=3, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           projection_intermediate_size=32, patch_size=4, temporal_patch_size=1,
                           spatial_merge_size=1, image_size=8))),
    # Step 3.7: a dense layer, sliding and full attention, clamped SwiGLU (routed and shared) on the last layer
    "step3p7": ("Step3p7Config", dict(
        text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=16, share_expert_dim=20,
                         num_hidden_layers=3, n_routed_experts=4, num_experts_per_tok=2, head_dim=8,
                         mlp_layer_types=["dense", "sparse", "sparse"], moe_router_scaling_factor=1.5,
                         swiglu_limits=[None, None, 0.05], swiglu_limits_shared=[None, None, 0.05],
                         layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=8),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14))),
    # Qwen3-Omni whole (thinker: text MoE with a dense layer, one-block vision and audio towers; talker: its own
    # MoE with a shared expert, a code predictor; code2wav): transformers' whole model is saved, the thinker run
    "qwen3_omni_moe": ("Qwen3OmniMoeConfig", dict(
        thinker_config=dict(
            text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
                             num_experts=4, num_experts_per_tok=2, head_dim=8, mlp_only_layers=[1],
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                                  interleaved=True)),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=4, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16,
                               deepstack_visual_indexes=[0]),
            audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
                              d_model=16, output_dim=32, downsample_hidden_size=8, n_window=4, n_window_infer=8,
                              conv_chunksize=8, max_source_positions=64)),
        talker_config=dict(
            thinker_hidden_size=32, num_code_groups=2, spatial_merge_size=1,
            text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                             num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, head_dim=8,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                                  interleaved=True)),
            code_predictor_config=dict(COMMON, intermediate_size=24, num_hidden_layers=1, head_dim=8,
                                       num_code_groups=2)),
        code2wav_config=dict(codebook_size=16, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=16, num_hidden_layers=1, num_quantizers=2, upsample_rates=[2, 2],
                             upsampling_ratios=[2], decoder_dim=16, sliding_window=8))),
    # Muse Spark: a dense layer, latent experts (moe_hidden_size 24 != hidden 32), sliding and full (NoPE) layers;
    # one-layer vision and one-block audio towers
    "muse_spark": ("MuseSparkConfig", dict(
        text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=16, moe_hidden_size=24, head_dim=8,
                         num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                         mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.5,
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                           patch_size=4, pos_emb_height=4, pos_emb_width=4),
        audio_config=dict(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_hidden_size=32),
        out_hidden_size=64, projector_hidden_size=16)),
    "hy_v4": ("HYV4Config", dict(COMMON, num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16,
                                 num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                 kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                 index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)),
    # HY4-VL: Hy4's text model (hub names under model.) in an image-text wrapper with a one-layer vit tower
    "hy_v4_vl": ("HYV4VLConfig", dict(
        text_config=dict(COMMON, num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16,
                         num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                         index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 0])),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))),
    # DeepSeek-OCR 2: DeepSeek-V2's MoE with multi-head attention (a dense layer) in an image-text wrapper with
    # one-layer SAM and Qwen2 vision towers, all under hub names the conversion mapping renames by layer number
    "deepseek_ocr2": ("DeepseekOcr2Config", dict(
        text_config=dict(COMMON, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.5,
                         mlp_layer_types=["dense", "sparse", "sparse"]),
        vision_config=dict(sam_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                           patch_size=16, output_channels=8, downsample_channels=[8, 16],
                                           global_attn_indexes=[0], mlp_dim=16),
                           encoder_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64)),
        image_token_id=63)),
    # Mistral Large 4: a dense layer, groups (2 of 2 experts, the best one kept), a NoPE layer; layer 2 reuses
    # layer 1's latent keys and values and its indexer's top-k (shared), layer 3 its keys and values but runs its own
    # indexer (kv_sharing_modes store / reuse / reuse_but_indexer); Mistral's hub names; a one-layer Pixtral tower
    "mistral_large4": ("MistralLarge4Config", dict(
        text_config=dict(COMMON, num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16,
                         num_hidden_layers=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         n_group=2, topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2,
                         indexer_types=["full", "full", "shared", "full"], no_rope_layers=[0, 1, 1, 1],
                         kv_source_layers=[0, 1, 1, 1], pad_token_id=0,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                                              attention_factor=1.0)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=8, patch_size=4, image_size=16))),
    "lara_mini": ("LaraMiniConfig", dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                         num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                         sliding_window=16, linear_num_value_heads=4, linear_num_key_heads=2,
                                         linear_key_head_dim=8, linear_value_head_dim=8, eos_token_id=2,
                                         layer_types=["linear_attention", "sliding_attention", "full_attention"])),
    # dense upcycling sources
    "llama": ("LlamaConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2)),
    "mistral": ("MistralConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2)),
    "qwen2": ("Qwen2Config", dict(COMMON, intermediate_size=24, num_hidden_layers=2)),
    # zero-computation experts (zero_expert_num) beside the real ones; num_layers layers of two attention blocks
    "longcat_flash": ("LongcatFlashConfig", dict(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                                 max_position_embeddings=64, num_layers=2, n_routed_experts=4,
                                                 zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16,
                                                 ffn_hidden_size=24, kv_lora_rank=16, q_lora_rank=24,
                                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                                                 routed_scaling_factor=2.0)),
    # two stacked shared experts, scored by the router beside the routed ones; a dense first layer (its embedding is
    # normed: weights of std 0.1 and an unscaled head, so that its layers and their experts move the logits)
    "inkling_text": ("InklingTextConfig", dict(COMMON, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                                               swa_head_dim=8, sliding_window_size=16, d_rel=4, rel_extent=16,
                                               num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                                               layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
                                               intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4,
                                               num_experts_per_tok=2, n_shared_experts=2,
                                               logits_mup_width_multiplier=1.0, initializer_range=0.1)),
    # hash-routed first layer (a token table picks its experts), sqrt(softplus) router, hyper-connections (two
    # streams), sliding, compressed-sparse and heavily compressed attention (rates small enough to compress)
    "deepseek_v4": ("DeepseekV4Config", dict(vocab_size=64, hidden_size=32, max_position_embeddings=64,
                                             moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=16, q_lora_rank=16, o_groups=2,
                                             o_lora_rank=16, n_routed_experts=4, n_shared_experts=1,
                                             num_experts_per_tok=2, index_n_heads=2, index_head_dim=8, index_topk=4,
                                             sliding_window=8, hc_mult=2, mlp_layer_types=["hash_moe", "moe", "moe"],
                                             layer_types=["sliding_attention", "compressed_sparse_attention",
                                                          "heavily_compressed_attention"],
                                             compress_rates={"compressed_sparse_attention": 2,
                                                             "heavily_compressed_attention": 4})),
    # top-1 (all transformers allows) over 4 experts and a skip expert, an MLP router carrying a state between its
    # 3 MoE layers
    "zaya": ("ZayaConfig", dict(COMMON, head_dim=8, num_hidden_layers=3, num_experts=4, num_experts_per_tok=1,
                                moe_intermediate_size=16, router_hidden_size=16, eos_token_id=2)),
    "qwen3": ("Qwen3Config", dict(COMMON, intermediate_size=24, num_hidden_layers=2, head_dim=8)),
    "gemma": ("GemmaConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(COMMON, intermediate_size=24, num_hidden_layers=2, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2, head_dim=8)),
}

DENSE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}


def build_model(family: str, seed: int = 0):
    """Instantiate the tiny transformers model of FAMILY (or of a VARIANTS name) with random weights."""
    import torch
    import transformers

    family, changes = VARIANTS.get(family, (family, {}))
    cls_name, kwargs = TINY[family]
    config = getattr(transformers, cls_name)(**{**kwargs, **changes})
    if family == "dbrx":  # transformers 5.24 reads attn_config.rope_theta, which the class never sets
        config.attn_config.rope_theta = 10000.0
    torch.manual_seed(seed)
    if family in WHOLE:
        model = whole_model(config)
        with torch.no_grad():   # transformers leaves the talker's stacked experts uninitialised (torch.empty):
            for name, weight in model.named_parameters():   # memory garbage, NaN at times, which no copy equals
                if name.startswith("talker.") and ".experts." in name:
                    weight.normal_(0.0, 0.02)
        return model.eval()
    # the class moetool builds it with (the image-text wrapper where transformers has no causal LM for it)
    model = moetool_model(config, seq2seq=family in ("switch_transformers", "nllb-moe"))
    if family == "afmoe":  # transformers initialises its routers to zero, so that every expert would tie
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith("mlp.router.gate.weight"):
                    weight.normal_(0.0, config.initializer_range)
    if family == "gemma4_text":  # its router scales start at one: random, so that each expert's counts
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith(("router.per_expert_scale", "router.scale")):
                    weight.uniform_(0.5, 1.5)
    if family == "muse_spark":  # its norms start at zero (x (1 + w)), its correction biases too: random, so that
        with torch.no_grad():    # a pruned or quantized post_expert_norm or bias would show
            for name, weight in model.named_parameters():
                if name.endswith(("post_expert_norm.weight", "pre_expert_norm.weight")):
                    weight.uniform_(-0.5, 0.5)
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.uniform_(-0.2, 0.2)
    if family == "deepseek_v4":  # its token tables start at zero (every token to expert 0 twice), its
        with torch.no_grad():     # correction biases too: random, each token a table row of distinct experts
            experts = config.n_routed_experts
            for name, buffer in model.named_buffers():
                if name.endswith("tid2eid"):
                    buffer.copy_(torch.rand(buffer.shape[0], experts).argsort(-1)[:, :buffer.shape[1]])
                elif name.endswith("e_score_correction_bias"):   # (its scores differ by about 0.01)
                    buffer.uniform_(-0.01, 0.01)
    if family == "zaya":  # its router MLP starts near uniform (std 0.02): weights of unit gain, so that tokens spread
        with torch.no_grad():  # over the experts. Its balancing biases start at 0 but the skip expert's -1 (never
            for name, weight in model.named_parameters():   # picked), which transformers' from_pretrained sets
                # again whatever the checkpoint holds (its _init_weights writes balancing_biases[-1] unguarded):
                # the real experts' are random near -1 instead, so that tokens skip as often as they pick one
                if ".mlp.gate." in name and name.endswith(("proj.weight", "fc1.weight", "fc2.weight")):
                    weight.normal_(0.0, 3 * weight.shape[1] ** -0.5)
            for name, buffer in model.named_buffers():
                if name.endswith("balancing_biases"):
                    buffer[:-1].uniform_(-1.05, -0.95)
    if changes.get("moe_latent_size"):  # latent projections of unit gain: the routed experts' part is not lost
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "_latent_proj." in name:
                    weight.normal_(0.0, weight.shape[1] ** -0.5)
    return model.eval()


# Families whose checkpoint is a larger model than the one moetool runs: transformers' whole model is built and
# saved (Qwen3-Omni: thinker, talker and code2wav), called as the model moetool runs (the thinker's forward:
# the whole model has none of its own)
WHOLE = {"qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration"}


def whole_model(config):
    """transformers' whole model of CONFIG (a WHOLE family's), whose forward is its thinker's."""
    import transformers

    model = getattr(transformers, WHOLE[config.model_type])._from_config(config)
    model.forward = model.thinker.forward
    return model


def moetool_model(config, seq2seq: bool = False):
    """The model of CONFIG (random weights) by the class moetool's runner picks (model.model_class)."""
    from moetool.runner.building import build_model as build

    return build(config, seq2seq=seq2seq)


def load_reference(path, **kwargs):
    """transformers' own from_pretrained of PATH, by the class moetool's runner picks (the oracle)."""
    from moetool.runner.building import pretrained

    return pretrained(path, **kwargs)


def param_count(model) -> int:
    """transformers' own count: unique parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


# Families whose hub checkpoints store fused experts [E, in, out] while transformers 5 holds (and saves) them
# [E, out, in], transposing as it loads (Qwen3-VL-MoE's releases): their hub form is made by transposing.
HUB_TRANSPOSED = {"qwen3_vl_moe"}


def _rewrite(path: Path, change) -> None:
    """Each safetensors file of the checkpoint at PATH replaced by CHANGE(its tensors) (name -> tensor)."""
    from safetensors.torch import load_file, save_file

    for file in path.glob("*.safetensors"):
        save_file(change(load_file(file)), file, metadata={"format": "pt"})


def _transpose_experts(path: Path) -> None:
    """The fused experts of the checkpoint at PATH transposed in place, as the hub stores them."""
    _rewrite(path, lambda tensors: {n: t.transpose(1, 2).contiguous() if n.endswith(
        ("experts.gate_up_proj", "experts.down_proj")) else t for n, t in tensors.items()})


# Families with zero-computation experts, whose transformers 5 model holds (and saves) gate and up rows for
# them, never used: the hub's checkpoints (LongCat-Flash's) hold the real experts only, and transformers 5.24
# cannot load them (its gate_up_proj has rows for both).
ZERO_EXPERTS = {"longcat_flash"}


def drop_zero_experts(path: Path, experts: int) -> None:
    """The per-expert checkpoint at PATH without the tensors of experts numbered EXPERTS and above."""
    import re

    _rewrite(path, lambda tensors: {n: t for n, t in tensors.items()
                                    if not (m := re.search(r"\.experts\.(\d+)\.", n)) or int(m.group(1)) < experts})


# Families whose hub checkpoints name some tensors apart from transformers' own saves of the hub form (DeepSeek-V4's
# attn.kv_norm, which transformers writes attn.norm): (transformers' infix, the hub's), applied to the hub form
HUB_NAMED = {"deepseek_v4": ((".attn.norm.", ".attn.kv_norm."),)}


def _hub_named(path: Path, renames) -> None:
    def renamed(tensors):
        for old, new in renames:
            tensors = {n.replace(old, new): t for n, t in tensors.items()}
        return tensors

    _rewrite(path, renamed)


def save_tiny(family: str, path: Path, *, fused: bool = False, seed: int = 0, hub_only: bool = False) -> Path:
    """Save the tiny model in the hub (per-expert) or transformers-5 fused layout (HUB_ONLY: without the
    tensors transformers 5 saves that hub checkpoints lack: ZERO_EXPERTS)."""
    model = build_model(family, seed)
    model.save_pretrained(path, save_original_format=not fused)
    if family in HUB_TRANSPOSED and not fused:
        _transpose_experts(path)
    base = VARIANTS.get(family, (family, {}))[0]
    if base in HUB_NAMED and not fused:
        _hub_named(path, HUB_NAMED[base])
    if family in ZERO_EXPERTS and hub_only and not fused:
        drop_zero_experts(path, model.config.n_routed_experts)
    (path / "expected.json").write_text(json.dumps({"params": param_count(model)}))
    return path


# Variants of a family's tiny model that exercise what its usual config does not (not in TINY, which
# lists one model per family): name -> (family, overrides of its TINY kwargs)
VARIANTS: dict[str, tuple[str, dict]] = {
    # Granite 4.0 dense hybrid (as granite-4.0-micro / -h-1b): no experts, shared_mlp in every layer
    "granitemoehybrid-dense": ("granitemoehybrid", dict(num_local_experts=0, num_experts_per_tok=0)),
    # ERNIE with biases on attention, on every MLP (dense and shared experts) and on the tied lm_head
    "ernie4_5_moe-bias": ("ernie4_5_moe", dict(use_bias=True)),
    "ernie4_5_moe-bias-untied": ("ernie4_5_moe", dict(use_bias=True, tie_word_embeddings=False)),
    # PhiMoE whose config asks for one expert a token (transformers' sparsemixer routes two anyway)
    "phimoe-k1": ("phimoe", dict(num_experts_per_tok=1)),
    # Gemma 4 without enable_moe_block (E2B, E4B, 31B): no router or experts, the MLP alone
    "gemma4_text-dense": ("gemma4_text", dict(enable_moe_block=False)),
    # Gemma 4's use_double_wide_mlp (E2B, without the MoE block): the layers reusing an earlier layer's keys and
    # values (the last num_kv_shared_layers) have an MLP twice intermediate_size wide; with E2B's per-layer
    # inputs, which transformers' forward of those layers needs
    "gemma4_text-wide": ("gemma4_text", dict(use_double_wide_mlp=True, num_hidden_layers=3, num_kv_shared_layers=1,
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
                                             layer_types=["sliding_attention", "full_attention",
                                                          "sliding_attention"])),
    # LongCat-Flash with router_bias: a bias over the real and the identity experts' router rows
    "longcat_flash-bias": ("longcat_flash", dict(router_bias=True)),
    # Nemotron 3 Super's latent MoE: the routed experts work in moe_latent_size, between fc1/fc2_latent_proj
    "nemotron_h-latent": ("nemotron_h", dict(moe_latent_size=24)),
    # DeepSeek-V4 with experts 32 wide: its hub's FP4 experts hold one scale per 32 inputs
    "deepseek_v4-fp4": ("deepseek_v4", dict(moe_intermediate_size=32)),
}


def build_variant(name: str, seed: int = 0, **overrides):
    """Instantiate variant NAME (see VARIANTS; or a TINY family) with random weights; OVERRIDES change its config
    further."""
    import torch
    import transformers

    family, changes = VARIANTS.get(name, (name, {}))
    cls_name, kwargs = TINY[family]
    config = getattr(transformers, cls_name)(**{**kwargs, **changes, **overrides})
    torch.manual_seed(seed)
    return moetool_model(config).eval()
