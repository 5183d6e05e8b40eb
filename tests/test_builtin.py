"""The built-in reference models: trained, small, routing far from uniform, and reproducible."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.checkpoint import builtin_model_path, open_checkpoint
from moetool.errors import SourceNotFoundError
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import ProfileOptions, profile

TRAINING = json.loads((builtin_model_path("builtin:tiny-moe").parent / "training.json").read_text())


@pytest.mark.parametrize("name, family", [("builtin:tiny-moe", "qwen3_moe"), ("builtin:tiny-dense", "qwen3")])
def test_builtin_models_are_small_and_complete(name, family):
    path = builtin_model_path(name)
    assert (path / "model.safetensors").stat().st_size <= 10_000_000
    assert (path / "tokenizer.json").exists()
    with open_checkpoint(name) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.family == family and report.problems == []


def test_unknown_builtin_name():
    with pytest.raises(SourceNotFoundError, match="tiny-moe"):
        open_checkpoint("builtin:huge-moe")


def test_moe_heldout_perplexity_far_below_unigram():
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        report = evaluate(ckpt, EvalOptions(max_tokens=None, seq_len=128))   # all 45,826 held-out tokens
    unigram = TRAINING["unigram_heldout_perplexity"]
    assert report.perplexity < unigram / 3, (report.perplexity, unigram)
    # the shipped bf16 weights evaluate close to what training measured in fp32 on all held-out tokens
    assert report.perplexity == pytest.approx(TRAINING["tiny-moe"]["heldout_perplexity"], rel=0.02)


def test_moe_routing_is_far_from_uniform_and_no_expert_is_dead():
    with open_checkpoint("builtin:tiny-moe") as ckpt:
        report = profile(ckpt, ProfileOptions(max_tokens=8192, seq_len=128))
    assert len(report.layers) == 4
    for layer in report.layers:
        assert layer.entropy_mean < math.log(layer.experts) * 0.9
        assert layer.dead_experts == [] and min(layer.counts) > 0


def test_readme_main_command_runs():
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", "--max-tokens", "2048"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "builtin:tiny-moe" in proc.stdout and "Load heatmap" in proc.stdout


@pytest.mark.skipif(os.environ.get("MOETOOL_TRAIN_TESTS") != "1",
                    reason="retrains both models (about 20 minutes); set MOETOOL_TRAIN_TESTS=1")
def test_training_reproduces_the_shipped_perplexity(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_builtin.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True)
    again = json.loads((tmp_path / "training.json").read_text())
    for model in ("tiny-moe", "tiny-dense"):
        assert again[model]["heldout_perplexity"] == pytest.approx(TRAINING[model]["heldout_perplexity"], rel=0.05)
