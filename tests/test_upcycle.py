"""`moetool upcycle`: exact at initialisation against the dense model's logits in transformers."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

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
