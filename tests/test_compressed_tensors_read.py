"""Reading compressed-tensors checkpoints in every weight format llm-compressor writes for MoE models: each one
built here by the compressed-tensors package's own compressors, and checked against the package's own
decompression (CompressedTensorsDequantizer) and transformers' forward on the weights it decompressed."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.prune import PruneOptions, prune
from moetool.ops.quantize import QuantizeOptions, quantize
from moetool.runner.model import load_model

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert import convert_checkpoint  # noqa: E402
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

TARGETS = r"re:.*(experts\.\d+\.|self_attn\.).*_proj$"   # the routed experts and attention, as llm-compressor's
FP8_DYNAMIC = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
# name -> (weights, input activations, format): the schemes of llm-compressor's presets (FP8_DYNAMIC, FP8_BLOCK,
# W8A8, W4A16, NVFP4, MXFP4) and the strategies beside them
SCHEMES = {
    "fp8-channel-dynamic": (dict(num_bits=8, type="float", strategy="channel"), FP8_DYNAMIC, "float-quantized"),
    "fp8-block": (dict(num_bits=8, type="float", strategy="block", block_structure=[16, 16]),
                  dict(num_bits=8, type="float", strategy="group", group_size=16, dynamic=True), "float-quantized"),
    "fp8-tensor": (dict(num_bits=8, type="float", strategy="tensor"), None, "float-quantized"),
    "int8-channel-w8a8": (dict(num_bits=8, type="int", strategy="channel"),
                          dict(num_bits=8, type="int", strategy="token", dynamic=True), "int-quantized"),
    "int8-tensor-asym": (dict(num_bits=8, type="int", strategy="tensor", symmetric=False),
                         dict(num_bits=8, type="int", strategy="tensor", dynamic=True), "int-quantized"),
    "int4-channel": (dict(num_bits=4, type="int", strategy="channel"), None, "pack-quantized"),
    "int4-channel-asym": (dict(num_bits=4, type="int", strategy="channel", symmetric=False), None, "pack-quantized"),
    "int4-g16-asym": (dict(num_bits=4, type="int", strategy="group", group_size=16, symmetric=False), None,
                      "pack-quantized"),
    "int2-g16": (dict(num_bits=2, type="int", strategy="group", group_size=16), None, "pack-quantized"),
    "nvfp4": (dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn"),
              dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local"),
              "nvfp4-pack-quantized"),
    "mxfp4": (dict(num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="uint8"), None,
              "mxfp4-pack-quantized"),
}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _observed(weight, args):
    """The minimum and maximum of WEIGHT over each of ARGS' scales (what llm-compressor's min-max observer sees)."""
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if args.strategy == "block":
        (b0, b1), (rows, cols) = args.block_structure, weight.shape
        blocks = weight.reshape(rows // b0, b0, cols // b1, b1).transpose(1, 2)
        return blocks.amin((-1, -2)), blocks.amax((-1, -2))
    groups = weight.unflatten(-1, (-1, args.group_size))
    return groups.amin(-1), groups.amax(-1)


def _compressed(base, out, name: str):
    """BASE with every targeted weight compressed by the package in scheme NAME, config as llm-compressor writes it."""
    weights, activations, fmt = SCHEMES[name]
    scheme = QuantizationScheme(targets=[TARGETS], format=fmt, weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**activations) if activations else None)
    args, compressor = scheme.weights, BaseCompressor.get_value_from_registry(fmt)
    shutil.copytree(base, out)
    stored = {}
    for tensor_name, tensor in load_file(out / "model.safetensors").items():
        module = tensor_name.removesuffix(".weight")
        if not (tensor_name.endswith(".weight") and re.fullmatch(TARGETS[3:], module)):
            stored[tensor_name] = tensor
            continue
        global_scale = generate_gparam(tensor.amin(), tensor.amax()) if args.strategy == "tensor_group" else None
        scale, zero_point = calculate_qparams(*_observed(tensor, args), args, global_scale=global_scale)
        state = {"weight": tensor, "weight_scale": scale, "weight_zero_point": zero_point}
        if global_scale is not None:
            state["weight_global_scale"] = global_scale
        stored |= {f"{module}.{k}": v.contiguous() for k, v in compressor.compress(state, scheme).items()}
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                                       quantization_status="compressed",
                                                       ignore=["lm_head"]).model_dump(mode="json")
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (compressed checkpoint, the package's float32 decompression of it); "base": the original."""
    root = tmp_path_factory.mktemp("ct")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")   # experts one a tensor
    out = {"base": (root / "base", root / "base")}
    for name in SCHEMES:
        compressed = _compressed(root / "base", root / name, name)
        convert_checkpoint(compressed, root / f"{name}-dense", CompressedTensorsDequantizer(compressed,
                                                                                            dtype=torch.float32))
        out[name] = (compressed, root / f"{name}-dense")
    (root / "ids.json").write_text(json.dumps(torch.randint(0, 64, (4, 16)).tolist()))
    out["ids"] = root / "ids.json"
    return out


@pytest.mark.parametrize("name", SCHEMES)
def test_dequantized_weights_are_the_packages(tmp_path, models, name):
    """convert --dequantize writes exactly what the package's own decompression gives, names and all."""
    source, dense = models[name]
    with open_checkpoint(source) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(dense / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    # and the weights are quantized: not the original's
    original = load_file(models["base"][0] / "model.safetensors")
    assert not torch.equal(ours["model.layers.0.mlp.experts.1.down_proj.weight"],
                           original["model.layers.0.mlp.experts.1.down_proj.weight"])


@pytest.mark.parametrize("name", SCHEMES)
def test_runs_equal_transformers_on_the_packages_weights(models, name):
    """load_model (full) and a streamed eval give transformers' logits on the package's decompressed weights."""
    source, dense = models[name]
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
        with open_checkpoint(source) as ckpt:
            got = load_model(ckpt, device="cpu", dtype=torch.float32, mode="full").model(IDS).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    with open_checkpoint(source) as ckpt, open_checkpoint(dense) as ref:
        report = evaluate(ckpt, EvalOptions(token_ids=models["ids"], seq_len=16, mode="streamed", dtype="fp32",
                                            device="cpu"), ref)
    assert report.kl_mean < 1e-9 and report.top1_agreement == 1.0


def test_inspect_counts_every_parameter_and_names_the_forms(models):
    with open_checkpoint(models["base"][0]) as ckpt:
        expected = inspect_checkpoint(ckpt).params
    labels = {"fp8-channel-dynamic": "compressed-tensors fp8 channel, activations fp8 token dynamic",
              "fp8-block": "compressed-tensors fp8 block 16x16, activations fp8 group dynamic",
              "int8-tensor-asym": "compressed-tensors int8 tensor asym, activations int8 tensor dynamic",
              "int4-g16-asym": "compressed-tensors int4 g16 asym",
              "nvfp4": "compressed-tensors nvfp4, activations fp4 tensor_group dynamic (local)",
              "mxfp4": "compressed-tensors mxfp4"}
    for name in SCHEMES:
        with open_checkpoint(models[name][0]) as ckpt:
            report = inspect_checkpoint(ckpt)
        assert report.params == expected, name
        assert not report.problems, (name, report.problems)
        if name in labels:
            assert report.quantization == [labels[name]]


def test_mixed_bit_widths_are_counted_each_by_its_own(tmp_path, tiny):
    """moetool's own compressed-tensors output with int4 and int8 layers (one group each): every weight's
    parameters from its own group's bits (the first group's bits were used for all)."""
    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        expected = inspect_checkpoint(ckpt).params
        quantize(ckpt, tmp_path / "q", QuantizeOptions(layout="compressed-tensors", bits_budget=9.0, policy="uniform",
                                                       candidates="int4-g16-sym,int8-g16-sym"))
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    with open_checkpoint(tmp_path / "q") as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.params == expected
    assert report.quantization == ["compressed-tensors int4 g16", "compressed-tensors int8 g16"]


def test_served_activation_quantization_is_said(models, caplog):
    with open_checkpoint(models["fp8-channel-dynamic"][0]) as ckpt, caplog.at_level("WARNING"):
        load_model(ckpt, device="cpu", dtype=torch.float32, mode="streamed")
    assert "quantizes activations when served (fp8 token dynamic)" in caplog.text
    caplog.clear()
    with open_checkpoint(models["fp8-tensor"][0]) as ckpt, caplog.at_level("WARNING"):
        load_model(ckpt, device="cpu", dtype=torch.float32, mode="streamed")
    assert "activations" not in caplog.text


def test_what_it_cannot_read_is_refused_before_writing(tmp_path, models):
    """Activation-ordered groups (weight_g_idx, which the package itself no longer dequantizes): inspect warns,
    convert --dequantize and runs refuse, nothing is written."""
    source = tmp_path / "actorder"
    shutil.copytree(models["int4-g16-asym"][0], source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (source / "config.json").write_text(json.dumps(config))
    with open_checkpoint(source) as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == ["unreadable_quantization"]
        with pytest.raises(UnsupportedError, match="activation-ordered"):
            convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True))
        with pytest.raises(UnsupportedError, match="activation-ordered"):
            load_model(ckpt, device="cpu", dtype=torch.float32, mode="full")
    assert not (tmp_path / "out").exists()


def test_prune_and_quantize_refuse_them(tmp_path, models):
    with open_checkpoint(models["fp8-channel-dynamic"][0]) as ckpt:
        with pytest.raises(UnsupportedError, match="compressed-tensors"):
            prune(ckpt, tmp_path / "p", PruneOptions(keep=2))
        with pytest.raises(UnsupportedError, match="compressed-tensors"):
            quantize(ckpt, tmp_path / "q", QuantizeOptions())
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
