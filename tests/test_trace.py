"""Routing traces: --trace streams the routing to disk, --from-trace recomputes the report from it
(or from vLLM's routed-experts arrays) without running the model; bad traces are refused."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.errors import UsageError
from moetool.ops.profile import ProfileOptions, profile
from moetool.runner.trace import TraceError
from tests.test_routing_stats import naive_lru_hits


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (960,), generator=torch.Generator().manual_seed(3)).tolist()))
    return path


def run(path, **kw):
    with open_checkpoint(path) as ckpt:
        return profile(ckpt, ProfileOptions(**kw))


def test_from_trace_reproduces_the_report(tmp_path, tiny, token_file):
    path = tiny("mixtral")
    common = dict(seq_len=40, batch_size=3, ep=2, ep_replicas=1, saliency=True)
    live = run(path, token_ids=token_file, trace=tmp_path / "trace", mode="streamed", **common)
    header = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert header["format"] == "moetool-routing-trace" and header["sequences"] == 24 and header["seq_len"] == 40
    assert not (tmp_path / "trace.partial").exists()
    tokens = np.load(tmp_path / "trace" / "rank-00" / "tokens.npy")
    assert tokens.dtype == np.int32 and tokens.flatten().tolist() == json.loads(token_file.read_text())
    assert np.load(tmp_path / "trace" / "rank-00" / "layer-000.experts.npy").dtype == np.int16
    assert np.load(tmp_path / "trace" / "rank-00" / "layer-000.weights.npy").dtype == np.float16
    again = run(path, from_trace=tmp_path / "trace", **common)
    assert again.mode == "trace" and again.tokens == live.tokens and again.capacity_window == live.capacity_window
    for a, b in zip(live.layers, again.layers):
        for name in ("counts", "coactivation", "capacity_drop", "lru_hit_rate", "distinct_experts_per_sequence",
                     "consecutive_reuse", "dead_experts", "imbalance", "ep", "tokens"):
            assert getattr(a, name) == getattr(b, name), name
        for name in ("entropy_mean", "top1_prob_mean", "margin_mean", "saliency"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-6), name
        # gate weights are stored in float16
        assert b.weight_mass == pytest.approx(a.weight_mass, rel=2e-3)
        assert b.activation_norm == pytest.approx(a.activation_norm, rel=2e-3)


def test_vllm_routed_experts(tmp_path, tiny):
    """Arrays as vLLM returns them ([tokens, moe_layers, top_k] int16, one per request, prefix-cached rows
    -1): the counts, co-activation and LRU figures are those computed here by hand."""
    g = np.random.default_rng(0)
    folder = tmp_path / "vllm"
    folder.mkdir()
    requests = []
    for n, length in enumerate((30, 17, 45)):
        array = np.stack([np.stack([g.permutation(4)[:2] for _ in range(2)]) for _ in range(length)]).astype(np.int16)
        array[:3] = -1 if n == 1 else array[:3]          # request 1 starts with 3 prefix-cached positions
        np.save(folder / f"{n:04d}.npy", array)
        requests.append(array[3:] if n == 1 else array)
    report = run(tiny("mixtral"), from_trace=folder, capacity_window=16)
    assert report.tokens == 92 - 3 and report.sequences == 3          # prefix-cached rows skipped
    assert any("without gate weights" in note for note in report.notes)
    for position, layer in enumerate(report.layers):
        rows = [row.tolist() for request in requests for row in request[:, position, :]]
        assert layer.tokens == len(rows) == 89
        assert layer.counts == [sum(r.count(e) for r in rows) for e in range(4)]
        assert layer.coactivation == [[sum(1 for r in rows if i in r and j in r) for j in range(4)] for i in range(4)]
        assert layer.weight_mass is None and layer.entropy_mean is None and layer.saliency is None
        sequences = [[row.tolist() for row in request[:, position, :]] for request in requests]
        for size, rate in layer.lru_hit_rate.items():
            assert rate == pytest.approx(naive_lru_hits(sequences, int(size)) / (89 * 2))
    single = run(tiny("mixtral"), from_trace=folder / "0000.npy")
    assert single.sequences == 1 and single.layers[0].tokens == 30
    # without --capacity-window each request is its own window, as a live run's sequence is: the
    # capacity of each from its own length, computed here by hand
    import math

    per_request = run(tiny("mixtral"), from_trace=folder)
    assert per_request.capacity_window == 0 and any("one per request" in n for n in per_request.notes)
    for position, layer in enumerate(per_request.layers):
        for factor, share in layer.capacity_drop.items():
            dropped = 0
            for request in requests:
                counts = np.bincount(request[:, position, :].ravel(), minlength=4)
                capacity = math.ceil(float(factor) * len(request) * 2 / 4)
                dropped += int(np.clip(counts - capacity, 0, None).sum())
            assert share == pytest.approx(dropped / (89 * 2)), (position, factor)


def test_vllm_arrays_indexed_by_decoder_layer(tmp_path, tiny):
    """vLLM's (and SGLang's) capturer sizes the layer axis num_hidden_layers (int32), dense layers'
    slots zero: DeepSeek-V3's first layer is dense, so its slot is not routing."""
    g = np.random.default_rng(1)
    moe = np.stack([np.stack([g.permutation(4)[:2] for _ in range(2)]) for _ in range(40)]).astype(np.int32)
    full = np.concatenate([np.zeros((40, 1, 2), np.int32), moe], axis=1)   # [tokens, 3 layers, top_k]
    np.save(tmp_path / "full.npy", full)
    np.save(tmp_path / "moe.npy", moe)
    by_layer, by_moe_layer = (run(tiny("deepseek_v3"), from_trace=tmp_path / n) for n in ("full.npy", "moe.npy"))
    assert [lp.layer for lp in by_layer.layers] == [1, 2]
    for a, b, position in zip(by_layer.layers, by_moe_layer.layers, range(2)):
        assert a.counts == b.counts == [int((moe[:, position] == e).sum()) for e in range(4)]


def test_bad_traces(tmp_path, tiny, token_file):
    path = tiny("mixtral")
    run(path, token_ids=token_file, seq_len=40, trace=tmp_path / "trace")
    with pytest.raises(UsageError, match="--capacity-window 7"):                # as a live run refuses it
        run(path, from_trace=tmp_path / "trace", capacity_window=7)
    with pytest.raises(UsageError, match="another model"):                     # MoE layers differ
        run(tiny("qwen2_moe"), from_trace=tmp_path / "trace")
    shard = tmp_path / "trace" / "rank-00" / "layer-001.weights.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TraceError, match="truncated|shape"):
        run(path, from_trace=tmp_path / "trace")
    np.save(tmp_path / "wrong.npy", np.zeros((5, 3, 2), dtype=np.int16))        # 3 MoE layers, the model has 2
    with pytest.raises(UsageError, match="3 layers, but the model has 2 decoder layers"):
        run(path, from_trace=tmp_path / "wrong.npy")
    np.save(tmp_path / "ids.npy", np.full((5, 2, 2), 9, dtype=np.int16))         # expert 9 of 4
    with pytest.raises(UsageError, match="expert 9"):
        run(path, from_trace=tmp_path / "ids.npy")
    np.save(tmp_path / "cached.npy", np.full((5, 2, 2), -1, dtype=np.int16))     # every position prefix-cached
    with pytest.raises(TraceError, match="no routed tokens"):
        run(path, from_trace=tmp_path / "cached.npy")
    (tmp_path / "file").write_text("not a trace")            # --force replaces an earlier trace, not a file
    with pytest.raises(UsageError, match="not a folder"):
        run(path, token_ids=token_file, seq_len=40, trace=tmp_path / "file", force=True)
    assert (tmp_path / "file").read_text() == "not a trace"
    run(path, token_ids=token_file, seq_len=40, trace=tmp_path / "trace", force=True)   # an earlier trace: replaced
    assert (tmp_path / "trace" / "trace.json").is_file()


def test_cli_trace_errors_are_one_line(tmp_path, tiny, token_file):
    path = str(tiny("mixtral"))
    base = [sys.executable, "-m", "moetool", "profile", path, "--token-ids", str(token_file), "--seq-len", "40"]
    assert subprocess.run(base + ["--trace", str(tmp_path / "t")], capture_output=True).returncode == 0
    proc = subprocess.run(base + ["--trace", str(tmp_path / "t")], capture_output=True, text=True)
    assert proc.returncode == 8 and "exists" in proc.stderr                    # no --force
    (tmp_path / "t" / "rank-00" / "tokens.npy").write_bytes(b"\x93NUMPY")
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", path, "--from-trace", str(tmp_path / "t")],
                          capture_output=True, text=True)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "tokens.npy" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("qwen2_moe")), "--from-trace",
                           str(tmp_path / "nothing")], capture_output=True, text=True)
    assert proc.returncode == 4 and "no such trace" in proc.stderr


def test_a_failed_run_leaves_no_trace(tmp_path, tiny, token_file, monkeypatch):
    from moetool.runner.model import LoadedModel

    def fail(self, input_ids, attention_mask=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(LoadedModel, "base_forward", fail)
    with pytest.raises(RuntimeError):
        run(tiny("mixtral"), token_ids=token_file, seq_len=40, trace=tmp_path / "trace", mode="full")
    assert not (tmp_path / "trace").exists() and not (tmp_path / "trace.partial").exists()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny, token_file):
    """A trace of the tiny Mixtral, recorded once (tests copy it)."""
    path = tmp_path_factory.mktemp("recorded") / "trace"
    run(tiny("mixtral"), token_ids=token_file, seq_len=40, trace=path)
    return path


def _digest(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tampered(recorded, tmp_path, change):
    import shutil

    path = tmp_path / "trace"
    shutil.copytree(recorded, path)
    header = json.loads((path / "trace.json").read_text())
    replaced = change(header, path)
    (path / "trace.json").write_text(json.dumps(header if replaced is None else replaced))
    return path


def _outside_rank(header, path, name):
    import shutil

    shutil.copytree(path / "rank-00", path.parent / "outside" / "rank-00")
    shutil.rmtree(path / "rank-00")
    header["ranks"][0]["dir"] = name(path)


def _linked_rank(header, path):
    import shutil

    shutil.move(path / "rank-00", path.parent / "rank-00")
    (path / "rank-00").symlink_to(path.parent / "rank-00")


TAMPERED = {
    "dir_absolute": lambda h, p: _outside_rank(h, p, lambda p: str(p.parent / "outside" / "rank-00")),
    "dir_dotdot": lambda h, p: _outside_rank(h, p, lambda p: "../outside/rank-00"),
    "dir_linked_outside": _linked_rank,
    "dir_missing": lambda h, p: h["ranks"][0].pop("dir"),
    "dir_integer": lambda h, p: h["ranks"][0].update(dir=5),
    "ranks_a_string": lambda h, p: h.update(ranks="rank-00"),
    "rank_a_list": lambda h, p: h.update(ranks=[[1]]),
    "first_sequence_a_string": lambda h, p: h["ranks"][0].update(first_sequence="x"),
    "sequences_negative": lambda h, p: h["ranks"][0].update(sequences=-1),
    "stored_an_integer": lambda h, p: h.update(stored=5),
    "stored_null": lambda h, p: h.update(stored=None),
    "stored_without_experts": lambda h, p: h.update(stored=["tokens", "weights"]),
    "top_k_missing_a_layer": lambda h, p: h["top_k"].pop("0"),
    "experts_a_float": lambda h, p: h["experts"].update({"0": 4.5}),
    "seq_len_negative": lambda h, p: h.update(seq_len=-40),
    "capacity_window_a_string": lambda h, p: h.update(capacity_window="x"),
    "header_a_list": lambda h, p: [h],
    "header_nested_deeply": lambda h, p: None,   # (written below)
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_trace_header_is_one_format_error(tmp_path, tiny, recorded, case):
    """Every field of trace.json is checked before anything is read: a rank folder named by an absolute
    path, '..' or a link leading out of the trace is not read; a field of the wrong type is one line (exit
    4), never a traceback."""
    path = _tampered(recorded, tmp_path, TAMPERED[case])
    if case == "header_nested_deeply":
        (path / "trace.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(TraceError) as error:
        run(tiny("mixtral"), from_trace=path)
    assert "\n" not in str(error.value)
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("mixtral")), "--from-trace",
                           str(path)], capture_output=True, text=True) if case.startswith("dir_") else None
    if proc is not None:
        assert proc.returncode == 4 and "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("case", ["other_json", "user_folder", "extra_file", "linked_rank", "partial_of_the_user"])
def test_force_replaces_only_a_trace_moetool_wrote(tmp_path, tiny, token_file, recorded, case):
    """--force deletes the folder: one holding a trace.json that is not moetool's, or moetool's beside
    the user's files or folders, is refused (exit 2) and left as it was."""
    import shutil

    path = tmp_path / "trace"
    if case == "partial_of_the_user":   # TRACE.partial is where the trace is written: never the user's
        (tmp_path / "trace.partial").mkdir()
        (tmp_path / "trace.partial" / "main.py").write_text("print(1)")
    elif case == "other_json":
        path.mkdir()
        (path / "trace.json").write_text('{"spans": []}')
        (path / "rank-00").mkdir()
        (path / "rank-00" / "mine.txt").write_text("mine")
    else:
        shutil.copytree(recorded, path)
        if case == "user_folder":
            (path / "src").mkdir()
            (path / "src" / "main.py").write_text("print(1)")
        elif case == "extra_file":
            (path / "notes.txt").write_text("mine")
        else:
            shutil.move(path / "rank-00", tmp_path / "elsewhere")
            (path / "rank-00").symlink_to(tmp_path / "elsewhere")
    before = _digest(tmp_path)
    with pytest.raises(UsageError, match="not an unfinished trace" if case == "partial_of_the_user" else
                       "no earlier output"):
        run(tiny("mixtral"), token_ids=token_file, seq_len=40, trace=path, force=True)
    assert _digest(tmp_path) == before
    assert (tmp_path / "trace.partial").exists() == (case == "partial_of_the_user")


@pytest.mark.parametrize("failure", ["oserror", "interrupt"])
def test_force_keeps_the_earlier_trace_if_the_new_one_cannot_take_its_place(tmp_path, tiny, token_file, recorded,
                                                                            monkeypatch, failure):
    """--force: the earlier trace is moved aside, not deleted, until the new one is in place; if the rename
    fails (one line, exit 9) or is interrupted, the earlier trace is back and nothing else is left."""
    import os
    import shutil

    from moetool.errors import OutputWriteError

    path = tmp_path / "trace"
    shutil.copytree(recorded, path)
    before = _digest(path)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            assert not path.exists()   # (the earlier trace is aside)
            raise KeyboardInterrupt if failure == "interrupt" else OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else OutputWriteError) as error:
        run(tiny("mixtral"), token_ids=token_file, seq_len=40, trace=path, force=True)
    if failure == "oserror":
        assert "No space left" in str(error.value) and "earlier trace is kept" in str(error.value)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]
