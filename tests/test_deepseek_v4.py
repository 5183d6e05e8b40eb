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
from moetool.errors import UnsupportedError, UsageError
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


def expert_similarity(model, layer: int) -> torch.Tensor:
    """Cosine similarity of the experts' weights (gate, up and down of each, as one vector)."""
    experts = model.model.layers[layer].mlp.experts
    flat = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], dim=1).double()
    flat = flat / flat.norm(dim=1, keepdim=True)
    return flat @ flat.T


def remapped_rows(table: torch.Tensor, kept: list[int], similarity: torch.Tensor) -> torch.Tensor:
    """The documented rule, token by token: a removed expert's entry goes to the most similar kept expert the
    row does not hold yet (else the most similar kept one); ids in the original numbering."""
    out = table.clone()
    for row in out:
        for j, expert in enumerate(row.tolist()):
            if expert in kept:
                continue
            ranked = sorted(kept, key=lambda k: (-float(similarity[expert, k]), k))
            row[j] = next((k for k in ranked if k not in row.tolist()), ranked[0])
    return out


@pytest.mark.parametrize("keep", [2, 3])
def test_pruned_checkpoint_is_the_original_with_experts_masked_and_its_table_remapped(tmp_path, hub, ids, keep):
    """Stock transformers runs the pruned checkpoint as the original runs with the removed experts' router logits
    -inf and, in the token-table layer, each removed expert's entries sent to a similar kept expert."""
    from tests.test_prune import routers_restricted

    with open_checkpoint(hub) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=2))
    model = reference(hub)
    kept = report.kept[0]
    table = model.model.layers[0].mlp.gate.tid2eid
    assert (~torch.isin(table, torch.tensor(kept))).any()   # (the table did send tokens to removed experts)
    with torch.no_grad():
        table.copy_(remapped_rows(table, kept, expert_similarity(model, 0)))
    removed = {layer: [e for e in range(4) if e not in v] for layer, v in report.kept.items()}
    routers = {layer: model.model.layers[layer].mlp.gate.weight for layer in removed}
    with torch.no_grad(), routers_restricted(model, removed, routers):
        want = model(ids).logits
    pruned = reference(tmp_path / "out")
    with torch.no_grad():
        assert (pruned(ids).logits - want).abs().max() <= 1e-5
    rows = pruned.model.layers[0].mlp.gate.tid2eid
    assert rows.shape == table.shape and all(len(set(row)) == 2 for row in rows.tolist())   # k distinct experts
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == []   # (the MTP module is dropped)


def test_sequential_pruning_routes_the_token_table_layer_as_the_pruned_checkpoint(tmp_path, hub, ids):
    """The in-place restriction of the token-table layer (RouterRestriction with the table remapped) gives the
    pruned checkpoint's logits; and `prune --sequential` runs through it."""
    from moetool.ops.prune_choice import remapped_table
    from moetool.runner.sequential_prune import RouterRestriction

    with open_checkpoint(hub) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=2, criterion="random", seed=2))
    model = reference(hub)
    config = model.config.to_dict()
    family = moetool.arch.detect_family(config)
    restrictions = []
    for layer, kept in report.kept.items():
        similarity = expert_similarity(model, layer).tolist()
        remap = (lambda t, kept=kept, s=similarity: remapped_table(t, kept, s, renumber=False)) if layer == 0 \
            else None
        restrictions.append(RouterRestriction(model, family, config, layer, model.model.layers[layer],
                                              [e for e in range(4) if e not in kept], remap))
    with torch.no_grad():
        got = model(ids).logits
    for restriction in restrictions:
        restriction.remove()
    with torch.no_grad():
        assert (reference(tmp_path / "out")(ids).logits - got).abs().max() <= 1e-5
        assert (model(ids).logits - got).abs().max() > 1e-4   # (removed: the table put back)
    # the streamed runner's in-place pruning (SequentialPrune, choosing the report's experts) ends where the pruned
    # checkpoint's decoder does, micro-batch by micro-batch
    from moetool.runner.engine import micro_batches, run
    from moetool.runner.model import load_model
    from moetool.runner.sequential_prune import SequentialPrune

    def choose(layer, totals):
        kept = report.kept[layer]
        sim = expert_similarity(model, layer).tolist()
        return kept, None, (lambda t: remapped_table(t, kept, sim, renumber=False)) if layer == 0 else None

    finals = {}
    with open_checkpoint(hub) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        pruner = SequentialPrune(loaded.model, loaded.family, loaded.config, {layer: (4, 2) for layer in range(3)},
                                 choose, seq_len=ids.shape[1])
        try:
            with torch.no_grad():
                run(loaded, micro_batches(ids, 2), calibrate=pruner,
                    on_final=lambda batch, hidden: finals.__setitem__(batch.slot, hidden.clone()))
        finally:
            pruner.close()
    with torch.no_grad():
        want = reference(tmp_path / "out").model(ids).last_hidden_state
    assert (torch.cat([finals[k] for k in sorted(finals)]) - want).abs().max() <= 1e-5
    tokens = tmp_path / "ids.json"
    tokens.write_text(json.dumps(ids.flatten().tolist()))
    calibration = ProfileOptions(token_ids=tokens, seq_len=24, batch_size=2, device="cpu", dtype="fp32")
    with open_checkpoint(hub) as ckpt:
        sequential = prune(ckpt, tmp_path / "seq", PruneOptions(keep=2, sequential=True, calibration=calibration))
    assert all(len(v) == 2 for v in sequential.kept.values())
    with open_checkpoint(tmp_path / "seq") as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == []


def test_prune_keeps_at_least_top_k_experts_and_writes_nothing(tmp_path, hub):
    with open_checkpoint(hub) as ckpt, pytest.raises(UsageError, match="token table"):
        prune(ckpt, tmp_path / "out", PruneOptions(keep=1, criterion="random"))
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_output_loads_in_stock_transformers(tmp_path, hub, ids):
    """quantize --layout compressed-tensors of the hub form: transformers' compressed-tensors integration reads it
    (the logits moetool.load_model gives, within 1e-4 relative)."""
    from moetool.ops.quantize import QuantizeOptions, quantize

    with open_checkpoint(hub) as ckpt:
        quantize(ckpt, tmp_path / "ct", QuantizeOptions(format="int4-g16", layout="compressed-tensors"))
    with torch.no_grad():
        got = moetool.load_model(tmp_path / "ct")(ids).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(ids).logits
        plain = reference(hub)(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - plain).abs().max() > 1e-6   # (really quantized)


def test_gptq_sees_the_clamped_activation_each_expert_computes(tmp_path):
    """Per-expert calibration's down_proj inputs are the experts' clamped SwiGLU (swiglu_limit, small here so that
    it binds): its Hessians equal those of min(gate, L) and clamp(up, -L, L) through silu, written out here, on
    the hidden states and picks transformers' own experts module receives (the token table's in layer 0)."""
    from moetool.runner.engine import micro_batches, run
    from moetool.runner.model import load_model
    from tests.test_sequential import HessianObserver
    from tests.tiny import build_variant

    limit = 0.05
    model = build_variant("deepseek_v4", swiglu_limit=limit)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(4))
    seen = {}
    hooks = [model.model.layers[layer].mlp.experts.register_forward_pre_hook(
        lambda m, args, layer=layer: seen.__setitem__(layer, args[:2])) for layer in range(3)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    observer = HessianObserver()
    with open_checkpoint(tmp_path / "m") as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        run(loaded, micro_batches(ids, 2), calibrate=observer)
    clamped = 0
    for layer, (hidden, index) in seen.items():
        experts = model.model.layers[layer].mlp.experts
        inputs = observer.found[layer]["mlp.experts"]
        for e in range(4):
            x = hidden[(index == e).any(-1)].float()
            gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            clamped += int((gate > limit).sum() + (up.abs() > limit).sum())
            a = torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
            assert torch.allclose(inputs.down[e].matrix(), 2 * a.T @ a / max(1, a.shape[0]), atol=1e-6)
    assert clamped > 0   # (the limit did bind)


def test_a_table_layer_whose_experts_cannot_be_compared_is_refused(tmp_path):
    """Its removed experts' tokens go to the most similar kept ones: where inspect cannot compare the experts
    (one stored in another dtype), prune says so instead of failing on a missing layer."""
    src = save_tiny("deepseek_v4", tmp_path / "saved")
    path = hub_checkpoint(src, tmp_path / "hub")
    tensors = load_file(path / "model.safetensors")
    tensors["layers.0.ffn.experts.3.w1.weight"] = tensors["layers.0.ffn.experts.3.w1.weight"].bfloat16()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(path) as ckpt, pytest.raises(UnsupportedError, match="could not be compared"):
        prune(ckpt, tmp_path / "out", PruneOptions(keep=2, criterion="random"))
    assert not (tmp_path / "out").exists()


def test_only_the_token_table_layers_experts_are_compared_without_merge(tmp_path, hub, monkeypatch):
    """The table remap needs those layers' expert similarity alone: the other layers' experts are not read for it
    (a full read of a 1T-parameter checkpoint's experts); --merge compares every layer's."""
    import moetool.ops.inspect as inspect_module

    asked, real = [], inspect_module.inspect_checkpoint

    def recorded(ckpt, **kwargs):
        asked.append(kwargs.get("experts"))
        return real(ckpt, **kwargs)

    monkeypatch.setattr(inspect_module, "inspect_checkpoint", recorded)
    calibration = ProfileOptions(token_ids=_ids_file(tmp_path), seq_len=24, device="cpu", dtype="fp32")
    merged = PruneOptions(keep=2, criterion="soft-count", merge=True, calibration=calibration)
    for name, options in (("plain", PruneOptions(keep=2, criterion="random")), ("merged", merged)):
        with open_checkpoint(hub) as ckpt:
            prune(ckpt, tmp_path / name, options)
    compared = [experts for experts in asked if experts]
    assert compared == [[0], True]


def _ids_file(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (96,), generator=torch.Generator().manual_seed(1)).tolist()))
    return path
