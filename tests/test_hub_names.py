"""Checkpoints whose experts are fused already but whose other tensors carry hub names transformers 5
renames, splits or joins on load (Hy4: linear_gate, learnable_sink_param, hc_*; LARA-mini: one in_proj split
in four, out_norm): moetool's own loaders (the tensor plan) name them as transformers does; convert without
a layout change keeps the checkpoint's names."""

import pytest
import torch

from moetool.arch import detect_family
from moetool.checkpoint import open_checkpoint
from moetool.layout.plan import PlanOptions, plan_tensors
from moetool.ops.convert import ConvertOptions, convert
from moetool.runner.model import _load_planned
from tests.tiny import load_reference

FAMILIES = ["hy_v4", "lara_mini"]
HUB_ONLY = {"hy_v4": ".linear_gate.", "lara_mini": ".linear_attn.in_proj."}


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_load_of_hub_names_equals_transformers(tiny, family):
    path = tiny(family)
    with open_checkpoint(path) as ckpt:
        assert any(HUB_ONLY[family] in name for name in ckpt.tensors)        # really hub-named
        plan = plan_tensors(ckpt, PlanOptions(model_names=True))
        assert plan.source_layout == plan.target_layout == "fused"          # no layout change
        assert not any(HUB_ONLY[family] in t.name for t in plan.tensors)
        model = _load_planned(ckpt, detect_family(ckpt.config), dtype=torch.float32, device="cpu",
                              trust_remote_code=False)
    reference = load_reference(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dtype_only_convert_keeps_the_hub_names(tmp_path, tiny, family):
    path = tiny(family)
    with open_checkpoint(path) as ckpt:
        names = set(ckpt.tensors)
        convert(ckpt, tmp_path / "out", ConvertOptions(dtype="bf16"), verify=False)
    with open_checkpoint(tmp_path / "out") as out:
        assert set(out.tensors) == names
