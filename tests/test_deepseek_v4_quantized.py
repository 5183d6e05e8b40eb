"""DeepSeek-V4's quantized hub checkpoints (V4-Flash, V4-Pro, their Base models): inspect, convert --dequantize,
load_model and inspect --experts read them. The hub form is made here from the tiny model (DeepSeek's names, no
model. prefix): attention, indexer and shared-expert weights block FP8 (e4m3, one ue8m0 scale per block, in
X.scale), routed experts FP4 e2m1 (int8, two values a byte, the low nibble first, one ue8m0 scale per 32
inputs); the Base form has FP8 experts and float32 scales. The oracle is transformers' own dequantization
(FineGrainedFP8Config(dequantize=True), its Fp8Dequantize), never moetool's."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.errors import CheckpointFormatError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from tests.test_deepseek_v4 import hub_name
from tests.tiny import save_tiny

TINY = "deepseek_v4-fp4"   # (experts 32 wide: one FP4 scale per 32 inputs)
FP8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
       "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3")
E2M1 = torch.tensor((0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6))
# variant -> (weight_block_size, experts fp4, expert_dtype in config.json, float32 scales)
VARIANTS = {
    "flash": ((128, 128), True, "fp4", False),   # the hub's blocks: the tiny's matrices are one partial block
    "pro": ((16, 16), True, None, False),        # no expert_dtype key; several whole blocks a matrix
    "base": ((128, 128), False, "fp8", True),    # FP8 experts, float32 scales
    "base-16": ((16, 16), False, "fp8", True),   # the same in blocks of 16: several a matrix
}


def _pow2(x):
    """The power of two at or above X (an e8m0 scale)."""
    return torch.exp2(torch.ceil(torch.log2(x.clamp(min=2.0 ** -100))))


def _fp8(w, block, f32):
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = w
    amax = padded.reshape(grid[0], block[0], grid[1], block[1]).abs().amax((1, 3)) / 448
    scale = amax if f32 else _pow2(amax)
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale.float() if f32 else scale.to(torch.float8_e8m0fnu)


def _fp4(w):
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 32, 32)
    scale = _pow2(groups.abs().amax(-1) / 6)
    codes = ((groups / scale.unsqueeze(-1)).unsqueeze(-1) - E2M1).abs().argmin(-1).reshape(rows, cols)
    return (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).view(torch.int8), scale.to(torch.float8_e8m0fnu)



def save_hub_quantized(path, variant="flash"):
    block, fp4, expert_dtype, f32 = VARIANTS[variant]
    save_tiny(TINY, path)   # (the hub form: transformers' save, attn.kv_norm as the hub names it)
    out = {}
    for name, tensor in load_file(path / "model.safetensors").items():
        name = hub_name(name)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".", 2)[-1] in FP8:
            out[name], out[module + ".scale"] = _fp8(tensor, block, f32)
        elif name.endswith(".weight") and ".ffn.experts." in name:
            out[name], out[module + ".scale"] = _fp4(tensor) if fp4 else _fp8(tensor, block, f32)
        else:
            out[name] = tensor
    if variant == "flash":   # the hub's multi-token-prediction block (transformers ignores mtp.*), quantized alike
        last = f"layers.{json.loads((path / 'config.json').read_text())['num_hidden_layers'] - 1}."
        out.update({"mtp.0." + n.removeprefix(last): t.clone() for n, t in out.items() if n.startswith(last)})
        out["mtp.0.e_proj.weight"], out["mtp.0.e_proj.scale"] = _fp8(torch.randn(32, 64) / 8, block, f32)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "scale_fmt": "ue8m0", "weight_block_size": list(block)}
    if f32:
        del config["quantization_config"]["scale_fmt"]
    if expert_dtype:
        config["expert_dtype"] = expert_dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    made = {}

    def get(variant="flash"):
        if variant not in made:
            made[variant] = save_hub_quantized(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return get


def oracle(path, dtype=torch.float32):
    """transformers' own load of the quantized checkpoint, dequantized (on CPU as it must be)."""
    return transformers.DeepseekV4ForCausalLM.from_pretrained(
        path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=dtype).eval()


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _inspect(path, **kwargs):
    with open_checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt, **kwargs)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_counts_the_weights_the_quantized_tensors_hold(hub, variant):
    path = hub(variant)
    block, fp4, _, f32 = VARIANTS[variant]
    report = _inspect(path)
    assert [p.code for p in report.problems] == (["mtp"] if variant == "flash" else [])
    # transformers' count of the unquantized model: an FP4 byte holds two parameters, scales are none
    assert report.total_params == json.loads((path / "expected.json").read_text())["params"]
    fp8 = f"fp8 block {block[0]}x{block[1]} ({'f32' if f32 else 'ue8m0'} scales)"
    assert report.quantization == sorted({fp8, "experts fp4 e2m1 (ue8m0 scales per 32)" if fp4 else "experts " + fp8})
    assert _cli("inspect", "--strict", str(path)).returncode == 0


def test_inspect_flags_a_missing_or_misfit_scale(hub, tmp_path):
    tensors = load_file(hub() / "model.safetensors")
    for case, edit in (("missing_scale", lambda t: t.pop("layers.1.attn.wq_a.scale")),
                       ("bad_scale", lambda t: t.update({"layers.2.ffn.experts.1.w2.scale": torch.ones(
                           16, 1).to(torch.float8_e8m0fnu)}))):
        path = tmp_path / case
        path.mkdir()
        (path / "config.json").write_text((hub() / "config.json").read_text())
        changed = dict(tensors)
        edit(changed)
        save_file(changed, path / "model.safetensors")
        assert case in [p.code for p in _inspect(path).problems]
        strict = _cli("inspect", "--strict", str(path))
        assert strict.returncode != 0 and case in strict.stderr + strict.stdout
        if case == "bad_scale":
            with open_checkpoint(path) as ckpt, pytest.raises(CheckpointFormatError, match="scales"):
                convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True))


@pytest.mark.parametrize("variant,layout,dtype", [("flash", None, None), ("flash", "fused", "bf16"),
                                                  ("flash", None, "fp32"), ("pro", "fused", "fp32"),
                                                  ("base", None, "fp32"), ("base", "fused", "bf16")])
def test_dequantize_equals_transformers_dequantization(hub, tmp_path, variant, layout, dtype):
    src = hub(variant)
    with open_checkpoint(src) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions(dequantize=True, dtype=dtype, layout=layout))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    written = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(file))
    assert not any(t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8) for t in written.values())
    torch_dtype = torch.bfloat16 if dtype in (None, "bf16") else torch.float32
    want = oracle(src, torch_dtype)
    got = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch_dtype).eval()
    want_state, got_state = want.state_dict(), got.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    assert torch.equal(_logits(got), _logits(want))


@pytest.mark.parametrize("variant", ["flash", "base"])
def test_load_model_and_streamed_eval_read_the_quantized_checkpoint(hub, tmp_path, variant):
    src = hub(variant)
    assert torch.equal(_logits(moetool.load_model(src, dtype=torch.bfloat16)), _logits(oracle(src, torch.bfloat16)))
    # moetool's loader dequantizes in the load dtype, as transformers' does
    got, want = _logits(moetool.load_model(src, dtype=torch.float32)), _logits(oracle(src))
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    (tmp_path / "ids.json").write_text(json.dumps(torch.randint(0, 64, (96,)).tolist()))
    with open_checkpoint(src) as ckpt:
        full, streamed = (evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=24, mode=mode))
                          for mode in ("full", "streamed"))
    assert streamed.mode == "streamed" and streamed.nll_mean == pytest.approx(full.nll_mean, rel=1e-6)


@pytest.mark.parametrize("variant", ["flash", "base", "base-16"])
def test_expert_statistics_of_the_dequantized_experts(hub, variant):
    report = _inspect(hub(variant), experts=True)
    state = oracle(hub(variant)).state_dict()
    assert [s.layer for s in report.experts] == [0, 1, 2]
    for stats in report.experts:
        prefix = f"model.layers.{stats.layer}.mlp.experts."
        gate_up, down = state[prefix + "gate_up_proj"], state[prefix + "down_proj"]
        want = (gate_up.flatten(1).square().sum(1) + down.flatten(1).square().sum(1)).sqrt()
        assert stats.norms == pytest.approx(want.tolist(), rel=1e-5)


def test_fp4_unpacks_as_transformers_does():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from moetool.quant.dequant import dequantize_fp4

    packed = torch.randint(-128, 128, (6, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    scale = torch.exp2(torch.randint(-4, 4, (6, 5)).float()).to(torch.float8_e8m0fnu)   # 80 values: groups of 16
    want = Fp8Dequantize(None)._dequantize_one(packed, scale, torch.float32)
    assert torch.equal(dequantize_fp4(packed, scale, torch.float32), want)


def test_a_scale_parameter_is_a_companion_only_beside_a_quantized_weight():
    from moetool.arch import get_family
    from moetool.arch.matcher import Classifier, scale_companions

    class Ref:
        def __init__(self, dtype):
            self.dtype = dtype

    tensors = {"model.layers.0.attn_hc.scale": Ref("F32"), "model.layers.0.attn_hc.fn": Ref("F32"),
               "layers.0.q_norm.scale": Ref("BF16"), "layers.0.q_norm.weight": Ref("BF16"),
               "layers.0.attn.wq_a.scale": Ref("F8_E8M0"), "layers.0.attn.wq_a.weight": Ref("F8_E4M3"),
               "layers.0.ffn.experts.0.w1.scale": Ref("F8_E8M0"), "layers.0.ffn.experts.0.w1.weight": Ref("I8")}
    assert scale_companions(tensors) == {"layers.0.attn.wq_a.scale", "layers.0.ffn.experts.0.w1.scale"}
    classifier = Classifier(get_family("deepseek_v4"), 0, tensors)
    assert [classifier.classify(n).aux for n in tensors] == [False, False, False, False, True, False, True, False]


def test_pruning_the_quantized_checkpoint_is_pruning_it_dequantized(hub, tmp_path):
    """prune keeps the quantized experts (their .scale companions renumbered with them), remaps the token table by
    the dequantized experts' similarity: dequantized afterwards, the same as dequantized first, then pruned."""
    from moetool.ops.convert import ConvertOptions, convert
    from moetool.ops.prune import PruneOptions, prune

    src = hub("flash")
    options = PruneOptions(keep=2, criterion="random", seed=3)
    with open_checkpoint(src) as ckpt:
        report = prune(ckpt, tmp_path / "pruned", options)
        convert(ckpt, tmp_path / "plain", ConvertOptions(dequantize=True, dtype="fp32"))
    with open_checkpoint(tmp_path / "pruned") as ckpt:
        assert any(ref.dtype == "I8" for ref in ckpt.tensors.values())   # (still quantized)
        convert(ckpt, tmp_path / "pruned-plain", ConvertOptions(dequantize=True, dtype="fp32"))
    with open_checkpoint(tmp_path / "plain") as ckpt:
        assert prune(ckpt, tmp_path / "plain-pruned", options).kept == report.kept
    got = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "pruned-plain", dtype=torch.float32).eval()
    want = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "plain-pruned", dtype=torch.float32).eval()
    assert torch.equal(_logits(got), _logits(want))
