"""`moetool prune`: a model pruned to a subset S of experts equals the original model whose routers
are restricted to S (logits of removed experts at -inf before top-k), in transformers."""

import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import transformers

from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.prune import PruneOptions, prune
from moetool.runner.modules import module_in
from tests.tiny import build_model, load_reference, moetool_model

FAMILIES = ["mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2",
            "glm4_moe", "glm4_moe_lite", "qwen3_5_moe_text", "lfm2_moe", "exaone_moe",
            "dots1", "gpt_oss", "llama4_text", "granitemoe", "granitemoeshared", "granitemoehybrid",
            "phimoe", "jamba", "ernie4_5_moe", "hunyuan_v1_moe", "deepseek_v3",
            "deepseek_v32", "dbrx", "cohere2_moe", "afmoe",
            "granitemoe_swa", "sarvam_moe", "gemma4_text", "qwen4_exp_text",
            "hy_v3", "axk1", "flint", "mellum", "beam", "axk2",
            "glm_moe_dsa", "solar_open", "sarvam_mla", "kimi_linear",
            "nemotron_h", "nemotron_h-latent", "mimo_v2_flash", "bailing_hybrid", "laguna", "kolibri1",
            "minimax_m3_vl_text", "dots3_note_text",
            "qwen3_vl_moe", "glm4v_moe", "mistral4", "glm5_next",
            "hy_v4", "lara_mini", "longcat_flash", "longcat_flash-bias", "step3p7",
            "qwen3_omni_moe", "muse_spark", "hy_v4_vl", "inkling_text", "deepseek_ocr2", "mistral_large4",
            "zaya"]


@contextmanager
def routers_restricted(model, removed: dict[int, list[int]], router_weights: dict[int, torch.Tensor]):
    """Set the logits of removed experts to -inf wherever a router's weight is applied."""
    real = torch.nn.functional.linear
    by_pointer = {w.data_ptr(): removed[layer] for layer, w in router_weights.items()}

    def linear(x, weight, bias=None):
        out = real(x, weight, bias)
        gone = by_pointer.get(weight.data_ptr())
        if gone:
            out = out.clone()
            out[..., gone] = float("-inf")
        return out

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = real


def _router_weights(model, family_name, layers):
    from moetool.arch import detect_family

    family = detect_family(model.config.to_dict())
    out = {}
    for layer in layers:
        module = model.get_submodule(module_in(model, family, family.router_module.replace("{L}", str(layer))))
        weight = getattr(module, "weight", None)
        if family_name == "zaya":   # an MLP router: its expert rows are its last projection's
            weight = module.router_mlp.out_proj.weight
        if weight is None:   # Hunyuan's gate holds an nn.Linear, JetMoE's router a .layer
            weight = next(p for n, p in module.named_parameters() if n.endswith("weight"))
        out[layer] = weight
    return out


# families whose tiny router selects within the best of 2 groups: pruned with 8 experts, keeping 4
GROUPED = ("deepseek_v3", "deepseek_v32", "axk1", "beam", "bailing_hybrid", "mistral4", "mistral_large4")


def _model(family):
    if family not in GROUPED:
        return build_model(family)
    # 8 experts in 2 groups, so that each group can keep 2 (its score is the sum of its best two)
    from tests.tiny import TINY

    cls, kwargs = TINY[family]
    text = kwargs.get("text_config", kwargs)   # (a wrapper's text model: Mistral Large 4)
    key = next(k for k in ("n_routed_experts", "num_experts") if k in text)
    text = {**text, key: 8}
    torch.manual_seed(0)
    return moetool_model(getattr(transformers, cls)(**({**kwargs, "text_config": text} if text is not kwargs and
                                                         "text_config" in kwargs else text)))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_the_masked_original(tmp_path, family):
    model = _model(family).eval()
    model.save_pretrained(tmp_path / "src")
    keep = 4 if family in GROUPED else 3      # DeepSeek-V3: 2 of 4 in each of its 2 groups
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=1))
    removed = {layer: [e for e in range(report.experts_before) if e not in kept] for layer, kept in report.kept.items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routers_restricted(model, removed, _router_weights(model, family, report.kept)):
        want = model(ids).logits
    pruned = load_reference(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = pruned(ids).logits
    assert (got - want).abs().max() <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert keep in config.values() or keep in (config.get("ffn_config") or {}).values() or \
        keep in (config.get("text_config") or {}).values() or \
        keep in (config.get("thinker_config") or {}).get("text_config", {}).values()
    src_bytes = sum(f.stat().st_size for f in (tmp_path / "src").glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert src_bytes - out_bytes == pytest.approx(report.bytes_removed, abs=4096)   # headers differ a little


@pytest.mark.parametrize("method, keep", [("group_limited_greedy", 2), ("greedy", 3)])
def test_deepseek_v2_groups_as_its_router_uses_them(tmp_path, method, keep):
    """DeepSeek-V2 ranks a group by its best expert (one per group may be kept), and with topk_method
    greedy it ignores n_group altogether (any count); either way the pruned model equals the original
    with the removed experts masked."""
    from tests.tiny import TINY

    cls, kwargs = TINY["deepseek_v2"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{
        **kwargs, "n_routed_experts": 8, "n_group": 2, "topk_group": 1, "topk_method": method,
        "num_experts_per_tok": 1})).eval()
    model.save_pretrained(tmp_path / "src")
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=keep, criterion="random", seed=3))
    removed = {layer: [e for e in range(8) if e not in kept] for layer, kept in report.kept.items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routers_restricted(model, removed, _router_weights(model, "deepseek_v2", report.kept)):
        want = model(ids).logits
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (pruned(ids).logits - want).abs().max() <= 1e-5


def _profile_json(tmp_path, path, tokens=600):
    """`moetool profile --saliency --json` of PATH over TOKENS random ids, as the command writes it (in this
    process: tests/test_cli*.py run the command itself)."""
    from moetool.ops.profile import ProfileOptions, profile

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(torch.randint(0, 64, (tokens,), generator=torch.Generator().manual_seed(2)).tolist()))
    with open_checkpoint(path) as ckpt:
        report = profile(ckpt, ProfileOptions(token_ids=ids, seq_len=30, saliency=True))
    text = json.dumps(report.to_dict(), indent=2, default=str, allow_nan=False)
    (tmp_path / "profile.json").write_text(text)
    return tmp_path / "profile.json", json.loads(text)


@pytest.mark.parametrize("criterion, field", [("frequency", "counts"), ("soft-count", "weight_mass"),
                                              ("reap", "saliency")])
def test_criteria_from_a_profile_keep_the_top_experts(tmp_path, tiny, criterion, field):
    profile_path, profile = _profile_json(tmp_path, tiny("qwen3_moe"))
    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(ratio=0.5, criterion=criterion, profile=profile_path))
    for layer in profile["layers"]:
        scores = layer[field]
        best = sorted(range(4), key=lambda e: (-scores[e], e))[:2]
        assert report.kept[layer["layer"]] == sorted(best)
        assert report.scores[layer["layer"]] == scores   # the report says what the choice saw
    assert report.experts_after == 2 and 0 <= report.routing_mass_removed <= 0.5 + 1e-9


def test_top_k_is_lowered_and_bad_requests_are_refused(tmp_path, tiny):
    with open_checkpoint(tiny("mixtral")) as ckpt:
        report = prune(ckpt, tmp_path / "one", PruneOptions(keep=1, criterion="random"))
        assert report.top_k == 1 and report.warnings
        assert json.loads((tmp_path / "one" / "config.json").read_text())["num_experts_per_tok"] == 1
        with pytest.raises(UsageError, match="cannot keep 5 of 4"):
            prune(ckpt, tmp_path / "x", PruneOptions(keep=5, criterion="random"))
        with pytest.raises(UsageError, match="exactly one"):
            prune(ckpt, tmp_path / "x", PruneOptions(criterion="random"))
    with open_checkpoint(tiny("nllb-moe")) as ckpt, pytest.raises(UsageError, match="top-k of 2"):
        prune(ckpt, tmp_path / "x", PruneOptions(keep=1, criterion="random"))
    with open_checkpoint(tiny("llama")) as ckpt, pytest.raises(UsageError, match="no MoE layers"):
        prune(ckpt, tmp_path / "x", PruneOptions(keep=1, criterion="random"))
    with open_checkpoint(tiny("jetmoe")) as ckpt, pytest.raises(UnsupportedError, match="attention experts"):
        prune(ckpt, tmp_path / "x", PruneOptions(keep=2, criterion="random"))
    other, _ = _profile_json(tmp_path, tiny("olmoe"))
    with open_checkpoint(tiny("deepseek_v2")) as ckpt, pytest.raises(UsageError, match="another model"):
        prune(ckpt, tmp_path / "x", PruneOptions(keep=2, profile=other))


@pytest.mark.parametrize("extra", [["--criterion", "weight-norm", "--max-tokens", "100"],
                                   ["--criterion", "random", "--batch-size", "2"],
                                   ["--experts", "0:0,1;1:2,3", "--data", "builtin"]])
def test_calibration_options_that_would_go_unused_are_refused(tmp_path, tiny, extra):
    proc = subprocess.run([sys.executable, "-m", "moetool", "prune", str(tiny("olmoe")), str(tmp_path / "out"),
                           *([] if "--experts" in extra else ["--keep", "2"]), *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nothing is calibrated here" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, tiny):
    proc = subprocess.run([sys.executable, "-m", "moetool", "prune", str(tiny("olmoe")), str(tmp_path / "out"),
                           "--keep", "2", "--criterion", "random", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["experts_after"] == 2 and data["bytes_removed"] > 0
    with open_checkpoint(tmp_path / "out") as ckpt:
        from moetool.ops.inspect import inspect_checkpoint
        report = inspect_checkpoint(ckpt)
    assert report.num_experts == 2 and report.problems == []


def test_ean_weight_norm_and_explicit_experts(tmp_path, tiny):
    from moetool.ops.inspect import inspect_checkpoint

    profile_path, profile = _profile_json(tmp_path, tiny("mixtral"))
    layer = profile["layers"][0]
    assert all(a >= 0 for a in layer["activation_norm"])
    with open_checkpoint(tiny("mixtral")) as ckpt:
        ean = prune(ckpt, tmp_path / "ean", PruneOptions(keep=2, criterion="ean", profile=profile_path))
        want = sorted(sorted(range(4), key=lambda e: (-layer["activation_norm"][e], e))[:2])
        assert ean.kept[layer["layer"]] == want
        norms = {s.layer: s.norms for s in inspect_checkpoint(ckpt, experts=True).experts}
        by_norm = prune(ckpt, tmp_path / "wn", PruneOptions(keep=3, criterion="weight-norm"))
        assert by_norm.kept[1] == sorted(sorted(range(4), key=lambda e: (-norms[1][e], e))[:3])
        explicit = prune(ckpt, tmp_path / "ex", PruneOptions(experts={0: [3, 1], 1: [0, 2]}))
        assert explicit.kept == {0: [1, 3], 1: [0, 2]}
        with pytest.raises(UsageError, match="same number"):
            prune(ckpt, tmp_path / "bad", PruneOptions(experts={0: [1], 1: [0, 2]}))


def test_merge_folds_removed_experts_into_the_most_similar(tmp_path, tiny):
    from safetensors.torch import load_file

    from moetool.ops.inspect import inspect_checkpoint

    src = tiny("qwen3_moe")
    profile_path, profile = _profile_json(tmp_path, src)
    with open_checkpoint(src) as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=2, criterion="frequency", profile=profile_path,
                                                            merge=True))
        similarity = {s.layer: s.similarity for s in inspect_checkpoint(ckpt, experts=True).experts}
    original, merged = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for layer in profile["layers"]:
        index, mass, keep = layer["layer"], layer["weight_mass"], report.kept[layer["layer"]]
        groups = {k: [k] for k in keep}
        for e in range(4):
            if e not in keep:
                groups[max(keep, key=lambda k: (similarity[index][e][k], -k))].append(e)
        for new, k in enumerate(keep):
            total = sum(mass[e] for e in groups[k])
            for proj in ("gate_proj", "up_proj", "down_proj"):
                want = sum(original[f"model.layers.{index}.mlp.experts.{e}.{proj}.weight"] * (mass[e] / total)
                           for e in groups[k])
                got = merged[f"model.layers.{index}.mlp.experts.{new}.{proj}.weight"]
                assert torch.allclose(got, want, atol=1e-6)
    with open_checkpoint(tiny("mixtral", fused=True)) as ckpt, pytest.raises(UnsupportedError, match="per-expert"):
        prune(ckpt, tmp_path / "f", PruneOptions(keep=2, criterion="frequency", merge=True,
                                                 profile=_profile_json(tmp_path, tiny("mixtral", fused=True))[0]))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2", "granitemoe", "qwen3_vl_moe", "glm4v_moe",
                                    "glm5_next", "step3p7"])
def test_global_scope_loads_with_moetool_and_matches_the_masked_original(tmp_path, family):
    import moetool

    model = build_model(family)
    model.save_pretrained(tmp_path / "src")
    profile_path, profile = _profile_json(tmp_path, tmp_path / "src")
    first = profile["layers"][0]                     # make the first MoE layer's experts matter more
    first["weight_mass"] = [100 * v for v in first["weight_mass"]]
    profile_path.write_text(json.dumps(profile))
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=3, criterion="soft-count", profile=profile_path,
                                                            scope="global"))
    counts = [len(v) for v in report.kept.values()]
    assert counts == [4, 2]                           # 6 kept in all, at least top-k (2) per layer
    assert report.experts_after_text == "2-4" and list(report.to_dict()["experts_per_layer"].values()) == [4, 2]
    assert "4 -> 2-4 experts per layer" in (tmp_path / "out" / "README.md").read_text()
    assert "moetool.load_model" in report.warnings[-1]
    with pytest.raises(RuntimeError):                 # stock transformers cannot load different counts
        load_reference(tmp_path / "out")
    removed = {layer: [e for e in range(4) if e not in kept] for layer, kept in report.kept.items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routers_restricted(model, removed, _router_weights(model, family, report.kept)):
        want = model(ids).logits
    pruned = moetool.load_model(tmp_path / "out")
    with torch.no_grad():
        got = pruned(ids).logits
    assert (got - want).abs().max() <= 1e-5
    with open_checkpoint(tmp_path / "out") as ckpt:   # inspect reads each layer's own count
        after = inspect_checkpoint(ckpt)
    assert after.problems == [] and [i.experts for i in after.layers if i.kind == "moe"] == counts
    if family == "qwen3_moe":   # and quantize's output loads, each layer built with its own count
        from moetool.ops.quantize import QuantizeOptions, quantize

        with open_checkpoint(tmp_path / "out") as ckpt:
            quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g8"))
        with torch.no_grad():
            assert (moetool.load_model(tmp_path / "q")(ids).logits - got).abs().max() <= 0.05 * got.abs().max()


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_encoder_decoder_pruning_equals_the_masked_original(tmp_path, family):
    model = build_model(family)
    model.save_pretrained(tmp_path / "src")
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=3, criterion="random", seed=2))
    removed = {layer: [e for e in range(4) if e not in kept] for layer, kept in report.kept.items()}
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    weights = {}
    from moetool.arch import detect_family
    from moetool.runner.capture import module_name

    fam = detect_family(model.config.to_dict())
    for layer in report.kept:
        module = model.get_submodule(module_name(fam.router_module, layer, fam.decoder_offset(model.config.to_dict())))
        weights[layer] = module.classifier.weight
    with torch.no_grad(), routers_restricted(model, removed, weights):
        want = model(input_ids=ids, decoder_input_ids=ids).logits
    pruned = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = pruned(input_ids=ids, decoder_input_ids=ids).logits
    # NLLB's combine weights are softmax probabilities themselves (not renormalised over the top-k):
    # a softmax over 3 terms and one over 4 with exp(-inf) = 0 differ in the last bits
    assert (got - want).abs().max() <= (1e-5 if family == "switch_transformers" else 2e-4)


@pytest.mark.parametrize("family, why", [("phimoe", "sparsemixer"), ("jamba", "dense MLP"),
                                         ("glm4_moe", "best two")])
def test_a_layer_keeps_what_its_router_needs(tmp_path, tiny, family, why):
    """Below these, transformers' forward breaks: PhiMoE's sparsemixer gives NaN with one expert, Jamba
    builds a dense MLP (random weights) for one, GLM/DeepSeek-V3 routers take the top-2 of a group."""
    with open_checkpoint(tiny(family)) as ckpt, pytest.raises(UsageError, match=why):
        prune(ckpt, tmp_path / "x", PruneOptions(keep=1, criterion="random"))
    assert not (tmp_path / "x").exists()


def test_profile_options_combine_with_every_criterion(tmp_path, tiny, monkeypatch):
    from moetool.ops.inspect import inspect_checkpoint

    src = tiny("qwen3_moe")
    profile_path, profile = _profile_json(tmp_path, src)
    with open_checkpoint(src) as ckpt:
        norms = {s.layer: s.norms for s in inspect_checkpoint(ckpt, experts=True).experts}
        by_norm = prune(ckpt, tmp_path / "wn", PruneOptions(keep=2, criterion="weight-norm", profile=profile_path,
                                                            merge=True))   # mass from the profile
        assert by_norm.kept[0] == sorted(sorted(range(4), key=lambda e: (-norms[0][e], e))[:2])
        explicit = prune(ckpt, tmp_path / "ex", PruneOptions(experts={0: [0, 1], 1: [2, 3]}, profile=profile_path,
                                                             merge=True))
        mass = profile["layers"][0]["weight_mass"]
        assert explicit.routing_mass_removed == pytest.approx(
            (sum(mass[2:]) + sum(profile["layers"][1]["weight_mass"][:2])) / (sum(mass) + sum(
                profile["layers"][1]["weight_mass"])))
        counts_only = json.loads(profile_path.read_text())   # as a profile of a vLLM trace: no gate weights
        for layer in counts_only["layers"]:
            layer["weight_mass"] = None
        (tmp_path / "counts.json").write_text(json.dumps(counts_only))
        report = prune(ckpt, tmp_path / "c", PruneOptions(keep=2, profile=tmp_path / "counts.json"))
        assert report.routing_mass_removed is None
        with pytest.raises(UsageError, match="gate-weight mass"):
            prune(ckpt, tmp_path / "m", PruneOptions(keep=2, profile=tmp_path / "counts.json", merge=True))
        with pytest.raises(UsageError, match="exactly one"):
            prune(ckpt, tmp_path / "k", PruneOptions(experts={0: [0, 1], 1: [2, 3]}, keep=3))

        def no_calibration(*args, **kwargs):
            raise AssertionError("calibrated before refusing")

        monkeypatch.setattr("moetool.ops.prune_choice.routing_profile", no_calibration)
        monkeypatch.setattr("moetool.ops.prune_choice.sequential_choice", no_calibration)
        (tmp_path / "taken").mkdir()
        from moetool.errors import OutputExistsError

        with pytest.raises(OutputExistsError):
            prune(ckpt, tmp_path / "taken", PruneOptions(keep=2, criterion="reap"))
        with pytest.raises(UsageError, match="--criterion bogus"):
            prune(ckpt, tmp_path / "b", PruneOptions(keep=2, criterion="bogus", sequential=True))
    with open_checkpoint(tiny("qwen3_moe", fused=True)) as ckpt, pytest.raises(UnsupportedError, match="per-expert"):
        prune(ckpt, tmp_path / "f", PruneOptions(keep=2, sequential=True, merge=True))
