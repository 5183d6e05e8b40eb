"""DeepSeek-V4 as its hub checkpoints store it: DeepSeek's own names without transformers' model. prefix (embed,
head, norm and hc_head_* at the top, layers.{L}.attn / ffn / hc_*), an MTP module transformers ignores, and hash
layers whose experts a token table picks. transformers' own DeepseekV4ForCausalLM, which loads that form, is the
oracle."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.prune import PruneOptions, prune
from tests.tiny import param_count, save_tiny

TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "head.weight": "head.weight"}


def hub_name(name: str) -> str:
    """A name of transformers' save (model.-prefixed) as the hub's checkpoints have it."""
    name = TOP.get(name, name).replace("model.hc_head.hc_", "hc_head_")
    return name.removeprefix("model.")


def hub_checkpoint(src, out, *, drop=()):
    """The checkpoint SRC (transformers' save of the tiny model) under the hub's names, with an MTP tensor."""
    out.mkdir()
    tensors = {hub_name(n): t for n, t in load_file(src / "model.safetensors").items() if hub_name(n) not in drop}
    assert "embed.weight" in tensors and "layers.1.ffn.experts.0.w1.weight" in tensors   # (the hub's names)
    tensors["mtp.0.ffn.experts.0.w1.weight"] = torch.zeros(16, 32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    src = save_tiny("deepseek_v4", root / "saved")
    return hub_checkpoint(src, root / "hub")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(3))


def reference(path):
    return transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_the_hub_form_inspects_loads_and_converts_as_transformers_reads_it(tmp_path, hub, ids):
    model = reference(hub)
    with torch.no_grad():
        want = model(ids).logits
    with open_checkpoint(hub) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert [p.code for p in report.problems] == ["mtp"]          # (the MTP module, counted apart)
    assert report.total_params == param_count(model)
    assert report.moe_layers == [0, 1, 2] and report.layout == "per-expert"
    assert report.router["token_table_layers"] == [0]            # mlp_layer_types: hash_moe, moe, moe
    with torch.no_grad():
        assert torch.equal(moetool.load_model(hub)(ids).logits, want)
    with open_checkpoint(hub) as ckpt:
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
    with torch.no_grad():
        assert torch.equal(reference(tmp_path / "fused")(ids).logits, want)   # stock transformers reads it
    with open_checkpoint(tmp_path / "fused") as ckpt:
        fused = inspect_checkpoint(ckpt)
    assert fused.layout == "fused" and [p.code for p in fused.problems] == ["mtp"]   # (kept, as convert keeps it)
    assert fused.total_params == report.total_params


def test_a_missing_token_table_or_correction_bias_is_flagged(tmp_path):
    src = save_tiny("deepseek_v4", tmp_path / "saved")
    for missing in ("layers.0.ffn.gate.tid2eid", "layers.2.ffn.gate.bias"):
        path = hub_checkpoint(src, tmp_path / missing, drop={missing})
        with open_checkpoint(path) as ckpt:
            problems = {p.code: p.message for p in inspect_checkpoint(ckpt).problems}
        assert missing in problems["missing_tensors"]


def test_profile_counts_the_hash_layers_picks_from_the_token_table(tmp_path, hub, ids):
    """Layer 0's loads are the table's rows of the tokens, counted; full and streamed modes agree."""
    tokens = tmp_path / "ids.json"
    tokens.write_text(json.dumps(ids.flatten().tolist()))
    table = load_file(hub / "model.safetensors")["layers.0.ffn.gate.tid2eid"]
    want = torch.bincount(table[ids.flatten()].flatten(), minlength=4).tolist()
    reports = []
    for mode in ("full", "streamed"):
        options = ProfileOptions(token_ids=tokens, seq_len=24, max_tokens=ids.numel(), batch_size=2, device="cpu",
                                 dtype="fp32", mode=mode, offload_dir=tmp_path / "off")
        with open_checkpoint(hub) as ckpt:
            reports.append(profile(ckpt, options))
    with torch.no_grad():   # transformers records the logits of the routers that choose (layers 1 and 2)
        logits = reference(hub)(ids, output_router_logits=True).router_logits
    scores = torch.nn.functional.softplus(logits[0].float()).sqrt()   # the router's distribution: its scores, normed
    p = scores / scores.sum(-1, keepdim=True)
    for report in reports:
        assert report.layers[0].counts == want
        assert any("token table" in note and "layer 0" in note for note in report.notes)
        assert report.layers[1].entropy_mean == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        assert report.layers[1].top1_prob_mean == pytest.approx(float(p.max(-1).values.mean()), rel=1e-5)
    assert [layer.counts for layer in reports[0].layers] == [layer.counts for layer in reports[1].layers]


def test_streamed_eval_equals_transformers_loss(hub, ids, tmp_path):
    tokens = tmp_path / "ids.json"
    tokens.write_text(json.dumps(ids.flatten().tolist()))
    with torch.no_grad():
        loss = reference(hub)(ids, labels=ids).loss
    with open_checkpoint(hub) as ckpt:
        report = evaluate(ckpt, EvalOptions(token_ids=tokens, seq_len=24, batch_size=2, device="cpu", dtype="fp32",
                                            mode="streamed", offload_dir=tmp_path / "off"))
    assert report.nll_mean == pytest.approx(float(loss), rel=1e-5)


def test_prune_is_refused_with_the_reason_and_writes_nothing(tmp_path, hub):
    with open_checkpoint(hub) as ckpt, pytest.raises(UnsupportedError, match="token-id table"):
        prune(ckpt, tmp_path / "out", PruneOptions(keep=2, criterion="random"))
    assert not (tmp_path / "out").exists()
