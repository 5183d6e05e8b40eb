"""`prune --sequential`: each layer's experts are scored on the hidden states of the already-pruned
earlier layers. The oracle is transformers' own model, pruned by hand layer after layer: the routers
of the layers already chosen restricted to their kept experts (logits of removed experts at -inf,
which tests/test_prune.py shows equals the pruned checkpoint; here patched into F.linear, not
moetool's torch function mode), and with --merge their kept experts' weights replaced by the merged
ones the output holds; the next layer's frequency, gate-weight mass or REAP saliency is counted
from its router's outputs and its experts' weights directly."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moetool.checkpoint import open_checkpoint
from moetool.errors import UsageError
from moetool.ops.profile import ProfileOptions
from moetool.ops.prune import PruneOptions, prune
from moetool.runner.building import _decoder_layers
from tests.test_prune import routers_restricted
from tests.tiny import load_reference

EXPERTS, KEEP, LAYERS, SEQ = 8, 4, 3, 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Qwen3-MoE of 3 layers of 8 experts (top-2), random token ids to calibrate on."""
    root = tmp_path_factory.mktemp("seq")
    torch.manual_seed(3)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, max_position_embeddings=64, intermediate_size=24,
                                         moe_intermediate_size=16, num_hidden_layers=LAYERS, num_experts=EXPERTS,
                                         num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # larger routers: routing that depends on what the earlier layers did
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8)
    model.save_pretrained(root / "src")
    ids = torch.randint(0, 64, (24 * SEQ,), generator=torch.Generator().manual_seed(5))
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    return root / "src", root / "ids.json", ids.reshape(-1, SEQ)


def _calibration(ids_path):
    return ProfileOptions(token_ids=ids_path, seq_len=SEQ, max_tokens=None, batch_size=5, device="cpu",
                          dtype="fp32")


def _measure(model, layer: int, ids, criterion: str) -> tuple[list[float], list[float]]:
    """(scores, gate-weight mass) of LAYER's experts over IDS, from its router's top-k output and, for
    REAP, the mean over routed tokens of ||gate weight x expert(x)|| computed from the weights."""
    mlp = model.model.layers[layer].mlp
    counts, mass, salience = torch.zeros(EXPERTS), torch.zeros(EXPERTS, dtype=torch.float64), \
        torch.zeros(EXPERTS, dtype=torch.float64)
    seen = {}

    def router_hook(module, args, output):
        _, weights, index = output
        seen["x"], seen["index"], seen["weights"] = args[0], index, weights
        counts.index_add_(0, index.reshape(-1), torch.ones(index.numel()))
        mass.index_add_(0, index.reshape(-1), weights.reshape(-1).double())
        if criterion == "reap":
            experts = mlp.experts
            for t in range(index.shape[0]):
                for j in range(index.shape[1]):
                    e = int(index[t, j])
                    gate, up = (experts.gate_up_proj[e] @ args[0][t]).chunk(2)
                    out = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                    salience[e] += float((weights[t, j] * out).norm())

    handle = mlp.gate.register_forward_hook(router_hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    if criterion == "frequency":
        scores = counts.tolist()
    elif criterion == "soft-count":
        scores = mass.tolist()
    else:
        scores = [s / c if c else 0.0 for s, c in zip(salience.tolist(), counts.tolist())]
    return scores, mass.tolist()


def _oracle(path, ids, criterion: str, merged_from=None) -> tuple[dict[int, list[int]], float, dict[int, list]]:
    """The experts kept layer by layer, each layer measured with the earlier ones pruned (MERGED_FROM:
    the output checkpoint whose merged kept experts replace the earlier layers' kept slots), the
    share of the gate-weight mass the removed experts carried, so measured, and each layer's scores."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    merged = load_file(next(merged_from.glob("*.safetensors"))) if merged_from else None
    weights = {layer: model.model.layers[layer].mlp.gate.weight for layer in range(LAYERS)}
    kept, removed, mass_removed, mass_total, scored = {}, {}, 0.0, 0.0, {}
    for layer in range(LAYERS):
        with routers_restricted(model, removed, {k: weights[k] for k in removed}):
            scores, mass = _measure(model, layer, ids, criterion)
        scored[layer] = scores
        kept[layer] = sorted(sorted(range(EXPERTS), key=lambda e: (-scores[e], e))[:KEEP])
        removed[layer] = [e for e in range(EXPERTS) if e not in kept[layer]]
        mass_removed += sum(mass[e] for e in removed[layer])
        mass_total += sum(mass)
        if merged is not None:   # the kept slots as the output holds them, merged
            experts = model.model.layers[layer].mlp.experts
            with torch.no_grad():
                for new, old in enumerate(kept[layer]):
                    prefix = f"model.layers.{layer}.mlp.experts.{new}."
                    gate, up, down = (merged[prefix + f"{p}_proj.weight"] for p in ("gate", "up", "down"))
                    experts.gate_up_proj[old] = torch.cat([gate, up])
                    experts.down_proj[old] = down
    return kept, mass_removed / mass_total, scored


@pytest.mark.parametrize("criterion", ["frequency", "soft-count", "reap"])
def test_each_layer_is_scored_on_the_pruned_earlier_layers(tmp_path, source, criterion):
    path, ids_path, ids = source
    with open_checkpoint(path) as ckpt:
        seq = prune(ckpt, tmp_path / "seq", PruneOptions(keep=KEEP, criterion=criterion, sequential=True,
                                                         calibration=_calibration(ids_path)))
        per_layer = prune(ckpt, tmp_path / "flat", PruneOptions(keep=KEEP, criterion=criterion,
                                                                calibration=_calibration(ids_path)), dry_run=True)
    kept, mass_removed, scores = _oracle(path, ids, criterion)
    assert seq.kept == kept
    assert seq.routing_mass_removed == pytest.approx(mass_removed, rel=1e-5)
    for layer in range(LAYERS):   # the report's scores: each layer's, as measured after the earlier ones were pruned
        assert seq.scores[layer] == pytest.approx(scores[layer], rel=1e-4, abs=1e-6)
    assert seq.scores[LAYERS - 1] != pytest.approx(per_layer.scores[LAYERS - 1], rel=1e-4)
    assert seq.kept[0] == per_layer.kept[0]     # the first layer sees the same inputs either way
    # and the later ones do not: the test tells sequential from per-layer scoring
    assert abs(seq.routing_mass_removed - per_layer.routing_mass_removed) > 1e-4


def test_merge_works_in_the_same_pass(tmp_path, source):
    path, ids_path, ids = source
    with open_checkpoint(path) as ckpt:
        seq = prune(ckpt, tmp_path / "seq", PruneOptions(keep=KEEP, sequential=True, merge=True,
                                                         calibration=_calibration(ids_path)))
        dropped = prune(ckpt, tmp_path / "drop", PruneOptions(keep=KEEP, sequential=True,
                                                              calibration=_calibration(ids_path)), dry_run=True)
    kept, mass_removed, _ = _oracle(path, ids, "frequency", merged_from=tmp_path / "seq")
    assert seq.kept == kept
    assert seq.routing_mass_removed == pytest.approx(mass_removed, rel=1e-5)
    # merged earlier layers route the later ones differently from dropped ones
    assert abs(seq.routing_mass_removed - dropped.routing_mass_removed) > 1e-4
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq", dtype=torch.float32)
    assert pruned.config.num_experts == KEEP


def test_refusals_come_before_any_work(tmp_path, source):
    path, ids_path, _ = source
    with open_checkpoint(path) as ckpt:
        for options, words in ((PruneOptions(keep=KEEP, sequential=True, scope="global"), "per-layer"),
                               (PruneOptions(keep=KEEP, sequential=True, criterion="random"), "routing"),
                               (PruneOptions(keep=KEEP, sequential=True, profile=tmp_path / "p.json"), "--profile")):
            with pytest.raises(UsageError, match=words):
                prune(ckpt, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, source):
    path, ids_path, _ = source
    proc = subprocess.run([sys.executable, "-m", "moetool", "prune", str(path), str(tmp_path / "out"), "--keep",
                           str(KEEP), "--sequential", "--token-ids", str(ids_path), "--seq-len", str(SEQ),
                           "--criterion", "reap", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["kept"]) == LAYERS and all(len(v) == KEEP for v in report["kept"].values())
    for layer, kept in report["kept"].items():   # the kept experts are the best scored
        scores = report["scores"][layer]
        assert min(scores[e] for e in kept) >= max(s for e, s in enumerate(scores) if e not in kept)
    assert (tmp_path / "out" / "config.json").exists()


def _randomize_correction_biases(model) -> int:
    """Nonzero router correction biases (a sigmoid router adds them after the logits)."""
    count = 0
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(count)) * 3)
                count += 1
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", __import__("tests.test_prune", fromlist=["FAMILIES"]).FAMILIES)
def test_a_restricted_layer_runs_as_the_pruned_checkpoint(tmp_path, family, dtype):
    """moetool's in-place pruning (RouterRestriction on every MoE layer of the full model) gives the
    logits of the pruned checkpoint in stock transformers, with nonzero correction biases, and in
    bfloat16 too, where routers that compute in float32 cast their weight first."""
    from moetool.arch import detect_family
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.runner.sequential_prune import RouterRestriction
    from tests.test_prune import GROUPED, _model

    model = _model(family).eval()
    _randomize_correction_biases(model)
    model.save_pretrained(tmp_path / "src")
    keep = 4 if family in GROUPED else 3
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=1))
        layers = inspect_checkpoint(ckpt).moe_layers
    model = model.to(dtype)
    config = model.config.to_dict()
    fam = detect_family(config)
    decoder = _decoder_layers(model)[1]   # (a wrapper's vision, audio or talker blocks are not the decoder)
    restrictions = [RouterRestriction(model, fam, config, layer, decoder[layer],
                                      [e for e in range(report.experts_before) if e not in report.kept[layer]])
                    for layer in layers]   # each raises if its router's weight goes unseen
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits.float()
    for restriction in restrictions:
        restriction.remove()
    with torch.no_grad():
        unrestricted = model(ids).logits.float()
    pruned = load_reference(tmp_path / "out", dtype=dtype).eval()
    with torch.no_grad():
        want = pruned(ids).logits.float()
    scale = want.abs().max().item()
    assert (got - want).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    if dtype == torch.float32:
        assert (unrestricted - want).abs().max() > 1e-4   # the removed experts did matter


def test_a_router_it_cannot_restrict_is_an_error_not_a_no_op(tmp_path, source):
    """A router that applies its weight other than through F.linear cannot be restricted: the call
    raises (after putting everything back) instead of routing as if nothing were pruned."""
    from moetool.arch import detect_family
    from moetool.errors import UnsupportedError
    from moetool.runner.sequential_prune import RouterRestriction

    path, _, ids = source
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gate = model.model.layers[0].mlp.gate
    real = type(gate).forward

    def matmul_router(hidden):
        logits = hidden.reshape(-1, hidden.shape[-1]) @ gate.weight.T   # no F.linear
        weights, index = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
        return logits, weights, index

    config = model.config.to_dict()
    restriction = RouterRestriction(model, detect_family(config), config, 0, model.model.layers[0], [1, 2])
    gate.forward = matmul_router
    try:
        with pytest.raises(UnsupportedError, match="never applied"), torch.no_grad():
            model(ids[:1])
    finally:
        gate.forward = real.__get__(gate)
        restriction.remove()
    with torch.no_grad():   # nothing left behind: the mode is gone
        assert torch.isfinite(model.model.layers[0].mlp.gate(torch.randn(3, 32))[0]).all()


def test_merge_in_place_needs_stacked_experts(tmp_path):
    """gpt-oss keeps its experts transposed with biases: --sequential --merge is refused before any
    calibration runs."""
    from moetool.errors import UnsupportedError
    from tests.tiny import save_tiny

    folder = save_tiny("gpt_oss", tmp_path / "src")
    with open_checkpoint(folder) as ckpt:
        with pytest.raises(UnsupportedError, match="without --sequential|--layout per-expert"):
            prune(ckpt, tmp_path / "out", PruneOptions(keep=2, sequential=True, merge=True))
    assert not (tmp_path / "out").exists()
