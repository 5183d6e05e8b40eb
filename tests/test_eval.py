"""`moetool eval`: perplexity against transformers' own loss; KL and agreement against a reference."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(5)).tolist()))
    return path


def run(path, token_file, reference=None, **kw):
    options = EvalOptions(token_ids=token_file, seq_len=30, **kw)
    with open_checkpoint(path) as ckpt:
        if reference is None:
            return evaluate(ckpt, options)
        with open_checkpoint(reference) as ref:
            return evaluate(ckpt, options, ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "deepseek_v4", "gpt_oss", "granitemoe", "llama",
                                    "nemotron_h-latent"])
def test_perplexity_is_exp_of_transformers_mean_nll(tiny, token_file, family):
    report = run(tiny(family), token_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny(family), dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(token_file.read_text())).reshape(20, 30)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss     # mean NLL over the 20 x 29 predicted tokens
    assert report.tokens == 20 * 29
    assert report.nll_mean == pytest.approx(float(loss), rel=1e-5)
    assert report.perplexity == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_against_itself_and_a_perturbed_copy(tmp_path, tiny, token_file):
    src = tiny("mixtral")
    same = run(src, token_file, reference=src)
    assert same.kl_mean == 0 and same.kl_max == 0 and same.top1_agreement == 1.0 and same.max_logit_diff == 0
    with open_checkpoint(src) as ckpt:     # a perturbed copy: every weight rounded to fp16
        convert(ckpt, tmp_path / "fp16", ConvertOptions(dtype="fp16"))
    other = run(tmp_path / "fp16", token_file, reference=src)
    assert other.kl_mean > 0 and other.max_logit_diff > 0
    assert other.reference_perplexity == pytest.approx(same.perplexity)


def test_standard_errors_and_per_sequence_figures_against_transformers(tmp_path, tiny, token_file):
    """Each sequence's mean NLL, KL and top-1 agreement recomputed from transformers' own logits of
    both models; the standard errors are their sample standard deviations over sqrt(sequences)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny("mixtral")
    shutil.copytree(src, tmp_path / "noisy")     # a copy with 20% noise on every weight: KL well above rounding
    weights = next((tmp_path / "noisy").glob("*.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.2 * v.std() * torch.randn(v.shape, generator=gen) for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    report = run(tmp_path / "noisy", token_file, reference=src, per_sequence=True, batch_size=3)
    ids = torch.tensor(json.loads(token_file.read_text())).reshape(20, 30)
    logits = {}
    for name, path in (("ref", src), ("model", tmp_path / "noisy")):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits[:, :-1].double()
    lp, ref_lp = logits["model"].log_softmax(-1), logits["ref"].log_softmax(-1)
    nll = -lp.gather(2, ids[:, 1:, None]).squeeze(2).mean(1)                  # [20]
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean(1)
    top1 = (logits["ref"].argmax(-1) == logits["model"].argmax(-1)).double().mean(1)
    rows = report.per_sequence
    assert [r["sequence"] for r in rows] == list(range(20))
    for key, expected in (("nll_mean", nll), ("kl_mean", kl), ("top1_agreement", top1)):
        # (abs: a KL of ~5e-4 is a difference of float32 log-probabilities, so batching moves it by ~5e-8)
        assert [r[key] for r in rows] == pytest.approx(expected.tolist(), rel=1e-4, abs=2e-7), key
    assert kl.min() > 1e-4 and top1.std() > 0
    assert report.nll_stderr == pytest.approx(float(nll.std() / 20 ** 0.5), rel=1e-4)
    assert report.kl_stderr == pytest.approx(float(kl.std() / 20 ** 0.5), rel=1e-4)
    assert report.top1_stderr == pytest.approx(float(top1.std() / 20 ** 0.5), rel=1e-4, abs=1e-12)
    assert report.perplexity_stderr == pytest.approx(report.perplexity * report.nll_stderr)
    token_kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).reshape(-1).numpy()   # percentiles: nearest rank
    for q, value in report.kl_percentiles.items():
        exact = np.percentile(token_kl, float(q), method="inverted_cdf")
        assert value == pytest.approx(exact, rel=0.012), q                # the histogram's bins: within 1.2%
    assert report.kl_percentiles["50"] < report.kl_percentiles["99.9"]
    alone = run(src, token_file)                                              # no reference: NLL figures only
    assert alone.kl_stderr is None and alone.per_sequence is None and alone.nll_stderr > 0
    one = tmp_path / "one.json"                                               # one sequence: no spread to measure
    one.write_text(json.dumps(list(range(30))))
    assert run(src, one).nll_stderr is None


# a dense model too (an upcycle's reference), and Nemotron-H's latent MoE
@pytest.mark.parametrize("family", ["deepseek_v3", "gemma2", "nemotron_h-latent"])
def test_streamed_matches_full(tiny, token_file, family):
    full = run(tiny(family), token_file, mode="full")
    streamed = run(tiny(family), token_file, mode="streamed")
    assert streamed.mode == "streamed" and full.mode == "full"
    assert streamed.nll_mean == pytest.approx(full.nll_mean, rel=1e-6)


def test_gemma2_logits_are_soft_capped(tmp_path, token_file):
    """Gemma 2 caps its logits (30 tanh(x / 30)): with a head large enough for the cap to bite, the
    perplexity is still transformers' own."""
    from tests.tiny import build_model

    model = build_model("gemma2")
    model.config.tie_word_embeddings = False   # a head of its own, 200 times the embedding
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 200)
    model.save_pretrained(tmp_path / "g")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(token_file.read_text())).reshape(20, 30)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        assert (model(ids).logits.abs().max() - 30).abs() < 1   # the cap is reached
    assert run(tmp_path / "g", token_file).nll_mean == pytest.approx(float(loss), rel=1e-5)


def test_encoder_decoder_is_refused(tiny, token_file):
    with pytest.raises(UnsupportedError, match="decoder-only"):
        run(tiny("switch_transformers"), token_file)


def test_what_cannot_be_measured_is_refused_before_the_runs(tmp_path, tiny, token_file):
    from moetool.errors import MoetoolError, UsageError

    with pytest.raises(UsageError, match="vocabulary"):   # KL over different tokens means nothing
        run(tiny("olmoe"), token_file, reference="builtin:tiny-moe")
    one = tmp_path / "one.txt"
    one.write_text("5")
    with open_checkpoint(tiny("olmoe")) as ckpt, pytest.raises(MoetoolError, match="predict nothing"):
        evaluate(ckpt, EvalOptions(token_ids=one, seq_len=30))   # one token: no next token to predict


def test_cli_json(tiny, token_file):
    proc = subprocess.run([sys.executable, "-m", "moetool", "eval", str(tiny("olmoe")), "--reference",
                           str(tiny("olmoe")), "--token-ids", str(token_file), "--seq-len", "30", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["schema_version"] == 1 and data["kl_mean"] == 0 and data["top1_agreement"] == 1.0
    assert data["kl_stderr"] == 0 and data["per_sequence"] is None and set(data["kl_percentiles"].values()) == {0}
    proc = subprocess.run([sys.executable, "-m", "moetool", "eval", str(tiny("olmoe")), "--token-ids", str(token_file),
                           "--seq-len", "30", "--per-sequence"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and " ± " in proc.stdout and "highest nll mean by sequence: #" in proc.stdout


@pytest.mark.parametrize("where", ["model", "reference"])
def test_non_finite_logits_are_an_error_not_a_result(tmp_path, tiny, token_file, where):
    """A NaN in the weights makes every log-probability NaN: eval refuses to report it (exit 6)."""
    from safetensors.torch import load_file, save_file

    from moetool.errors import ProblemsFoundError

    broken = tmp_path / "nan"
    with open_checkpoint(tiny("olmoe")) as ckpt:
        convert(ckpt, broken, ConvertOptions())
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    model, reference = (broken, tiny("olmoe")) if where == "model" else (tiny("olmoe"), broken)
    with pytest.raises(ProblemsFoundError, match="not finite") as err:
        run(model, token_file, reference=reference)
    assert str(broken) in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "moetool", "eval", str(model), "--reference", str(reference),
                           "--token-ids", str(token_file), "--seq-len", "30"], capture_output=True, text=True)
    assert proc.returncode == 6 and "not finite" in proc.stderr and "Traceback" not in proc.stderr


def test_tokens_the_reference_rules_out_add_no_divergence():
    """A reference logit of -inf (a masked vocabulary entry) has probability 0: it adds 0 to the KL,
    not NaN (0 x -inf); the KL is the sum over the other tokens, as scipy's rel_entr defines it."""
    from moetool.ops.evaluate import _Metrics

    class Head:   # a head whose logits are given: one chunk of 3 predicted tokens over 4 entries
        def __init__(self, logits):
            self.logits = logits

        def logprobs(self, hidden):
            yield self.logits, torch.log_softmax(self.logits, -1)

    ref = torch.tensor([[1.0, 2.0, float("-inf"), 0.5], [0.0, 0.0, 0.0, 0.0], [3.0, float("-inf"), 1.0, 1.0]])
    model = torch.tensor([[1.5, 1.0, 0.3, 0.5], [0.2, 0.1, 0.0, 0.4], [2.0, 0.5, 1.0, 1.5]])
    metrics = _Metrics(torch.device("cpu"), 1, per_sequence=False)
    metrics.add(Head(model), None, torch.tensor([[1, 2, 3]]), 0, Head(ref), None)
    p, q = torch.softmax(ref.double(), -1), torch.softmax(model.double(), -1)
    expected = sum(float(pi * (pi / qi).log()) for row_p, row_q in zip(p, q) for pi, qi in zip(row_p, row_q) if pi > 0)
    assert float(metrics.kl_sum) == pytest.approx(expected, rel=1e-5)
