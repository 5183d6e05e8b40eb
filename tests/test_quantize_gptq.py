"""`moetool quantize --method gptq`: GPTQ per routed expert on the Hessian of the calibration tokens
routed to it, layer by layer on the quantized earlier layers (tests/test_gptq.py checks the
algorithm against a plain reference; here, the Hessians it is given and the result)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moetool.checkpoint import open_checkpoint
from moetool.errors import MoetoolError, UsageError
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
        want = gptq(weights[name], 2 * xe.T @ xe / xe.shape[0], fmt)
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
        report = quantize(ckpt, tmp_path / "d", QuantizeOptions(format="int4-g8-sym", method="gptq"), dry_run=True)
    assert report.coverage == {} and not any((tmp_path / n).exists() for n in "abcd")


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
