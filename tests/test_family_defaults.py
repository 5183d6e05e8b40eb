"""Config keys a config.json leaves out are read as transformers reads them: its config class's
default (Family.defaults, Router.config_defaults), not moetool's own fallback. The oracle is the model
transformers builds from that config.json (its MoE layers, shared experts and parameter count), and
the router transformers runs."""

import json

import pytest
import torch
import transformers

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from tests.tiny import TINY, load_reference, moetool_model

# (fixture, config changes before saving, keys then deleted from config.json)
CASES = [
    ("deepseek_v3", {"num_hidden_layers": 4, "first_k_dense_replace": 3}, ["first_k_dense_replace"]),   # 3 dense
    ("deepseek_v3", {}, ["n_shared_experts"]),                               # 1
    ("deepseek_v32", {"num_hidden_layers": 4, "first_k_dense_replace": 3, "mlp_layer_types": None},
     ["first_k_dense_replace", "mlp_layer_types"]),                          # DeepseekV32Config: 3 dense layers
    ("deepseek_v32", {"mlp_layer_types": ["dense", "sparse", "dense"]}, []),   # mlp_layer_types decides
    ("sarvam_moe", {}, ["first_k_dense_replace"]),           # SarvamMoEConfig: 1
    ("sarvam_moe", {}, ["n_shared_experts"]),                # 1
    ("sarvam_moe", {"num_key_value_heads": 4, "head_dim": 64}, ["num_key_value_heads", "head_dim"]),   # 4, 64
    ("glm4_moe_lite", {}, ["n_shared_experts"]),             # Glm4MoeLiteConfig: 1
    ("afmoe", {}, ["num_dense_layers"]),                     # AfmoeConfig: 1
    ("afmoe", {"num_shared_experts": 2}, ["num_shared_experts"]),   # 2
    ("qwen3_5_moe_text", {"shared_expert_intermediate_size": 512}, ["shared_expert_intermediate_size"]),  # 512
    ("lfm2_moe", {}, ["use_expert_bias"]),                   # Lfm2MoeConfig: True
    ("zaya", {"router_hidden_size": 256}, ["router_hidden_size", "num_experts_per_tok"]),   # ZayaConfig: 256, top-1
    ("hy_v3", {}, ["mlp_layer_types"]),                      # HYV3Config: the first layer dense
    ("hy_v3", {}, ["num_shared_experts"]),                   # 1
    ("axk1", {}, ["mlp_layer_types"]),                       # AXK1Config: first_k_dense_replace 1
    ("axk1", {"mlp_layer_types": ["dense", "sparse", "dense"]}, []),
    ("flint", {"mlp_only_layers": [0, 1]}, ["mlp_only_layers"]),   # FlintConfig: [0, 1]
    ("mellum", {"mlp_layer_types": ["sparse"] * 3}, ["mlp_layer_types"]),   # MellumConfig: all sparse
    ("beam", {"num_hidden_layers": 4, "mlp_layer_types": None, "layer_types": None}, ["mlp_layer_types"]),  # 3 dense
    ("flint", {"shared_expert_intermediate_size": 1024}, ["shared_expert_intermediate_size"]),   # 1024
    ("glm_moe_dsa", {"num_hidden_layers": 4, "first_k_dense_replace": 3, "indexer_types": ["full"] * 4},
     ["mlp_layer_types", "first_k_dense_replace"]),          # GlmMoeDsaConfig: 3 dense layers
    ("glm_moe_dsa", {}, ["n_shared_experts"]),               # 1
    ("solar_open", {}, ["n_shared_experts"]),                # SolarOpenConfig: 1
    ("sarvam_mla", {}, ["first_k_dense_replace"]),           # SarvamMLAConfig: 1
    ("sarvam_mla", {}, ["n_shared_experts"]),                # 1
    ("kimi_linear", {}, ["mlp_layer_types", "first_k_dense_replace"]),   # KimiLinearConfig: 1 dense layer
    ("kimi_linear", {}, ["num_shared_experts"]),             # 1
    ("mimo_v2_flash", {}, ["mlp_layer_types"]),              # MiMoV2FlashConfig: dense, then sparse
    ("laguna", {}, ["mlp_layer_types"]),                     # LagunaConfig: dense, then sparse
    ("laguna", {"shared_expert_intermediate_size": 512}, ["shared_expert_intermediate_size"]),   # 512
    ("minimax_m3_vl_text", {"mlp_layer_types": ["sparse"] * 3}, ["mlp_layer_types"]),   # every layer MoE
    ("minimax_m3_vl_text", {"shared_intermediate_size": 3072, "dense_intermediate_size": 12288},
     ["shared_intermediate_size", "dense_intermediate_size"]),   # 3072, 12288
    ("dots3_note_text", {"mlp_layer_types": ["dense", "sparse", "sparse"]}, ["mlp_layer_types"]),   # first_k_dense 1
    ("dots3_note_text", {"shared_experts_intermediate_size": 1536}, ["shared_experts_intermediate_size"]),  # 1536
    ("mistral4", {"first_k_dense_replace": 0}, ["first_k_dense_replace"]),   # Mistral4Config: 0 (all MoE)
    ("mistral4", {}, ["n_shared_experts"]),                   # 1
    ("inkling_text", {}, ["n_shared_experts"]),               # InklingTextConfig: 2 (router rows E + 2)
    ("inkling_text", {"mlp_layer_types": None}, ["mlp_layer_types"]),   # every layer sparse
    # (a wrapper: the changes replace its text_config)
    ("glm5_next", {"text_config": dict(TINY["glm5_next"][1]["text_config"], num_hidden_layers=4, mlp_layer_types=None,
                                       layer_types=["linear_attention", "indexed_attention"] * 2,
                                       indexer_types=["full"] * 4)},
     ["mlp_layer_types"]),                                   # Glm5NextTextConfig: 3 dense layers
    ("glm5_next", {}, ["n_shared_experts"]),                  # 1
    ("deepseek_ocr2", {"text_config": dict(TINY["deepseek_ocr2"][1]["text_config"], n_shared_experts=2)},
     ["n_shared_experts"]),                                  # DeepseekOcr2TextConfig: 2
    ("muse_spark", {"text_config": {**{k: v for k, v in TINY["muse_spark"][1]["text_config"].items()
                                       if k != "moe_hidden_size"}, "mlp_layer_types": ["sparse"] * 3}},
     ["mlp_layer_types", "moe_hidden_size"]),                # MuseSparkTextConfig: all sparse; latent width 4096
]


def _saved(tmp_path, fixture, changes, dropped):
    cls, kwargs = TINY[fixture]
    torch.manual_seed(0)
    model = moetool_model(getattr(transformers, cls)(**{**kwargs, **changes}))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in dropped:   # (a wrapper's from its text_config)
        config.get("text_config", config).pop(key)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return tmp_path / "m", load_reference(tmp_path / "m", dtype=torch.float32)


@pytest.mark.parametrize("fixture, changes, dropped", CASES, ids=[f"{f}-{'-'.join(d)}" for f, _, d in CASES])
def test_absent_keys_take_the_config_class_default(tmp_path, fixture, changes, dropped):
    path, model = _saved(tmp_path, fixture, changes, dropped)
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.problems == []
    assert report.total_params == sum(p.numel() for p in model.parameters())
    layers = getattr(model.model, "language_model", model.model).layers
    assert report.moe_layers == [i for i, layer in enumerate(layers)
                                 if hasattr(getattr(layer, "mlp", None) or layer.feed_forward, "experts")]
    shared = [m for n, m in model.named_modules() if n.endswith(("shared_experts", "shared_expert"))]
    assert (report.num_shared_experts > 0) == bool(shared)


@pytest.mark.parametrize("fixture, changes, score, renormalize, bias", [
    ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}, "sigmoid of the top-k logits",
     True, False),
    ("cohere2_moe", {}, "softmax over top-k logits", False, False),
    ("lfm2_moe", {"use_expert_bias": False}, "sigmoid", True, False),
    ("lfm2_moe", {}, "sigmoid", True, True),
])
def test_router_report_follows_the_config(tmp_path, fixture, changes, score, renormalize, bias):
    """Cohere2-MoE's expert_selection_fn picks the score function (sigmoid: renormalised iff
    norm_topk_prob); LFM2-MoE's use_expert_bias decides whether there is a correction bias, and a
    checkpoint without one inspects clean."""
    path, model = _saved(tmp_path, fixture, changes, [])
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.problems == []
    router = report.router
    assert (router["score"], router["renormalize"], router["correction_bias"]) == (score, renormalize, bias)
    assert any(n.endswith("expert_bias") for n, _ in model.named_buffers()) == bias or fixture != "lfm2_moe"
