"""The run engine: a router its parent module bypasses (transformers' MXFP4 GPT-OSS MLP), streamed
eval with offloaded reference states, the activation store's tiers and a full offload disk, the
accelerate device map, and no transformers progress bars in moetool's output."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.errors import OutputWriteError
from moetool.ops import profile as profile_module
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.runner.capture import RouterCapture
from moetool.runner.engine import ActivationStore


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (480,), generator=torch.Generator().manual_seed(5)).tolist()))
    return path


def run(path, token_file, **kw):
    with open_checkpoint(path) as ckpt:
        return profile(ckpt, ProfileOptions(token_ids=token_file, seq_len=40, batch_size=4, **kw))


def bypass_router(mlp):
    """Make a GPT-OSS MLP compute its router logits itself, as transformers' Mxfp4GptOssMLP does on
    CUDA (F.linear with the router's weights, top-k, softmax over the top-k), never calling the router."""
    def forward(hidden_states):
        batch = hidden_states.shape[0]
        flat = hidden_states.reshape(-1, mlp.router.hidden_dim)
        logits = torch.nn.functional.linear(flat, mlp.router.weight, mlp.router.bias)
        top, index = torch.topk(logits, mlp.router.top_k, dim=-1)
        scores = torch.softmax(top, dim=1, dtype=top.dtype)
        return mlp.experts(flat, index, scores).reshape(batch, -1, mlp.router.hidden_dim), logits
    mlp.forward = forward


@pytest.mark.parametrize("watch", [True, False])
def test_router_bypassed_by_its_module_is_recorded(tiny, token_file, monkeypatch, watch):
    path = tiny("gpt_oss")
    want = run(path, token_file, mode="full")
    load = profile_module.load_model

    def load_bypassed(*args, **kwargs):
        loaded = load(*args, **kwargs)
        for layer in loaded.layers:
            bypass_router(layer.mlp)
        return loaded

    monkeypatch.setattr(profile_module, "load_model", load_bypassed)
    if not watch:   # without the parent watch nothing would be recorded: the test can fail
        monkeypatch.setattr(RouterCapture, "_watch_parent", lambda self, parent, router, layer: None)
    got = run(path, token_file, mode="full")
    for a, b in zip(want.layers, got.layers):
        if watch:
            assert a.counts == b.counts and a.coactivation == b.coactivation
            assert a.weight_mass == pytest.approx(b.weight_mass, rel=1e-6)
        else:
            assert sum(b.counts) == 0


def test_streamed_eval_with_offloaded_reference(tmp_path, tiny, token_file):
    """KL against a reference, micro-batch by micro-batch, its final hidden states on disk."""
    path = tiny("qwen3_moe")
    with open_checkpoint(path) as a, open_checkpoint(tiny("mixtral")) as b:
        full = evaluate(a, EvalOptions(token_ids=token_file, seq_len=40, batch_size=3, mode="full"), b)
        streamed = evaluate(a, EvalOptions(token_ids=token_file, seq_len=40, batch_size=5, mode="streamed",
                                           offload_dir=tmp_path / "off"), b)
    assert streamed.tokens == full.tokens == 12 * 39
    for name in ("perplexity", "kl_mean", "kl_max", "top1_agreement", "max_logit_diff", "reference_perplexity"):
        assert getattr(streamed, name) == pytest.approx(getattr(full, name), rel=1e-5), name
    assert full.kl_mean > 1e-5 and not list((tmp_path / "off").iterdir())    # offload files removed


def test_activation_store_tiers(tmp_path):
    store = ActivationStore(torch.device("cpu"), device_budget=0, host_budget=2 * 4 * 16, offload_dir=tmp_path)
    tensors = [torch.randn(4, 4) + i for i in range(5)]
    for slot, t in enumerate(tensors):
        store.put(slot, t)
    assert store.used == {"device": 0, "host": 128, "disk": 3 * 64}
    for slot, t in enumerate(tensors):
        assert torch.equal(store.get(slot), t)
        store.put(slot, t * 2)
    assert all(torch.equal(store.get(slot), t * 2) for slot, t in enumerate(tensors))
    assert len(list(tmp_path.iterdir())) == 1
    store.close()
    assert not list(tmp_path.iterdir())


def test_full_offload_disk(tmp_path, tiny, token_file, monkeypatch):
    """No space left for the offloaded hidden states: exit 9, and the offload folder is emptied."""
    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OutputWriteError, match="no space left") as info:
        run(tiny("mixtral"), token_file, mode="streamed", offload_dir=tmp_path / "off")
    assert info.value.exit_code == 9
    assert not list((tmp_path / "off").iterdir())


def test_full_offload_disk_for_real(tmp_path, tiny, token_file):
    """The same on a 16 KB tmpfs (the run needs 60 KB) (where this machine lets the tests mount one)."""
    target = tmp_path / "small"
    target.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs",
                                                        str(target)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("mixtral")), "--token-ids",
                               str(token_file), "--seq-len", "40", "--mode", "streamed", "--offload-dir",
                               str(target)], capture_output=True, text=True)
        assert proc.returncode == 9, proc.stderr
        assert "no space left" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(target.iterdir())
    finally:
        subprocess.run(["umount", str(target)])


def test_device_map_auto_matches_full(tiny, token_file):
    a = run(tiny("qwen2_moe"), token_file, mode="full")
    b = run(tiny("qwen2_moe"), token_file, mode="full", device_map="auto")
    assert [x.counts for x in a.layers] == [x.counts for x in b.layers]


def test_transformers_progress_bars_stay_out(tiny, token_file):
    for mode in ("full", "streamed"):
        proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("mixtral")), "--token-ids",
                               str(token_file), "--seq-len", "40", "--mode", mode], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr


@pytest.mark.gpu
def test_gpu_statistics_never_wait_for_the_device():
    """On CUDA, the accumulators' update makes no synchronising call (sync debug mode raises on one)."""
    from moetool.runner.stats import LayerStats

    device = torch.device("cuda")
    index = torch.stack([torch.randperm(16, device=device)[:4] for _ in range(8 * 64)]).reshape(8, 64, 4)
    stats = LayerStats(16, 4, device, capacity_window=100, ep=4)
    weight, router = torch.rand(8, 64, 4, device=device), torch.rand(8, 64, 3, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.update(index, 0, weight, router)
        stats.update_salience(index, weight, torch.rand(8, 64, 4, device=device))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sum(stats.totals().counts) == 8 * 64 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_gpu_streamed_matches_full_in_bf16(tmp_path, tiny, token_file, family):
    full = run(tiny(family), token_file, mode="full", device="cuda", dtype="bf16")
    streamed = run(tiny(family), token_file, mode="streamed", device="cuda", dtype="bf16",
                   offload_dir=tmp_path / "off")
    assert full.device.startswith("cuda") and full.dtype == "bfloat16"
    for a, b in zip(full.layers, streamed.layers):
        assert a.counts == b.counts and a.coactivation == b.coactivation and a.capacity_drop == b.capacity_drop


@pytest.mark.parametrize("tokens", [16384, 262144])
def test_streamed_reads_each_weight_once(tokens):
    """The bytes moetool's reader takes from the checkpoint over a whole streamed profile are its size
    (within 5%), however many tokens go through."""
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        report = profile(ckpt, ProfileOptions(max_tokens=tokens, mode="streamed", batch_size=16))
    assert report.tokens == tokens
    assert report.io["weight_bytes_read"] == pytest.approx(report.io["checkpoint_bytes"], rel=0.05)


def test_globally_pruned_checkpoint_profiles_in_both_modes(tmp_path, tiny, token_file):
    """Layers keeping different numbers of experts (prune --scope global) are built with their own
    counts in full and in streamed mode."""
    from moetool.ops.prune import PruneOptions, prune

    with open_checkpoint(tiny("qwen3_moe")) as ckpt:
        prune(ckpt, tmp_path / "pruned", PruneOptions(ratio=0.25, scope="global", criterion="weight-norm"))
    full = run(tmp_path / "pruned", token_file, mode="full")
    streamed = run(tmp_path / "pruned", token_file, mode="streamed")
    assert sorted({layer.experts for layer in full.layers}) != [4]             # really uneven, or fewer
    for a, b in zip(full.layers, streamed.layers):
        assert a.experts == b.experts and a.counts == b.counts and len(a.counts) == a.experts


def test_trace_setup_failure_leaves_nothing(tmp_path, tiny, token_file):
    from moetool.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="saliency"):   # JetMoE has no experts module to measure
        run(tiny("jetmoe"), token_file, saliency=True, trace=tmp_path / "t")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_unrunnable_gguf_models_are_refused_before_any_data_is_read(tmp_path):
    """Architectures moetool does not run from GGUF (tests/test_gguf_run.py runs the others)."""
    from tests.gguf_fixtures import write_family

    path = write_family("olmoe", tmp_path / "m.gguf")[0]
    for command in ("profile", "eval"):
        proc = subprocess.run([sys.executable, "-m", "moetool", command, str(path), "--data", "/nonexistent"],
                              capture_output=True, text=True)
        assert proc.returncode == 7 and "running a GGUF model" in proc.stderr and "Traceback" not in proc.stderr


def test_a_layers_extra_outputs_are_held_in_the_store(tmp_path, tiny, token_file):
    """GLM-5's layers return the indexer's top-k beside their hidden states, for the next layer: in
    streamed mode it is held in the activation store (its budget, spilled to --offload-dir), not
    in host memory beside it, and the statistics stay full mode's."""
    path = tiny("glm_moe_dsa")
    full = run(path, token_file, mode="full")
    streamed = run(path, token_file, mode="streamed", offload_dir=tmp_path / "off")
    for a, b in zip(full.layers, streamed.layers):
        assert a.counts == b.counts
    tokens, hidden = 12 * 40, 32
    on_disk = streamed.memory["activation_store_bytes"]["disk"]
    hidden_bytes = tokens * hidden * 4                                # fp32 hidden states
    assert on_disk > hidden_bytes                                     # the top-k [B, S, 4] indices too
    assert on_disk - hidden_bytes in (tokens * 4 * 4, tokens * 4 * 8)   # int32 or int64
