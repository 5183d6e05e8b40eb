"""Reading the quantized checkpoints other tools write for MoE models: compressed-tensors (llm-compressor) in every
weight format, each one built here by the compressed-tensors package's own compressors; AutoAWQ, read by that
package's own converter; NVIDIA ModelOpt NVFP4, read by ModelOpt's own dequantization (nvidia-modelopt); GPTQ
packed as GPTQModel packs. Each checked against the writing tool's own decompression (compressed-tensors'
CompressedTensorsDequantizer, ModelOpt's NVFP4QTensor.dequantize) and transformers' forward on those weights."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moetool.checkpoint import open_checkpoint
from moetool.errors import CheckpointFormatError, UnsupportedError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.prune import PruneOptions, prune
from moetool.ops.quantize import QuantizeOptions, quantize
from moetool.quant import released
from moetool.runner.model import load_model

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert import convert_checkpoint  # noqa: E402
from compressed_tensors.entrypoints.convert.converters import (  # noqa: E402
    AutoAWQConverter,
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
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
    "int4-tensor-asym": (dict(num_bits=4, type="int", strategy="tensor", symmetric=False), None, "pack-quantized"),
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


def _compressed(base, out, name: str, targets: str = TARGETS):
    """BASE with every targeted weight compressed by the package in scheme NAME, config as llm-compressor writes it."""
    weights, activations, fmt = SCHEMES[name]
    scheme = QuantizationScheme(targets=[targets], format=fmt, weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**activations) if activations else None)
    args, compressor = scheme.weights, BaseCompressor.get_value_from_registry(fmt)
    shutil.copytree(base, out)
    stored = {}
    for tensor_name, tensor in load_file(out / "model.safetensors").items():
        module = tensor_name.removesuffix(".weight")
        if not (tensor_name.endswith(".weight") and re.fullmatch(targets[3:], module)):
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
    out["modelopt-nvfp4"] = _modelopt(root / "nvfp4", root / "modelopt-nvfp4")
    out["awq"] = _awq(root / "base", root / "awq")
    for name, (bits, group, fmt) in GPTQ.items():
        out[name] = _gptq(root / "base", root / name, bits, group, fmt,
                          DYNAMIC if name == "gptq-int4-dynamic" else None)
    out["modelopt-fp8"] = _modelopt_fp8(root / "base", root / "modelopt-fp8")
    (root / "ids.json").write_text(json.dumps(torch.randint(0, 64, (4, 16)).tolist()))
    out["ids"] = root / "ids.json"
    return out


# GPTQ: bits, group size (-1: per channel), checkpoint_format; desc_act (a permuted g_idx) wherever groups
GPTQ = {"gptq-int4-g16-act-order": (4, 16, "gptq"), "gptq-int2-g16": (2, 16, "gptq"),
        "gptq-int8-channel-v2": (8, -1, "gptq_v2"), "gptq-int4-dynamic": (4, 16, "gptq")}
DYNAMIC = (r".*\.experts\.1\.", 8, 32)   # GPTQModel's dynamic: expert 1 of each layer in int8, groups of 32
RELEASES = [*SCHEMES, "modelopt-nvfp4", "modelopt-fp8", "awq", *GPTQ]


def _package_dequantized(source, converters, out):
    """The package's conversion of SOURCE to compressed-tensors by CONVERTERS, then its decompression (float32)."""
    middle = out.with_name(out.name + "-ct")
    convert_checkpoint(source, middle, converters)
    # the activations' scales go (its dequantizer calls them orphans: they serve activations, not weights)
    tensors = load_file(middle / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".input_global_scale")},
              middle / "model.safetensors", metadata={"format": "pt"})
    index = middle / "model.safetensors.index.json"
    if index.exists():
        held = json.loads(index.read_text())
        held["weight_map"] = {k: v for k, v in held["weight_map"].items() if not k.endswith(".input_global_scale")}
        index.write_text(json.dumps(held))
    convert_checkpoint(middle, out, CompressedTensorsDequantizer(middle, dtype=torch.float32))
    return out


def _modelopt(nvfp4, out):
    """The compressed-tensors NVFP4 checkpoint as ModelOpt stores it (the inverse of the package's ModelOpt
    converter: weight_packed -> weight, weight_global_scale -> its reciprocal weight_scale_2, a 0-d float32 as
    ModelOpt's unified_export_hf.py squeezes it, an input_scale per Linear, the kv-cache algorithm named); the
    oracle is ModelOpt's own NVFP4QTensor.dequantize (in float32)."""
    shutil.copytree(nvfp4, out)
    stored = {}
    for name, tensor in load_file(out / "model.safetensors").items():
        if name.endswith(".weight_packed"):
            stored[name.removesuffix("_packed")] = tensor
            stored[name.removesuffix(".weight_packed") + ".input_scale"] = torch.tensor(0.03125)
        elif name.endswith(".weight_global_scale"):
            stored[name.removesuffix("_global_scale") + "_scale_2"] = (1 / tensor).reshape(())
        else:
            stored[name] = tensor
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                     "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    dense = out.with_name(out.name + "-dense")
    dense.mkdir()
    shutil.copy(out / "config.json", dense / "config.json")
    config.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(config, indent=2))
    # in a process of its own: importing modelopt.torch registers its plugins with transformers
    done = subprocess.run([sys.executable, "-c", MODELOPT_DEQUANTIZE, str(out / "model.safetensors"),
                           str(dense / "model.safetensors")], capture_output=True, text=True)
    assert done.returncode == 0, f"ModelOpt (pip install nvidia-modelopt) failed: {done.stderr[-3000:]}"
    return out, dense


# ModelOpt's own dequantization of each NVFP4 weight (uint8 codes, fp8 block scales, weight_scale_2) in float32;
# the other tensors as stored, less the input scales
MODELOPT_DEQUANTIZE = """
import sys, torch
from safetensors.torch import load_file, save_file
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
stored, out = load_file(sys.argv[1]), {}
for name, tensor in stored.items():
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module + ".weight_scale_2" in stored:
        shape = torch.Size([tensor.shape[0], tensor.shape[1] * 2])
        out[name] = NVFP4QTensor(shape, torch.float32, tensor).dequantize(
            dtype=torch.float32, scale=stored[module + ".weight_scale"],
            double_scale=stored[module + ".weight_scale_2"], block_sizes={-1: 16})
    elif not name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
        out[name] = tensor
save_file(out, sys.argv[2], metadata={"format": "pt"})
"""


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AutoAWQ's pack order (awq/utils/packing_utils.py): column of each nibble


def _awq_pack(codes):
    """[rows, cols] 4-bit codes -> [rows, cols / 8] int32, nibble j of each word holding column AWQ_ORDER[j]."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for j, column in enumerate(AWQ_ORDER):
        words |= codes[:, column::8].to(torch.int64) << (4 * j)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _awq(base, out, group=16):
    """BASE's targeted weights as AutoAWQ GEMM stores them (int4, zero points, groups of GROUP inputs, float16
    scales); the oracle is the package's AutoAWQ converter's reading of it."""
    shutil.copytree(base, out)
    stored = {}
    for name, tensor in load_file(out / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and re.fullmatch(TARGETS[3:], module)):
            stored[name] = tensor
            continue
        w = tensor.T.unflatten(0, (-1, group))                     # [groups, group, out]: AutoAWQ works on W^T
        lo, hi = w.amin(1), w.amax(1)
        scales = ((hi - lo) / 15).clamp(min=1e-5).half()
        zeros = (-lo / scales.float()).round().clamp(0, 15)
        codes = (w / scales.float().unsqueeze(1) + zeros.unsqueeze(1)).round().clamp(0, 15).flatten(0, 1)
        stored |= {f"{module}.qweight": _awq_pack(codes.to(torch.int32)), f"{module}.scales": scales,
                   f"{module}.qzeros": _awq_pack(zeros.to(torch.int32))}
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": ["mlp.gate"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    converter = AutoAWQConverter.from_autoawq_config(config["quantization_config"], targets=[TARGETS])
    return out, _package_dequantized(out, converter, out.with_name(out.name + "-dense"))


def _pack_gptq(codes, bits: int):
    """[K, N] codes -> int32 [K * bits / 32, N]: field j (bits j*bits up) of word [r, n] holds row r * 32 / bits + j
    (GPTQModel's PackableQuantLinear.pack_block, AutoGPTQ's qlinear pack)."""
    per = 32 // bits
    rows, cols = codes.shape
    words = (codes.to(torch.int64).reshape(rows // per, per, cols) << (torch.arange(per).view(1, per, 1) * bits)).sum(1)
    words &= 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _gptq(base, out, bits: int, group: int, fmt: str, dynamic=None, targets: str = TARGETS, act_order=True):
    """BASE's targeted weights as GPTQ stores them: asymmetric codes and zeros packed the GPTQModel way, a
    permuted g_idx (desc_act) where there are groups, float16 scales, v1 zeros (each minus one, by GPTQModel's
    whole-word subtract: int2's first group holds positive weights alone, a zero of 0 that borrows) for "gptq";
    DYNAMIC: (pattern, bits, group) of GPTQModel's per-module override; ACT_ORDER false: g_idx = i // group.
    Returns it and a checkpoint of the values it holds, scale x (code - zero) computed from the codes before they
    were packed: what reading it must give."""
    shutil.copytree(base, out)
    dense = out.with_name(out.name + "-dense")
    shutil.copytree(base, dense)
    stored, values = {}, {}
    generator = torch.Generator().manual_seed(bits)
    for name, tensor in load_file(out / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and re.fullmatch(targets[3:], module)):
            stored[name] = values[name] = tensor
            continue
        b, g = (dynamic[1], dynamic[2]) if dynamic and re.match(dynamic[0], module) else (bits, group)
        maxq = (1 << b) - 1
        w = tensor.T.clone()                                          # [K, N]: GPTQ works on W^T
        inputs = w.shape[0]
        g_idx = torch.randperm(inputs, generator=generator) if act_order else torch.arange(inputs)
        g_idx = g_idx // g if g > 0 else torch.zeros(inputs, dtype=torch.long)
        if b == 2:
            w[g_idx == 0] = w[g_idx == 0].abs()
        groups = int(g_idx.max()) + 1
        lo = torch.stack([w[g_idx == i].amin(0) for i in range(groups)]).clamp(max=0)
        hi = torch.stack([w[g_idx == i].amax(0) for i in range(groups)]).clamp(min=0)
        scales = ((hi - lo) / maxq).clamp(min=1e-5).half()
        zeros = (-lo / scales.float()).round().clamp(0, maxq).to(torch.int64)
        codes = (w / scales.float()[g_idx] + zeros[g_idx]).round().clamp(0, maxq).to(torch.int64)
        packed_zeros = _pack_gptq(zeros.T.contiguous(), b).T.contiguous()
        if fmt == "gptq":   # v1: minus one in every field, by a whole-word subtract (borrowing where a zero is 0)
            sub = (packed_zeros.to(torch.int64) - {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[b]) & 0xFFFFFFFF
            packed_zeros = torch.where(sub >= 1 << 31, sub - (1 << 32), sub).to(torch.int32)
        stored |= {f"{module}.qweight": _pack_gptq(codes, b), f"{module}.qzeros": packed_zeros,
                   f"{module}.scales": scales, f"{module}.g_idx": g_idx.to(torch.int32)}
        # (GPTQModel casts the scales to the model's dtype first: in float32, the product is exact)
        values[name] = ((codes - zeros[g_idx]).float() * scales.float()[g_idx]).T.contiguous()
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    save_file(values, dense / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": False,
                                     "desc_act": group > 0 and act_order, "checkpoint_format": fmt}
    if dynamic:
        config["quantization_config"]["dynamic"] = {"+:" + dynamic[0]: {"bits": dynamic[1], "group_size": dynamic[2]},
                                                    r"-:.*\.mlp\.gate$": {}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, dense


def _modelopt_fp8(base, out):
    """BASE's targeted weights as ModelOpt's FP8 stores them: fp8 e4m3 and a float32 scale per tensor (attention) or
    per row (experts: FP8_PER_CHANNEL_PER_TOKEN), an input_scale per Linear, the kv cache's scheme named; the oracle
    is the package's decompression of the same codes and scales under compressed-tensors' names (a float-quantized
    scheme by tensor or channel)."""
    shutil.copytree(base, out)
    stored, as_compressed = {}, {}
    for name, tensor in load_file(out / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and re.fullmatch(TARGETS[3:], module)):
            stored[name] = as_compressed[name] = tensor
            continue
        per_row = ".experts." in name
        scale = (tensor.abs().amax(1) if per_row else tensor.abs().amax()) / 448
        codes = (tensor / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
        stored |= {name: codes, f"{module}.weight_scale": scale, f"{module}.input_scale": torch.tensor(0.01)}
        as_compressed |= {name: codes, f"{module}.weight_scale": scale[:, None] if per_row else scale.reshape(1)}
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                                     "kv_cache_scheme": {"num_bits": 8, "type": "float", "dynamic": False}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    compressed = out.with_name(out.name + "-ct")
    shutil.copytree(base, compressed)
    save_file(as_compressed, compressed / "model.safetensors", metadata={"format": "pt"})
    held = json.loads((compressed / "config.json").read_text())
    groups = {f"group_{i}": QuantizationScheme(targets=[target], format="float-quantized",
                                               weights=QuantizationArgs(num_bits=8, type="float", strategy=strategy))
              for i, (target, strategy) in enumerate(((r"re:.*experts\.\d+\..*_proj$", "channel"),
                                                      (r"re:.*self_attn\..*_proj$", "tensor")))}
    held["quantization_config"] = QuantizationConfig(config_groups=groups, format="float-quantized",
                                                     quantization_status="compressed",
                                                     ignore=["lm_head"]).model_dump(mode="json")
    held["quantization_config"]["quant_method"] = "compressed-tensors"
    (compressed / "config.json").write_text(json.dumps(held))
    dense = out.with_name(out.name + "-dense")
    convert_checkpoint(compressed, dense, CompressedTensorsDequantizer(compressed, dtype=torch.float32))
    return out, dense


@pytest.mark.parametrize("name", RELEASES)
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


@pytest.mark.parametrize("name", RELEASES)
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
              "mxfp4": "compressed-tensors mxfp4", "modelopt-nvfp4": "modelopt nvfp4", "awq": "awq int4 g16",
              "gptq-int4-g16-act-order": "gptq int4 g16", "gptq-int8-channel-v2": "gptq int8 channel",
              "modelopt-fp8": ["modelopt fp8 channel", "modelopt fp8 tensor"]}
    for name in RELEASES:
        with open_checkpoint(models[name][0]) as ckpt:
            report = inspect_checkpoint(ckpt)
        assert report.params == expected, name
        assert not report.problems, (name, report.problems)
        if name in labels:
            assert report.quantization == (labels[name] if isinstance(labels[name], list) else [labels[name]])


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


def test_overlapping_groups_resolve_as_the_package_does(tmp_path, models):
    """A "Linear" group (int8 W8A8) and an experts regex group (int4 groups, asymmetric): each module gets the group
    compressed-tensors' apply_quantization_config gives it (a name match before a class match), run here on a tree
    of nn.Linear modules named as the checkpoint's; the values are that group's compressor's decompression."""
    base = models["base"][0]
    tensors = load_file(base / "model.safetensors")
    groups = {"group_0": QuantizationScheme(targets=["Linear"], format="int-quantized",
                                            weights=QuantizationArgs(num_bits=8, type="int", strategy="channel"),
                                            input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token",
                                                                               dynamic=True)),
              "group_1": QuantizationScheme(targets=[r"re:.*mlp\.experts\..*"], format="pack-quantized",
                                            weights=QuantizationArgs(num_bits=4, type="int", strategy="group",
                                                                     group_size=16, symmetric=False))}
    config = QuantizationConfig(config_groups=groups, ignore=["lm_head", r"re:.*mlp\.gate$"],
                                quantization_status="compressed")
    tree = torch.nn.Module()
    modules = [n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight") and t.ndim == 2
               and re.fullmatch(TARGETS[3:], n.removesuffix(".weight"))]
    for module in modules:
        parent = tree
        for part in module.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(module.rsplit(".", 1)[1], torch.nn.Linear(1, 1, bias=False))
    apply_quantization_config(tree, config)
    stored, expected = dict(tensors), {}
    for module in modules:
        scheme = tree.get_submodule(module).quantization_scheme
        args = scheme.weights
        weight = stored.pop(module + ".weight")
        scale, zero_point = calculate_qparams(*_observed(weight, args), args)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        compressed = compressor.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point},
                                         scheme)
        stored |= {f"{module}.{k}": v.contiguous() for k, v in compressed.items()}
        expected[module + ".weight"] = compressor.decompress(compressed, scheme)["weight"]
    assert {tree.get_submodule(m).quantization_scheme.format for m in modules} == {"int-quantized", "pack-quantized"}
    source = tmp_path / "mixed"
    shutil.copytree(base, source)
    save_file(stored, source / "model.safetensors", metadata={"format": "pt"})
    held = json.loads((source / "config.json").read_text())
    held["quantization_config"] = config.model_dump(mode="json") | {"quant_method": "compressed-tensors"}
    (source / "config.json").write_text(json.dumps(held))
    with open_checkpoint(source) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
        assert inspect_checkpoint(ckpt).params == inspect_checkpoint(open_checkpoint(base)).params
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for key, value in expected.items():
        assert torch.equal(ours[key], value.float()), key


def test_formats_it_does_not_read_are_named_not_guessed(tmp_path, models):
    source = tmp_path / "mxfp8"
    shutil.copytree(models["fp8-tensor"][0], source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["format"] = config["quantization_config"]["config_groups"]["group_0"]["format"] = \
        "mxfp8-quantized"
    (source / "config.json").write_text(json.dumps(config))
    _refused(source, tmp_path / "out", "mxfp8-quantized", said="mxfp8-quantized")


def test_static_activation_and_kv_cache_scales_are_dropped(tmp_path, models):
    """Static fp8 input scales and kv-cache scales beside the fp8 weights: read past, said, the weights unchanged."""
    source = tmp_path / "static"
    shutil.copytree(models["fp8-tensor"][0], source)
    tensors = load_file(source / "model.safetensors")
    for name in list(tensors):
        if name.endswith(".weight_scale"):
            tensors[name.removesuffix(".weight_scale") + ".input_scale"] = torch.tensor([0.02])
        if name.endswith(("k_proj.weight_scale", "v_proj.weight_scale")):
            tensors[name.removesuffix("_proj.weight_scale") + "_scale"] = torch.tensor(0.5)   # self_attn.k_scale
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False, "symmetric": True}
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    (source / "config.json").write_text(json.dumps(config))
    with open_checkpoint(source) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
        assert not inspect_checkpoint(ckpt).problems
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == \
        load_file(models["fp8-tensor"][1] / "model.safetensors").keys()
    with open_checkpoint(source) as ckpt:
        assert "fp8 tensor static; kv cache fp8 tensor static" in \
            released.activation_note(ckpt.config, ckpt.tensors)


def test_served_activation_quantization_is_said(models):
    """eval's and profile's reports say that the activations a checkpoint quantizes when served ran unquantized."""
    from moetool.ops.profile import ProfileOptions, profile

    for name, said in (("fp8-channel-dynamic", True), ("fp8-tensor", False)):
        source, dense = models[name]
        with open_checkpoint(source) as ckpt, open_checkpoint(dense) as ref:
            evaluated = evaluate(ckpt, EvalOptions(token_ids=models["ids"], seq_len=16, mode="streamed", device="cpu"),
                                 ref)
            profiled = profile(ckpt, ProfileOptions(token_ids=models["ids"], seq_len=16, mode="streamed", device="cpu"))
        note = "quantizes activations when served (fp8 token dynamic)"
        assert any(note in w for w in evaluated.warnings) == said
        assert any(note in n for n in profiled.notes) == said
        assert not any("activations" in w for w in evaluated.warnings if w.startswith(str(dense)))


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


def _refused(source, out, words: str, said: str | None = None) -> None:
    """SOURCE's quantization is one moetool cannot read: inspect warns (unreadable_quantization, its message holding
    SAID), convert --dequantize refuses (UnsupportedError matching WORDS) and writes nothing at OUT."""
    with open_checkpoint(source) as ckpt:
        problems = inspect_checkpoint(ckpt).problems
        assert [p.code for p in problems] == ["unreadable_quantization"]
        assert said is None or said in problems[0].message
        with pytest.raises(UnsupportedError, match=words):
            convert(ckpt, out, ConvertOptions(dequantize=True))
    assert not out.exists()


def _rewritten(tmp_path, source, name, config_change=None, drop=()):
    """A copy of SOURCE named NAME, its quantization_config updated by CONFIG_CHANGE, the tensors ending in DROP
    left out."""
    out = tmp_path / name
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] |= config_change or {}
    (out / "config.json").write_text(json.dumps(config))
    if drop:
        kept = {k: v for k, v in load_file(out / "model.safetensors").items() if not k.endswith(drop)}
        save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_unpacked_zero_points_are_refused_not_misread(tmp_path, models):
    """compressed-tensors before 0.10 stored pack-quantized zero points unpacked (int8 [rows, groups]): refused with
    their form named, not broadcast into wrong values."""
    source = tmp_path / "old-zeros"
    shutil.copytree(models["int4-g16-asym"][0], source)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.0.mlp.experts.0.down_proj.weight_zero_point"
    rows, groups = tensors[name.removesuffix("zero_point") + "scale"].shape
    tensors[name] = torch.zeros(rows, groups, dtype=torch.int8)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(source) as ckpt:
        with pytest.raises(CheckpointFormatError, match="weight_zero_point torch.int8"):
            convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True))
    assert not (tmp_path / "out").exists()


def test_modelopt_w4a16_nvfp4_and_its_other_spelling_are_read(tmp_path, models):
    """quant_method "modelopt_fp4" (vLLM takes any "modelopt..."), quant_algo W4A16_NVFP4 (NVFP4's tensors without
    input scales): read as NVFP4 is, to ModelOpt's own values."""
    source, dense = models["modelopt-nvfp4"]
    w4a16 = _rewritten(tmp_path, source, "w4a16", {"quant_method": "modelopt_fp4", "quant_algo": "W4A16_NVFP4"},
                       drop=(".input_scale",))
    with open_checkpoint(w4a16) as ckpt:
        report = inspect_checkpoint(ckpt)
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
    assert report.problems == [] and "modelopt nvfp4" in " ".join(report.quantization)
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(dense / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_modelopt_forms_it_cannot_read_are_named(tmp_path, models):
    """An algorithm not read is named as such (not taken for AWQ); fp8 scales are told apart by their shape, so
    block scales holding as many values as the weight has rows are refused, not applied per row."""
    source, _ = models["modelopt-nvfp4"]
    with open_checkpoint(_rewritten(tmp_path, source, "w4a8", {"quant_algo": "W4A8_NVFP4_FP8"})) as ckpt:
        problems = inspect_checkpoint(ckpt).problems
        assert [p.code for p in problems] == ["unreadable_quantization"]
        assert "W4A8_NVFP4_FP8 checkpoints are not read" in problems[0].message and "AWQ" not in problems[0].message
    fp8 = tmp_path / "fp8-blocks"
    shutil.copytree(models["modelopt-fp8"][0], fp8)
    tensors = load_file(fp8 / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"   # [64, 64]: 64 scales, as blocks [8, 8] would be
    rows = tensors[name].shape[0]
    tensors[name.removesuffix("weight") + "weight_scale"] = torch.ones(8, rows // 8)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    _refused(fp8, tmp_path / "out", "per tensor or per row", said="[8, 8]")


@pytest.mark.parametrize("name", ["fp8-channel-dynamic", "modelopt-nvfp4", "awq", "gptq-int2-g16"])
def test_quantize_refuses_them(tmp_path, models, name):
    method = json.loads((models[name][0] / "config.json").read_text())["quantization_config"]["quant_method"]
    with open_checkpoint(models[name][0]) as ckpt:
        with pytest.raises(UnsupportedError, match=f"quantized \\({method}"):
            quantize(ckpt, tmp_path / "q", QuantizeOptions())
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("name, said", [("modelopt-nvfp4", "(nvfp4 inputs, static scales)"),
                                        ("modelopt-fp8", "(mixed_precision inputs, static scales; kv cache fp8)")])
def test_modelopt_activation_scales_are_said(models, name, said):
    """(The dequantized checkpoint holds none of them: test_dequantized_weights_are_the_packages compares names.)"""
    source, _ = models[name]
    assert any(name.endswith(".input_scale") for name in load_file(source / "model.safetensors"))
    with open_checkpoint(source) as ckpt:
        assert f"quantizes activations when served {said}" in released.activation_note(ckpt.config, ckpt.tensors)


def test_awq_zero_points_are_read_wherever_stored(tmp_path, models):
    """GPTQModel's AWQ writes qzeros even for zero_point false: read, not refused."""
    source = tmp_path / "awq"
    shutil.copytree(models["awq"][0], source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["zero_point"] = False
    (source / "config.json").write_text(json.dumps(config))
    for path, out in ((source, tmp_path / "a"), (models["awq"][0], tmp_path / "b")):
        with open_checkpoint(path) as ckpt:
            convert(ckpt, out, ConvertOptions(dequantize=True, dtype="fp32"))
    ours, theirs = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("name, scales", [("gptq-int4-g16-act-order", ".scales"), ("awq", ".scales"),
                                          ("nvfp4", ".weight_global_scale")])
def test_a_dtype_change_leaves_quantized_weights_as_they_are(tmp_path, models, name, scales):
    """convert --dtype without --dequantize casts the float weights, not the quantized ones' scales."""
    source = models[name][0]
    with open_checkpoint(source) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dtype="bf16"))
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    held = [k for k in before if k.endswith(scales)]
    assert held and all(torch.equal(after[k], before[k]) for k in held)
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_gptq_without_g_idx_groups_inputs_in_order(tmp_path, models):
    """Without act-order, a g_idx left out is input i // group_size (what GPTQModel and AutoGPTQ store); with
    act-order (desc_act) and no g_idx the order is unknown: refused."""
    source, dense = _gptq(models["base"][0], tmp_path / "in-order", 4, 16, "gptq", act_order=False)
    tensors = load_file(source / "model.safetensors")
    assert any(k.endswith(".g_idx") for k in tensors)
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, source / "model.safetensors",
              metadata={"format": "pt"})
    with open_checkpoint(source) as ckpt:
        assert inspect_checkpoint(ckpt).problems == []
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(dense / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
    _refused(_rewritten(tmp_path, source, "unordered", {"desc_act": True}), tmp_path / "out2", "no g_idx")
    # one group (per channel): every input is in it, whatever the order
    channel, dense = models["gptq-int8-channel-v2"]
    channel = _rewritten(tmp_path, channel, "channel", {"desc_act": True}, drop=(".g_idx",))
    with open_checkpoint(channel) as ckpt:
        assert inspect_checkpoint(ckpt).problems == []
        convert(ckpt, tmp_path / "out3", ConvertOptions(dequantize=True, dtype="fp32"))
    ours, theirs = load_file(tmp_path / "out3" / "model.safetensors"), load_file(dense / "model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("change, words", [({"checkpoint_format": "gptq_p"}, "gptq_p layout"),
                                           ({"bits": 3}, "int3"), ({"rotation": "hadamard"}, "hadamard rotation"),
                                           ({"dynamic": {r"+:.*experts\.1\.": {"bits": 3}}}, "int3")])
def test_gptq_it_cannot_read_is_refused(tmp_path, models, change, words):
    _refused(_rewritten(tmp_path, models["gptq-int4-g16-act-order"][0], "gptq", change), tmp_path / "out", words)


def _described_beside(tmp_path, models):
    """The GPTQ release with its quantization described in quantize_config.json, not config.json (AutoGPTQ's older
    releases)."""
    source = tmp_path / "gptq"
    shutil.copytree(models["gptq-int4-g16-act-order"][0], source)
    config = json.loads((source / "config.json").read_text())
    described = config.pop("quantization_config")
    described.pop("quant_method")
    (source / "config.json").write_text(json.dumps(config))
    (source / "quantize_config.json").write_text(json.dumps(described))
    return source


def test_quantization_described_beside_config_json(tmp_path, models):
    """AutoGPTQ's older releases describe it in quantize_config.json alone: read as transformers reads it; with no
    description at all, the packed weights are named and refused, not loaded as missing."""
    source = _described_beside(tmp_path, models)
    for path, out in ((source, tmp_path / "a"), (models["gptq-int4-g16-act-order"][0], tmp_path / "b")):
        with open_checkpoint(path) as ckpt:
            convert(ckpt, out, ConvertOptions(dequantize=True, dtype="fp32"))
    ours, theirs = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
    (source / "quantize_config.json").unlink()
    with open_checkpoint(source) as ckpt:
        assert inspect_checkpoint(ckpt).quantization == ["packed int32 (X.qweight; no quantization_config)"]
        with pytest.raises(UnsupportedError, match="stored packed"):
            load_model(ckpt, device="cpu", dtype=torch.float32, mode="full")


def test_packed_weights_of_a_method_not_read_are_named(tmp_path, models):
    """Packed X.qweight under a quant_method moetool does not read (BitBLAS's "bitblas"): inspect names the
    method and warns, runs refuse naming it (not "no quantization_config")."""
    source = _rewritten(tmp_path, models["gptq-int4-g16-act-order"][0], "bitblas", {"quant_method": "bitblas"})
    with open_checkpoint(source) as ckpt:
        report = inspect_checkpoint(ckpt)
        assert report.quantization == ["packed int32 (X.qweight; quant_method bitblas)"]
        assert [p.code for p in report.problems] == ["unreadable_quantization"]
        with pytest.raises(UnsupportedError, match="quant_method 'bitblas'"):
            load_model(ckpt, device="cpu", dtype=torch.float32, mode="full")


def test_side_description_read_from_the_hub_too(tmp_path, models, monkeypatch):
    """inspect of a hub id (headers only, nothing cached) fetches quantize_config.json too, where config.json
    describes no quantization: the release is counted as the same files in a folder are."""
    from tests.test_checkpoint import fake_hub

    source = _described_beside(tmp_path, models)
    calls = []
    fake_hub(monkeypatch, source, calls)
    with open_checkpoint("acme/moe-gptq", headers_only=True) as ckpt:
        remote = inspect_checkpoint(ckpt)
    assert [c[2] for c in calls if c[0] == "download"] == ["config.json", "quantize_config.json"]
    with open_checkpoint(models["gptq-int4-g16-act-order"][0]) as ckpt:
        local = inspect_checkpoint(ckpt)
    assert remote.kind == "hub-headers" and remote.problems == []
    assert (remote.quantization, remote.total_params) == (local.quantization, local.total_params)
    assert "gptq" in " ".join(remote.quantization)


@pytest.mark.parametrize("name", ["fp8-channel-dynamic", "nvfp4", "int4-g16-asym", "modelopt-nvfp4", "awq",
                                  "gptq-int4-g16-act-order"])
@pytest.mark.parametrize("criterion", ["frequency", "reap"])
def test_pruning_a_release_equals_pruning_it_dequantized(tmp_path, models, name, criterion):
    """prune copies the kept experts' codes and scales as they are (renumbered), choosing them on the weights
    dequantized: the pruned release, dequantized, is the dequantized release pruned."""
    from moetool.ops.profile import ProfileOptions

    source, dense = models[name]
    options = PruneOptions(keep=2, criterion=criterion,
                           calibration=ProfileOptions(token_ids=models["ids"], seq_len=16, dtype="fp32", device="cpu"))
    with open_checkpoint(source) as ckpt:
        ours = prune(ckpt, tmp_path / "pruned", options)
    with open_checkpoint(dense) as ckpt:
        theirs = prune(ckpt, tmp_path / "dense-pruned", options)
    assert ours.kept == theirs.kept and ours.params_removed == theirs.params_removed
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((source / "config.json").read_text())["quantization_config"]
    with open_checkpoint(tmp_path / "pruned") as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype="fp32"))
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "dense-pruned" /
                                                                              "model.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_pruning_a_release_refuses_what_it_cannot_copy(tmp_path, models):
    with open_checkpoint(models["awq"][0]) as ckpt:
        with pytest.raises(UnsupportedError, match="--merge"):
            prune(ckpt, tmp_path / "p", PruneOptions(keep=2, merge=True))
    for dynamic in ({r"+:.*\.experts\.1\.": {"bits": 8, "group_size": 32}},      # an expert by number
                    {r"+:.*\.experts\.(1)\.": {"bits": 8, "group_size": 32}},    # the forms a digit check misses
                    {r"+:.*\.experts\.[1]\.": {"bits": 8, "group_size": 32}}):
        source = tmp_path / "numbered"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(models["gptq-int4-dynamic"][0], source)
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"]["dynamic"] = dynamic
        (source / "config.json").write_text(json.dumps(config))
        with open_checkpoint(source) as ckpt, pytest.raises(UnsupportedError, match="renumbers"):
            prune(ckpt, tmp_path / "p", PruneOptions(experts={0: [0, 2], 1: [0, 2]}))
    assert not (tmp_path / "p").exists()


def test_pruning_a_release_keeps_what_follows_its_experts(tmp_path, models):
    """A list naming every expert alike (optimum's modules_in_block_to_quantize, as Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4
    ships it) still names the kept ones after renumbering: pruned, not refused. Activation scales go with their
    expert (input_global_scale: each kept expert's own, renumbered; the removed ones' dropped)."""
    source = tmp_path / "listed"
    shutil.copytree(models["gptq-int4-g16-act-order"][0], source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["modules_in_block_to_quantize"] = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")],
        [f"mlp.experts.{e}.down_proj" for e in range(4)]]
    (source / "config.json").write_text(json.dumps(config))
    with open_checkpoint(source) as ckpt:
        assert prune(ckpt, tmp_path / "p", PruneOptions(experts={0: [1, 3], 1: [0, 2]})).kept == {0: [1, 3],
                                                                                                    1: [0, 2]}
    nvfp4 = tmp_path / "nvfp4"
    shutil.copytree(models["nvfp4"][0], nvfp4)
    tensors = load_file(nvfp4 / "model.safetensors")
    marks = {}
    for name in [n for n in tensors if n.endswith(".weight_global_scale")]:
        module = name.removesuffix(".weight_global_scale")
        expert = re.search(r"experts\.(\d+)\.", module)
        tensors[module + ".input_global_scale"] = torch.tensor([100.0 + int(expert.group(1)) if expert else 1.0])
        marks[module] = tensors[module + ".input_global_scale"]
    save_file(tensors, nvfp4 / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(nvfp4) as ckpt:
        prune(ckpt, tmp_path / "q", PruneOptions(experts={0: [1, 3], 1: [0, 2]}))
    pruned = load_file(tmp_path / "q" / "model.safetensors")
    scales = {n: float(t) for n, t in pruned.items() if n.endswith(".input_global_scale") and ".experts." in n}
    assert scales == {f"model.layers.{layer}.mlp.experts.{new}.{p}.input_global_scale": 100.0 + old
                      for layer, kept in ((0, [1, 3]), (1, [0, 2])) for new, old in enumerate(kept)
                      for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_other_families_read_alike(tmp_path, family):
    """GPTQ and compressed-tensors fp8 experts of families with other names (Mixtral's block_sparse_moe w1/w2/w3),
    shared experts and dense layers (DeepSeek-V3, Qwen2-MoE): dequantized exactly, and run as transformers runs the
    weights they hold."""
    from tests.tiny import save_tiny

    base = save_tiny(family, tmp_path / "base")
    experts = r"re:.*experts\.\d+\.[^.]+$"
    for name, (source, dense) in (("gptq", _gptq(base, tmp_path / "gptq", 4, 16, "gptq", targets=experts)),
                                  ("fp8", _fp8_family(base, tmp_path / "fp8", experts))):
        assert any(n.endswith((".qweight", ".weight_scale")) for n in load_file(source / "model.safetensors"))
        with open_checkpoint(source) as ckpt:
            convert(ckpt, tmp_path / f"{name}-out", ConvertOptions(dequantize=True, dtype="fp32"))
            assert inspect_checkpoint(ckpt).total_params == json.loads((base / "expected.json").read_text())["params"]
        got, want = load_file(tmp_path / f"{name}-out" / "model.safetensors"), load_file(dense / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], v.float()) for k, v in want.items()), name
        reference = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        with torch.no_grad(), open_checkpoint(source) as ckpt:
            logits = load_model(ckpt, device="cpu", dtype=torch.float32, mode="full").model(IDS).logits
            assert torch.allclose(logits, reference(IDS).logits, rtol=0, atol=1e-5), name


def _fp8_family(base, out, targets):
    compressed = _compressed(base, out, "fp8-channel-dynamic", targets)
    dense = out.with_name(out.name + "-dense")
    convert_checkpoint(compressed, dense, CompressedTensorsDequantizer(compressed, dtype=torch.float32))
    return compressed, dense


def test_cli(tmp_path, models):
    """The commands on a release: inspect names it, eval says what it does not reproduce, convert dequantizes it."""
    import subprocess
    import sys

    source, dense = models["fp8-channel-dynamic"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moetool", *map(str, args)], capture_output=True, text=True)

    inspected = cli("inspect", source, "--json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["quantization"] == [
        "compressed-tensors fp8 channel, activations fp8 token dynamic"]
    evaluated = cli("eval", source, "--reference", dense, "--token-ids", models["ids"], "--seq-len", 16)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "warning" in evaluated.stdout and "quantizes activations when served" in evaluated.stdout
    converted = cli("convert", source, tmp_path / "out", "--dequantize", "--json")
    assert converted.returncode == 0, converted.stderr
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
