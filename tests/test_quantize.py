"""`moetool quantize`: formats against bitsandbytes' own quantize -> dequantize, integer error bounds,
the written checkpoint read back with safetensors, quantized models against a dequantize-first
path in transformers, bit allocation, and the command line."""

import json
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.quantize import QuantizeOptions, allocate, parse_rules, quantize
from moetool.quant import bnb
from moetool.quant.formats import parse_format
from tests.tiny import load_reference

F = bnb()
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SHAPES = [(96, 256), (1408, 512), (7, 40), (33, 64)]


def _bnb4_reference(w, fmt):
    q, state = F.quantize_4bit(w, blocksize=fmt.block, quant_type=fmt.kind, compress_statistics=fmt.double_quant)
    return q, state


@pytest.mark.parametrize("spec", ["nf4-b32", "nf4-b64", "nf4-b128-dq", "nf4-b256", "fp4-b32-dq", "fp4-b64",
                                  "fp4-b128", "fp4-b256-dq"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bnb4_is_bitsandbytes_bit_for_bit(spec, dtype):
    fmt = parse_format(spec)
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen).to(dtype)
        parts = fmt.quantize(w)
        q, state = _bnb4_reference(w, fmt)
        assert torch.equal(parts[""], q)
        for key, value in state.as_dict(packed=True).items():
            if not key.startswith("quant_state"):
                assert torch.equal(parts["." + key], value), key
        # the stored tensors, through bitsandbytes' own deserialization, dequantize to its own result
        own = F.QuantState.from_dict({k.lstrip("."): v for k, v in parts.items() if k}, device=torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(parts[""], own), F.dequantize_4bit(q, state))
        assert [(s, d, tuple(t)) for s, d, t in fmt.components(shape, DTYPES[dtype])] == \
            [(s, DTYPES.get(v.dtype, {torch.uint8: "U8"}.get(v.dtype)), tuple(v.shape)) for s, v in parts.items()]


@pytest.mark.parametrize("block", [64, 256, 4096])
def test_bnb8_blockwise_is_bitsandbytes_bit_for_bit(block):
    fmt = parse_format(f"bnb8-b{block}")
    w = torch.randn(96, 256).to(torch.bfloat16)
    parts = fmt.quantize(w)
    codes, state = F.quantize_blockwise(w, blocksize=block)
    assert torch.equal(parts[""], codes) and torch.equal(parts[".absmax"], state.absmax)
    assert torch.equal(fmt.dequantize(parts, (96, 256), torch.bfloat16), F.dequantize_blockwise(codes, state))


def _full_range_error(w, bits: int, group: int, sym: bool, top_code_exact: bool = False):
    """Per group, the squared error of plain round-to-nearest over the group's whole range (written
    out here in numpy: symmetric codes -2**(b-1) .. 2**(b-1)-1 at absmax / ((2**b - 1) / 2), as
    compressed-tensors, or TOP_CODE_EXACT at absmax / (2**(b-1) - 1); asymmetric 0 .. 2**b - 1 over
    [min(w, 0), max(w, 0)])."""
    import numpy as np

    g = w.float().numpy().reshape(w.shape[0], -1, group).astype(np.float64)
    top = 2 ** bits - 1
    if sym:
        scale = np.abs(g).max(-1, keepdims=True) / (2 ** (bits - 1) - 1 if top_code_exact else top / 2)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16).astype(np.float64)   # stored in float16
        q = np.clip(np.round(g / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        back = q * scale
    else:
        low, high = np.minimum(g.min(-1, keepdims=True), 0), np.maximum(g.max(-1, keepdims=True), 0)
        scale = np.where(high > low, (high - low) / top, 1.0).astype(np.float16).astype(np.float64)
        zero = np.clip(np.round(-low / scale), 0, top)
        back = (np.clip(np.round(g / scale) + zero, 0, top) - zero) * scale
    return torch.from_numpy(((g - back) ** 2).sum(-1))


@pytest.mark.parametrize("bits,group,sym", list(product((2, 3, 4, 8), (8, 64, 128), (True, False))))
def test_integer_formats_round_to_a_searched_grid(bits, group, sym):
    """Codes use all 2**bits levels; the clipping search is never worse, group by group, than
    round-to-nearest over the whole range (symmetric: either grid; up to float16 scale rounding),
    and better overall."""
    fmt = parse_format(f"int{bits}-g{group}-{'sym' if sym else 'asym'}")
    gen = torch.Generator().manual_seed(bits * group)
    w = (torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen)).to(torch.bfloat16)
    w[0, :group] = 0.5   # a group of one value: its own scale, exact
    w[1] = torch.rand(256, generator=gen)   # all positive (asymmetric groups include zero)
    parts = fmt.quantize(w)
    assert parts[""].dtype == torch.uint8 and parts[""].shape == (64, 256 // group, group * bits // 8)
    back = fmt.dequantize(parts, (64, 256), torch.float32)
    assert torch.allclose(back[0, :group], torch.full((group,), 0.5), atol=1e-3)
    assert len(back[5].unique()) <= 256 // group * (1 << bits)
    ours = (w.float() - back).double().reshape(64, -1, group).square().sum(-1)
    full = _full_range_error(w, bits, group, sym)
    if sym:
        full = torch.minimum(full, _full_range_error(w, bits, group, sym, top_code_exact=True))
    energy = w.float().double().reshape(64, -1, group).square().sum(-1)   # float16 scales: a little slack
    assert (ours <= full * (1 + 2e-3) + 1e-6 * energy).all()
    if bits <= 4:
        assert ours.sum() < 0.97 * full.sum()


def test_symmetric_codes_reach_the_lowest_level():
    """int3 symmetric has 8 codes, -4 .. 3 around the midpoint (the old grid used 7)."""
    from moetool.quant.formats import int_codes, int_grid

    fmt = parse_format("int3-g32-sym")
    w = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(0))
    scale, zero = int_grid(w, fmt, search=False)
    codes = int_codes(w, scale, zero, fmt) - zero.unsqueeze(-1)
    assert codes.min() == -4 and codes.max() == 3


def test_format_ids_and_bad_formats():
    assert parse_format("nf4").id == "nf4-b64"
    assert parse_format("INT3").id == "int3-g128-asym"
    assert parse_format("int8").id == "int8-g128-sym"
    assert parse_format("fp4-b256-dq").id == "fp4-b256-dq"
    for bad in ("int5", "nf4-b48", "nf4-g64", "int4-b64", "bnb8-b32", "int4-g12", "int4-dq", "nf4-sym", "q4_k"):
        with pytest.raises(UsageError):
            parse_format(bad)
    with pytest.raises(UsageError, match="group size"):
        parse_format("int4-g128").check("w", (16, 96))


def test_allocation_meets_the_budget_and_beats_every_single_format():
    gen = torch.Generator().manual_seed(0)
    sizes = {"a": 2.0, "b": 3.0, "c": 4.0, "d": 8.0}
    items = {}
    for key in range(12):
        weight = float(torch.rand(1, generator=gen)) * 10
        items[key] = [(int(bits * 1000), weight * 2.0 ** -bits * (1 + float(torch.rand(1, generator=gen))), f)
                      for f, bits in sizes.items()]
    for budget_bits in (2.5, 3.0, 5.0):
        budget = budget_bits * 1000 * len(items)
        choice = allocate(items, budget)
        spent = sum(next(b for b, _, f in items[k] if f == choice[k]) for k in items)
        cost = sum(next(c for _, c, f in items[k] if f == choice[k]) for k in items)
        assert spent <= budget
        for f, bits in sizes.items():   # one format for all that fits costs no less
            if bits * 1000 * len(items) <= budget:
                assert cost <= sum(next(c for _, c, g in items[k] if g == f) for k in items) + 1e-12
    with pytest.raises(ValueError):
        allocate(items, 1000)


def test_rules_parse():
    assert [k for k, _ in parse_rules(("attention=int8,shared_experts=nf4", r"q_proj=int4-g8"))] == \
        ["attention", "shared_experts", "q_proj"]
    with pytest.raises(UsageError):
        parse_rules(("routed_experts=nf4",))
    with pytest.raises(UsageError):
        parse_rules(("attention",))
    with pytest.raises(UsageError):
        parse_rules(("[=nf4",))


# ---------------------------------------------------------------- whole checkpoints

def _stored_parts(folder: Path, name: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key == name or key.startswith(name + "."):
                    out[key[len(name):]] = f.get_tensor(key)
    return out


def test_written_bnb4_experts_dequantize_like_bitsandbytes(tmp_path):
    out = tmp_path / "q"
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        report = quantize(ckpt, out, QuantizeOptions(format="nf4-b64-dq"))
        source = {n: r.load() for n, r in ckpt.tensors.items() if ".experts." in n}
    assert report.formats == {"nf4-b64-dq": 32} and len(report.experts) == 32
    # 4 bits + absmax + fixed per-tensor state (1.2 KB: sizeable on these 128 x 128 matrices)
    assert 4.1 < report.expert_bits < 4.8 and report.bytes_after < report.bytes_before
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "moetool" and config["experts"]["3"] == ["nf4-b64-dq"] * 8
    # the report's relative error of expert (0, 0), against bitsandbytes' own round trip
    sse = norm = 0.0
    for name, weight in source.items():
        if ".layers.0.mlp.experts.0." in name:
            q, ref = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
            sse += float((F.dequantize_4bit(q, ref).float() - weight.float()).pow(2).sum())
            norm += float(weight.float().pow(2).sum())
    assert report.experts[0].rel_error == pytest.approx((sse / norm) ** 0.5, rel=1e-3)
    for name, weight in list(source.items())[:12]:
        parts = _stored_parts(out, name)   # read back with safetensors' own reader
        assert set(parts) == {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                              ".quant_state.bitsandbytes__nf4"}
        state = F.QuantState.from_dict({k.lstrip("."): v for k, v in parts.items() if k}, device=torch.device("cpu"))
        q, ref = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(F.dequantize_4bit(parts[""], state), F.dequantize_4bit(q, ref))


FAMILIES = ["mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2",
            "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5_moe_text", "lfm2_moe", "exaone_moe",
            "dots1", "gpt_oss", "llama4_text", "granitemoe", "granitemoeshared",
            "granitemoehybrid", "phimoe", "jetmoe", "jamba", "ernie4_5_moe", "hunyuan_v1_moe", "switch_transformers",
            "nllb-moe", "cohere2_moe", "afmoe", "granitemoe_swa", "sarvam_moe", "gemma4_text", "qwen4_exp_text",
            "hy_v3", "axk1", "flint", "mellum", "beam", "axk2",
            "glm_moe_dsa", "solar_open", "sarvam_mla", "kimi_linear",
            "nemotron_h", "nemotron_h-latent", "mimo_v2_flash", "bailing_hybrid", "laguna", "kolibri1",
            "minimax_m3_vl_text", "dots3_note_text",
            "qwen3_vl_moe", "glm4v_moe", "mistral4", "glm5_next",
            "hy_v4", "lara_mini", "longcat_flash", "step3p7", "qwen3_omni_moe", "muse_spark", "hy_v4_vl",
            "inkling_text", "deepseek_ocr2", "deepseek_v4", "mistral_large4", "zaya"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_matches_the_dequantize_first_path(tmp_path, tiny, family):
    """moetool.load_model keeps weights quantized; its logits equal transformers' on the same weights
    dequantized first (convert --dequantize), within 1e-4 relative."""
    quantized, plain = tmp_path / "q", tmp_path / "d"
    with open_checkpoint(tiny(family)) as ckpt:
        report = quantize(ckpt, quantized, QuantizeOptions(format="int4-g8", rules=("attention=nf4-b32",
                                                                                  "shared_experts=bnb8-b64")))
    assert report.formats == {"int4-g8-asym": len(report.experts)}
    seq2seq = family in ("switch_transformers", "nllb-moe")
    with open_checkpoint(quantized) as ckpt:
        convert(ckpt, plain, ConvertOptions(dtype="fp32", dequantize=True, layout=None if seq2seq else "fused"))
    reference = load_reference(plain, seq2seq=seq2seq, dtype=torch.float32).eval()
    model = moetool.load_model(quantized)
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if seq2seq else {}
    with torch.no_grad():
        got, want = model(ids, **extra).logits, reference(ids, **extra).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # the experts really are held quantized
    banks = [m for m in model.modules() if type(m).__name__ in ("ExpertBank", "QuantLinear")]
    assert banks
    with open_checkpoint(quantized) as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == []
    # and quantization changed the model (the test could fail)
    with open_checkpoint(tiny(family)) as ckpt:
        original = load_reference(ckpt.root, seq2seq=seq2seq, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (original(ids, **extra).logits - want).abs().max() > 1e-3


def test_rules_say_stacked_shared_experts_stay_unquantized(tmp_path, tiny):
    """Inkling's shared experts are 3-D parameters, not Linear modules: a rule naming them warns that they stay."""
    with open_checkpoint(tiny("inkling_text")) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8", rules=("shared_experts=int8-g8",)))
    assert any("stacked shared experts" in w and ".mlp.shared_experts." in w for w in report.warnings), report.warnings
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.1.mlp.shared_experts.up_proj").get_dtype() == "F32"
def test_refusals(tmp_path, tiny):
    with open_checkpoint("builtin:tiny-dense") as ckpt, pytest.raises(UsageError, match="MoE"):
        quantize(ckpt, tmp_path / "x", QuantizeOptions())
    with open_checkpoint(tiny("dbrx")) as ckpt, pytest.raises(UnsupportedError, match="packed"):
        quantize(ckpt, tmp_path / "x", QuantizeOptions())
    with open_checkpoint(tiny("mixtral")) as ckpt, pytest.raises(UsageError, match="group size"):
        quantize(ckpt, tmp_path / "x", QuantizeOptions(format="int4-g128"))
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4"))
        with pytest.raises(UsageError, match="bits budget|--bits-budget"):
            quantize(ckpt, tmp_path / "y", QuantizeOptions(bits_budget=1.5, policy="uniform"))
    with open_checkpoint(tmp_path / "q") as ckpt, pytest.raises(UnsupportedError, match="already quantized"):
        quantize(ckpt, tmp_path / "z", QuantizeOptions())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_budget_allocation_on_the_builtin_model(tmp_path):
    """A 3-bit budget is met globally and per layer; important experts get more bits; the
    routing-aware allocation beats the uniform one in KL against the unquantized model."""
    from moetool.ops.evaluate import EvalOptions, evaluate
    from moetool.ops.profile import ProfileOptions, profile

    with open_checkpoint("builtin:tiny-moe") as original:
        (tmp_path / "p.json").write_text(json.dumps(profile(original, ProfileOptions(max_tokens=4096)).to_dict()))
        kl = {}
        for policy, scope in (("uniform", "global"), ("mass", "global"), ("frequency", "layer")):
            out = tmp_path / f"{policy}-{scope}"
            report = quantize(original, out, QuantizeOptions(bits_budget=3.0, policy=policy, budget_scope=scope,
                                                             profile=tmp_path / "p.json"))
            assert 2.9 < report.expert_bits <= 3.0 and len(report.formats) >= 2
            if scope == "layer":
                for layer in range(4):
                    rows = [e for e in report.experts if e.layer == layer]
                    assert sum(e.bytes for e in rows) * 8 <= 3.0 * sum(e.params for e in rows)
            if policy != "uniform":
                top = max(report.experts, key=lambda e: e.importance)
                low = min(report.experts, key=lambda e: e.importance)
                assert top.bits >= low.bits and top.rel_error <= low.rel_error
            with open_checkpoint(out) as q:
                kl[policy] = evaluate(q, EvalOptions(max_tokens=4096, seq_len=128), original).kl_mean
    assert kl["mass"] < kl["uniform"]


def test_streamed_profile_and_eval_accept_quantized_checkpoints(tmp_path):
    from moetool.ops.evaluate import EvalOptions, evaluate
    from moetool.ops.profile import ProfileOptions, profile

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4"))
    with open_checkpoint(tmp_path / "q") as ckpt:
        full = profile(ckpt, ProfileOptions(max_tokens=512, seq_len=128, mode="full"))
        streamed = profile(ckpt, ProfileOptions(max_tokens=512, seq_len=128, mode="streamed"))
        assert [lp.counts for lp in full.layers] == [lp.counts for lp in streamed.layers]
        quantized = evaluate(ckpt, EvalOptions(max_tokens=512, seq_len=128)).perplexity
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        assert quantized < 1.1 * evaluate(ckpt, EvalOptions(max_tokens=512, seq_len=128)).perplexity


def test_cli(tmp_path):
    out = tmp_path / "q"
    llama = tmp_path / "types.txt"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moetool", "quantize", "builtin:tiny-moe", str(out), *args],
                              capture_output=True, text=True)

    proc = cli("--bits-budget", "3", "--policy", "uniform", "--dry-run", "--json", "--emit-llama-quantize",
               str(llama))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["out"] is None and not out.exists() and not llama.exists()
    assert data["expert_bits_per_param"] <= 3.0 and len(data["experts"]) == 32
    assert {"layer", "expert", "format", "bits", "rel_error", "bytes"} <= set(data["experts"][0])
    proc = cli("--bits-budget", "3", "--policy", "uniform", "--emit-llama-quantize", str(llama),
               "--rules", "attention=int8")
    assert proc.returncode == 0, proc.stderr
    assert "bits per parameter" in proc.stdout and "Warning" not in proc.stderr and "kernels" not in proc.stderr
    lines = llama.read_text().split()
    import re

    import gguf  # gguf-py's names of the stacked expert weights (gate and up alone, or fused)
    names = [gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, t)].format(bid=layer) + ".weight"
             for layer in range(4) for t in ("FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP", "FFN_GATE_UP_EXP")]
    assert len(lines) == 16 and [n for n in names if not any(re.search(line.split("=")[0], n) for line in lines)] == []
    assert all(sum(bool(re.search(line.split("=")[0], n)) for line in lines) == 1 for n in names)
    assert {line.split("=")[1] for line in lines} <= {"q2_K", "q3_K", "q4_K"}
    assert cli().returncode == 8   # exists
    assert cli("--format", "int5", "--force").returncode == 2
    assert cli("--policy", "sometimes", "--bits-budget", "3", "--force").returncode == 2
    proc = subprocess.run([sys.executable, "-m", "moetool", "inspect", str(out), "--json"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["problems"] == [] and any(q.startswith("moetool int") for q in report["quantization"])
    proc = subprocess.run([sys.executable, "-m", "moetool", "eval", str(out), "--reference", "builtin:tiny-moe",
                           "--max-tokens", "1024", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 0 < json.loads(proc.stdout)["kl_mean"] < 1


def test_convert_dequantize_writes_bf16_back(tmp_path):
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8", rules=("attention=nf4",)))
        original = {n: r.load() for n, r in ckpt.tensors.items()}
    with open_checkpoint(tmp_path / "q") as ckpt:
        report = convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True, dtype="bf16"))
    assert report.plan["notes"] == ["quantization_config removed"]
    with open_checkpoint(tmp_path / "d") as ckpt:
        assert set(ckpt.tensors) == set(original)
        for name, ref in ckpt.tensors.items():
            assert ref.dtype == "BF16" and ref.shape == tuple(original[name].shape)
            back, want = ref.load().float(), original[name].float()
            assert (back - want).norm() <= 0.1 * want.norm() + 1e-6, name
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


def _wide_model(family: str, path: Path) -> Path:
    """A tiny model bitsandbytes' CPU 4-bit matmul accepts (inputs of 64 or more, outputs in
    multiples of 64, sizes that hold whole blocks)."""
    from tests.tiny import TINY

    cls_name, kwargs = TINY[family]
    sizes = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim",
             "intermediate_size_mlp")
    wide = {k: (-(-v * 4 // 64) * 64 if k in sizes else v) for k, v in kwargs.items()}   # multiples of 64
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**wide))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("spec", ["nf4", "fp4-b128-dq"])
def test_transformers_layout_loads_in_stock_transformers(tmp_path, family, spec):
    """--layout transformers: stock transformers + bitsandbytes loads it, and its logits equal
    transformers quantizing the same model on load (BitsAndBytesConfig), bit for bit."""
    src = _wide_model(family, tmp_path / "src")
    with open_checkpoint(src) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format=spec, layout="transformers"))
    assert report.formats == {"keep": len(report.experts)} and "stay in bf16" in report.warnings[0]
    fmt = parse_format(spec)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        src, device_map="cpu", dtype=torch.bfloat16, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=fmt.kind, bnb_4bit_use_double_quant=fmt.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=json.loads(
                (tmp_path / "q" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]))
    count = [sum(type(m).__name__ == "Linear4bit" for m in model.modules()) for model in (ours, theirs)]
    assert count[0] == count[1] > 0
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if fmt.block == 64:   # transformers quantizes with bitsandbytes' default block size
            assert torch.equal(ours(ids).logits, theirs(ids).logits)
        else:
            assert (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max() < 0.5
    with open_checkpoint(src) as ckpt, pytest.raises(UsageError, match="one bitsandbytes 4-bit format"):
        quantize(ckpt, tmp_path / "x", QuantizeOptions(format="int4", layout="transformers"))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["nf4-b64-dq", "int4-g64", "bnb8-b256"])
def test_gpu_quantized_model_matches_cpu(tmp_path, spec):
    """On CUDA the stored weights are dequantized by bitsandbytes' CUDA kernels (4-bit, 8-bit) or
    torch; logits equal the CPU model's up to float reordering."""
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format=spec, rules=("attention=nf4",)))
    ids = torch.randint(0, 2000, (2, 64), generator=torch.Generator().manual_seed(0))
    cpu = moetool.load_model(tmp_path / "q")
    gpu = moetool.load_model(tmp_path / "q", device="cuda")
    with torch.no_grad():
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_stacked_experts_are_stored_one_slice_each(tmp_path, tiny):
    """Granite stores experts stacked [E, 2I, H] under its hub names: moetool stores expert e as
    `input_linear.{e}.weight`, records the stacking, and convert --dequantize stacks them back."""
    with open_checkpoint(tiny("granitemoe")) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="keep"))
        original = {n: r.load() for n, r in ckpt.tensors.items()}
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    stacked = "model.layers.1.block_sparse_moe.input_linear.weight"
    assert config["stacked"][stacked] == 4
    parts = _stored_parts(tmp_path / "q", "model.layers.1.block_sparse_moe.input_linear.2.weight")
    assert torch.equal(parts[""], original[stacked][2])
    with open_checkpoint(tmp_path / "q") as ckpt:
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True))
    with open_checkpoint(tmp_path / "d") as ckpt:
        assert set(ckpt.tensors) == set(original) and "quantization_config" not in ckpt.config
        assert torch.equal(ckpt.tensors[stacked].load(), original[stacked])


def test_gpt_oss_mxfp4_release_is_requantized_expert_by_expert(tmp_path):
    """An mxfp4 GPT-OSS checkpoint: each expert slice is dequantized (transformers' own unpacking
    as oracle) and quantized again on its own."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from tests.test_convert import _mxfp4_checkpoint

    weights = _mxfp4_checkpoint(tmp_path / "mx")
    with open_checkpoint(tmp_path / "mx") as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g8"))
    assert len(report.experts) == 8
    p = "model.layers.1.mlp.experts."
    want = _convert_moe_packed_tensors(weights[p + "gate_up_proj_blocks"], weights[p + "gate_up_proj_scales"],
                                       dtype=torch.bfloat16)
    fmt = parse_format("int8-g8")
    parts = _stored_parts(tmp_path / "q", p + "2.gate_up_proj.weight")
    back = fmt.dequantize(parts, tuple(want.shape[1:]), torch.float32)
    assert (back - want[2].float()).norm() <= 0.01 * want[2].float().norm()   # int8 of the dequantized release


def test_quantized_checkpoints_survive_other_commands(tmp_path):
    """convert --dtype keeps the quantization state as it is; a loaded model casts; prune refuses."""
    from moetool.ops.prune import PruneOptions, prune

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4-b64-dq", rules=("attention=int4",)))
    with open_checkpoint(tmp_path / "q") as ckpt:
        report = convert(ckpt, tmp_path / "cast", ConvertOptions(dtype="fp16"))
        assert report.plan["actions"]["kept (quantization state)"] > 0
        with pytest.raises(UnsupportedError, match="quantized by moetool"):
            prune(ckpt, tmp_path / "p", PruneOptions(keep=6, criterion="random"))
    ids = torch.randint(0, 2000, (1, 32), generator=torch.Generator().manual_seed(0))
    original, cast = moetool.load_model(tmp_path / "q"), moetool.load_model(tmp_path / "cast")
    with torch.no_grad():
        want = original(ids).logits
        assert (cast(ids).logits - want).abs().max() < 0.05 * want.abs().max()   # only the norms/embeddings cast
        original.to(torch.bfloat16)
        got = original(ids).logits
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_option_errors_are_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moetool", "quantize", "builtin:tiny-moe", str(tmp_path / "q"),
                               *args], capture_output=True, text=True)

    for args, message in ((("--policy", "mass"), "give --bits-budget"),
                          (("--bits-budget", "3", "--policy", "often"), "--policy often"),
                          (("--bits-budget", "3", "--budget-scope", "model"), "--budget-scope model"),
                          (("--emit-llama-quantize", str(tmp_path / "no" / "t.txt")), "folder does not exist"),
                          (("--rules", "attention"), "KEY=FORMAT"),
                          (("--layout", "gguf"), "--layout gguf")):
        proc = cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "q").exists()
    proc = cli("--bits-budget", "3", "--candidates", "int4-g96,int2-g64,int3-g128", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert any("int4-g96" in w for w in data["warnings"]) and "int4-g96-asym" not in data["formats"]


def test_allocation_against_brute_force():
    """Never over budget; close to the optimum that exhaustive search finds."""
    import random

    rng = random.Random(1)
    ratios = []
    for _ in range(300):
        items = {i: [(rng.randint(1, 20), rng.random() * 50, f"f{j}") for j in range(rng.randint(1, 4))]
                 for i in range(rng.randint(1, 5))}
        budget = sum(min(o[0] for o in v) for v in items.values()) + rng.random() * 30
        choice = allocate(items, budget)
        picked = [next(o for o in items[i] if o[2] == choice[i]) for i in items]
        assert sum(o[0] for o in picked) <= budget
        best = min(sum(o[1] for o in combo) for combo in product(*items.values())
                   if sum(o[0] for o in combo) <= budget)
        ratios.append(sum(o[1] for o in picked) / best if best else 1.0)
    assert sum(ratios) / len(ratios) < 1.02 and max(ratios) < 1.5


V4_JOB = """
import json, sys, torch, transformers
path, skip = sys.argv[1], sys.argv[2]
kw = {} if skip == "-" else {"quantization_config": transformers.BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
    llm_int8_skip_modules=json.loads(skip))}
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu", **kw)
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])).logits
print(json.dumps({"linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
                  "logits": logits.float().tolist()}))
"""


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers4_layout_quantizes_experts_in_stock_transformers_4(tmp_path, family):
    """--layout transformers4: transformers 4.57 (in .ci/transformers4) loads it with every expert in
    bitsandbytes 4-bit, and its logits equal transformers 4 quantizing the same model on load."""
    import os

    v4 = Path(os.environ.get("MOETOOL_TRANSFORMERS4", Path(__file__).parents[1] / ".ci" / "transformers4"))
    if not (v4 / "transformers").is_dir():
        pytest.skip("transformers 4.57 is not installed in .ci/transformers4")
    src = _wide_model(family, tmp_path / "src")
    with open_checkpoint(src) as ckpt:
        convert(ckpt, tmp_path / "bf16", ConvertOptions(dtype="bf16"))   # a config transformers 4 reads
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4", layout="transformers4"))
    assert report.formats == {"nf4-b64": len(report.experts)}
    skip = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    env = {**os.environ, "PYTHONPATH": str(v4)}
    results = []
    for path, arg in ((tmp_path / "q", "-"), (tmp_path / "bf16", json.dumps(skip))):
        proc = subprocess.run([sys.executable, "-c", V4_JOB, str(path), arg], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    experts = 2 * 4 * 3
    assert results[0]["linear4bit"] == results[1]["linear4bit"] >= experts
    assert results[0]["logits"] == results[1]["logits"]


def test_block_fp8_release_is_requantized(tmp_path, tiny):
    """A DeepSeek-V3-style block-fp8 checkpoint: experts are dequantized, then quantized on their own;
    the fp8 quantization_config gives way to moetool's."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, fp8 = tiny("deepseek_v3"), tmp_path / "fp8"
    shutil.copytree(src, fp8)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    weights = load_file(src / "model.safetensors")
    for name in [n for n in weights if ".experts." in n]:
        weights[name] = (weights[name] * 2).to(torch.float8_e4m3fn)
        weights[name + "_scale_inv"] = torch.full((1, 1), 0.5)
    save_file(weights, fp8 / "model.safetensors")
    with open_checkpoint(fp8) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g8"))
    assert len(report.experts) == 8
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "moetool"
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    want = (weights[name].float() * 0.5).bfloat16().float()
    parts = _stored_parts(tmp_path / "q", name)
    assert not any(k.endswith("_scale_inv") for k in parts)
    back = parse_format("int8-g8").dequantize(parts, tuple(want.shape), torch.float32)
    assert (back - want).norm() <= 0.01 * want.norm()   # int8 of the dequantized release


def test_casting_a_loaded_model_keeps_the_stored_state_exact(tmp_path):
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4-b64-dq", rules=("attention=int4",)))
    model = moetool.load_model(tmp_path / "q")
    before = {n: b.clone() for n, b in model.named_buffers() if ".part" in n}
    model.to(torch.bfloat16).half().float()
    after = dict(model.named_buffers())
    assert all(after[n].dtype == b.dtype and torch.equal(after[n], b) for n, b in before.items())


def test_llama4_transformers_layout_quantizes_its_experts_and_gpt_oss_is_refused(tmp_path, tiny):
    """transformers 5 holds Llama 4's experts in Linear modules for bitsandbytes checkpoints: the stock
    layout quantizes them, and stock transformers' logits match moetool's own loader on the same
    nf4 weights. GPT-OSS keeps its experts stacked there: refused."""
    src = _wide_model("llama4_text", tmp_path / "src")
    with open_checkpoint(src) as ckpt:
        report = quantize(ckpt, tmp_path / "stock", QuantizeOptions(format="nf4", layout="transformers"))
        quantize(ckpt, tmp_path / "ours", QuantizeOptions(format="nf4", rules=("attention=nf4",)))
    assert report.formats == {"nf4-b64": len(report.experts)}
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock", device_map="cpu",
                                                              dtype=torch.bfloat16)
    assert sum(type(m).__name__ == "Linear4bit" for m in stock.modules()) >= 3 * len(report.experts)
    ours = moetool.load_model(tmp_path / "ours", dtype=torch.bfloat16)
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = stock(ids).logits.float(), ours(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    with open_checkpoint(tiny("gpt_oss")) as ckpt, pytest.raises(UnsupportedError, match="stacked"):
        quantize(ckpt, tmp_path / "x", QuantizeOptions(format="nf4", layout="transformers"))


def test_profile_of_gpt_oss_per_expert_form_uses_its_experts(tmp_path, tiny):
    """transformers 5 does not read GPT-OSS's per-expert form; the runner fuses it while loading."""
    from moetool.ops.profile import ProfileOptions, profile

    convert_dir = tmp_path / "per"
    with open_checkpoint(tiny("gpt_oss")) as ckpt:
        convert(ckpt, convert_dir, ConvertOptions(layout="per-expert"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(torch.randint(0, 60, (256,), generator=torch.Generator().manual_seed(0)).tolist()))
    counts = []
    for path in (tiny("gpt_oss"), convert_dir):
        with open_checkpoint(path) as ckpt:
            report = profile(ckpt, ProfileOptions(token_ids=ids, seq_len=32, mode="full", dtype="fp32"))
            counts.append([lp.counts for lp in report.layers])
    assert counts[0] == counts[1]


@pytest.mark.parametrize("layout", ["transformers", "transformers4"])
def test_stock_layouts_run_in_moetool_as_dequantized(tmp_path, tiny, layout):
    """transformers 5 cannot load transformers 4's per-expert bitsandbytes experts (it fuses their
    packed codes): moetool's full mode and load_model read both stock layouts dequantized, and give
    the logits of the checkpoint `convert --dequantize` writes."""
    from moetool.runner.device import pick_device
    from moetool.runner.model import load_model as load_runner

    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4", layout=layout))
    with open_checkpoint(tmp_path / "q") as ckpt:   # (load_model dequantizes in its dtype: float32 here)
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True, dtype="fp32"))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    want = moetool.load_model(tmp_path / "d")(ids).logits
    assert torch.equal(moetool.load_model(tmp_path / "q")(ids).logits, want)
    if layout == "transformers4":   # transformers 5's own loader fails on it: full mode must not use it
        with open_checkpoint(tmp_path / "q") as ckpt:
            loaded = load_runner(ckpt, device=pick_device("cpu"), dtype=torch.float32, mode="full")
            with torch.no_grad():
                assert torch.equal(loaded.model(ids).logits, want)


# ---------------------------------------------------------------- non-finite weights, scale limits, tampered state

NON_FINITE_SPECS = ["nf4-b64", "nf4-b64-dq", "fp4-b128", "bnb8-b256", "int4-g32-asym", "int8-g128-sym"]


@pytest.mark.parametrize("spec", NON_FINITE_SPECS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_in_every_format_naming_the_tensor(spec, value):
    """bitsandbytes writes NaN/inf without complaint (nf4-dq spreads one over the whole matrix
    through its absmax mean): every format but keep refuses the weight, naming it, and suggests
    no bitsandbytes format."""
    fmt = parse_format(spec)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[5, 7] = value
    if fmt.is_bnb4:   # what bitsandbytes itself would have written
        q, state = F.quantize_4bit(w, blocksize=fmt.block, quant_type=fmt.kind, compress_statistics=fmt.double_quant)
        spread = int((~torch.isfinite(F.dequantize_4bit(q, state))).sum())
        assert spread >= fmt.block and (not fmt.double_quant or spread > w.numel() // 4)
    with pytest.raises(UsageError) as info:
        fmt.quantize(w, "model.layers.1.mlp.experts.3.gate_proj.weight")
    message = str(info.value)
    assert message.startswith("model.layers.1.mlp.experts.3.gate_proj.weight: 1 of 32768 values are not finite")
    assert "[5, 7]" in message and "bitsandbytes" not in message and "\n" not in message
    assert parse_format("keep").quantize(w, "x")[""] is w


def test_too_large_weights_name_the_tensor_and_suggest_bitsandbytes_which_holds_them():
    """Finite values beyond float16 scales: the integer formats refuse, naming the tensor and
    suggesting bitsandbytes, whose absmax are float32: it holds them, bit for bit its own."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e7
    with pytest.raises(UsageError, match=r"^experts\.0\.up_proj\.weight: .*too large for float16 scales; use a "
                                         r"bitsandbytes format"):
        parse_format("int4-g32-asym").quantize(w, "experts.0.up_proj.weight")
    fmt = parse_format("nf4-b64-dq")
    parts = fmt.quantize(w, "experts.0.up_proj.weight")
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(parts[""], q)
    assert torch.equal(fmt.dequantize(parts, (64, 128), torch.float32), F.dequantize_4bit(q, state))


def _non_finite_source(tmp_path: Path) -> Path:
    """builtin:tiny-moe with one NaN in layer 1 expert 3's gate_proj."""
    from safetensors.torch import load_file, save_file

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        convert(ckpt, tmp_path / "src", ConvertOptions())
    file = next((tmp_path / "src").glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.1.mlp.experts.3.gate_proj.weight"][5, 7] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    return tmp_path / "src"


def test_quantize_refuses_a_non_finite_expert_and_writes_nothing(tmp_path):
    src = _non_finite_source(tmp_path)
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    with open_checkpoint(src) as ckpt:
        with pytest.raises(UsageError, match=rf"^{name}: 1 of 16384 values are not finite"):
            quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4-b64-dq"))
        # under a budget every candidate refuses it: the error says why
        with pytest.raises(UsageError, match=rf"layer 1 expert 3: no candidate format fits .*{name}: 1 of 16384 "
                                             "values are not finite"):
            quantize(ckpt, tmp_path / "b", QuantizeOptions(bits_budget=4.0, policy="uniform"))
    assert not (tmp_path / "q").exists() and not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast", "ignore:invalid value encountered in multiply")
@pytest.mark.parametrize("spec,absmax", [("int2-g8-sym", 70000.0), ("int4-g8-sym", 470000.0),
                                         ("int3-g16-sym", 200000.0)])
def test_symmetric_stretch_grid_is_skipped_where_float16_cannot_hold_its_scale(spec, absmax):
    """A group whose plain grid's scale fits float16 but whose stretched grid's does not is still
    quantized (on the plain or a clipped grid), no worse than the plain grid (numpy, below); the
    other groups still get the better of both grids."""
    fmt = parse_format(spec)
    group = fmt.block
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4 * group, generator=gen)
    w[0, :group] = torch.linspace(-1, 1, group) * absmax
    assert absmax / (((1 << fmt.bits) - 1) / 2) <= 65504 < absmax / ((1 << (fmt.bits - 1)) - 1)
    back = fmt.dequantize(fmt.quantize(w, "w"), tuple(w.shape), torch.float32)
    ours = (w - back).double().reshape(16, -1, group).square().sum(-1)
    plain = _full_range_error(w, fmt.bits, group, True)
    energy = w.double().reshape(16, -1, group).square().sum(-1)
    assert (ours <= plain * (1 + 2e-3) + 1e-6 * energy).all()
    assert float(ours[0, 0]) < 0.25 * float(energy[0, 0])   # (int2 on 8 values: about 10%)
    best = torch.minimum(plain, _full_range_error(w, fmt.bits, group, True, top_code_exact=True))
    assert (ours[1:] <= best[1:] * (1 + 2e-3) + 1e-6 * energy[1:]).all()


def test_bf16_switch_transformers_runs_quantized_linears_in_bf16(tmp_path):
    """T5-style DenseActDense casts its hidden states to `wo.weight.dtype`: a QuantLinear's .weight
    is in the model's dtype (bf16 loaded, or cast to it), so logits equal transformers' on the same
    weights dequantized first, in bf16, exactly."""
    from tests.tiny import build_model

    build_model("switch_transformers").to(torch.bfloat16).save_pretrained(tmp_path / "src", save_original_format=True)
    with open_checkpoint(tmp_path / "src") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8-asym", rules=("dense_mlp=int8-g8-sym",)))
    with open_checkpoint(tmp_path / "q") as ckpt:
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True, dtype="bf16"))
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "d", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids, decoder_input_ids=ids).logits
    loaded = moetool.load_model(tmp_path / "q", dtype=torch.bfloat16)
    cast = moetool.load_model(tmp_path / "q", dtype=torch.float32).to(torch.bfloat16)
    for model in (loaded, cast):
        linears = [m for m in model.modules() if type(m).__name__ == "QuantLinear"]
        assert linears and {m.weight.dtype for m in linears} == {torch.bfloat16}
        with torch.no_grad():
            assert torch.equal(model(ids, decoder_input_ids=ids).logits, want)
    assert {m.weight.dtype for m in cast.float().modules() if type(m).__name__ == "QuantLinear"} == {torch.float32}


def _tamper_bnb4(src: Path, out: Path, how: str) -> str:
    """A copy of moetool nf4 checkpoint SRC with one weight's quant_state (or absmax) tampered."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    file = next(out.glob("*.safetensors"))
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if k.endswith(".quant_state.bitsandbytes__nf4"))
    state = json.loads(bytes(tensors[key].tolist()).decode())
    if how == "garbage":
        raw = b"\xff\xfenot json"
    elif how == "huge":
        raw = json.dumps({**state, "shape": [128, 10 ** 10]}).encode()
    elif how == "not-json-object":
        raw = b"[1, 2]"
    else:
        raw = bytes(tensors[key].tolist())
    tensors[key] = torch.tensor(list(raw), dtype=torch.uint8)
    name = key.rsplit(".quant_state.", 1)[0]
    if how == "absmax":
        tensors[name + ".absmax"] = tensors[name + ".absmax"][:-1].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["garbage", "huge", "not-json-object", "absmax"])
def test_a_tampered_bnb4_state_is_a_one_line_checkpoint_error(tmp_path, how):
    """The quant_state blob is read, not trusted: convert --dequantize and load_model refuse it with
    CheckpointFormatError (exit 4, one line, no traceback); the intact checkpoint dequantizes as
    bitsandbytes' own dequantize_4bit of the stored tensors."""
    from moetool.errors import CheckpointFormatError

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4"))
    name = _tamper_bnb4(tmp_path / "q", tmp_path / "t", how)
    with open_checkpoint(tmp_path / "t") as ckpt, pytest.raises(CheckpointFormatError, match="quant_state"):
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True))
    with pytest.raises(CheckpointFormatError, match="quant_state"):
        moetool.load_model(tmp_path / "t")
    # the reader itself names the weight (given the name, as the loaders pass it)
    stored = _stored_parts(tmp_path / "t", name)
    fmt = parse_format("nf4")
    with pytest.raises(CheckpointFormatError, match=rf"^{name}: its bitsandbytes quant_state"):
        shape = fmt.original_shape(tuple(stored[""].shape), lambda: stored[".quant_state.bitsandbytes__nf4"], name,
                                   {k: tuple(v.shape) for k, v in stored.items()})
        fmt.dequantize(stored, shape, torch.float32, name=name)
    proc = subprocess.run([sys.executable, "-m", "moetool", "convert", str(tmp_path / "t"), str(tmp_path / "d"),
                           "--dequantize"], capture_output=True, text=True)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error")][0].count("quant_state") == 1
    assert not (tmp_path / "d").exists()
    # the untampered weight, through the same reader, is bitsandbytes' own result
    parts = _stored_parts(tmp_path / "q", name)
    own = F.QuantState.from_dict({k.lstrip("."): v for k, v in parts.items() if k}, device=torch.device("cpu"))
    assert torch.equal(fmt.dequantize(parts, tuple(own.shape), torch.float32, name=name),
                       F.dequantize_4bit(parts[""], own))
