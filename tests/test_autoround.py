"""Reading Intel AutoRound checkpoints (quant_method auto-round) for MoE models. Each checkpoint is packed here by
AutoRound's own packers (auto_round_extension/torch QuantLinear.pack, as export_to_autoround/export.py calls it;
export_to_awq's WQLinear_GEMM.from_linear), in a process of its own (`PACK`), and what moetool must read is what
AutoRound computes from the packed tensors: its torch kernels (QuantLinear.forward on the identity), its
dequantize_gemm for the AWQ layout, and, where AutoRound's CPU loader picks those kernels, the model that
transformers' AutoRound integration loads from the checkpoint (its extra_config resolution included)."""

import json
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
from moetool.runner.model import load_model

TARGETS = r".*(experts\.\d+\.|self_attn\.).*_proj"   # routed experts and attention; routers stay in 16 bits
# name -> packing_format (None: not written, AutoRound's default), bits, group size, sym, own settings of modules
# (re.fullmatch -> [bits, group], the first that matches) and the extra_config that says them
CASES = {
    "int4-sym-mixed": (None, 4, 16, True,
                       {r".*layers\.1\.mlp\.experts\.1\.down_proj": [2, 16], r".*experts\.1\..*": [8, 32]},
                       # a pattern for expert 1 of each layer, and an exact name that wins over it although it
                       # comes later (after the routers' entry, which every case has); before them a key that is
                       # no pattern and an empty entry, both passed over as AutoRound's loader passes them
                       {r"experts\.1\.(": {"bits": 2}, r"experts\.1\.up": {},
                        r"experts\.1\.": {"bits": 8, "group_size": 32},
                        "model.layers.1.mlp.experts.1.down_proj": {"bits": 2, "group_size": 16}}),
    "int2-asym-gptq": ("auto_round:auto_gptq", 2, 16, False, {}, {}),   # with zero points of 0: stored 0, read 1
    "int3-asym": ("auto_round", 3, 32, False, {}, {}),                    # a bit stream: 32 codes in 3 words
    "int5-channel": ("auto_round", 5, -1, False, {}, {}),
    "int8-sym": ("auto_round:auto_gptq", 8, 32, True, {}, {}),
    "int6-asym": ("auto_round", 6, 32, False, {}, {}),
    "int7-sym-gptq": ("auto_round:auto_gptq", 7, 32, True, {}, {}),       # a bit stream, zeros minus one
    "int4-gptqmodel": ("auto_round:gptqmodel", 4, 16, False, {}, {}),      # zeros as they are, and a g_idx
    "int4-awq": ("auto_round:auto_awq", 4, 16, False, {}, {}),
}
STOCK = ("int4-sym-mixed", "int3-asym", "int5-channel", "int8-sym")   # loaded by transformers with the torch kernels
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

# AutoRound's packing of BASE's targeted weights for each case (min-max scales in float16, as its export stores
# them), the values its own kernels give for them, and (stock) those of the model transformers loads
PACK = r"""
import json, re, shutil, sys
from pathlib import Path
import torch, transformers
from safetensors.torch import load_file, save_file
from auto_round_extension.torch.qlinear_torch import QuantLinear as RawLinear
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as ZpLinear
from auto_round.export.export_to_awq.utils import WQLinear_GEMM, dequantize_gemm

base, targets, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
for out, (packing, bits, group, sym, own, extra), stock in cases:
    out = Path(out)
    shutil.copytree(base, out)
    packed_as = packing or "auto_round:auto_gptq"
    stored, values = {}, {}
    for name, w in load_file(out / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and re.fullmatch(targets, module)):
            stored[name] = w
            continue
        b, g = next((tuple(v) for k, v in own.items() if re.fullmatch(k, module)), (bits, group))
        rows, cols = w.shape
        wg = w.float().reshape(rows, -1, g if g > 0 else cols)
        if not sym:   # the first group's weights all positive: a zero point of 0
            wg[:, 0] = wg[:, 0].abs()
        maxq = 2 ** b - 1
        if sym:
            scales, zeros = (wg.abs().amax(-1) / 2 ** (b - 1)).clamp(min=1e-5).half(), 2 ** (b - 1)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            scales = ((hi - lo) / maxq).clamp(min=1e-5).half()
            zeros = (-lo / scales.float()).round().clamp(0, maxq)
        linear = torch.nn.Linear(cols, rows, bias=False)
        linear.weight.data = wg.reshape(rows, cols)
        if packed_as == "auto_round:auto_awq":
            q = WQLinear_GEMM.from_linear(linear, b, g, scales=scales.T.float().contiguous(),
                                          zeros=zeros.T.contiguous())
            values[name] = dequantize_gemm(q.qweight, q.qzeros, q.scales, b, g).T.contiguous()
        else:
            q = (ZpLinear if packed_as == "auto_round:auto_gptq" else RawLinear)(
                b, g, cols, rows, False, g_idx=packed_as == "auto_round:gptqmodel")
            q.device = torch.device("cpu")   # (AutoRound's export sets it before packing)
            q.pack(linear, scales.float(), zeros)
            kernel = q
            if hasattr(q, "g_idx"):   # (its g_idx path slices the scales by inputs, wrong for outputs != inputs;
                kernel = (ZpLinear if packed_as == "auto_round:auto_gptq" else RawLinear)(b, g, cols, rows, False)
                kernel.load_state_dict({k: v for k, v in q.state_dict().items() if k != "g_idx"})   # g_idx = i // g)
            with torch.no_grad():
                values[name] = kernel(torch.eye(cols, dtype=torch.float16)).T.contiguous()
        stored |= {f"{module}.{k}": getattr(q, k) for k in ("qweight", "qzeros", "scales", "g_idx") if hasattr(q, k)}
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "auto-round", "bits": bits, "group_size": group, "sym": sym,
                                     "data_type": "int", "block_name_to_quantize": "model.layers"}
    # (for MoE models AutoRound leaves every router in 16 bits and says so: special_model_handler.py)
    extra = {r".*mlp\.gate.*": {"bits": 16, "data_type": "float"}} | extra
    config["quantization_config"] |= ({"packing_format": packing} if packing else {}) | {"extra_config": extra}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(values, out.with_name(out.name + "-kernels.safetensors"), metadata={"format": "pt"})
    if stock:
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
        loaded = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
        assert all(type(m).__module__.startswith("auto_round_extension.torch") for m in loaded.values()), out
        with torch.no_grad():
            values = {n + ".weight": m(torch.eye(m.infeatures, dtype=torch.float16)).T.contiguous()
                      for n, m in loaded.items()}
            logits = model(torch.tensor(json.loads(sys.argv[4]))).logits.float()
        save_file(values | {"logits": logits}, out.with_name(out.name + "-stock.safetensors"),
                  metadata={"format": "pt"})
"""


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """name -> AutoRound checkpoint; name + "-kernels" / "-stock": the values AutoRound computes (safetensors)."""
    pytest.importorskip("auto_round", reason="pip install auto-round (a dev extra)")
    root = tmp_path_factory.mktemp("autoround")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    cases = [(str(root / name), case, name in STOCK) for name, case in CASES.items()]
    done = subprocess.run([sys.executable, "-c", PACK, str(root / "base"), TARGETS, json.dumps(cases),
                           json.dumps(IDS.tolist())], capture_output=True, text=True)
    assert done.returncode == 0, f"AutoRound's packing failed: {done.stderr[-3000:]}"
    out = {"base": root / "base"}
    for name in CASES:
        out |= {name: root / name, name + "-kernels": root / f"{name}-kernels.safetensors",
                name + "-stock": root / f"{name}-stock.safetensors"}
    (root / "ids.json").write_text(json.dumps(torch.randint(0, 64, (4, 16)).tolist()))
    out["ids"] = root / "ids.json"
    return out


def _dequantized(source, out, dtype="fp16"):
    with open_checkpoint(source) as ckpt:
        convert(ckpt, out, ConvertOptions(dequantize=True, dtype=dtype))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_values_are_autoround_kernels(tmp_path, releases, name):
    """convert --dequantize gives exactly AutoRound's own kernels' values for every packed weight (float16, the
    product rounded once), the others as stored; no quantization_config is left."""
    ours = _dequantized(releases[name], tmp_path / "out")
    kernels = load_file(releases[name + "-kernels"])
    packed = {k.removesuffix(".qweight") + ".weight" for k in load_file(releases[name] / "model.safetensors")
              if k.endswith(".qweight")}
    assert set(kernels) == packed and len(packed) == 32
    for key, value in kernels.items():
        assert torch.equal(ours[key], value), key
    base = load_file(releases["base"] / "model.safetensors")
    assert sorted(ours) == sorted(base)
    for key in base.keys() - packed:
        assert torch.equal(ours[key], base[key].half()), key
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    # in float32 too: the float16 product cast (AutoRound's kernels cast it to the activations' dtype), not a
    # float32 product of the scales
    wide = _dequantized(releases[name], tmp_path / "fp32", "fp32")
    for key, value in kernels.items():
        assert torch.equal(wide[key], value.float()), key


@pytest.mark.parametrize("name", STOCK)
def test_transformers_autoround_loads_the_same(tmp_path, releases, name):
    """transformers' AutoRound integration (AutoRound's loader: its extra_config resolution, its zero convention
    for the packing) loads each weight with the values moetool reads, and its logits are moetool's in float16."""
    ours = _dequantized(releases[name], tmp_path / "out")
    stock = load_file(releases[name + "-stock"])
    logits = stock.pop("logits")
    assert len(stock) == 32
    for key, value in stock.items():
        assert torch.equal(ours[key], value), key
    with torch.no_grad(), open_checkpoint(releases[name]) as ckpt:
        got = load_model(ckpt, device="cpu", dtype=torch.float16, mode="full").model(IDS).logits.float()
        unquantized = transformers.AutoModelForCausalLM.from_pretrained(releases["base"], dtype=torch.float32)
        away = (unquantized(IDS).logits - logits).abs().max()
    # (float16 activations on both sides: what differs is the order of the operations, well below quantization's)
    assert (got - logits).abs().max() < min(5e-3, float(away) / 10)


def test_mixed_widths_follow_extra_config_as_autoround_resolves_it(tmp_path, releases):
    """Expert 1 of each layer in int8 by a pattern, layer 1's expert 1 down_proj in int2 by its exact name (which
    wins over the earlier pattern); inspect names each form, and counts every parameter."""
    with open_checkpoint(releases["int4-sym-mixed"]) as ckpt:
        report = inspect_checkpoint(ckpt)
        assert not report.problems
        assert report.quantization == ["auto-round int2 g16", "auto-round int4 g16", "auto-round int8 g32"]
    with open_checkpoint(releases["base"]) as ckpt:
        assert report.params == inspect_checkpoint(ckpt).params


def test_runs_equal_the_dequantized_model(releases):
    """load_model (full) and a streamed eval of the packed checkpoint equal transformers on its dequantized weights."""
    dense = releases["int3-asym"].with_name("int3-dense")
    if not dense.exists():
        _dequantized(releases["int3-asym"], dense, "fp32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad(), open_checkpoint(releases["int3-asym"]) as ckpt:
        got = load_model(ckpt, device="cpu", dtype=torch.float32, mode="full").model(IDS).logits
        assert torch.allclose(got, reference(IDS).logits, rtol=0, atol=1e-5)
    with open_checkpoint(releases["int3-asym"]) as ckpt, open_checkpoint(dense) as ref:
        report = evaluate(ckpt, EvalOptions(token_ids=releases["ids"], seq_len=16, mode="streamed", dtype="fp32",
                                            device="cpu"), ref)
    assert report.kl_mean < 1e-9 and report.top1_agreement == 1.0


def test_other_spellings_of_the_method(tmp_path, releases):
    """intel/auto-round (older transformers) and auto_round (vLLM's INC loader) are AutoRound's too."""
    want = _dequantized(releases["int3-asym"], tmp_path / "want")
    for spelling in ("intel/auto-round", "auto_round"):
        source = _rewritten(tmp_path, releases["int3-asym"], spelling.replace("/", "-"), {"quant_method": spelling})
        got = _dequantized(source, tmp_path / f"{source.name}-out")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _rewritten(tmp_path, source, name, config_change):
    out = tmp_path / name
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] |= config_change
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, words", [
    ({"packing_format": "auto_round:marlin"}, "auto_round:marlin packing"),
    ({"data_type": "nv_fp"}, "nv_fp weights"),
    ({"model_free": True}, "model-free export"),
    ({"act_bits": 8}, "W3A8 layout"),
    ({"rotation_config": {"hadamard": True}}, "rotation_config"),
    ({"extra_config": {r"experts\.2\.down_proj": {"bits": 16, "data_type": "float"}}}, "unquantized"),
    ({"bits": 9}, "int9"),
])
def test_what_it_cannot_read_is_refused_before_writing(tmp_path, releases, change, words):
    """Each is named by inspect (unreadable_quantization) and refused with nothing written: never guessed."""
    source = _rewritten(tmp_path, releases["int3-asym"], "changed", change)
    with open_checkpoint(source) as ckpt:
        problems = inspect_checkpoint(ckpt).problems
        assert [p.code for p in problems] == ["unreadable_quantization"] and words in problems[0].message
        with pytest.raises(UnsupportedError, match=words):
            convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True))
        with pytest.raises(UnsupportedError, match=words):
            load_model(ckpt, device="cpu", dtype=torch.float32, mode="full")
    assert not (tmp_path / "out").exists()


def _floating_form(tmp_path, releases, form):
    """The int3 release's packed weights replaced by AutoRound's fp8 (X.weight e4m3, X.weight_scale per tensor) or
    MX/NV fp4 (X.weight_packed e2m1 pairs and its scales, the auto_round:llm_compressor packing) tensors."""
    source = _rewritten(tmp_path, releases["int3-asym"], form, {
        "packing_format": "auto_round:fp8" if form == "fp8" else "auto_round:llm_compressor",
        "data_type": "fp8" if form == "fp8" else "nv_fp4", "bits": 8 if form == "fp8" else 4, "group_size": 16})
    base = load_file(releases["base"] / "model.safetensors")
    stored = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        module, _, tail = name.rpartition(".")
        if tail == "qweight":
            weight = base[module + ".weight"]
            if form == "fp8":
                stored |= {module + ".weight": weight.to(torch.float8_e4m3fn), module + ".weight_scale": torch.ones(1)}
            else:
                rows, cols = weight.shape
                stored |= {module + ".weight_packed": torch.zeros(rows, cols // 2, dtype=torch.uint8),
                           module + ".weight_scale": torch.ones(rows, cols // 16).to(torch.float8_e4m3fn),
                           module + ".weight_global_scale": torch.ones(1)}
        elif tail not in ("qzeros", "scales"):
            stored[name] = tensor
    save_file(stored, source / "model.safetensors", metadata={"format": "pt"})
    return source


@pytest.mark.parametrize("form", ["fp8", "fp4"])
def test_floating_point_forms_are_named_and_refused(tmp_path, releases, form):
    """AutoRound's fp8 and fp4 exports (not its integer packings) are counted and named by inspect, and refused by
    the commands that read values (prune included), nothing written: never read as plain fp8 or as mxfp4."""
    source = _floating_form(tmp_path, releases, form)
    with open_checkpoint(source) as ckpt:
        report = inspect_checkpoint(ckpt)
        assert [p.code for p in report.problems] == ["unreadable_quantization"]
        assert "is not read (its integer packings are)" in report.problems[0].message
        packing = "auto_round:fp8" if form == "fp8" else "auto_round:llm_compressor"
        assert report.quantization == [f"auto-round {form} ({packing})"]
        with open_checkpoint(releases["base"]) as base:
            assert report.params == inspect_checkpoint(base).params
        for run in (lambda: convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True)),
                    lambda: prune(ckpt, tmp_path / "out", PruneOptions(experts={0: [0, 1], 1: [0, 1]})),
                    lambda: load_model(ckpt, device="cpu", dtype=torch.float32, mode="full")):
            with pytest.raises(UnsupportedError, match="not read"):
                run()
    assert not (tmp_path / "out").exists()


def test_a_group_size_the_scales_do_not_have_is_an_error(tmp_path, releases):
    """An extra_config group size that does not fit the stored scales is an error, not values grouped wrongly."""
    source = _rewritten(tmp_path, releases["int3-asym"], "regrouped", {"extra_config": {
        "model.layers.0.mlp.experts.0.gate_proj": {"group_size": 64}}})
    with open_checkpoint(source) as ckpt, pytest.raises(CheckpointFormatError, match="groups of 64"):
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["int4-sym-mixed", "int4-awq"])
def test_pruning_equals_pruning_it_dequantized(tmp_path, releases, name):
    """prune copies the kept experts' codes and scales as they are (renumbered; the config kept), choosing them on
    the weights dequantized: the pruned release, dequantized, is the dequantized release pruned. In the mixed
    release expert 1 (its extra_config names it by number) is kept where it is, expert 3 renumbered to 2."""
    from moetool.ops.profile import ProfileOptions

    dense = tmp_path / "dense"
    _dequantized(releases[name], dense, "fp32")
    options = PruneOptions(experts={0: [0, 1, 3], 1: [0, 1, 3]},
                           calibration=ProfileOptions(token_ids=releases["ids"], seq_len=16, dtype="fp32",
                                                      device="cpu"))
    with open_checkpoint(releases[name]) as ckpt:
        prune(ckpt, tmp_path / "pruned", options)
    with open_checkpoint(dense) as ckpt:
        prune(ckpt, tmp_path / "dense-pruned", options)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((releases[name] / "config.json").read_text())[
        "quantization_config"]
    got = _dequantized(tmp_path / "pruned", tmp_path / "out", "fp32")
    want = load_file(tmp_path / "dense-pruned" / "model.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_pruning_refuses_renumbering_what_extra_config_names(tmp_path, releases):
    """Renumbering expert 2 to 1 would change what extra_config says of it (expert 1 is named by a pattern, searched
    in the module's name as AutoRound's loader does, and layer 1's down_proj by its exact name): refused before
    writing, with the pattern alone too."""
    source = releases["int4-sym-mixed"]
    extra = json.loads((source / "config.json").read_text())["quantization_config"]["extra_config"]
    pattern_only = _rewritten(tmp_path, source, "pattern-only", {"extra_config": {
        k: v for k, v in extra.items() if not k.startswith("model.")}})
    for release in (source, pattern_only):
        with open_checkpoint(release) as ckpt, pytest.raises(UnsupportedError, match="renumbers"):
            prune(ckpt, tmp_path / "p", PruneOptions(experts={0: [0, 2], 1: [0, 2]}))
    assert not (tmp_path / "p").exists()


def test_pruning_renumbers_experts_extra_config_lists_alike(tmp_path, releases):
    """AutoRound lists by exact name every layer whose settings differ from the config's: with every expert listed
    alike (and the routers by name), renumbering changes nothing it says, so the release is pruned."""
    source = releases["int4-awq"]
    names = {k.removesuffix(".qweight") for k in load_file(source / "model.safetensors") if ".experts." in k and
             k.endswith(".qweight")}
    listed = _rewritten(tmp_path, source, "listed", {"extra_config": {name: {"sym": True} for name in names} | {
        f"model.layers.{i}.mlp.gate": {"bits": 16, "data_type": "float"} for i in range(2)}})
    with open_checkpoint(listed) as ckpt:
        report = prune(ckpt, tmp_path / "p", PruneOptions(experts={0: [0, 2], 1: [1, 3]}))
    assert report.kept == {0: [0, 2], 1: [1, 3]}


def test_cli(tmp_path, releases):
    """inspect names the form; a form it cannot read is a one-line error (exit 7), nothing written."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moetool", *map(str, args)], capture_output=True, text=True)

    inspected = cli("inspect", releases["int4-awq"], "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["quantization"] == ["auto-round int4 g16"]
    bad = _rewritten(tmp_path, releases["int3-asym"], "bad", {"packing_format": "auto_round:fp8"})
    converted = cli("convert", bad, tmp_path / "out", "--dequantize")
    assert converted.returncode == 7 and "auto_round:fp8" in converted.stderr
    assert "Traceback" not in converted.stderr and len(converted.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()
