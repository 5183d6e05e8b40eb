"""`moetool upcycle`: exact at initialisation against the dense model's logits in transformers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.upcycle import UpcycleOptions, plan_upcycle, upcycle


def run(src, out, **kw):
    with open_checkpoint(src) as ckpt:
        return upcycle(ckpt, out, UpcycleOptions(**kw))


def logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("source", ["llama", "mistral", "qwen3", "gemma"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("granularity", [1, 2])
def test_exact_at_initialisation(tmp_path, tiny, source, top_k, granularity):
    src = tiny(source)
    summary = run(src, tmp_path / "moe", experts=4, top_k=top_k, granularity=granularity)
    assert summary["experts"] == 4 * granularity and summary["top_k"] == top_k * granularity
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    got, want = logits(tmp_path / "moe", ids), logits(src, ids)
    assert (got - want).abs().max() <= 1e-5
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == ("qwen3_moe" if source == "qwen3" else "mixtral")
    assert "rope_theta" in config   # transformers 4.57 reads rope_theta, not rope_parameters


def test_qwen3_partial_layers(tmp_path, tiny):
    src = tiny("qwen3")
    run(src, tmp_path / "moe", experts=4, top_k=2, layers=[1])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["num_experts"] == 4
    ids = torch.randint(0, 64, (1, 9))
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() <= 1e-5


def test_builtin_dense_upcycled_is_the_same_model(tmp_path):
    from moetool.ops.evaluate import EvalOptions, evaluate

    run("builtin:tiny-dense", tmp_path / "moe", experts=8, top_k=2)
    with open_checkpoint(tmp_path / "moe") as moe, open_checkpoint("builtin:tiny-dense") as dense:
        report = evaluate(moe, EvalOptions(max_tokens=4096, seq_len=128), dense)
    assert report.kl_mean < 1e-6 and report.top1_agreement == 1.0


def test_drop_ratio_and_noise_change_the_stated_fraction(tmp_path, tiny):
    src = tiny("qwen3")
    dense = load_file(src / "model.safetensors")
    run(src, tmp_path / "drop", experts=4, top_k=2, drop_ratio=0.25)
    out = load_file(tmp_path / "drop" / "model.safetensors")
    gate = dense["model.layers.0.mlp.gate_proj.weight"]            # [24, 32]
    changed_sets = []
    for e in range(4):
        expert = out[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]
        changed = {i for i in range(24) if not torch.equal(expert[i], gate[i])}
        assert len(changed) == 6                                   # 25% of 24 neurons
        down = out[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]
        dense_down = dense["model.layers.0.mlp.down_proj.weight"]
        assert {i for i in range(24) if not torch.equal(down[:, i], dense_down[:, i])} == changed   # same neurons
        changed_sets.append(frozenset(changed))
    assert len(set(changed_sets)) > 1                              # a different subset per expert

    run(src, tmp_path / "noise", experts=4, top_k=2, noise=0.1)
    noisy = load_file(tmp_path / "noise" / "model.safetensors")["model.layers.0.mlp.experts.2.gate_proj.weight"]
    difference = noisy - gate
    assert (difference != 0).float().mean() == 1.0                 # every weight moved
    assert float(difference.std() / gate.std()) == pytest.approx(0.1, rel=0.25)


def test_bad_requests(tmp_path, tiny):
    with open_checkpoint(tiny("mixtral")) as ckpt, pytest.raises(UsageError, match="dense model"):
        plan_upcycle(ckpt, UpcycleOptions())
    with open_checkpoint(tiny("qwen3")) as ckpt, pytest.raises(UnsupportedError, match="attention matches"):
        plan_upcycle(ckpt, UpcycleOptions(target="mixtral"))
    with open_checkpoint(tiny("llama")) as ckpt:
        with pytest.raises(UnsupportedError, match="dense layers"):
            plan_upcycle(ckpt, UpcycleOptions(experts=4, layers=[1]))
        with pytest.raises(UsageError, match="top-k"):
            plan_upcycle(ckpt, UpcycleOptions(experts=2, top_k=3))
        with pytest.raises(UsageError, match="granularity"):
            plan_upcycle(ckpt, UpcycleOptions(experts=2, granularity=5))


def test_cli_dry_run_and_write(tmp_path, tiny):
    proc = subprocess.run([sys.executable, "-m", "moetool", "upcycle", str(tiny("llama")), str(tmp_path / "out"),
                           "--experts", "4", "--top-k", "2", "--dry-run", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target_family"] == "mixtral" and not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "moetool", "upcycle", str(tiny("llama")), str(tmp_path / "out"),
                           "--experts", "4", "--granularity", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open_checkpoint(tmp_path / "out") as ckpt:
        from moetool.ops.inspect import inspect_checkpoint
        report = inspect_checkpoint(ckpt)
    assert report.family == "mixtral" and report.num_experts == 8 and report.top_k == 4 and not report.problems


def test_hidden_kmeans_balances_initial_routing_better_than_random(tmp_path):
    """Balanced k-means of the dense model's MLP inputs (training plays) against a random router,
    judged by profile's imbalance on the held-out play."""
    from moetool.ops.profile import ProfileOptions, profile

    cv = {}
    for init in ("random", "hidden-kmeans"):
        run("builtin:tiny-dense", tmp_path / init, experts=8, top_k=2, router_init=init, max_tokens=4096)
        with open_checkpoint(tmp_path / init) as ckpt:
            report = profile(ckpt, ProfileOptions(data="builtin:heldout", max_tokens=8192, seq_len=256))
        cv[init] = sum(layer.imbalance["cv"] for layer in report.layers) / len(report.layers)
        assert all(not layer.dead_experts for layer in report.layers)
    assert cv["hidden-kmeans"] < cv["random"], cv


def test_prompts_router_init(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([["To be, or not to be"], ["Friends, Romans, countrymen"],
                                   ["Now is the winter of our discontent"], ["All the world's a stage"]]))
    run("builtin:tiny-dense", tmp_path / "moe", experts=4, top_k=1, router_init="prompts", prompts=prompts)
    router = load_file(tmp_path / "moe" / "model.safetensors")["model.layers.2.mlp.gate.weight"].float()
    assert router.shape == (4, 128) and torch.linalg.matrix_rank(router) == 4
    with pytest.raises(UsageError, match="4 experts"):
        (tmp_path / "three.json").write_text(json.dumps([["a"], ["b"], ["c"]]))
        run("builtin:tiny-dense", tmp_path / "bad", experts=4, router_init="prompts", prompts=tmp_path / "three.json")


def test_bad_prompts_are_one_line_errors_before_any_work(tmp_path, monkeypatch):
    """--prompts: every prompt a text that is not blank and gives token ids of the model's vocabulary; a bad
    one is a UsageError naming the file, list and prompt, and nothing is written."""
    from moetool.runner import data

    cases = {'[[1], [2]]': r"list 1, prompt 1 is 1: each prompt must be a text",
             '[[""], ["b"]]': r"list 1, prompt 1 is \"\": each prompt must be a text that is not blank",
             '[["a"], ["b", " \\n"]]': r"list 2, prompt 2 is \" \\n\"",
             '[["a"], [null]]': r"list 2, prompt 1 is null", '[["a"], [["b"]]]': r"list 2, prompt 1 is \[\"b\"\]",
             '[["a"], []]': r"not a JSON list of non-empty prompt lists", '[[1], [2]': r"not a JSON list",
             "[" * 100_000: r"not a JSON list", '{"a": ["b"]}': r"not a JSON list"}
    for n, (text, message) in enumerate(cases.items()):
        (tmp_path / f"p{n}.json").write_text(text)
        with pytest.raises(UsageError, match=rf"p{n}\.json: {message}"):
            run("builtin:tiny-dense", tmp_path / "out", experts=2, top_k=1, router_init="prompts",
                prompts=tmp_path / f"p{n}.json")
    (tmp_path / "ok.json").write_text(json.dumps([["To be, or not to be"], ["Friends, Romans"]]))
    tokenize = data.tokenize
    fake = {"none": lambda texts, path: [] if texts == ["Friends, Romans"] else tokenize(texts, path),
            "outside": lambda texts, path: [5, 10**6]}
    for name, message in (("none", r"list 2, prompt 1 gives no tokens"),
                          ("outside", r"list 1, prompt 1 gives token id 1000000, outside the model's vocabulary")):
        monkeypatch.setattr(data, "tokenize", fake[name])
        with pytest.raises(UsageError, match=r"ok\.json: " + message):
            run("builtin:tiny-dense", tmp_path / "out", experts=2, top_k=1, router_init="prompts",
                prompts=tmp_path / "ok.json")
    monkeypatch.setattr(data, "tokenize", tokenize)
    assert not (tmp_path / "out").exists()
    cli = subprocess.run([sys.executable, "-m", "moetool", "upcycle", "builtin:tiny-dense", str(tmp_path / "out"),
                          "--experts", "2", "--top-k", "1", "--router-init", "prompts", "--prompts",
                          str(tmp_path / "p1.json")], capture_output=True, text=True)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "list 1, prompt 1" in cli.stderr


@pytest.mark.parametrize("average", [False, True])
def test_several_sources(tmp_path, tiny, average):
    """Branch-Train-MiX: expert e from source e mod 2; shared tensors from the first or averaged."""
    from tests.tiny import save_tiny

    a = tiny("llama")
    b = save_tiny("llama", tmp_path / "other", seed=1)
    with open_checkpoint(a) as first, open_checkpoint(b) as second:
        summary = upcycle(first, tmp_path / "moe", UpcycleOptions(experts=4, top_k=2, average_shared=average),
                          others=[second])
    assert "2 sources" in summary["warnings"][0]
    out = load_file(tmp_path / "moe" / "model.safetensors")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for e in range(4):
        src = wa if e % 2 == 0 else wb
        assert torch.equal(out[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"],
                           src["model.layers.1.mlp.gate_proj.weight"])
    attention = "model.layers.0.self_attn.q_proj.weight"
    want = (wa[attention] + wb[attention]) / 2 if average else wa[attention]
    assert torch.allclose(out[attention], want)
    with open_checkpoint(a) as first, open_checkpoint(tiny("qwen3")) as other, \
            pytest.raises(UsageError, match="same architecture"):
        plan_upcycle(first, UpcycleOptions(experts=2, top_k=1), [other])


@pytest.mark.parametrize("shared", [0, 1, 2])
@pytest.mark.parametrize("granularity", [1, 2])
def test_qwen2_to_qwen2_moe_with_shared_experts(tmp_path, tiny, shared, granularity):
    """Qwen2-MoE adds sigmoid(gate . x) x shared(x): with the gate at 0 (1/2), the shared expert equal to
    the dense MLP and the routed experts halved, the output is still the dense model's."""
    src = tiny("qwen2")
    run(src, tmp_path / "moe", experts=4, top_k=2, shared_experts=shared, granularity=granularity)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == shared * 24
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() <= 1e-5
    with open_checkpoint(tmp_path / "moe") as ckpt:
        from moetool.ops.inspect import inspect_checkpoint
        report = inspect_checkpoint(ckpt)
    assert report.problems == [] and report.num_shared_experts == (1 if shared else 0)


def test_shared_experts_need_a_family_that_has_them(tiny):
    with open_checkpoint(tiny("llama")) as ckpt, pytest.raises(UsageError, match="no shared experts"):
        plan_upcycle(ckpt, UpcycleOptions(experts=4, shared_experts=1))


@pytest.mark.parametrize("source", ["llama", "mistral"])
@pytest.mark.parametrize("top_k, granularity, shared", [(1, 1, 0), (2, 1, 1), (2, 2, 0), (1, 2, 2)])
def test_deepseek_v3_style_target(tmp_path, tiny, source, top_k, granularity, shared):
    """GLM-4.5 architecture: DeepSeek-V3 routing (sigmoid scores, correction bias, renormalised, shared
    experts) on the source's own attention; exact at initialisation."""
    src = tiny(source)
    run(src, tmp_path / "moe", experts=4, top_k=top_k, granularity=granularity, shared_experts=shared,
        target="glm4_moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["n_routed_experts"] == 4 * granularity
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() <= 1e-5
    with open_checkpoint(tmp_path / "moe") as ckpt:
        from moetool.ops.inspect import inspect_checkpoint
        report = inspect_checkpoint(ckpt)
    assert report.problems == [] and report.router["correction_bias"]


def test_glm_target_keeps_only_first_layers_dense(tmp_path, tiny):
    src = tiny("llama")
    run(src, tmp_path / "moe", experts=4, top_k=2, target="glm4_moe", layers=[1])
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["first_k_dense_replace"] == 1
    ids = torch.randint(0, 64, (1, 7))
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() <= 1e-5
    with open_checkpoint(src) as ckpt, pytest.raises(UnsupportedError, match="first layers dense"):
        plan_upcycle(ckpt, UpcycleOptions(experts=4, target="glm4_moe", layers=[0]))


@pytest.mark.parametrize("source", ["gemma2", "gemma3_text"])
def test_inexact_sources_warn_with_the_reason(tmp_path, tiny, source):
    """Gemma 2/3 into Mixtral cannot be exact (norms around the MLP, soft-capping, q/k norms): the
    command says so and why, and still writes a checkpoint transformers loads."""
    summary = run(tiny(source), tmp_path / "moe", experts=4, top_k=2)
    assert any("normalises around the MLP" in w and "differs from the dense model" in w for w in summary["warnings"])
    proc = subprocess.run([sys.executable, "-m", "moetool", "upcycle", str(tiny(source)), str(tmp_path / "cli"),
                           "--experts", "4"], capture_output=True, text=True)
    assert proc.returncode == 0 and "warning" in proc.stdout and "normalises around the MLP" in proc.stdout
    ids = torch.randint(0, 64, (1, 7))
    assert logits(tmp_path / "moe", ids).isfinite().all()


def test_olmoe_target_warns_and_loads(tmp_path, tiny):
    summary = run(tiny("llama"), tmp_path / "moe", experts=4, top_k=2, target="olmoe")
    assert any("OLMoE normalises queries and keys" in w for w in summary["warnings"])
    with open_checkpoint(tmp_path / "moe") as ckpt:
        from moetool.ops.inspect import inspect_checkpoint
        report = inspect_checkpoint(ckpt)
    assert report.family == "olmoe" and report.problems == [] and report.num_experts == 4
    ids = torch.randint(0, 64, (1, 7))
    got, want = logits(tmp_path / "moe", ids), logits(tiny("llama"), ids)
    assert got.isfinite().all() and (got - want).abs().max() > 1e-4   # not the dense model, as warned


# ---------------------------------------------------------------- bad inputs are refused before anything is written

def cli(*args):
    return subprocess.run([sys.executable, "-m", "moetool", "upcycle", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def assert_refused(proc, code, out, *words):
    """Exit CODE, one "Error:" line (and perhaps its hint), no traceback, no output folder."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and all(line.startswith("Hint: ") for line in lines[1:2]), proc.stderr
    assert len(lines) <= 2 and "Traceback" not in proc.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()


def variant(src, path, config=None, edit=None):
    """A copy of SRC with config keys changed (None: removed) and its tensors changed by EDIT(dict)."""
    shutil.copytree(src, path)
    if edit:
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


def save_model(family, path, randomise_biases=True, **overrides):
    """The tiny model of FAMILY with other config values; biases random (transformers starts them at 0)."""
    from tests.tiny import TINY

    cls_name, kwargs = TINY[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**{**kwargs, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and randomise_biases:
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def test_mlp_shapes_must_match_the_config(tmp_path, tiny):
    """Experts are byte ranges of the dense MLP: an up_proj of 20 rows where the config says 24 would
    have each expert's last rows read from the next tensor in the file."""
    name = "model.layers.1.mlp.up_proj.weight"
    short = variant(tiny("llama"), tmp_path / "short", edit=lambda t: t.update({name: t[name][:20].clone()}))
    assert_refused(cli(short, tmp_path / "out", "--experts", "2"), 4, tmp_path / "out", name, "[20, 32]", "24")
    wide = "model.layers.0.mlp.down_proj.weight"
    bad = variant(tiny("qwen3"), tmp_path / "wide", edit=lambda t: t.update({wide: torch.cat([t[wide]] * 2, 1)}))
    assert_refused(cli(bad, tmp_path / "out", "--experts", "2", "--layers", "1"), 4, tmp_path / "out", wide)
    missing = variant(tiny("llama"), tmp_path / "missing", edit=lambda t: t.pop(name))
    assert_refused(cli(missing, tmp_path / "out", "--experts", "2"), 4, tmp_path / "out", name, "missing")
    # --from: a second source of other shapes is not the same model
    assert_refused(cli(tiny("llama"), tmp_path / "out", "--experts", "2", "--from", short), 2, tmp_path / "out",
                   "same architecture and shapes")


def test_incomplete_config_gguf_and_bad_layers_are_one_line_errors(tmp_path, tiny):
    from tests.gguf_fixtures import write_family

    out = tmp_path / "out"
    no_ffn = variant(tiny("llama"), tmp_path / "no-ffn", config={"intermediate_size": None})
    assert_refused(cli(no_ffn, out, "--experts", "2"), 5, out, "intermediate_size")
    gguf = write_family("mixtral", tmp_path / "model.gguf")[0]
    assert_refused(cli(gguf, out, "--experts", "2"), 7, out, "GGUF", "safetensors")
    for layers in ("every:0", "every:abc", "every:-2", "1,x"):
        assert_refused(cli(tiny("qwen3"), out, "--experts", "2", "--layers", layers), 2, out, repr(layers))


@pytest.mark.parametrize("layers, family", [("", None), ("", "glm4_moe"), ("every:3", None), ("every:9", "glm4_moe")])
def test_no_moe_layer_is_refused(tmp_path, tiny, layers, family):
    """An "MoE" without MoE layers is the dense model under another name: refused (2 layers here)."""
    src = tiny("qwen3" if family is None else "llama")
    args = ["--experts", "2", "--layers", layers] + (["--family", family] if family else [])
    assert_refused(cli(src, tmp_path / "out", *args), 2, tmp_path / "out", "none of the 2 layers")
    with open_checkpoint(src) as ckpt, pytest.raises(UsageError, match="none of the 2 layers"):
        plan_upcycle(ckpt, UpcycleOptions(experts=2, layers=[]))


@pytest.mark.parametrize("bias, family", [("attention_bias", "mixtral"), ("attention_bias", "glm4_moe"),
                                          ("mlp_bias", "mixtral"), ("mlp_bias", "glm4_moe"), ("mlp_bias", "olmoe")])
def test_biases_the_target_cannot_hold_are_refused(tmp_path, bias, family):
    """transformers drops biases the target class has no place for (Mixtral: none; GLM-4.5: none on the
    attention output; no target's experts have biases): that would change the model silently."""
    src = save_model("llama", tmp_path / "dense", **{bias: True})
    assert_refused(cli(src, tmp_path / "out", "--experts", "2", "--family", family), 7, tmp_path / "out", bias)


def test_attention_biases_the_target_holds_stay_exact(tmp_path):
    """Qwen3-MoE's attention_bias covers the same q/k/v/o biases as Qwen3's: kept, and exact."""
    src = save_model("qwen3", tmp_path / "dense", attention_bias=True)
    run(src, tmp_path / "moe", experts=4, top_k=2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    want = logits(src, ids)
    assert (logits(tmp_path / "moe", ids) - want).abs().max() <= 1e-5
    zeroed = save_model("qwen3", tmp_path / "zero", randomise_biases=False, attention_bias=True)
    assert (logits(zeroed, ids) - want).abs().max() > 1e-3    # the biases matter to the output


def window_bites(path, ids):
    """Whether the model's output changes when its sliding window is switched off."""
    full = variant(path, path.with_name(path.name + "-full"), config={"use_sliding_window": False, "layer_types": None})
    return (logits(full, ids) - logits(path, ids)).abs().max() > 1e-3


def test_qwen3_sliding_window_only_where_exact(tmp_path):
    """Qwen3 slides its window on layers max_window_layers.. only, Qwen3-MoE on every layer: refused
    unless every layer slides, which is exact."""
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))
    some = save_model("qwen3", tmp_path / "some", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert window_bites(some, ids)
    assert_refused(cli(some, tmp_path / "out", "--experts", "2"), 7, tmp_path / "out", "sliding window", "[1]")
    every = save_model("qwen3", tmp_path / "every", use_sliding_window=True, sliding_window=3, max_window_layers=0)
    assert window_bites(every, ids)
    run(every, tmp_path / "moe", experts=4, top_k=2)
    assert (logits(tmp_path / "moe", ids) - logits(every, ids)).abs().max() <= 1e-5
    none = save_model("qwen3", tmp_path / "none", use_sliding_window=True, sliding_window=3, max_window_layers=2)
    run(none, tmp_path / "moe-none", experts=4, top_k=2)   # no layer slides: the MoE's window is turned off
    assert (logits(tmp_path / "moe-none", ids) - logits(none, ids)).abs().max() <= 1e-5


def test_qwen2_sliding_window_pattern_is_kept(tmp_path):
    """Without layer_types in config.json, Qwen2 slides from max_window_layers on while Qwen2-MoE would
    derive its own alternating pattern: the source's pattern is written out, so the MoE stays exact."""
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(8))
    src = save_model("qwen2", tmp_path / "src", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    src = variant(src, tmp_path / "no-types", config={"layer_types": None})
    assert window_bites(src, ids)
    run(src, tmp_path / "moe", experts=4, top_k=2)
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() <= 1e-5


def test_mistral_window_into_glm_warns(tmp_path):
    """GLM-4.5 has no sliding window: a Mistral whose window is shorter than its context says so."""
    src = save_model("mistral", tmp_path / "src", sliding_window=4)
    summary = run(src, tmp_path / "moe", experts=2, top_k=1, target="glm4_moe")
    assert any("sliding window of 4 tokens" in w for w in summary["warnings"])
    ids = torch.randint(0, 64, (1, 11))
    assert (logits(tmp_path / "moe", ids) - logits(src, ids)).abs().max() > 1e-3   # as warned


def test_router_init_from_text_without_a_tokenizer_says_what_upcycle_can_do(tmp_path, tiny):
    """upcycle takes no --token-ids: a dense model without a tokenizer gets a hint upcycle can follow."""
    proc = subprocess.run([sys.executable, "-m", "moetool", "upcycle", str(tiny("llama")), str(tmp_path / "up"),
                           "--experts", "4", "--router-init", "hidden-kmeans"], capture_output=True, text=True)
    assert proc.returncode == 11 and "Traceback" not in proc.stderr, proc.stderr
    assert "--router-init random" in proc.stderr and "--token-ids" not in proc.stderr
    assert not (tmp_path / "up").exists()
