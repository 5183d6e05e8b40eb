"""Mistral's FP8 checkpoints (Mistral Large 3/4): fp8 e4m3 weights with their inverse scales under X.qscale_weight
(per block, or one per tensor) and static activation scales under X.qscale_act. The oracle is transformers' own
dequantization (FineGrainedFP8Config(dequantize=True), which reads qscale_weight as weight_scale_inv and derives
each weight's blocks from its scale grid)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.inspect import inspect_checkpoint
from tests.tiny import save_tiny

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _fp8(weight, block):
    """WEIGHT as fp8 e4m3 and its float32 inverse scales, one per BLOCK (None: one for the tensor)."""
    rows, cols = weight.shape
    block = block or (rows, cols)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight
    scale = padded.reshape(grid[0], block[0], grid[1], block[1]).abs().amax((1, 3)).clamp(min=1e-8) / 448
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight / full).to(torch.float8_e4m3fn), scale if block != (rows, cols) else scale.reshape(())


def _quantized(path, block):
    """The tiny Mistral Large 4 (Mistral's names) with its attention and expert weights in fp8."""
    save_tiny("mistral_large4", path)
    stored = {}
    for name, tensor in load_file(path / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and tensor.ndim == 2 and (".experts." in name or ".attention.w" in name):
            stored[name], stored[module + ".qscale_weight"] = _fp8(tensor, block)
            stored[module + ".qscale_act"] = torch.tensor(0.02)
        else:
            stored[name] = tensor
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                     "weight_block_size": list(block) if block else None}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module", params=[(16, 16), None], ids=["blocks", "per-tensor"])
def quantized(request, tmp_path_factory):
    return _quantized(tmp_path_factory.mktemp("mistral-fp8"), request.param)


def _oracle(path):
    return transformers.MistralLarge4ForConditionalGeneration.from_pretrained(
        path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32).eval()


def test_inspect_counts_and_names_it(quantized):
    with open_checkpoint(quantized) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.total_params == json.loads((quantized / "expected.json").read_text())["params"]
    assert report.problems == []
    assert any(form.startswith("fp8") for form in report.quantization)


def test_load_model_and_dequantize_equal_transformers(quantized, tmp_path):
    with torch.no_grad():
        want = _oracle(quantized)(IDS).logits
        got = moetool.load_model(quantized, dtype=torch.float32)(IDS).logits
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
        with open_checkpoint(quantized) as ckpt:
            convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
        written = load_file(next((tmp_path / "out").glob("*.safetensors")))
        assert not any(name.endswith(("qscale_weight", "qscale_act")) for name in written)
        assert not any(t.dtype == torch.float8_e4m3fn for t in written.values())
        dense = transformers.MistralLarge4ForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                                  dtype=torch.float32).eval()
        assert torch.allclose(dense(IDS).logits, want, rtol=0, atol=1e-5)


def test_expert_statistics_read_the_dequantized_experts(quantized, tmp_path):
    """inspect --experts dequantizes fp8 experts by their qscale_weight (per block or per tensor): the norms are the
    dequantized checkpoint's."""
    with open_checkpoint(quantized) as ckpt:
        convert(ckpt, tmp_path / "dense", ConvertOptions(dequantize=True, dtype="fp32"))
        got = inspect_checkpoint(ckpt, experts=True).experts
    with open_checkpoint(tmp_path / "dense") as ckpt:
        want = inspect_checkpoint(ckpt, experts=True).experts
    assert [s.layer for s in got] == [s.layer for s in want] and got
    for ours, theirs in zip(got, want):
        assert ours.norms == pytest.approx(theirs.norms, rel=1e-5)
