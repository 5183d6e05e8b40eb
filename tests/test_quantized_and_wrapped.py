"""Quantized on-disk forms, multimodal wrappers and model_type aliases."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from tests.tiny import COMMON


def _inspect(path):
    with open_checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)


def _expected(path) -> int:
    return json.loads((path / "expected.json").read_text())["params"]


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_bitsandbytes_checkpoint_saved_by_transformers(tmp_path, tiny, mode):
    src = tiny("qwen2_moe")
    config = (transformers.BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
              transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path / "bnb")
    report = _inspect(tmp_path / "bnb")
    assert report.total_params == _expected(src)
    assert report.quantization == [f"bitsandbytes {mode}"]
    # transformers 5 leaves the fused experts unquantized, and inspect says so
    assert [p.code for p in report.problems] == ["experts_not_quantized"]
    assert report.disk["tensor_bytes"] < 4 * report.total_params


def test_block_fp8_experts(tmp_path, tiny):
    src = tiny("deepseek_v3")
    shutil.copytree(src, tmp_path / "fp8")
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in [n for n in tensors if ".experts." in n or "self_attn" in n and n.endswith("proj.weight")]:
        w = tensors[name]
        scale = w.abs().amax().reshape(1, 1) / 448
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale.float()
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    report = _inspect(tmp_path / "fp8")
    assert report.problems == []
    assert report.total_params == _expected(src)
    assert report.quantization == ["fp8", "fp8 block-scaled"]


def test_compressed_tensors_packed_int4(tmp_path, tiny):
    src = tiny("mixtral")
    shutil.copytree(src, tmp_path / "ct")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"targets": ["Linear"],
                                                                   "weights": {"num_bits": 4, "group_size": 8}}}}
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in [n for n in tensors if ".experts." in n]:
        out, inp = tensors.pop(name).shape
        base = name.removesuffix(".weight")
        tensors[base + ".weight_packed"] = torch.zeros(out, inp // 8, dtype=torch.int32)
        tensors[base + ".weight_scale"] = torch.ones(out, inp // 8, dtype=torch.bfloat16)
        tensors[base + ".weight_shape"] = torch.tensor([out, inp], dtype=torch.int64)
    save_file(tensors, tmp_path / "ct" / "model.safetensors")
    report = _inspect(tmp_path / "ct")
    assert report.problems == []
    assert report.total_params == _expected(src)
    assert report.quantization == ["compressed-tensors int4 g8"]


def test_kimi_k2_reads_as_deepseek_v3(tmp_path, tiny):
    shutil.copytree(tiny("deepseek_v3"), tmp_path / "kimi")
    config = json.loads((tmp_path / "kimi" / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(config))
    report = _inspect(tmp_path / "kimi")
    assert report.family == "deepseek_v3" and report.problems == []
    assert report.total_params == _expected(tmp_path / "kimi")


VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
              patch_size=16)


def _llama4_wrapper_config():
    """A tiny Llama 4 image-text config, as the hub releases are (Llama4ForConditionalGeneration)."""
    return transformers.Llama4Config(
        text_config=dict(COMMON, intermediate_size=16, intermediate_size_mlp=24, num_hidden_layers=2,
                         num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=8),
        vision_config=dict(VISION, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32))


@pytest.mark.parametrize("family", ["llama4", "gemma3"])
def test_multimodal_wrappers(tmp_path, family):
    """Text models inside image-text checkpoints: text_config and the language_model. prefix."""
    if family == "llama4":
        config = _llama4_wrapper_config()
    else:
        config = transformers.Gemma3Config(text_config=dict(COMMON, intermediate_size=24, num_hidden_layers=2,
                                                            head_dim=8), vision_config=VISION, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(tmp_path / family)
    report = _inspect(tmp_path / family)
    assert report.family == family and report.problems == []
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.params["embedding"] == 64 * 32   # the token embedding only, not the vision tower's
    if family == "llama4":
        assert report.moe_layers == [1] and report.num_experts == 4 and report.num_shared_experts == 1


@pytest.mark.parametrize("family", ["llama4", "qwen3_5_moe", "gemma4", "qwen4_exp", "dots3_note"])
def test_text_model_of_a_multimodal_moe_runs_from_its_wrapper(tmp_path, family):
    """Hub releases of Llama 4, Qwen3.5 MoE, Gemma 4, Qwen4-Exp and dots.llm3 Note are image-text wrappers:
    load_model and the streamed runner read the text model's weights under (model.)language_model.* (dots.llm3
    Note's hub names keep them at model.*, beside its vision and audio towers), as transformers' own causal-LM
    loader does (its logits are the oracle), and streamed equals full."""
    import moetool
    from moetool.ops.evaluate import EvalOptions, evaluate
    from tests.tiny import TINY

    if family == "llama4":
        config = _llama4_wrapper_config()
    elif family == "gemma4":
        config = transformers.Gemma4Config(text_config=TINY["gemma4_text"][1], audio_config=None, vision_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, patch_size=4, pooling_kernel_size=1, position_embedding_size=64))
    elif family == "dots3_note":   # its vision tower has routed experts of its own
        config = transformers.Dots3NoteConfig(text_config=TINY["dots3_note_text"][1], vision_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
            moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, mlp_layer_types=["sparse"],
            adapter_in_dim=16, adapter_out_dim=32, spatial_merge_size=1, adapter_merge_size=1), audio_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, downsample_hidden_size=8,
            adapter_input_size=16, adapter_out_dim=32, feature_size=16, max_position_embeddings=64))
    else:
        config = getattr(transformers, "Qwen4ExpConfig" if family == "qwen4_exp" else "Qwen3_5MoeConfig")(
            text_config=TINY[f"{family}_text"][1], vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
            temporal_patch_size=1, spatial_merge_size=1))
    torch.manual_seed(0)
    wrapper = transformers.AutoModelForImageTextToText.from_config(config)
    wrapper.save_pretrained(tmp_path / family)
    if family == "dots3_note":   # the vision tower's experts are its own: counted, not the text model's
        report = _inspect(tmp_path / family)
        assert report.problems == [] and report.moe_layers == [1, 2] and report.num_experts == 4
        assert report.total_params == sum(p.numel() for p in wrapper.parameters())
    wrapped = ("vision_encoder.",) if family == "dots3_note" else ("language_model.", "model.language_model.")
    assert any(n.startswith(wrapped) for n in _inspect_names(tmp_path / family))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.float32).eval()
    with torch.no_grad():
        want = oracle(ids).logits
        got = moetool.load_model(tmp_path / family)(ids).logits
    assert (got - want).abs().max() <= 1e-5
    (tmp_path / "ids.json").write_text(json.dumps(torch.randint(0, 64, (240,)).tolist()))
    with open_checkpoint(tmp_path / family) as ckpt:
        full, streamed = (evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=24, mode=mode))
                          for mode in ("full", "streamed"))
    assert streamed.mode == "streamed" and streamed.nll_mean == pytest.approx(full.nll_mean, rel=1e-6)
    # quantized, the wrapper's weights keep their names; load_model equals transformers on the
    # dequantized copy (convert --dequantize, fused as transformers 5 reads Llama 4's experts)
    from moetool.ops.convert import ConvertOptions, convert
    from moetool.ops.quantize import QuantizeOptions, quantize

    with open_checkpoint(tmp_path / family) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g16-sym"))
    with open_checkpoint(tmp_path / "q") as ckpt:
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True, dtype="fp32", layout="fused"))
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    with torch.no_grad():
        want = dense(ids).logits
        got = moetool.load_model(tmp_path / "q")(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _inspect_names(path) -> list[str]:
    with open_checkpoint(path) as ckpt:
        return list(ckpt.tensors)


def _stock_bnb4(double_quant: bool):
    """A weight as transformers + bitsandbytes store it: packed codes under "weight", its companions
    by bitsandbytes' own serialization (as_dict(packed=True))."""
    from moetool.quant import bnb

    F = bnb()
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return {"weight": q, **state.as_dict(packed=True)}, F.dequantize_4bit(q, state)


def _blob(items) -> torch.Tensor:
    raw = items if isinstance(items, bytes) else json.dumps(items).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


@pytest.mark.parametrize("double_quant", [False, True])
def test_stock_bitsandbytes_quant_state_is_checked_before_it_is_trusted(double_quant):
    """dequant.bnb4_shape / dequantize_bnb4 (convert --dequantize of transformers' bitsandbytes
    checkpoints): intact, bitsandbytes' own dequantize_4bit; a blob that is not UTF-8 JSON, a shape
    the packed bytes cannot hold, or companions of the wrong size: CheckpointFormatError, one line."""
    from moetool.errors import CheckpointFormatError
    from moetool.quant import dequant

    parts, want = _stock_bnb4(double_quant)
    key = "quant_state.bitsandbytes__nf4"
    shapes = {k: tuple(v.shape) for k, v in parts.items() if k != "weight"}
    packed_bytes = parts["weight"].numel()   # (uint8 codes)
    assert dequant.bnb4_shape(parts[key], packed_bytes, parts=shapes) == (48, 80)
    assert torch.equal(dequant.dequantize_bnb4(parts, torch.float32), want)
    items = json.loads(bytes(parts[key].tolist()).decode())
    tampered = {
        "not UTF-8": {key: _blob(b"\xff\xfenot json")},
        "not JSON": {key: _blob(b"{shape: 1")},
        "a list": {key: _blob([1, 2])},
        "huge": {key: _blob({**items, "shape": [128, 10 ** 10]})},
        "other size": {key: _blob({**items, "shape": [40, 80]})},
        "negative": {key: _blob({**items, "shape": [-48, -80]})},
        "bad blocksize": {key: _blob({**items, "blocksize": 0})},
        "bad quant_type": {key: _blob({**items, "quant_type": "int4"})},
        "bad dtype": {key: _blob({**items, "dtype": "Tensor"})},
        "extra item": {key: _blob({**items, "code": 1})},
        "short absmax": {"absmax": parts["absmax"][:-1]},
        "wrong map": {"quant_map": parts["quant_map"][:8]},
    }
    if double_quant:
        tampered["no offset"] = {key: _blob({k: v for k, v in items.items() if k != "nested_offset"})}
        tampered["short nested absmax"] = {"nested_absmax": parts["nested_absmax"][:0]}
    for why, change in tampered.items():
        bad = {**parts, **change}
        with pytest.raises(CheckpointFormatError, match=r"^w\.weight: its bitsandbytes quant_state") as info:
            dequant.dequantize_bnb4(bad, torch.float32, name="w.weight")
        assert "\n" not in str(info.value), why
        if key in change:   # from the blob and the packed shape alone, before anything is read
            with pytest.raises(CheckpointFormatError):
                dequant.bnb4_shape(bad[key], packed_bytes)


@pytest.mark.parametrize("family", ["deepseek_v3", "hunyuan_v1_moe"])
def test_quantized_checkpoint_keeps_fp32_routers_as_transformers_does(tmp_path, tiny, family):
    """A moetool-quantized checkpoint loaded in bf16 holds its router (and correction bias) in fp32, as
    transformers' own bf16 load of the source does, so routing is not rounded to bf16."""
    import moetool
    from moetool.ops.quantize import QuantizeOptions, quantize

    with open_checkpoint(tiny(family)) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g8"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny(family), dtype=torch.bfloat16)
    want = {n: t.dtype for n, t in [*reference.named_parameters(), *reference.named_buffers()]
            if t.dtype == torch.float32}
    assert want   # the family does keep something in fp32
    loaded = moetool.load_model(tmp_path / "q", dtype=torch.bfloat16)
    got = dict([*loaded.named_parameters(), *loaded.named_buffers()])
    assert {n: got[n].dtype for n in want if n in got} == {n: want[n] for n in want if n in got}
    assert any("gate" in n for n in want if n in got)
