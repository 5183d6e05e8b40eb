"""NVIDIA ModelOpt exports whose experts stay fused (Llama 4's Llama4TextExperts, gpt-oss's GptOssExperts: ModelOpt's
unified_export_hf.py writes experts.gate_up_proj / down_proj whole, [E, in / 2, out] e2m1 pairs along the inputs
with W_weight_scale [E, in / 16, out] and one W_weight_scale_2; fp8 [E, in, out] with one scale). Each checkpoint is
quantized and exported here by ModelOpt itself (nvidia-modelopt, on the CPU, in a process of its own: `EXPORT`), and
what moetool must read is ModelOpt's own NVFP4QTensor.dequantize of each expert (its fp8: code x scale), while the
weights before quantization pin the layout independently (a transposed or mis-split reading is not near them)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.prune import PruneOptions, prune
from moetool.runner.model import load_model

pytest.importorskip("modelopt", reason="pip install nvidia-modelopt (a dev extra)")

CASES = {"llama4-nvfp4": ("llama4", "NVFP4"), "llama4-fp8": ("llama4", "FP8"), "gpt-oss-nvfp4": ("gpt_oss", "NVFP4")}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

# a tiny model of each family (hidden 64, expert width 48: no [E, H, 2I] / [E, 2I, H] confusion passes), saved as
# it is, quantized by ModelOpt (max calibration) and exported; then ModelOpt's own dequantization of every quantized
# tensor, the others as stored, written beside it (-dense)
EXPORT = r"""
import json, sys, shutil
from pathlib import Path
import torch, transformers
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
from safetensors.torch import load_file, save_file

def nvfp4(codes, scale, scale_2):   # [out, in / 2], [out, in / 16] -> [out, in]
    shape = torch.Size([codes.shape[0], codes.shape[1] * 2])
    return NVFP4QTensor(shape, torch.float32, codes).dequantize(dtype=torch.float32, scale=scale,
                                                                double_scale=scale_2, block_sizes={-1: 16})

for out, family, algo in json.loads(sys.argv[1]):
    out = Path(out)
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_hidden_layers=2, head_dim=16,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if family == "llama4":
        config = transformers.Llama4TextConfig(**common, intermediate_size_mlp=64, num_experts_per_tok=1,
                                               interleave_moe_layer_step=1, no_rope_layers=[1, 1],
                                               attention_chunk_size=64)
        config.architectures = ["Llama4ForCausalLM"]
        model = transformers.Llama4ForCausalLM(config)
    else:
        config = transformers.GptOssConfig(**common, num_experts_per_tok=2, layer_types=["full_attention"] * 2)
        config.architectures = ["GptOssForCausalLM"]
        model = transformers.GptOssForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out.with_name(out.name + "-original"))
    recipe = {"NVFP4": mtq.NVFP4_DEFAULT_CFG, "FP8": mtq.FP8_DEFAULT_CFG}[algo]
    mtq.quantize(model, recipe, lambda m: m(torch.randint(0, 128, (4, 16))))
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    stored, dense = load_file(out / "model.safetensors"), {}
    for name, tensor in stored.items():
        fused = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        scale = stored.get(name + "_weight_scale" if fused else name.removesuffix("weight") + "weight_scale")
        if name.endswith(("scale", "scale_2")):
            continue
        if scale is None:
            dense[name] = tensor
        elif fused and algo == "NVFP4":   # each expert's [out, in] weight, as ModelOpt quantized it
            scale_2 = stored[name + "_weight_scale_2"]
            dense[name] = torch.stack([nvfp4(tensor[e].T.contiguous(), scale[e].T.contiguous(), scale_2).T
                                       for e in range(tensor.shape[0])]).contiguous()
        elif algo == "NVFP4":
            dense[name] = nvfp4(tensor, scale, stored[name.removesuffix("weight") + "weight_scale_2"])
        else:
            dense[name] = tensor.float() * scale.float()
    target = out.with_name(out.name + "-dense")
    target.mkdir()
    save_file(dense, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelopt-fused")
    done = subprocess.run([sys.executable, "-c", EXPORT, json.dumps([(str(root / name), *case)
                                                                     for name, case in CASES.items()])],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"ModelOpt's export failed: {done.stderr[-3000:]}"
    (root / "ids.json").write_text(json.dumps(torch.randint(0, 128, (4, 16)).tolist()))
    return root


def _dequantized(source, out):
    with open_checkpoint(source) as ckpt:
        convert(ckpt, out, ConvertOptions(dequantize=True, dtype="fp32"))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_values_are_modelopts_own(tmp_path, exports, name):
    """convert --dequantize gives exactly ModelOpt's own dequantization of every tensor (fused experts, expert by
    expert), names and shapes as the unquantized model's; the fused experts lie near the weights they were
    quantized from (a layout read any other way does not)."""
    ours = _dequantized(exports / name, tmp_path / "out")
    assert not (tmp_path / "out" / "hf_quant_config.json").exists()   # (else the output reads as quantized again)
    theirs = load_file(exports / f"{name}-dense" / "model.safetensors")
    original = load_file(exports / f"{name}-original" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) == sorted(original)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.float()), key
    fused = [k for k in ours if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert len(fused) == 4
    for key in fused:
        error = float((ours[key] - original[key].float()).norm() / original[key].float().norm())
        assert error < (0.15 if "nvfp4" in name else 0.05), (key, error)
        assert not torch.equal(ours[key], original[key].float())
    with open_checkpoint(exports / name) as ckpt:
        report = inspect_checkpoint(ckpt)
    with open_checkpoint(exports / f"{name}-original") as ckpt:
        assert report.params == inspect_checkpoint(ckpt).params
    assert not report.problems
    form = "nvfp4" if "nvfp4" in name else "fp8 tensor"
    assert report.quantization == [f"modelopt {form}", f"modelopt {form} fused experts"]


@pytest.mark.parametrize("name", ["llama4-nvfp4", "gpt-oss-nvfp4"])
def test_runs_equal_transformers_on_modelopts_weights(exports, name):
    """load_model (full) gives transformers' logits on ModelOpt's dequantized weights; a streamed eval against them
    KL 0."""
    dense = exports / f"{name}-dense"
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad(), open_checkpoint(exports / name) as ckpt:
        got = load_model(ckpt, device="cpu", dtype=torch.float32, mode="full").model(IDS).logits
        assert torch.allclose(got, reference(IDS).logits, rtol=0, atol=1e-5)
    with open_checkpoint(exports / name) as ckpt, open_checkpoint(dense) as ref:
        report = evaluate(ckpt, EvalOptions(token_ids=exports / "ids.json", seq_len=16, mode="streamed", dtype="fp32",
                                            device="cpu"), ref)
    assert report.kl_mean < 1e-9 and report.top1_agreement == 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_pruning_slices_the_fused_codes_and_keeps_the_shared_scales(tmp_path, exports, name):
    """prune keeps the chosen experts' rows of the fused codes and block scales, and the scales all experts share
    (weight_scale_2, input_scale) as they are: the pruned export, dequantized, is the dequantized export pruned."""
    from moetool.ops.profile import ProfileOptions

    options = PruneOptions(experts={0: [1, 3], 1: [0, 2]}, calibration=ProfileOptions(
        token_ids=exports / "ids.json", seq_len=16, dtype="fp32", device="cpu"))
    with open_checkpoint(exports / name) as ckpt:
        ours = prune(ckpt, tmp_path / "pruned", options)
    with open_checkpoint(exports / f"{name}-dense") as ckpt:
        theirs = prune(ckpt, tmp_path / "dense-pruned", options)
    assert ours.params_removed == theirs.params_removed   # (the values packed codes hold, not their bytes)
    got = _dequantized(tmp_path / "pruned", tmp_path / "out")
    want = load_file(tmp_path / "dense-pruned" / "model.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value.float()), key
    stored = load_file(tmp_path / "pruned" / "model.safetensors")
    assert stored["model.layers.0." + ("feed_forward" if "llama4" in name else "mlp") +
                  ".experts.down_proj"].shape[0] == 2
