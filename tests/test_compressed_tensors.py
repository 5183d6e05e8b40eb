"""`moetool quantize --layout compressed-tensors`: checkpoints in compressed-tensors' pack-quantized
format, checked against the compressed-tensors package itself (its packing, its config parsing, its
decompression), loaded through stock loaders, and read back by moetool.load_model."""

import json
import re
import subprocess
import sys
from itertools import product

import pytest
import torch
import transformers
from safetensors import safe_open

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.quantize import QuantizeOptions, quantize
from moetool.quant import compressed_tensors as ct

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert import convert_checkpoint  # noqa: E402
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

CT = "compressed-tensors"
IDS = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))


def _scheme(fmt):
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct.scheme_weights(fmt)),
                              format=ct.PACK_FORMAT)


def _state(parts):
    """compressed-tensors' per-module names of a weight's stored tensors."""
    return {"weight" + suffix: tensor for suffix, tensor in parts.items()}


@pytest.mark.parametrize("bits,sym,group", list(product((4, 8), (True, False), (8, 32))))
def test_packing_and_decompression_are_the_packages(bits, sym, group):
    """Our tensors are what the package's own compress writes for the same weight, scale and zero
    point, and its decompress gives exactly our dequantized values, in every scale dtype."""
    fmt = ct.compressed_format(f"int{bits}-g{group}-{'sym' if sym else 'asym'}")
    gen = torch.Generator().manual_seed(bits * group + sym)
    w = torch.randn(36, 64, generator=gen) * torch.rand(36, 1, generator=gen)   # 36 rows: zero points padded
    parts = fmt.quantize(w)
    assert [(s, tuple(t.shape)) for s, t in parts.items()] == [(s, shape) for s, _, shape in fmt.components(
        (36, 64), "F32")]
    dense = fmt.dequantize(parts, (36, 64), torch.float32)
    state = {"weight": dense, "weight_scale": parts[ct.SCALE]}
    if not sym:   # moetool's unsigned zeros, in the package's signed convention
        state["weight_zero_point"] = (fmt.base.quantize(w)[".zeros"].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, _scheme(fmt))
    assert set(packed) == {"weight" + s for s in fmt.suffixes}
    for key, tensor in packed.items():
        assert torch.equal(tensor, _state(parts)[key]), key
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        parts = fmt.quantize(w.to(dtype))
        assert parts[ct.SCALE].dtype == dtype   # the package's convention: scales in the weight's dtype
        theirs = PackedQuantizationCompressor.decompress(_state(parts), _scheme(fmt))["weight"]
        assert theirs.dtype == dtype and torch.equal(fmt.dequantize(parts, (36, 64), dtype), theirs)


@pytest.mark.parametrize("spec", ["int4-g32-sym", "int8-g16-asym"])
def test_gptq_results_convert_unchanged(spec):
    """GPTQ returns moetool's parts; written in this layout they decompress, by the package, to
    exactly the weights GPTQ chose (float32 scales hold moetool's float16 ones exactly)."""
    from moetool.quant.gptq import gptq

    fmt = ct.compressed_format(spec)
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 64, generator=gen), torch.randn(256, 64, generator=gen)
    got = gptq(w, x.T @ x, fmt.base)
    parts = fmt.from_parts(got.parts, torch.float32)
    theirs = PackedQuantizationCompressor.decompress(_state(parts), _scheme(fmt))["weight"]
    assert torch.equal(theirs, got.weight) and torch.equal(fmt.dequantize(parts, (24, 64), torch.float32), theirs)


def _write(tmp_path, source, name="q", **options):
    out = tmp_path / name
    with open_checkpoint(source) as ckpt:
        report = quantize(ckpt, out, QuantizeOptions(layout=CT, **options))
    return out, report


def _package_weights(path, dtype):
    """Every quantized weight as the package's own model-free dequantizer gives it."""
    tensors = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    packed = {k.removesuffix("_packed") for k in tensors if k.endswith(".weight_packed")}
    dense = CompressedTensorsDequantizer(path, dtype=dtype).validate(tensors)
    return {name: dense[name] for name in packed}


def _assert_exact(path, dtype):
    """moetool.load_model holds exactly the package's decompressed values, for every weight."""
    model = moetool.load_model(path, dtype=dtype)
    ours = {m.name: m.dequantize(dtype) for m in model.modules() if type(m).__name__ == "QuantizedWeight"}
    theirs = _package_weights(path, dtype)
    assert set(ours) == set(theirs) and theirs
    for name, weight in theirs.items():
        assert torch.equal(ours[name], weight), name
    return model


@pytest.mark.parametrize("spec", ["int4-g8-sym", "int4-g16-asym", "int8-g16-sym", "int8-g8-asym"])
def test_mixtral_checkpoint_decompresses_exactly(tmp_path, tiny, spec):
    out, report = _write(tmp_path, tiny("mixtral"), format=spec)
    assert report.formats == {spec: len(report.experts)}
    _assert_exact(out, torch.float32)


def test_tiny_moe_with_rules_decompresses_exactly_and_inspects_clean(tmp_path):
    out, report = _write(tmp_path, "builtin:tiny-moe", format="int8-g128-asym", rules=("attention=int4-g32-sym",))
    assert report.formats == {"int8-g128-asym": 32} and len(report.rule_tensors) == 16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["num_bits"] for g in qc["config_groups"].values()] == [8, 4]   # experts' group first
    assert any("transformers 5" in w for w in report.warnings)   # asymmetric experts: not for transformers
    _assert_exact(out, torch.bfloat16)
    with open_checkpoint(out) as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == []


def test_config_is_what_the_package_writes(tmp_path):
    """QuantizationConfig parses our quantization_config, and serializes it back the way
    ModelCompressor.update_config writes it."""
    out, _ = _write(tmp_path, "builtin:tiny-moe", format="int4-g128-asym", rules=("attention=int4-g128-asym",))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert {"version": qc["version"], "quant_method": CT, "sparsity_config": {}, "transform_config": {},
            **parsed.model_dump(exclude=["quant_method"])} == qc
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 1
    assert "lm_head" in qc["ignore"] and any("mlp\\.gate$" in i for i in qc["ignore"])


def test_stock_loaders_match_moetool(tmp_path):
    """Two stock paths load these checkpoints on CPU; both give moetool.load_model's logits.

    * transformers 5.24 (AutoModelForCausalLM + CompressedTensorsConfig(dequantize=True)): one
      symmetric expert scheme only (its MoE dequantizer drops zero points and takes the first
      experts' group for every layer); it keeps the experts in the scale dtype, hence .float().
    * compressed-tensors' own model-free loader (convert_checkpoint with CompressedTensorsDequantizer),
      then transformers on the dense result: any scheme mix, here asymmetric int4 and int8."""
    sym, _ = _write(tmp_path, "builtin:tiny-moe", "sym", format="int4-g32-sym")
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    stock = transformers.AutoModelForCausalLM.from_pretrained(
        sym, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).float()
    with torch.no_grad():
        want, got = stock(ids).logits, moetool.load_model(sym)(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

    mixed, _ = _write(tmp_path, "builtin:tiny-moe", "mixed", format="int4-g64-asym", rules=("attention=int8-g32-asym",))
    convert_checkpoint(mixed, tmp_path / "dense", CompressedTensorsDequantizer(mixed, dtype=torch.float32),
                       max_workers=1)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        want, got = dense(ids).logits, moetool.load_model(mixed)(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with open_checkpoint("builtin:tiny-moe") as ckpt:   # quantization changed the model
        original = transformers.AutoModelForCausalLM.from_pretrained(ckpt.root, dtype=torch.float32)
    with torch.no_grad():
        assert (original(ids).logits - want).abs().max() > 1e-3


def _vllm_scheme(qc, module):
    """The config group vLLM gives MODULE: None if ignored, else the first group with a matching target."""
    def match(name, target):
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    if any(match(module, t) for t in qc["ignore"]):
        return None
    return next((k for k, g in qc["config_groups"].items() if any(match(module, t) for t in g["targets"])), "none")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_names_and_groups_follow_vllms_loader(tmp_path, tiny, family):
    """Checked as vLLM's compressed-tensors loader looks them up (vllm-project/vllm, read at commit
    0043d6b52fdafbbed46c819125a2d582a148e121):

    * vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/
      compressed_tensors_moe.py, `CompressedTensorsMoEMethod.get_moe_method`: an MoE layer's scheme
      is the one of `<experts prefix>.0.gate_proj`, `.0.up_proj` and `.0.down_proj` (those names
      whatever the family calls its projections: Mixtral's are w1/w3/w2); the three must be equal
      ("All MoE projections need to have same quantization scheme"), the format pack-quantized and
      num_bits in WNA16_SUPPORTED_BITS (4, 8). So one scheme per MoE layer.
    * .../compressed_tensors_moe/compressed_tensors_moe_wna16_marlin.py,
      `CompressedTensorsWNA16MarlinMoEMethod.create_weights`: per layer w13_/w2_ `weight_packed`
      (int32, 32 // num_bits codes a word), `weight_scale` (the model dtype, one per group),
      `weight_zero_point` (int32, packed along the output dimension; asymmetric only) and
      `weight_shape`, filled from the per-expert tensors `...experts.{E}.<proj>.weight_packed`, ...
    * vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py,
      `CompressedTensorsConfig.get_scheme_dict`, with utils.py `should_ignore_layer` and
      `find_matched_target`: a module in `ignore` stays unquantized, any other takes the first
      target that equals its name or whose `re:` pattern matches (re.match) from its start."""
    out, report = _write(tmp_path, tiny(family), bits_budget=9, policy="uniform",
                         candidates="int4-g16-sym,int8-g16-sym", rules=("attention=int8-g16-sym",))
    assert len(report.formats) == 2   # fp32 scales: 6.25 and 10.25 bits; one layer each
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    with open_checkpoint(out) as ckpt:
        shapes = {name: ref.shape for name, ref in ckpt.tensors.items()}
    names = list(shapes)
    layers = {e.layer: e.format for e in report.experts}
    group_format = {k: f"int{g['weights']['num_bits']}-g{g['weights']['group_size']}-sym"
                    for k, g in qc["config_groups"].items()}
    for name in names:
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            assert group_format[_vllm_scheme(qc, module)] in ("int8-g16-sym", *layers.values())
        elif name.endswith(".weight") and len(shapes[name]) == 2:
            assert _vllm_scheme(qc, name.removesuffix(".weight")) is None, name   # unquantized: ignored
    prefixes = {re.sub(r"\.\d+\.[^.]+\.weight_packed$", "", n) for n in names if ".experts." in n
                and n.endswith(".weight_packed")}
    assert len(prefixes) == len(layers)
    for prefix in prefixes:   # what get_moe_method asks
        found = {_vllm_scheme(qc, f"{prefix}.0.{proj}") for proj in ("gate_proj", "up_proj", "down_proj")}
        assert len(found) == 1 and group_format[found.pop()] == layers[int(re.search(r"\.(\d+)\.", prefix)[1])]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_budget_is_one_format_per_moe_layer(tmp_path, method):
    """With GPTQ too: each layer's candidates weighed by their GPTQ errors summed over its experts."""
    from moetool.ops.profile import ProfileOptions

    gptq = dict(method="gptq", calibration=ProfileOptions(max_tokens=2048, seq_len=128)) if method == "gptq" else {}
    out, report = _write(tmp_path, "builtin:tiny-moe", bits_budget=6.0, policy="uniform", **gptq)
    assert report.expert_bits <= 6.0 and len(report.formats) == 2
    for layer in range(4):
        assert len({e.format for e in report.experts if e.layer == layer}) == 1
    assert any("one scheme per MoE layer" in w for w in report.warnings)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    _assert_exact(out, torch.bfloat16)


def test_formats_it_cannot_hold_are_refused(tmp_path, tiny):
    proc = subprocess.run([sys.executable, "-m", "moetool", "quantize", "builtin:tiny-moe", str(tmp_path / "q"),
                           "--layout", CT, "--format", "nf4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "int4 and int8" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for options in (dict(format="int3-g32-sym"), dict(format="bnb8-b64"), dict(format="fp4"),
                    dict(bits_budget=4.5, candidates="int4-g32-sym,int2-g64-asym"),
                    dict(format="int4-g32-sym", rules=("attention=nf4",))):
        with open_checkpoint("builtin:tiny-moe") as ckpt, pytest.raises(UsageError, match="int4 and int8"):
            quantize(ckpt, tmp_path / "q", QuantizeOptions(layout=CT, **options))
    with open_checkpoint(tiny("granitemoe")) as ckpt, pytest.raises(UnsupportedError, match="stacked"):
        quantize(ckpt, tmp_path / "q", QuantizeOptions(layout=CT, format="int4-g8-sym"))
    assert not (tmp_path / "q").exists()


def test_integers_default_to_symmetric_and_asymmetric_experts_are_flagged_for_vllm(tmp_path):
    """vLLM's WNA16 MoE methods (vllm/model_executor/layers/quantization/compressed_tensors/
    compressed_tensors_moe.py: CompressedTensorsWNA16MarlinMoEMethod and CompressedTensorsWNA16MoEMethod
    both `assert weight_quant.symmetric`) serve symmetric experts only: in this layout an integer
    format without -sym/-asym is symmetric, and asymmetric experts get a warning that vLLM cannot serve them."""
    out, report = _write(tmp_path, "builtin:tiny-moe", format="int4-g32", rules=("attention=int8",))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["symmetric"] for g in qc["config_groups"].values()] == [True, True]
    assert report.formats == {"int4-g32-sym": 32} and not any("vLLM cannot" in w for w in report.warnings)
    _, report = _write(tmp_path, "builtin:tiny-moe", "a", format="int4-g32-asym")
    assert report.formats == {"int4-g32-asym": 32} and any("vLLM cannot serve" in w for w in report.warnings)
    _, report = _write(tmp_path, "builtin:tiny-moe", "b", bits_budget=5.0, candidates="int4-g32,int8-g32")
    assert set(report.formats) <= {"int4-g32-sym", "int8-g32-sym"}
    assert QuantizeOptions(format="int4").format == "int4"   # other layouts keep their own default (asym below 8 bits)


def test_convert_dequantize_and_streamed_runs_read_the_layout(tmp_path):
    """The tensor plan reads compressed-tensors weights dequantized: `convert --dequantize` gives the
    values moetool.load_model holds, and a streamed eval equals a full one."""
    from moetool.ops.convert import ConvertOptions, convert
    from moetool.ops.evaluate import EvalOptions, evaluate

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g32-asym", layout="compressed-tensors"))
    with open_checkpoint(tmp_path / "q") as ckpt:
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True))
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized, dense = moetool.load_model(tmp_path / "q"), moetool.load_model(tmp_path / "d")
        # quantized experts run transformers' eager experts forward (each expert dequantized as it is read):
        # the dense model on the same path computes the same sums, bit for bit
        dense.set_experts_implementation("eager")
        assert torch.equal(quantized(ids).logits, dense(ids).logits)
    token_file = tmp_path / "ids.json"
    ids = torch.randint(0, 2048, (256,), generator=torch.Generator().manual_seed(1))
    token_file.write_text(json.dumps(ids.tolist()))
    reports = []
    for mode in ("full", "streamed"):
        with open_checkpoint(tmp_path / "q") as ckpt, open_checkpoint("builtin:tiny-moe") as ref:
            reports.append(evaluate(ckpt, EvalOptions(token_ids=token_file, seq_len=64, mode=mode), reference=ref))
    assert reports[0].kl_mean > 0 and reports[0].kl_mean == pytest.approx(reports[1].kl_mean, rel=1e-5)


@pytest.mark.parametrize("spec", ["int8-g32-sym", "int8-g16-asym", "int4-g32-sym"])
def test_bf16_weights_are_rounded_on_the_stored_grid(spec):
    """A bf16 weight's scales are stored in bf16: its codes must be the nearest ones on that stored
    grid (codes chosen on float16 scales, then stored on a rounded scale, are off it). (The package's
    own compress divides in bf16, whose quotients are coarser than the grid: not an oracle here.)"""
    fmt = ct.compressed_format(spec)
    w = (torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    parts = fmt.quantize(w)
    scale = parts[ct.SCALE].float().repeat_interleave(fmt.block, 1)
    offset = 1 << (fmt.bits - 1)
    zero = offset if fmt.symmetric else (ct._codes(parts[ct.ZERO_POINT].T, fmt.bits, 32).T - offset).repeat_interleave(
        fmt.block, 1) + offset
    nearest = (torch.round(w.float() / scale) + zero).clamp(0, (1 << fmt.bits) - 1)
    assert torch.equal(ct._codes(parts[ct.PACKED], fmt.bits, 64), nearest.long())
    on_f16 = fmt.from_parts(fmt.base.quantize(w), w.dtype)   # as before: chosen on float16 scales
    error = {name: (fmt.dequantize(p, (32, 64), torch.float32) - w.float()).norm()
             for name, p in (("bf16", parts), ("f16", on_f16))}
    assert error["bf16"] <= error["f16"]


# ---------------------------------------------------------------- fp8 (float-quantized, FP8_DYNAMIC)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["fp8", "fp8-b16"])
def test_fp8_is_the_packages(dtype, spec):
    """fp8's scales are the package's observer's (calculate_qparams on each row's, or each 16 x 16 tile's, min and
    max; the last tiles partial), its codes the package's compress of the weight with them, and its decompress
    gives exactly our dequantized values."""
    from compressed_tensors.compressors.naive_quantized import FloatQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    fmt = ct.compressed_format(spec)
    weight = (torch.randn(40, 56, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    weight[:16] = 0   # (a zero row, a zero tile: the smallest scale, not a division by zero)
    parts = fmt.quantize(weight)
    args = QuantizationArgs(**ct.scheme_weights(fmt))
    if fmt.block:
        padded = torch.nn.functional.pad(weight, (0, 8, 0, 8)).reshape(3, 16, 4, 16)
        low, high = padded.amin((1, 3)), padded.amax((1, 3))
    else:
        low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    scale, _ = calculate_qparams(low, high, args)
    assert parts[ct.SCALE].dtype == dtype and torch.equal(parts[ct.SCALE], scale)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=ct.FLOAT_FORMAT,
                                input_activations=QuantizationArgs(**ct.fp8_activations(fmt)))
    theirs = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    assert torch.equal(parts[""].view(torch.uint8), theirs["weight"].view(torch.uint8))
    back = FloatQuantizationCompressor.decompress({"weight": parts[""], "weight_scale": parts[ct.SCALE]}, scheme)
    assert torch.equal(fmt.dequantize(parts, tuple(weight.shape), None), back["weight"])


@pytest.mark.parametrize("spec", [dict(format="fp8"), dict(format="fp8-b16"),
                                  dict(bits_budget=8.0, policy="uniform", candidates="int4-g16-sym,fp8")])
def test_fp8_checkpoints_read_back_as_the_package_reads_them(tmp_path, tiny, spec):
    """The checkpoint (fp8 alone, or fp8 and int4 layers under a budget: a "mixed-precision" config) decompresses,
    by the package's own dequantizer, to exactly what moetool writes back with convert --dequantize, and moetool
    runs it as transformers runs those weights."""
    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(layout=CT, **spec))
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    formats = {g["format"] for g in qc["config_groups"].values()}
    for group in qc["config_groups"].values():   # vLLM's CompressedTensorsConfig._is_fp8_w8a8 (compressed_tensors.py)
        if group["format"] == "float-quantized":   # picks CompressedTensorsW8A8Fp8MoEMethod for the experts when:
            weights = QuantizationArgs(**group["weights"])
            inputs = QuantizationArgs(**group["input_activations"])
            assert weights.type == inputs.type == "float" and weights.symmetric and not weights.dynamic
            assert weights.strategy in ("tensor", "channel", "block") and inputs.dynamic
    assert "float-quantized" in formats and qc["format"] == ("mixed-precision" if len(formats) > 1 else
                                                             "float-quantized")
    assert ("int4-g16-sym" in report.formats) == ("bits_budget" in spec)
    convert_checkpoint(tmp_path / "q", tmp_path / "theirs", CompressedTensorsDequantizer(tmp_path / "q",
                                                                                       dtype=torch.float32))
    with open_checkpoint(tmp_path / "q") as ckpt:
        from moetool.ops.convert import ConvertOptions, convert

        convert(ckpt, tmp_path / "ours", ConvertOptions(dequantize=True, dtype="fp32"))
        assert inspect_checkpoint(ckpt).problems == []
    ours = {}
    for path in (tmp_path / "ours").glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            ours |= {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(tmp_path / "theirs" / "model.safetensors", "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "theirs", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(moetool.load_model(tmp_path / "q")(IDS).logits, reference(IDS).logits, rtol=0,
                              atol=1e-5)


def test_fp8_is_refused_where_it_cannot_go(tmp_path, tiny):
    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        with pytest.raises(UsageError, match="fp8 is written in --layout compressed-tensors"):
            quantize(ckpt, tmp_path / "a", QuantizeOptions(format="fp8"))
        with pytest.raises(UsageError, match="float format"):
            quantize(ckpt, tmp_path / "b", QuantizeOptions(format="fp8", layout=CT, method="gptq"))
        with pytest.raises(UsageError, match="fp8 takes one option"):
            quantize(ckpt, tmp_path / "c", QuantizeOptions(format="fp8-g128", layout=CT))
    assert not any((tmp_path / n).exists() for n in "abc")
