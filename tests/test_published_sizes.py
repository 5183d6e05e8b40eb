"""Totals and actives on header sets shaped like released models (sparse files, no weights).

Published figures come from the model cards; README "Parameter counts" says which
active-parameter convention each card uses.
"""

import pytest

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from tests.headersets import PUBLISHED, write_header_set


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_published_totals_and_actives(tmp_path, model):
    total, active, convention = PUBLISHED[model]
    with open_checkpoint(write_header_set(model, tmp_path / model)) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert not report.errors, report.errors
    assert report.total_params == pytest.approx(total, rel=0.02)
    assert getattr(report, convention) == pytest.approx(active, rel=0.02)
    # without the input embedding and without the lm_head (untied in all four)
    assert not report.tied_embeddings
    assert report.active_params_without_embeddings == report.active_params - report.params["lm_head"]
    assert report.active_params_without_embeddings < report.active_params < report.active_params_with_embedding


def test_deepseek_v3_structure(tmp_path):
    with open_checkpoint(write_header_set("deepseek_v3", tmp_path / "ds")) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.tensor_count > 90_000 and report.disk["shards"] == 163
    assert report.moe_layers == list(range(3, 61)) and report.dense_layers == [0, 1, 2]
    assert (report.num_experts, report.top_k, report.num_shared_experts) == (256, 8, 1)
    assert "fp8 block-scaled" in report.quantization
    assert report.router["group_limited"] == {"n_group": 8, "topk_group": 4}
    assert report.router["scaling_factor"] == 2.5 and report.router["correction_bias"]
    assert report.mtp_params > 10e9            # layer 61 is the MTP module, not counted
    assert [p.code for p in report.problems] == ["mtp"]
    # fp8 weights are counted as parameters, their scales are not
    assert report.disk["bytes_by_dtype"]["F8_E4M3"] < report.total_params + report.mtp_params


def test_gpt_oss_mxfp4_counts_packed_values(tmp_path):
    with open_checkpoint(write_header_set("gpt_oss_20b", tmp_path / "g")) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.quantization == ["mxfp4"]
    assert report.num_experts == 32 and report.top_k == 4
    assert all(info.experts == 32 for info in report.layers)
