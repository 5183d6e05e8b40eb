"""LongCat-Flash's zero-computation (identity) experts, in the form its hub checkpoints take: the real
experts only, which transformers 5.24 cannot load (its gate_up_proj holds rows for the identity
experts too). The oracle is transformers' own model object; the generic family tests
(tests/test_*.py lists) cover the form transformers saves, with the identity experts' gate and up."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.prune import PruneOptions, prune
from tests.test_prune import routers_restricted
from tests.tiny import build_model, param_count, save_tiny

IDS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(transformers' tiny LongCat-Flash, its hub-form checkpoint: no identity experts' tensors)."""
    path = save_tiny("longcat_flash", tmp_path_factory.mktemp("longcat") / "hub", hub_only=True)
    return build_model("longcat_flash"), path


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_transformers_cannot_load_the_hub_form_and_moetool_can(hub):
    model, path = hub
    config = model.config
    with pytest.raises(RuntimeError, match="mismatch"):   # (if transformers learns to, this form needs no help)
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.problems == [] and report.zero_experts == config.zero_expert_num == 2
    assert report.num_experts == 4 and report.layout == "per-expert"
    unused = config.num_layers * config.zero_expert_num * 2 * config.expert_ffn_hidden_size * config.hidden_size
    assert report.total_params == param_count(model) - unused   # transformers' count holds the unused rows
    assert "identity" in report.router["description"]
    want = _logits(model)
    assert (_logits(moetool.load_model(path)) - want).abs().max() <= 1e-5


def test_fused_conversion_loads_in_transformers(tmp_path, hub):
    model, path = hub
    with open_checkpoint(path) as ckpt:
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert (_logits(fused) - _logits(model)).abs().max() <= 1e-5
    gate_up = fused.model.layers[1].mlp.experts.gate_up_proj
    assert gate_up.shape[0] == 6 and torch.equal(gate_up[4:], torch.zeros_like(gate_up[4:]))   # identity rows
    with open_checkpoint(tmp_path / "fused") as ckpt:   # and back: what transformers saves, per expert
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="per-expert"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (_logits(back) - _logits(model)).abs().max() <= 1e-5
    names = set(load_file(next((tmp_path / "back").glob("*.safetensors"))))
    assert {"model.layers.0.mlp.experts.5.up_proj.weight", "model.layers.0.mlp.experts.3.down_proj.weight"} <= names
    assert "model.layers.0.mlp.experts.4.down_proj.weight" not in names


def test_profile_counts_identity_picks_apart_and_streams_alike(tmp_path, hub):
    model, path = hub
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(IDS.flatten().tolist()))
    options = dict(token_ids=ids_file, seq_len=IDS.shape[1], max_tokens=None, batch_size=2, device="cpu", dtype="fp32")
    with open_checkpoint(path) as ckpt:
        full = profile(ckpt, ProfileOptions(mode="full", **options))
        streamed = profile(ckpt, ProfileOptions(mode="streamed", **options))
    picks = []   # transformers' own router: (layer, top-k index)
    hooks = [layer.mlp.router.register_forward_hook(lambda m, a, out: picks.append(out[2]))
             for layer in model.model.layers]
    _logits(model)
    for h in hooks:
        h.remove()
    for position, (got, again) in enumerate(zip(full.layers, streamed.layers)):
        index = picks[position]
        assert got.counts == again.counts == torch.bincount(index.flatten(), minlength=6)[:4].tolist()
        assert got.identity["assignments"] == again.identity["assignments"] == int((index >= 4).sum())
        assert got.identity["computed_experts_per_token"] == pytest.approx(float((index < 4).sum()) / IDS.numel(),
                                                                           abs=1e-4)
        assert got.identity == again.identity


@pytest.mark.parametrize("keep", [2, 1])
def test_pruned_hub_checkpoint_equals_the_masked_original(tmp_path, hub, keep):
    """Pruned to KEEP real experts (one: fewer than top-k, which stays, the identity experts making up the
    choice), the model equals the original with the removed experts' router logits at -inf."""
    model, path = hub
    with open_checkpoint(path) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=3))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moe_topk"] == 2
    removed = {layer: [e for e in range(4) if e not in kept] for layer, kept in report.kept.items()}
    routers = {layer: model.model.layers[layer].mlp.router.classifier.weight for layer in report.kept}
    with routers_restricted(model, removed, routers):
        want = _logits(model)
    with open_checkpoint(tmp_path / "out") as ckpt:   # identity experts all kept: router rows 2 + 2
        after = inspect_checkpoint(ckpt)
        assert after.problems == [] and after.num_experts == keep and after.zero_experts == 2
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
    assert (_logits(moetool.load_model(tmp_path / "out")) - want).abs().max() <= 1e-5
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert (_logits(stock) - want).abs().max() <= 1e-5


def test_global_scope_from_transformers_saved_form(tmp_path):
    """Layers keeping different numbers of experts (moetool's loader only): the identity experts' gate and up
    that transformers saves are left out, so that no layer's identity experts pass for real ones."""
    model = build_model("longcat_flash")
    model.save_pretrained(tmp_path / "src")   # (with the identity experts' gate and up)
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=3, criterion="random", seed=0, scope="global"))
    counts = sorted(len(v) for v in report.kept.values())
    assert counts[0] != counts[-1]
    removed = {layer: [e for e in range(4) if e not in kept] for layer, kept in report.kept.items()}
    routers = {layer: model.model.layers[layer].mlp.router.classifier.weight for layer in report.kept}
    with routers_restricted(model, removed, routers):
        want = _logits(model)
    assert (_logits(moetool.load_model(tmp_path / "out")) - want).abs().max() <= 1e-5
    names = set(load_file(next((tmp_path / "out").glob("*.safetensors"))))
    assert not any(f"experts.{e}.gate_proj" in n for n in names for e in (4, 5))
