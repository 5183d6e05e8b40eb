"""ZAYA's skip expert: the router's last class, which computes nothing, and which transformers' router returns
masked to expert 0 at weight 0. The oracle is transformers' own model: its router's output (a masked pick is an
index 0 of weight 0, a real pick of expert 0 weighs its softmax probability, never 0), and the original with
the removed experts' router logits at -inf, run in stock transformers."""

import json

import pytest
import torch
import transformers

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.prune import PruneOptions, prune
from tests.test_prune import routers_restricted
from tests.tiny import build_model

IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("zaya") / "src"
    model = build_model("zaya")
    model.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), path


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _picks(model, ids=IDS):
    """Per layer, transformers' own router output: (real picks [T], skipped [T])."""
    out = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: out.append((o[2].flatten(), o[1].flatten() == 0)))
             for layer in model.model.layers]
    _logits(model, ids)
    for hook in hooks:
        hook.remove()
    return [(index[~skipped], skipped) for index, skipped in out]


def _removed(model, report):
    removed = {layer: [e for e in range(report.experts_before) if e not in kept] for layer, kept in report.kept.items()}
    routers = {layer: model.model.layers[layer].mlp.gate.router_mlp.out_proj.weight for layer in report.kept}
    return removed, routers


def test_skip_picks_are_counted_apart_in_full_and_streamed_mode(tmp_path, saved):
    model, path = saved
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.problems == [] and report.zero_experts == 1 and report.num_experts == 4 and report.top_k == 1
    assert "skip expert" in report.router["description"]
    # the router MLP counted as the router (its balancing_biases a buffer)
    assert report.params["router"] == sum(p.numel() for n, p in model.named_parameters() if ".mlp.gate." in n)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(IDS.flatten().tolist()))
    options = dict(token_ids=ids_file, seq_len=IDS.shape[1], max_tokens=None, batch_size=3, device="cpu", dtype="fp32")
    with open_checkpoint(path) as ckpt:
        full = profile(ckpt, ProfileOptions(mode="full", **options))
        streamed = profile(ckpt, ProfileOptions(mode="streamed", **options))
    picks = _picks(model)
    assert sum(int(skipped.sum()) for _, skipped in picks) > 0   # (else the skip expert could go unnoticed)
    for got, again, (real, skipped) in zip(full.layers, streamed.layers, picks):
        assert got.counts == again.counts == torch.bincount(real, minlength=4).tolist()
        assert got.identity["assignments"] == again.identity["assignments"] == int(skipped.sum())
        assert got.identity["computed_experts_per_token"] == pytest.approx(1 - float(skipped.float().mean()), abs=1e-4)


def test_cli_inspect_names_the_skip_expert(saved):
    from tests.test_cli_inspect import run

    out = run("inspect", str(saved[1])).stdout
    assert "4 routed + 1 skip (zero-computation)" in " ".join(out.split())


@pytest.mark.parametrize("keep", [2, 3])
def test_pruned_checkpoint_equals_the_masked_original_in_stock_transformers(tmp_path, saved, keep):
    model, path = saved
    with open_checkpoint(path) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=2))
    removed, routers = _removed(model, report)
    with routers_restricted(model, removed, routers):
        want = _logits(model)
    assert (_logits(model) - want).abs().max() > 1e-4   # the removed experts mattered
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (_logits(pruned) - want).abs().max() <= 1e-5
    for layer, kept in report.kept.items():   # router rows and balancing biases: the kept experts', then the skip's
        rows = kept + [4]
        gate, before = pruned.model.layers[layer].mlp.gate, model.model.layers[layer].mlp.gate
        assert torch.equal(gate.router_mlp.out_proj.weight, before.router_mlp.out_proj.weight[rows])
        assert torch.equal(gate.balancing_biases, before.balancing_biases[rows])
    assert sum(int(s.sum()) for _, s in _picks(pruned)) > 0   # the skip expert still picked
    with open_checkpoint(tmp_path / "out") as ckpt:
        after = inspect_checkpoint(ckpt)
    assert after.problems == [] and after.num_experts == keep and after.zero_experts == 1


@pytest.mark.parametrize("criterion", ["frequency", "reap"])
def test_sequential_prune_runs_and_its_output_is_the_masked_original(tmp_path, saved, criterion):
    model, path = saved
    ids = torch.randint(0, 64, (12, 12), generator=torch.Generator().manual_seed(5))
    (tmp_path / "ids.json").write_text(json.dumps(ids.flatten().tolist()))
    calibration = ProfileOptions(token_ids=tmp_path / "ids.json", seq_len=12, max_tokens=None, batch_size=5,
                                 device="cpu", dtype="fp32")
    with open_checkpoint(path) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=2, criterion=criterion, sequential=True,
                                                            calibration=calibration))
    if criterion == "frequency":   # the first layer sees the original's inputs: its two most picked real experts
        real, _ = _picks(model, ids)[0]   # (skip picks apart)
        counts = torch.bincount(real, minlength=4)
        assert counts.sort(descending=True).values[1] > counts.sort(descending=True).values[2]   # (no tie to break)
        assert report.kept[0] == sorted(counts.topk(2).indices.tolist())
    removed, routers = _removed(model, report)
    with routers_restricted(model, removed, routers):
        want = _logits(model)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (_logits(pruned) - want).abs().max() <= 1e-5


def test_a_stored_skip_bias_is_read_alike_in_full_and_streamed_mode(tmp_path):
    """transformers' from_pretrained resets every router's skip bias to -1 whatever the checkpoint stores; moetool
    reads the stored one in full and streamed mode alike, so the two modes route the same tokens."""
    import moetool
    from moetool.runner.model import load_model

    model = build_model("zaya")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.balancing_biases[-1] = -0.6
    model.save_pretrained(tmp_path / "src")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    assert float(stock.model.layers[0].mlp.gate.balancing_biases[-1]) == -1.0   # (the quirk)
    with open_checkpoint(tmp_path / "src") as ckpt:
        full = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="full")
    assert float(full.model.model.layers[0].mlp.gate.balancing_biases[-1]) == pytest.approx(-0.6)
    assert torch.equal(_logits(full.model), _logits(model))
    assert torch.equal(_logits(moetool.load_model(tmp_path / "src")), _logits(model))
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(IDS.flatten().tolist()))
    options = dict(token_ids=ids_file, seq_len=IDS.shape[1], batch_size=3, device="cpu", dtype="fp32")
    with open_checkpoint(tmp_path / "src") as ckpt:
        reports = [profile(ckpt, ProfileOptions(mode=mode, **options)) for mode in ("full", "streamed")]
    assert [layer.counts for layer in reports[0].layers] == [layer.counts for layer in reports[1].layers]
    assert [layer.identity for layer in reports[0].layers] == [layer.identity for layer in reports[1].layers]


def test_gptq_hessians_leave_out_the_skip_picks(saved):
    """Each expert's calibration inputs are the tokens really routed to it: a skip pick (handed to the experts as
    expert 0 at weight 0) is not expert 0's."""
    from moetool.runner.engine import micro_batches, run
    from moetool.runner.model import load_model
    from tests.test_sequential import HessianObserver

    model, path = saved
    observer = HessianObserver()
    with open_checkpoint(path) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        run(loaded, micro_batches(IDS, 2), calibrate=observer)
    for layer, (real, _) in enumerate(_picks(model)):
        assert observer.found[layer]["mlp.experts"].tokens() == torch.bincount(real, minlength=4).tolist()
