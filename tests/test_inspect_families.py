"""inspect on a tiny transformers-built model of every family, in both layouts.

Oracle: the model transformers builds from the same config (its parameter count,
its MoE layers, its experts and top-k).
"""

import json

import pytest

from moetool.arch import all_families, detect_family
from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from tests.tiny import DENSE, TINY

# family -> (MoE layers, experts, top-k, shared experts) as the tiny configs define them
STRUCTURE = {
    "mixtral": ([0, 1], 4, 2, 0), "minimax": ([0, 1], 4, 2, 0), "minimax_m2": ([0, 1], 4, 2, 0),
    "deepseek_v4": ([0, 1, 2], 4, 2, 1),
    "qwen2_moe": ([0, 2], 4, 2, 1), "qwen3_moe": ([0, 1], 4, 2, 0), "qwen3_next": ([0, 1], 4, 2, 1),
    "olmoe": ([0, 1], 4, 2, 0), "deepseek_v2": ([1, 2], 4, 2, 1), "deepseek_v3": ([1, 2], 4, 2, 1),
    "deepseek_v32": ([1, 2], 4, 2, 1),
    "glm4_moe": ([1, 2], 4, 2, 1), "glm4_moe_lite": ([1, 2], 4, 2, 1),
    "exaone_moe": ([1, 2], 4, 2, 1), "lfm2_moe": ([1, 2], 4, 2, 0), "qwen3_5_moe_text": ([0, 1], 4, 2, 1),
    "dots1": ([1, 2], 4, 2, 1), "gpt_oss": ([0, 1], 4, 2, 0),
    "llama4_text": ([1], 4, 1, 1), "granitemoe": ([0, 1], 4, 2, 0), "granitemoeshared": ([0, 1], 4, 2, 1),
    "granitemoehybrid": ([0, 1], 4, 2, 1), "phimoe": ([0, 1], 4, 2, 0), "jetmoe": ([0, 1], 4, 2, 0),
    "dbrx": ([0, 1], 4, 2, 0), "jamba": ([1, 3], 4, 2, 0), "ernie4_5_moe": ([1, 2], 4, 2, 1),
    "hunyuan_v1_moe": ([0, 1], 4, 2, 1), "cohere2_moe": ([1, 2], 4, 2, 1), "afmoe": ([1, 2], 4, 2, 1),
    "sarvam_moe": ([1, 2], 4, 2, 1), "gemma4_text": ([0, 1], 4, 2, 1),
    "qwen4_exp_text": ([0, 1], 4, 2, 1),
    "axk2": ([1, 2], 4, 2, 1),
    "beam": ([1, 2], 4, 2, 0),
    "mellum": ([1, 2], 4, 2, 0),
    "flint": ([1, 2], 4, 2, 1),
    "axk1": ([1, 2], 4, 2, 1),
    "hy_v3": ([1, 2], 4, 2, 1),
    "glm_moe_dsa": ([1, 2], 4, 2, 1), "solar_open": ([0, 1], 4, 2, 1),
    "sarvam_mla": ([1, 2], 4, 2, 1), "kimi_linear": ([1, 2], 4, 2, 1),
    "minimax_m3_vl_text": ([1, 2], 4, 2, 1),
    "dots3_note_text": ([1, 2], 4, 2, 1),
    "granitemoe_swa": ([0, 1], 4, 2, 1), "switch_transformers": ([1, 3], 4, 1, 0),
    "nllb-moe": ([1, 3], 4, 2, 0),
    "nemotron_h": ([1, 3], 4, 2, 1), "mimo_v2_flash": ([1, 2], 4, 2, 0),
    "bailing_hybrid": ([1, 2], 4, 2, 1), "laguna": ([1, 2], 4, 2, 1),
    "kolibri1": ([0, 1], 4, 2, 1),
    "qwen3_vl_moe": ([0, 2], 4, 2, 0), "glm4v_moe": ([1, 2], 4, 2, 1),
    "mistral4": ([1, 2], 4, 2, 1), "glm5_next": ([1, 2], 4, 2, 1),
    "hy_v4": ([1, 2], 4, 2, 1), "lara_mini": ([0, 1, 2], 4, 2, 1),
    "longcat_flash": ([0, 1], 4, 2, 0),
    "step3p7": ([1, 2], 4, 2, 1), "hy_v4_vl": ([1, 2], 4, 2, 1), "deepseek_ocr2": ([1, 2], 4, 2, 1),
    "qwen3_omni_moe": ([0, 2], 4, 2, 0),
    "muse_spark": ([1, 2], 4, 2, 0),
    "inkling_text": ([1, 2], 4, 2, 2),
    "mistral_large4": ([1, 2, 3], 4, 2, 1),
    "zaya": ([0, 1, 2], 4, 1, 0),
}
# Families whose hub layout is already fused: saving with either option gives the same names.
SINGLE_LAYOUT = {"gpt_oss", "jetmoe", "dbrx", "switch_transformers", "nllb-moe", "granitemoe_swa", "gemma4_text",
                 "minimax_m3_vl_text", "mistral4", "hy_v4", "lara_mini", "muse_spark", "hy_v4_vl", "inkling_text",
                 "zaya"}


def test_every_moe_family_has_a_tiny_model():
    families = {f.name for f in all_families()}
    tiny_families = {detect_family({"model_type": t}).name for t in TINY}
    assert families == tiny_families


@pytest.mark.parametrize("family", sorted(set(TINY) - DENSE))
@pytest.mark.parametrize("fused", [False, True], ids=["hub", "fused"])
def test_moe_family(tiny, family, fused):
    if fused and family in SINGLE_LAYOUT:
        pytest.skip("one on-disk layout only")
    path = tiny(family, fused)
    expected_params = json.loads((path / "expected.json").read_text())["params"]
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    moe_layers, experts, top_k, shared = STRUCTURE[family]
    assert report.problems == [], report.problems
    assert not report.guessed
    assert report.total_params == expected_params
    assert report.moe_layers == moe_layers
    assert report.num_experts == experts
    assert report.top_k == top_k
    assert report.num_shared_experts == shared
    assert all(info.experts == experts for info in report.layers if info.kind == "moe")
    assert report.dense_layers == [i for i in range(report.num_layers) if i not in moe_layers]
    # GPT-OSS, JetMoE, DBRX, Llama 4 (bf16) and Granite MoE SWA store fused experts on the hub too
    hub_fused = {"gpt_oss", "jetmoe", "dbrx", "llama4_text", "granitemoe_swa", "gemma4_text", "minimax_m3_vl_text",
                 "qwen3_vl_moe", "mistral4", "hy_v4", "lara_mini", "step3p7", "muse_spark", "hy_v4_vl", "inkling_text",
                 "zaya"}
    expected_layout = "fused" if fused or family in hub_fused else "per-expert"
    assert report.layout == expected_layout
    # active = everything but the input embedding and the routed experts not chosen
    assert report.params["routed_experts"] > 0
    assert report.active_params < report.total_params
    # (less the gate and up rows transformers 5 holds and saves for LongCat-Flash's identity experts: never used)
    config = json.loads((path / "config.json").read_text())
    routed = report.params["routed_experts"] - len(moe_layers) * config.get("zero_expert_num", 0) * 2 * \
        report.expert_ffn * report.hidden_size
    per_layer_routed = routed / len(moe_layers)
    expected_active = (report.total_params - report.params["routed_experts"]
                       + len(moe_layers) * per_layer_routed * top_k / experts
                       - report.params["embedding"] * (0 if report.tied_embeddings else 1))
    assert report.active_params == pytest.approx(expected_active, abs=len(moe_layers))
    # without input and output embeddings: the lm_head (or, tied, the shared matrix) out as well
    head = report.params["embedding"] if report.tied_embeddings else report.params["lm_head"]
    assert report.active_params_without_embeddings == report.active_params - head


@pytest.mark.parametrize("family", sorted(DENSE))
def test_dense_family(tiny, family):
    path = tiny(family)
    expected_params = json.loads((path / "expected.json").read_text())["params"]
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.problems == []
    assert report.family is not None and report.moe_layers == []
    assert report.total_params == expected_params
    assert report.params["dense_mlp"] > 0 and report.params["routed_experts"] == 0
