"""`moetool quantize --method gptq`: GPTQ per routed expert on the Hessian of the calibration tokens
routed to it, layer by layer on the quantized earlier layers (tests/test_gptq.py checks the
algorithm against a plain reference; here, the Hessians it is given and the result)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moetool.checkpoint import open_checkpoint
from moetool.errors import MoetoolError, UnsupportedError, UsageError
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions
from moetool.ops.quantize import QuantizeOptions, quantize
from moetool.quant.formats import parse_format
from moetool.quant.gptq import gptq


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (40 * 16,), generator=torch.Generator().manual_seed(4)).tolist()))
    return ProfileOptions(token_ids=path, seq_len=40, batch_size=8)


def _stored(folder, name):
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(name)]
            if keys:
                return {k[len(name):]: f.get_tensor(k) for k in keys}
    raise KeyError(name)


def test_first_layer_experts_are_gptq_of_their_routed_tokens(tmp_path, tiny, calibration):
    """Layer 0 sees the embeddings either way: each expert's stored codes are gptq() of its weight with
    the Hessian of the tokens routed to it, computed here from transformers' own forward."""
    import transformers

    folder = tiny("qwen3_moe")
    with open_checkpoint(folder) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                                calibration=calibration, min_tokens=1))
        weights = {n: t.load().float() for n, t in ckpt.tensors.items() if ".layers.0.mlp." in n}
    assert report.method == "gptq" and sum(report.coverage[0]) == 2 * 16 * 40
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = {}
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0]))
    ids = torch.tensor(json.loads(calibration.token_ids.read_text())).reshape(16, 40)
    with torch.no_grad():
        for start in range(0, 16, 8):
            model.model(ids[start:start + 8])
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]])
    chosen = (x @ weights["model.layers.0.mlp.gate.weight"].T).topk(2, dim=-1).indices
    fmt = parse_format("int4-g8-sym")
    for e in range(4):
        xe = x[(chosen == e).any(-1)]
        assert report.coverage[0][e] == xe.shape[0]
        name = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        want = gptq(weights[name], 2 * xe.T @ xe / xe.shape[0], fmt, act_order=True)   # the default
        got = _stored(tmp_path / "q", name)
        assert torch.equal(got[""], want.parts[""]) and torch.equal(got[".scales"], want.parts[".scales"])


def test_sequential_changes_later_layers_only(tmp_path, tiny, calibration):
    folder = tiny("qwen3_moe")
    for sequential in (True, False):
        with open_checkpoint(folder) as ckpt:
            quantize(ckpt, tmp_path / str(sequential), QuantizeOptions(
                format="int3-g8-asym", method="gptq", calibration=calibration, sequential=sequential))
    def codes(folder, layer):
        return torch.cat([_stored(folder, f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight")[""].flatten()
                          for e in range(4) for p in ("gate", "up", "down")])

    assert torch.equal(codes(tmp_path / "True", 0), codes(tmp_path / "False", 0))
    assert not torch.equal(codes(tmp_path / "True", 1), codes(tmp_path / "False", 1))


def test_gptq_beats_round_to_nearest_on_held_out_text(tmp_path):
    calibration = ProfileOptions(max_tokens=4096, seq_len=256, batch_size=8)
    kl = {}
    for method in ("rtn", "gptq"):
        with open_checkpoint("builtin:tiny-moe") as ckpt:
            quantize(ckpt, tmp_path / method, QuantizeOptions(format="int3-g32-sym", method=method,
                                                              calibration=calibration))
        with open_checkpoint(tmp_path / method) as q, open_checkpoint("builtin:tiny-moe") as ref:
            kl[method] = evaluate(q, EvalOptions(max_tokens=4096, seq_len=256), reference=ref).kl_mean
    assert kl["gptq"] < 0.8 * kl["rtn"]


def test_bad_requests_write_nothing(tmp_path, tiny, calibration):
    folder = tiny("qwen3_moe")
    with open_checkpoint(folder) as ckpt:
        with pytest.raises(UsageError, match="bitsandbytes"):
            quantize(ckpt, tmp_path / "a", QuantizeOptions(format="nf4", method="gptq"))
        with pytest.raises(UsageError, match="integer"):
            quantize(ckpt, tmp_path / "b", QuantizeOptions(bits_budget=3.0, candidates="int3-g8-asym,nf4-b64",
                                                           method="gptq"))
        short = tmp_path / "short.json"
        short.write_text("[1, 2, 3]")
        with pytest.raises(MoetoolError, match="fewer than one sequence"):
            quantize(ckpt, tmp_path / "c", QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                           calibration=ProfileOptions(token_ids=short, seq_len=40)))
        with pytest.raises(MoetoolError, match="outside the model's vocabulary"):   # a dry run checks the data too
            short.write_text(json.dumps([1, 2, 99] * 40))
            quantize(ckpt, tmp_path / "d", QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                           calibration=ProfileOptions(token_ids=short, seq_len=40)),
                     dry_run=True)
        with pytest.raises(MoetoolError, match="turns the text into no tokens"):   # no vocabulary: no text
            quantize(ckpt, tmp_path / "d", QuantizeOptions(format="int4-g8-sym", method="gptq"), dry_run=True)
        short.write_text(json.dumps([1, 2, 3] * 40))
        report = quantize(ckpt, tmp_path / "d", QuantizeOptions(format="int4-g8-sym", method="gptq", calibration=
                                                                ProfileOptions(token_ids=short, seq_len=40)),
                          dry_run=True)
    assert report.coverage == {} and report.method == "gptq" and not any((tmp_path / n).exists() for n in "abcd")


def test_cli(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MOETOOL_DEBUG"} | {"COLUMNS": "200"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "moetool", "quantize", "builtin:tiny-moe", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)

    bad = run(tmp_path / "a", "--format", "nf4", "--method", "gptq")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--method rtn" in bad.stderr
    assert not (tmp_path / "a").exists()
    ok = run(tmp_path / "b", "--format", "int4-g32-sym", "--method", "gptq", "--max-tokens", 1024, "--seq-len", 128,
             "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["method"] == "gptq" and sum(report["coverage"]["0"]) == 2 * 1024
    for args, said in ((["--format", "int4-g32-sym", "--damp", "0.5"], "options of --method gptq"),
                       (["--format", "int4-g32-sym", "--max-tokens", "99"], "nothing is calibrated"),
                       (["--format", "int4-g32-sym", "--bits-budget", "4"], "give one of the two"),
                       (["--bits-budget", "inf", "--policy", "uniform"], "bits-budget"),
                       (["--format", "int4-g32-sym", "--emit-llama-quantize", tmp_path], "is a folder")):
        bad = run(tmp_path / "c", *args)   # options that would be ignored, or fail after the work: refused first
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
        assert not (tmp_path / "c").exists()


def test_experts_it_cannot_calibrate_are_refused(tmp_path, tiny, calibration):
    """Llama 4 stores its experts [E, H, 2I] without saying so (no is_transposed): refused, not misread."""
    with open_checkpoint(tiny("llama4_text")) as ckpt:
        with pytest.raises(UnsupportedError, match="transposed"):
            quantize(ckpt, tmp_path / "out", QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                             calibration=calibration))
    assert not (tmp_path / "out").exists()


def _inputs(model, module_name: str, ids, batch: int = 8):
    """What transformers' own forward feeds MODULE_NAME, over IDS in micro-batches."""
    seen = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            model.model(ids[start:start + batch])
    handle.remove()
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in seen])


def test_rules_weights_are_gptq_of_all_their_tokens(tmp_path, tiny, calibration):
    """--rules under --method gptq: attention, shared experts and dense MLPs are GPTQ on the Hessian of
    every token at their module (q, k and v share one), as transformers' forward delivers it."""
    import transformers

    folder = tiny("qwen2_moe")   # a shared expert in its MoE layers, a dense MLP in layer 1
    rules = ("attention=int4-g8-sym", "shared_experts=int8-g8-sym", "dense_mlp=int4-g8-asym")
    with open_checkpoint(folder) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8-sym", method="gptq", rules=rules,
                                                                sequential=False, calibration=calibration))
        weights = {n: t.load().float() for n, t in ckpt.tensors.items()}
    assert not any("rounded to nearest" in w for w in report.warnings), report.warnings
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(calibration.token_ids.read_text())).reshape(16, 40)
    checked = 0
    for module, fmt in (("model.layers.0.self_attn.q_proj", "int4-g8-sym"),
                        ("model.layers.0.self_attn.v_proj", "int4-g8-sym"),
                        ("model.layers.2.self_attn.o_proj", "int4-g8-sym"),
                        ("model.layers.0.mlp.shared_expert.up_proj", "int8-g8-sym"),
                        ("model.layers.1.mlp.up_proj", "int4-g8-asym")):
        name = module + ".weight"
        assert report.rule_tensors[name] == fmt
        x = _inputs(model, module, ids)
        want = gptq(weights[name], 2 * x.T @ x / x.shape[0], parse_format(fmt), act_order=True)
        got = _stored(tmp_path / "q", name)
        rtn = parse_format(fmt).quantize(weights[name])
        assert torch.equal(got[""], want.parts[""]) and not torch.equal(got[""], rtn[""])
        checked += 1
    assert checked == 5
    with open_checkpoint(folder) as ckpt:   # non-integer rule formats are refused before any work
        with pytest.raises(UsageError, match="integer"):
            quantize(ckpt, tmp_path / "r", QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                           rules=("attention=nf4",)))
    assert not (tmp_path / "r").exists()


def test_budget_weighs_candidates_by_their_gptq_error(tmp_path, tiny, calibration):
    """Under --bits-budget with GPTQ, a candidate's cost is its GPTQ output error on the expert's own
    routed tokens, trace((W - Q) H (W - Q)^T): recomputed here for layer 0 from transformers' forward."""
    import transformers

    from moetool.quant.gptq import output_error
    from moetool.runner import sequential

    folder = tiny("qwen3_moe")
    candidates = [parse_format(f) for f in ("int2-g8-asym", "int4-g8-sym")]
    costs = {}
    real = sequential.GptqCosts.update

    def spy(self, index, layer):
        real(self, index, layer)
        costs.update(self.costs)

    sequential.GptqCosts.update = spy
    try:
        with open_checkpoint(folder) as ckpt:
            report = quantize(ckpt, tmp_path / "q", QuantizeOptions(
                bits_budget=5.5, candidates="int2-g8-asym,int4-g8-sym", policy="uniform", method="gptq",
                calibration=calibration, min_tokens=1))
            weights = {n: t.load().float() for n, t in ckpt.tensors.items() if ".layers.0.mlp." in n}
    finally:
        sequential.GptqCosts.update = real
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(calibration.token_ids.read_text())).reshape(16, 40)
    x = _inputs(model, "model.layers.0.mlp", ids)
    chosen = (x @ weights["model.layers.0.mlp.gate.weight"].T).topk(2, dim=-1).indices
    for e in range(4):
        xe = x[(chosen == e).any(-1)]
        prefix = f"model.layers.0.mlp.experts.{e}."
        gate_up = torch.cat([weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"]])
        down = weights[prefix + "down_proj.weight"]
        g, u = (gate_up @ xe.T).T.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        h_gate_up, h_down = 2 * xe.T @ xe / xe.shape[0], 2 * h.T @ h / h.shape[0]
        for fmt in candidates:
            want = (output_error(gate_up, gptq(gate_up, h_gate_up, fmt, act_order=True).weight, h_gate_up) +
                    output_error(down, gptq(down, h_down, fmt, act_order=True).weight, h_down))
            assert costs[(0, e)][fmt.id] == pytest.approx(want, rel=1e-3)
    assert set(report.formats) == {"int2-g8-asym", "int4-g8-sym"}   # the budget mixes them
    assert report.expert_bits <= 5.5
    # and the allocation is the knapsack over those costs (uniform importance), not over rounding errors
    from moetool.ops.quantize import allocate

    rows = {(r.layer, r.expert): r for r in report.experts}
    shapes = [tuple(weights[f"model.layers.0.mlp.experts.0.{p}_proj.weight"].shape) for p in ("gate", "up", "down")]
    items = {key: [(sum(fmt.nbytes(shape, "float32") for shape in shapes), costs[key][fmt.id], fmt.id)
                   for fmt in candidates] for key in rows}
    want = allocate(items, 5.5 * sum(r.params for r in rows.values()) / 8)
    assert {key: r.format for key, r in rows.items()} == want


def test_sequential_rules_weights_are_written_back(tmp_path, tiny, calibration):
    """Sequentially, the quantized --rules weights are in place when the next layer is calibrated:
    with attention quantized too, layer 2's experts see other inputs (and get other codes) than
    without, while layer 0's experts (calibrated before any attention weight is rounded) do not."""
    folder = tiny("qwen2_moe")
    for rules in ((), ("attention=int2-g8-asym",)):
        with open_checkpoint(folder) as ckpt:
            quantize(ckpt, tmp_path / str(len(rules)), QuantizeOptions(format="int4-g8-sym", method="gptq",
                                                                       rules=rules, calibration=calibration))
    first, later = "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.2.mlp.experts.0.up_proj.weight"
    assert torch.equal(_stored(tmp_path / "0", first)[""], _stored(tmp_path / "1", first)[""])
    assert not torch.equal(_stored(tmp_path / "0", later)[""], _stored(tmp_path / "1", later)[""])


@pytest.mark.parametrize("family", ["nemotron_h", "glm5_next", "hy_v4", "minimax_m3_vl_text", "jetmoe"])
def test_experts_gptq_cannot_calibrate_are_refused_not_rounded(tmp_path, tiny, calibration, family):
    """Experts GPTQ cannot calibrate per expert (Nemotron-H's non-gated relu² and GLM-5.3-Flash's clamped
    SwiGLU, seen only as the model runs; Hy4's, MiniMax-M3's and JetMoE's gate and up held together, seen
    before): --method gptq refuses them instead of writing round-to-nearest under GPTQ's name, and
    nothing is written."""
    with open_checkpoint(tiny(family)) as ckpt, pytest.raises(UnsupportedError, match="stacked|together"):
        quantize(ckpt, tmp_path / "out", QuantizeOptions(format="int8-g16-sym", method="gptq",
                                                        calibration=calibration))
    assert not (tmp_path / "out").exists()
