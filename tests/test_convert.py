"""`moetool convert`: layouts, dtypes, shards, .bin, dequantization; oracles are transformers'
own loading and saving, safetensors' reader and bitsandbytes' dequantize."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.inspect import inspect_checkpoint
from tests.tiny import COMMON, TINY, load_reference

# families with both a per-expert (hub) and a fused layout; Llama 4's bf16 hub form is fused already
BOTH_LAYOUTS = ["mixtral", "deepseek_v4", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe",
                "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5_moe_text",
                "lfm2_moe", "exaone_moe", "dots1", "granitemoe", "granitemoeshared",
                "granitemoehybrid", "phimoe", "jamba", "ernie4_5_moe", "hunyuan_v1_moe",
                "cohere2_moe", "afmoe", "sarvam_moe", "qwen4_exp_text",
                "hy_v3", "axk1", "flint", "mellum", "beam", "axk2",
                "glm_moe_dsa", "solar_open", "sarvam_mla", "kimi_linear",
                "nemotron_h", "nemotron_h-latent", "mimo_v2_flash", "bailing_hybrid", "laguna", "kolibri1",
                "dots3_note_text",
                "glm4v_moe", "glm5_next", "longcat_flash", "mistral_large4"]
# families whose fused output names only the text model's layers as transformers does (hub prefix, held prefix):
# their other tensors (embedding, head, norm, a wrapper's vision tower, which transformers renames and whose wq/wk it
# permutes as it loads them) keep the hub's names and bytes
LAYERS_ONLY = {"mistral_large4": ("layers.", "model.language_model.layers.")}


def run(src, out, **options):
    verify = options.pop("verify", True)
    with open_checkpoint(src) as ckpt:
        return convert(ckpt, out, ConvertOptions(**options), verify=verify)


def tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def logits(path, ids, dtype=torch.float32):
    model = load_reference(path, dtype=dtype, device_map="cpu")
    model.set_experts_implementation("eager") if hasattr(model, "set_experts_implementation") else None
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", BOTH_LAYOUTS)
def test_layout_round_trip_is_bit_identical_and_loads(tmp_path, tiny, family):
    src = tiny(family)
    run(src, tmp_path / "fused", layout="fused")
    run(tmp_path / "fused", tmp_path / "back", layout="per-expert")
    original, fused, back = tensors(src), tensors(tmp_path / "fused"), tensors(tmp_path / "back")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    # the fused output is exactly what transformers writes with save_original_format=False
    reference = tensors(tiny(family, fused=True))
    if family in LAYERS_ONLY:
        hub, held = LAYERS_ONLY[family]
        rest = {k: t for k, t in original.items() if not k.startswith(hub)}
        assert {k: t for k, t in fused.items() if not k.startswith(held)}.keys() == rest.keys()
        assert all(torch.equal(fused[k], t) for k, t in rest.items())
        reference = {k: t for k, t in reference.items() if k.startswith(held)}
        fused = {k: t for k, t in fused.items() if k.startswith(held)}
    assert fused.keys() == reference.keys()
    assert all(torch.equal(fused[k], reference[k]) for k in reference)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    want = logits(src, ids)
    assert torch.equal(logits(tmp_path / "fused", ids), want)
    assert torch.equal(logits(tmp_path / "back", ids), want)
    with open_checkpoint(tmp_path / "fused") as ckpt:
        assert inspect_checkpoint(ckpt).layout == "fused"


def test_llama4_fused_to_per_expert_and_back(tmp_path, tiny):
    """Llama 4 stores bf16 experts fused and transposed; its per-expert form is the fp8 releases'."""
    src = tiny("llama4_text")
    run(src, tmp_path / "per", layout="per-expert")
    per = tensors(tmp_path / "per")
    fused = tensors(src)
    gate_up = fused["model.layers.1.feed_forward.experts.gate_up_proj"]   # [E, H, 2I]
    inter = gate_up.shape[2] // 2
    for e in range(4):
        assert torch.equal(per[f"model.layers.1.feed_forward.experts.{e}.gate_proj.weight"], gate_up[e, :, :inter].T)
        assert torch.equal(per[f"model.layers.1.feed_forward.experts.{e}.up_proj.weight"], gate_up[e, :, inter:].T)
    run(tmp_path / "per", tmp_path / "back", layout="fused")
    back = tensors(tmp_path / "back")
    assert back.keys() == fused.keys() and all(torch.equal(back[k], fused[k]) for k in fused)


def test_gpt_oss_per_expert_slices_and_back(tmp_path, tiny):
    """GPT-OSS has only the fused layout on the hub; moetool's per-expert form (what quantize
    stores) is expert e of each fused tensor, as it is."""
    src = tiny("gpt_oss")
    run(src, tmp_path / "per", layout="per-expert")
    per, fused = tensors(tmp_path / "per"), tensors(src)
    for e in range(4):
        for proj in ("gate_up_proj", "down_proj"):
            assert torch.equal(per[f"model.layers.1.mlp.experts.{e}.{proj}.weight"],
                               fused[f"model.layers.1.mlp.experts.{proj}"][e])
    with open_checkpoint(tmp_path / "per") as ckpt:
        report = inspect_checkpoint(ckpt)
        assert report.layout == "per-expert" and report.problems == []
    run(tmp_path / "per", tmp_path / "back", layout="fused")
    back = tensors(tmp_path / "back")
    assert back.keys() == fused.keys() and all(torch.equal(back[k], fused[k]) for k in fused)


def test_fp32_to_bf16(tmp_path, tiny):
    src = tiny("qwen3_moe")
    report = run(src, tmp_path / "bf16", dtype="bf16")
    assert report.verified
    out = tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    got = logits(tmp_path / "bf16", ids, dtype=torch.float32)   # upcast on load: same values as bf16 weights
    want = logits(src, ids)
    assert torch.allclose(got, want, atol=0.05, rtol=0.05) and not torch.equal(got, want)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    # transformers 5 wrote num_local_experts; transformers 4.57 reads num_experts, so convert adds it
    assert config["num_experts"] == config["num_local_experts"] == 4
    assert config["torch_dtype"] == "bfloat16"
    assert "rope_theta" in config


def test_router_kept_in_fp32(tmp_path, tiny):
    src = tiny("deepseek_v3")
    run(src, tmp_path / "bf16", dtype="bf16")
    out = tensors(tmp_path / "bf16")
    assert out["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert out["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    run(src, tmp_path / "all", dtype="bf16", cast_fp32_roles=True)
    assert tensors(tmp_path / "all")["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_shards_and_index(tmp_path, tiny):
    src = tiny("mixtral")
    run(src, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    for file in files:
        with safe_open(tmp_path / "sharded" / file, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == file} == set(f.keys())
            assert f.metadata()["format"] == "pt"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(src).values())
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(logits(tmp_path / "sharded", ids), logits(src, ids))


def test_bin_to_safetensors(tmp_path, tiny):
    src = tiny("olmoe")
    (tmp_path / "bin").mkdir()
    shutil.copy(src / "config.json", tmp_path / "bin")
    torch.save(load_file(src / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    run(tmp_path / "bin", tmp_path / "st", dtype="bf16")
    want = load_file(src / "model.safetensors")
    got = tensors(tmp_path / "st")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].bfloat16()) for k in want)


def test_files_copied_and_model_card(tmp_path, tiny):
    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    run(src, tmp_path / "out", dtype="bf16")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja", "README.md", "config.json"} <= names
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(src) in card and "moetool" in card


# ---------------------------------------------------------------- dequantization

def _fp8_copy(src, out):
    """A copy of the checkpoint SRC whose config says block fp8 (the weights are then written over)."""
    shutil.copytree(src, out)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_dequantize_block_fp8(tmp_path, tiny):
    src = tiny("deepseek_v3")
    fp8 = _fp8_copy(src, tmp_path / "fp8")
    weights = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    exact = {}
    for name in [n for n in weights if ".experts." in n]:
        w = weights[name]   # tiny tensors get one 128x128 block; the next test exercises several
        scale = torch.rand(-(-w.shape[0] // 128), -(-w.shape[1] // 128), generator=g) + 0.5
        q = (w / scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]])
        weights[name] = q.to(torch.float8_e4m3fn)
        weights[name + "_scale_inv"] = scale
    for name in [n for n in weights if n.endswith("_scale_inv")]:
        base = name.removesuffix("_scale_inv")
        q, s = weights[base].float(), weights[name]
        expanded = torch.zeros_like(q)
        for i in range(q.shape[0]):
            for j in range(q.shape[1]):
                expanded[i, j] = s[i // 128, j // 128]
        exact[base] = (q * expanded).bfloat16()
    save_file(weights, fp8 / "model.safetensors")
    run(fp8, tmp_path / "deq", dequantize=True)
    out = tensors(tmp_path / "deq")
    assert not any(k.endswith("_scale_inv") for k in out)
    for name, want in exact.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())


def test_dequantize_block_fp8_several_blocks(tmp_path):
    from moetool.quant.dequant import dequantize_fp8_block

    g = torch.Generator().manual_seed(3)
    q = torch.randn(300, 260, generator=g).to(torch.float8_e4m3fn)
    s = torch.rand(3, 3, generator=g) + 0.5
    want = torch.empty(300, 260)
    for i in range(300):
        for j in range(260):
            want[i, j] = q[i, j].float() * s[i // 128, j // 128]
    assert torch.equal(dequantize_fp8_block(q, s, torch.float32), want)


def _mxfp4_checkpoint(path):
    """A GPT-OSS checkpoint whose experts are random MXFP4 blocks and scales, as the releases store them."""
    config = transformers.GptOssConfig(**dict(COMMON, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                              num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                              layer_types=["sliding_attention", "full_attention"]))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        experts, hidden, two_inter = weights.pop(p + "gate_up_proj").shape
        inter = weights.pop(p + "down_proj").shape[1]
        for name, rows, cols in (("gate_up_proj", two_inter, hidden), ("down_proj", hidden, inter)):
            weights[p + name + "_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8,
                                                          generator=g)
            weights[p + name + "_scales"] = torch.randint(118, 130, (experts, rows, cols // 32), dtype=torch.uint8,
                                                          generator=g)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(data))
    return weights


def test_dequantize_mxfp4_matches_transformers(tmp_path):
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    weights = _mxfp4_checkpoint(tmp_path / "mx")
    run(tmp_path / "mx", tmp_path / "deq", dequantize=True)
    out = tensors(tmp_path / "deq")
    assert not any(k.endswith(("_blocks", "_scales")) for k in out)
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):
            p = f"model.layers.{layer}.mlp.experts.{name}"
            # transformers' own unpacking; it returns the in-memory [E, in, out] orientation
            want = _convert_moe_packed_tensors(weights[p + "_blocks"], weights[p + "_scales"], dtype=torch.bfloat16)
            assert torch.equal(out[p], want)
    # transformers' own dequantizing load of the mxfp4 checkpoint computes the same logits
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mx", quantization_config=transformers.Mxfp4Config(dequantize=True), device_map="cpu",
        dtype=torch.bfloat16)
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq", device_map="cpu",
                                                                  dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, converted(ids).logits)


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8", "nf4-bf16-storage"])
def test_dequantize_bitsandbytes(tmp_path, tiny, mode):
    """(nf4-bf16-storage: codes stored as bf16 elements, bnb_4bit_quant_storage of FSDP-QLoRA.)"""
    import bitsandbytes.functional as F

    src = tiny("qwen2_moe")
    storage = {"bnb_4bit_quant_storage": torch.bfloat16} if mode.endswith("bf16-storage") else {}
    mode = mode.split("-")[0]
    config = (transformers.BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
              transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, **storage))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path / "bnb")
    run(tmp_path / "bnb", tmp_path / "deq", dequantize=True, dtype="fp32")
    out = tensors(tmp_path / "deq")
    checked = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if mode != "int8" and hasattr(weight, "quant_state"):
            want = F.dequantize_4bit(weight.data, weight.quant_state).float()   # bitsandbytes' own
        elif mode == "int8" and getattr(weight, "SCB", None) is not None:
            want = F.int8_vectorwise_dequant(weight.data, weight.SCB)                 # bitsandbytes' own
        else:
            continue
        assert torch.equal(out[name + ".weight"], want), name
        checked += 1
    assert checked >= 4
    assert set(out) == set(load_file(src / "model.safetensors"))
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    ids = torch.randint(0, 64, (1, 6))
    assert logits(tmp_path / "deq", ids).isfinite().all()


def test_quantized_layout_change_needs_dequantize(tmp_path, tiny):
    from moetool.errors import UnsupportedError

    src = tiny("deepseek_v3")
    fp8 = tmp_path / "fp8"
    shutil.copytree(src, fp8)
    weights = load_file(src / "model.safetensors")
    for name in [n for n in weights if ".experts." in n]:
        weights[name + "_scale_inv"] = torch.ones(1, 1)
        weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, fp8 / "model.safetensors")
    with pytest.raises(UnsupportedError, match="--dequantize"):
        run(fp8, tmp_path / "out", layout="fused")
    run(fp8, tmp_path / "out", layout="fused", dequantize=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors(tmp_path / "out")


def test_every_tiny_family_converts_to_bf16(tmp_path, tiny):
    for family in TINY:
        report = run(tiny(family), tmp_path / family, dtype="bf16")
        assert report.verified, family


V4_SCRIPT = """
import json, sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
with torch.no_grad():
    print(json.dumps(model(torch.tensor([[1, 5, 9, 3, 7]])).logits.tolist()))
"""


def test_transformers_4_57_reads_the_converted_checkpoint(tmp_path, tiny):
    """transformers 4.57 (installed beside the package by .ci/run into .ci/transformers4) loads the
    bf16 output, whose config convert kept readable; it cannot load the transformers-5-saved source."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    v4 = Path(os.environ.get("MOETOOL_TRANSFORMERS4", Path(__file__).parents[1] / ".ci" / "transformers4"))
    if not (v4 / "transformers").is_dir():
        pytest.skip("transformers 4.57 is not installed in .ci/transformers4")
    src = tiny("qwen3_moe")
    run(src, tmp_path / "bf16", dtype="bf16")
    env = {**os.environ, "PYTHONPATH": str(v4)}
    proc = subprocess.run([sys.executable, "-c", V4_SCRIPT, str(tmp_path / "bf16")], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, logits(tmp_path / "bf16", torch.tensor([[1, 5, 9, 3, 7]])), atol=1e-4)
    source = subprocess.run([sys.executable, "-c", V4_SCRIPT, str(src)], capture_output=True, text=True, env=env)
    assert source.returncode != 0 and "size mismatch" in source.stderr


def test_experts_of_different_shapes_are_not_stacked(tmp_path, tiny):
    """One expert stored transposed (the same number of values) would be scrambled into the fused tensor."""
    from moetool.errors import CheckpointFormatError

    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    state = load_file(src / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    state[name] = state[name].T.contiguous()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(src) as ckpt, pytest.raises(CheckpointFormatError, match="experts.2.w1"):
        convert(ckpt, tmp_path / "out", ConvertOptions(layout="fused"))
    assert not (tmp_path / "out").exists()


def test_gguf_and_plain_dequantize_are_said_plainly(tmp_path, tiny):
    from moetool.errors import UnsupportedError
    from tests.gguf_fixtures import write_family

    gguf = write_family("qwen3_moe", tmp_path / "m.gguf", qtype="Q8_0")[0]
    with open_checkpoint(gguf) as ckpt, pytest.raises(UnsupportedError, match="GGUF"):
        convert(ckpt, tmp_path / "out", ConvertOptions())
    with open_checkpoint(tiny("mixtral")) as ckpt:   # nothing to dequantize: the dtype stays what it is
        convert(ckpt, tmp_path / "plain", ConvertOptions(dequantize=True))
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) in (None, "float32")


def test_float16_refuses_values_it_would_make_infinite(tmp_path, tiny):
    from moetool.errors import UsageError

    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.block_sparse_moe.experts.1.w1.weight"][0, 0] = 1e6   # beyond float16's 65504
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(src) as ckpt:
        with pytest.raises(UsageError, match="experts.1.w1.weight: holds values beyond float16"):
            convert(ckpt, tmp_path / "out", ConvertOptions(dtype="fp16"))
        assert not (tmp_path / "out").exists()
        convert(ckpt, tmp_path / "bf16", ConvertOptions(dtype="bf16"))   # bf16 holds it
    assert torch.isfinite(load_file(tmp_path / "bf16" / "model.safetensors")[
        "model.layers.0.block_sparse_moe.experts.1.w1.weight"]).all()


def test_dequantize_block_fp8_expert_stacks(tmp_path, tiny):
    """Step 3.7's FP8 releases store each layer's experts stacked [E, rows, cols] with scales
    [E, rows/128, cols/128]: expert e dequantizes with its own scales, and the model runs on them."""
    import moetool
    from tests.tiny import load_reference

    src = tiny("step3p7")
    fp8 = _fp8_copy(src, tmp_path / "fp8")
    weights = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    stacks = [n for n in weights if ".moe." in n and n.endswith("_proj.weight") and weights[n].dim() == 3]
    assert stacks
    exact = {}
    for name in stacks:
        w = weights[name]
        scale = torch.rand(w.shape[0], 1, 1, generator=g) + 0.5   # (tiny experts: one block each)
        weights[name] = (w / scale).to(torch.float8_e4m3fn)
        weights[name + "_scale_inv"] = scale
        exact[name] = weights[name].float() * scale
    save_file(weights, fp8 / "model.safetensors")
    run(fp8, tmp_path / "deq", dequantize=True, dtype="fp32")
    out = tensors(tmp_path / "deq")
    assert not any(k.endswith("_scale_inv") for k in out)
    for name, want in exact.items():
        assert torch.equal(out[name], want), name
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # (moetool's loader dequantizes in the load dtype: float32 here)
        want = load_reference(tmp_path / "deq", dtype=torch.float32).eval()(ids).logits
        got = moetool.load_model(fp8)(ids).logits
    assert (got - want).abs().max() <= 1e-5
