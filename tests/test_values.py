"""Value reading without torch (numpy decoding), expert statistics and NaN/Inf scans."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.checkpoint import open_checkpoint
from moetool.checkpoint.values import decode, read_rows
from moetool.ops.inspect import inspect_checkpoint


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_decoding_matches_torch_for_every_byte(dtype):
    raw = torch.arange(256, dtype=torch.uint8)
    want = raw.view(dtype).float().numpy()
    name = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
    got = decode(raw.numpy().tobytes(), name)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_read_rows_matches_safetensors(tmp_path, dtype):
    tensor = (torch.randn(6, 5, 7) * 100).to(dtype)
    save_file({"t": tensor}, tmp_path / "x.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as ckpt:
        ref = ckpt.tensors["t"]
        rows = read_rows(ref, 7, 19)
    want = tensor.reshape(30, 7)[7:19].float().numpy()
    assert rows.dtype == np.float32 and np.array_equal(rows, want)


def _copy_expert(src, dst, expert_from: int, expert_to: int):
    """Copy SRC to DST with one expert's weights overwritten by another's in every layer."""
    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in list(tensors):
        if f".experts.{expert_to}." in name:
            tensors[name] = tensors[name.replace(f".experts.{expert_to}.", f".experts.{expert_from}.")].clone()
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            tensors[name][expert_to] = tensors[name][expert_from]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_experts_flags_duplicates_and_norms_match_torch(tmp_path, tiny, fused):
    tensors = _copy_expert(tiny("mixtral", fused), tmp_path / "dup", 1, 3)
    with open_checkpoint(tmp_path / "dup") as ckpt:
        report = inspect_checkpoint(ckpt, experts=True)
    assert len(report.experts) == 2
    for stats in report.experts:
        assert [(a, b) for a, b, _ in stats.near_duplicates] == [(1, 3)]
        assert stats.similarity[1][3] == pytest.approx(1.0, abs=1e-6)
        assert max(stats.similarity[0][1:]) < 0.5
        layer = stats.layer
        for e in range(4):
            if fused:
                parts = [tensors[f"model.layers.{layer}.mlp.experts.{n}"][e] for n in ("gate_up_proj", "down_proj")]
            else:
                parts = [tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                         for w in ("w1", "w2", "w3")]
            want = torch.cat([p.flatten() for p in parts]).norm().item()
            assert stats.norms[e] == pytest.approx(want, rel=1e-5)
    assert [p.code for p in report.problems] == ["near_duplicate_experts"] * 2


def test_experts_dequantizes_block_fp8(tmp_path, tiny):
    """DeepSeek-style fp8 experts with 128x128 inverse scales: norms of the dequantized weights."""
    src = tiny("deepseek_v3")
    out = tmp_path / "fp8"
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_size=256, moe_intermediate_size=160, intermediate_size=32, n_routed_experts=2,
                  num_hidden_layers=1, first_k_dense_replace=0)
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    tensors, dequant = {}, {}
    for e in range(2):
        for proj, shape in (("gate_proj", (160, 256)), ("up_proj", (160, 256)), ("down_proj", (256, 160))):
            w = torch.randn(shape)
            scale = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128)) + 0.5
            expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
            q = (w / expanded).to(torch.float8_e4m3fn)
            name = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            dequant[(e, proj)] = q.float() * expanded
    save_file(tensors, out / "model.safetensors")
    with open_checkpoint(out) as ckpt:   # only experts are stored: inspect reports the rest missing
        report = inspect_checkpoint(ckpt, experts=True)
    assert "missing_tensors" in [p.code for p in report.errors]
    stats = report.experts[0]
    for e in range(2):
        want = torch.cat([dequant[(e, p)].flatten() for p in ("gate_proj", "up_proj", "down_proj")]).norm()
        assert stats.norms[e] == pytest.approx(want.item(), rel=1e-5)


def test_check_values_finds_nan_and_inf(tmp_path, tiny):
    src = tiny("olmoe")
    shutil.copytree(src, tmp_path / "bad")
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensors[name][0, :3] = float("nan")
    tensors[name][5, 5] = float("inf")
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    with open_checkpoint(tmp_path / "bad") as ckpt:
        clean = inspect_checkpoint(ckpt)
        report = inspect_checkpoint(ckpt, check_values=True)
    assert clean.problems == []
    assert [(p.code, p.message) for p in report.problems] == [("non_finite", f"{name}: 4 NaN/Inf values")]
