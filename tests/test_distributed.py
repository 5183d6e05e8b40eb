"""torchrun on the CPU (gloo): data-parallel profile, eval and prune give what one process gives,
rank 0 alone prints and writes, and a failing rank stops the others instead of hanging them."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("moetool") is None, reason="the moetool console script is not on PATH")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
SMALL = ["--max-tokens", "4096", "--seq-len", "256", "--batch-size", "4"]


def moetool(*args, torchrun=False, timeout=300):
    cmd = (TORCHRUN if torchrun else [sys.executable, "-m"]) + ["moetool", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_profile_under_torchrun_equals_one_process(tmp_path):
    two = moetool("profile", "builtin:tiny-moe", "--json", *SMALL, "--ep", "2", "--trace", str(tmp_path / "t"),
                  torchrun=True)
    assert two.returncode == 0, two.stderr
    report = json.loads(two.stdout)                       # one report: rank 1 printed nothing
    one = json.loads(moetool("profile", "builtin:tiny-moe", "--json", *SMALL, "--ep", "2").stdout)
    assert report["world_size"] == 2 and report["tokens"] == one["tokens"] == 4096
    for a, b in zip(report["layers"], one["layers"]):
        for name in ("counts", "coactivation", "capacity_drop", "lru_hit_rate", "distinct_experts_per_sequence",
                     "consecutive_reuse"):
            assert a[name] == b[name], name
        assert a["weight_mass"] == pytest.approx(b["weight_mass"], rel=1e-5)
        assert a["ep"]["balanced"]["all_to_all_tokens"] == b["ep"]["balanced"]["all_to_all_tokens"]
    header = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [r["dir"] for r in header["ranks"]] == ["rank-00", "rank-01"] and header["sequences"] == 16
    again = json.loads(moetool("profile", "builtin:tiny-moe", "--json", "--ep", "2", "--from-trace",
                               str(tmp_path / "t")).stdout)
    assert [x["counts"] for x in again["layers"]] == [x["counts"] for x in one["layers"]]
    assert [x["capacity_drop"] for x in again["layers"]] == [x["capacity_drop"] for x in one["layers"]]


def test_eval_and_prune_under_torchrun(tmp_path):
    two = moetool("eval", "--json", "--max-tokens", "2048", "--seq-len", "128", "--reference", "builtin:tiny-moe",
                  "--per-sequence", torchrun=True)
    assert two.returncode == 0, two.stderr
    one = moetool("eval", "--json", "--max-tokens", "2048", "--seq-len", "128", "--reference", "builtin:tiny-moe",
                  "--per-sequence")
    a, b = json.loads(two.stdout), json.loads(one.stdout)
    assert a["tokens"] == b["tokens"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-9)
    assert a["nll_stderr"] == pytest.approx(b["nll_stderr"], rel=1e-9) and a["nll_stderr"] > 0
    assert [r["nll_mean"] for r in a["per_sequence"]] == pytest.approx([r["nll_mean"] for r in b["per_sequence"]])
    assert len(a["per_sequence"]) == 16          # each rank filled its own sequences' rows
    assert a["kl_percentiles"] == b["kl_percentiles"]
    assert a["kl_mean"] == pytest.approx(0, abs=1e-9) and a["top1_agreement"] == 1.0
    pruned = moetool("prune", "builtin:tiny-moe", str(tmp_path / "p2"), "--ratio", "0.25", "--json", *SMALL,
                     torchrun=True)
    assert pruned.returncode == 0, pruned.stderr
    single = moetool("prune", "builtin:tiny-moe", str(tmp_path / "p1"), "--ratio", "0.25", "--json", *SMALL)
    assert json.loads(pruned.stdout)["kept"] == json.loads(single.stdout)["kept"]
    assert (tmp_path / "p2" / "config.json").exists()


def test_a_failing_rank_stops_the_others(tmp_path):
    """Rank 1 fails after joining the group (its data does not exist); rank 0 would wait for it in
    all_reduce: torchrun stops it, and the run ends with the failing rank's one-line error."""
    script = tmp_path / "rank.sh"
    script.write_text("#!/bin/sh\nif [ \"$RANK\" = 1 ]; then exec moetool profile --data /nonexistent.txt; fi\n"
                      "exec moetool profile --max-tokens 4096 --seq-len 256\n")
    script.chmod(0o755)
    start = time.monotonic()
    proc = subprocess.run(TORCHRUN + [str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "MOETOOL_DIST_TIMEOUT": "60"})
    assert proc.returncode != 0
    assert time.monotonic() - start < 200
    assert "Error: /nonexistent.txt: no such file" in proc.stderr
    assert "/moetool/" not in proc.stderr           # no moetool traceback (torchrun prints its own summary)
    assert "exitcode  : 11" in proc.stderr          # the data error's exit code, as torchrun reports it


@pytest.mark.parametrize("extra", [("--criterion", "reap"), ("--merge",)])
def test_sequential_prune_under_torchrun_equals_one_process(tmp_path, extra):
    """Each rank runs half the sequences; every layer's statistics are summed over the ranks before
    its experts are chosen, so both ranks prune (and merge) the same experts as one process does."""
    args = ["--ratio", "0.5", "--sequential", "--json", *SMALL, *extra]
    two = moetool("prune", "builtin:tiny-moe", str(tmp_path / "p2"), *args, torchrun=True)
    assert two.returncode == 0, two.stderr
    one = moetool("prune", "builtin:tiny-moe", str(tmp_path / "p1"), *args)
    assert one.returncode == 0, one.stderr
    a, b = json.loads(two.stdout), json.loads(one.stdout)
    assert a["kept"] == b["kept"]
    assert a["routing_mass_removed"] == pytest.approx(b["routing_mass_removed"], rel=1e-6)
    assert (tmp_path / "p2" / "config.json").exists()


@pytest.mark.parametrize("sequential, agreement", [("--no-sequential", 0.9999), ("--sequential", 0.95)])
def test_gptq_under_torchrun_equals_one_process(tmp_path, sequential, agreement):
    """Each rank calibrates half the sequences; every layer's Hessians are summed over the ranks before
    GPTQ, so the checkpoint is one process's but for sums taken in another order: on the same inputs
    (--no-sequential) a byte in 10^5 differs; sequentially, later layers' inputs went through those
    codes, so their Hessians (and a token's route, now and then) differ a little more."""
    from safetensors import safe_open

    args = ["--format", "int4-g32-sym", "--method", "gptq", sequential, "--max-tokens", "1024", "--seq-len", "128",
            "--json"]
    two = moetool("quantize", "builtin:tiny-moe", str(tmp_path / "q2"), *args, torchrun=True)
    assert two.returncode == 0, two.stderr
    one = moetool("quantize", "builtin:tiny-moe", str(tmp_path / "q1"), *args)
    assert one.returncode == 0, one.stderr
    a, b = json.loads(two.stdout), json.loads(one.stdout)   # one report: rank 1 printed nothing
    assert a["coverage"]["0"] == b["coverage"]["0"] and sum(a["coverage"]["0"]) == 2 * 1024
    assert all(sum(a["coverage"][layer]) == sum(b["coverage"][layer]) for layer in b["coverage"])
    same = total = 0
    with safe_open(str(tmp_path / "q2" / "model.safetensors"), "pt") as f2, \
            safe_open(str(tmp_path / "q1" / "model.safetensors"), "pt") as f1:
        assert set(f1.keys()) == set(f2.keys())
        for name in f1.keys():
            if ".experts." in name and name.endswith(".weight"):   # the packed codes
                x, y = f1.get_tensor(name), f2.get_tensor(name)
                same, total = same + int((x == y).sum()), total + x.numel()
    assert total and same / total > agreement


def test_a_failed_final_barrier_is_one_line_and_its_exit_code(monkeypatch, capsys):
    """A rank whose peers failed after all: the barrier before os._exit raises DistributedError,
    which is said in one line and becomes the exit status (12), never a traceback."""
    import torch.distributed  # noqa: F401  (loaded, as after a run)

    from moetool.cli import app
    from moetool.runner import distributed
    from moetool.runner.distributed import DistributedError

    def failing_barrier():
        raise DistributedError("rank 1: a peer stopped")

    exits = []
    monkeypatch.setattr(distributed, "joined", lambda: True)
    monkeypatch.setattr(distributed, "barrier", failing_barrier)
    monkeypatch.setattr(app.os, "_exit", exits.append)
    app._leave_torchrun(0)
    assert exits == [12] and capsys.readouterr().err == "Error: rank 1: a peer stopped\n"
