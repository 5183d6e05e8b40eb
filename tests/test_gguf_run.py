"""profile and eval of GGUF files: the runner builds transformers' model from the GGUF itself
(config from the metadata, tensors dequantized with gguf-py as they are read).

Oracles: the transformers model the GGUF was written from (F32: equal logits; Mixtral's q/k rows
permuted on disk as convert_hf_to_gguf.py does), transformers' own GGUF loader for the types it
reads (Qwen2/3-MoE in Q8_0, Q4_0, F16), and gguf-py's reader with a permutation written in the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.runner.model import load_model, load_pretrained
from tests.gguf_fixtures import build
from tests.gguf_runnable import RUNNABLE, llama_permute, write_runnable

TINY_MOE = __import__("pathlib").Path(__file__).resolve().parents[1] / "moetool" / "data" / "models" / "tiny-moe"


def source_model(family, **overrides):
    if family == "qwen3_moe":   # llama.cpp's qwen3moe graph always renormalises the top-k weights
        overrides.setdefault("norm_topk_prob", True)
    return build(family, **overrides)


@pytest.fixture
def tiny_saved():
    def save(model, path):
        model.save_pretrained(path, save_original_format=True)   # hub names, one tensor per expert
        return path
    return save


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(torch.randint(0, 64, (480,), generator=torch.Generator().manual_seed(3)).tolist()))
    return path


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", RUNNABLE)
def test_f32_gguf_runs_as_its_source(tmp_path, family):
    model = source_model(family)
    path = write_runnable(family, tmp_path / "m.gguf", model=model)[0]
    got = logits(load_pretrained(path))
    assert (got - logits(model)).abs().max() <= 1e-5


def test_mixtral_q_and_k_rows_are_put_back(tmp_path):
    """The file holds the permuted rows (read back with gguf-py); the model gets the original ones."""
    from gguf import GGUFReader

    model = source_model("mixtral")
    path = write_runnable("mixtral", tmp_path / "m.gguf", model=model)[0]
    stored = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q)
    assert np.array_equal(stored["blk.0.attn_q.weight"], llama_permute(q, model.config.num_attention_heads))
    loaded = load_pretrained(path)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, torch.from_numpy(q))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path, family, qtype):
    """transformers' GGUF config mapping reads no expert FFN sizes: the models use its defaults."""
    import transformers

    sizes = dict(moe_intermediate_size=768) if family == "qwen3_moe" else \
        dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632, mlp_only_layers=[])
    path = write_runnable(family, tmp_path / "m.gguf", model=source_model(family, **sizes), qtype=qtype)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ours = load_pretrained(path)
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


def test_quantized_mixtral_matches_gguf_py_dequantized(tmp_path):
    """Mixtral (llama with experts), which transformers' GGUF loader does not run: the oracle is the
    source model with every weight replaced by gguf-py's dequantization of the file, q/k rows put
    back with the inverse of llama_permute."""
    from gguf import GGUFReader, dequantize

    model = source_model("mixtral")
    path = write_runnable("mixtral", tmp_path / "m.gguf", model=model, qtype="Q8_0")[0]
    c = model.config
    values = {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
              for t in GGUFReader(path).tensors}
    state = model.state_dict()
    for layer in range(c.num_hidden_layers):
        b, hf = f"blk.{layer}.", f"model.layers.{layer}."
        for stem, proj, heads in (("attn_q", "q_proj", c.num_attention_heads),
                                  ("attn_k", "k_proj", c.num_key_value_heads)):
            rows = values[b + stem + ".weight"]
            state[hf + f"self_attn.{proj}.weight"] = torch.from_numpy(
                rows.reshape(heads, rows.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape).copy())
        state[hf + "self_attn.v_proj.weight"] = torch.from_numpy(values[b + "attn_v.weight"])
        state[hf + "self_attn.o_proj.weight"] = torch.from_numpy(values[b + "attn_output.weight"])
        state[hf + "mlp.gate.weight"] = torch.from_numpy(values[b + "ffn_gate_inp.weight"])
        state[hf + "mlp.experts.gate_up_proj"] = torch.from_numpy(
            np.concatenate([values[b + "ffn_gate_exps.weight"], values[b + "ffn_up_exps.weight"]], axis=1))
        state[hf + "mlp.experts.down_proj"] = torch.from_numpy(values[b + "ffn_down_exps.weight"])
    state["model.embed_tokens.weight"] = torch.from_numpy(values["token_embd.weight"])
    state["lm_head.weight"] = torch.from_numpy(values["output.weight"])
    model.load_state_dict(state)
    assert (logits(load_pretrained(path)) - logits(model)).abs().max() <= 1e-5


def _profile(path, token_file, **kw):
    with open_checkpoint(path) as ckpt:
        return profile(ckpt, ProfileOptions(token_ids=token_file, seq_len=40, batch_size=4, **kw))


def _routing(report):
    return [(lp.counts, lp.coactivation) for lp in report.layers]


@pytest.mark.parametrize("family", RUNNABLE)
def test_profile_of_gguf_equals_profile_of_its_source(tmp_path, tiny_saved, token_file, family):
    model = source_model(family)
    folder = tiny_saved(model, tmp_path / "hf")
    path = write_runnable(family, tmp_path / "m.gguf", model=model)[0]
    want = _profile(folder, token_file, dtype="fp32", mode="full")
    for mode in ("full", "streamed"):
        got = _profile(path, token_file, dtype="fp32", mode=mode)
        assert _routing(got) == _routing(want), mode


def test_streamed_gguf_reads_each_byte_once_and_matches_full(tmp_path, token_file):
    path = write_runnable("qwen2_moe", tmp_path / "m.gguf", qtype="Q8_0", split_max_tensors=20)[0]
    full = _profile(path, token_file, dtype="fp32", mode="full")
    streamed = _profile(path, token_file, dtype="fp32", mode="streamed", offload_dir=tmp_path / "off")
    assert _routing(streamed) == _routing(full)
    assert streamed.io["weight_bytes_read"] <= streamed.io["checkpoint_bytes"]
    with open_checkpoint(path) as ckpt:   # all but the lm_head (profiling needs no logits)
        assert streamed.io["weight_bytes_read"] == ckpt.total_bytes - ckpt.tensors["output.weight"].nbytes


def test_eval_gguf_against_its_source(tmp_path, tiny_saved, token_file):
    model = source_model("qwen3_moe")
    folder = tiny_saved(model, tmp_path / "hf")
    path = write_runnable("qwen3_moe", tmp_path / "m.gguf", model=model)[0]
    options = EvalOptions(token_ids=token_file, seq_len=40, batch_size=4, dtype="fp32", mode="streamed")
    with open_checkpoint(path) as ckpt, open_checkpoint(folder) as ref:
        report = evaluate(ckpt, options, reference=ref)
    assert report.kl_mean <= 1e-9 and report.top1_agreement == 1.0 and report.max_logit_diff <= 1e-4
    assert report.perplexity == pytest.approx(report.reference_perplexity, rel=1e-6)


@pytest.fixture(scope="module")
def builtin_gguf(tmp_path_factory):
    """The built-in model as a Q8_0 GGUF with its tokenizer in llama.cpp's gpt2 form."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MOE, dtype=torch.float32)
    return write_runnable("qwen3_moe", tmp_path_factory.mktemp("builtin") / "tiny-moe-Q8_0.gguf", model=model,
                          qtype="Q8_0", tokenizer=TINY_MOE / "tokenizer.json")[0]


def test_tokenizer_from_gguf_metadata(builtin_gguf):
    """Text is tokenized by the tokenizer transformers builds from the GGUF's vocabulary, merges and
    pre-tokenizer name: on the whole held-out corpus (digits, punctuation, newlines) it gives the
    original tokenizer.json's ids."""
    import transformers

    from moetool.runner import data

    text = data.builtin_texts("heldout")[0]
    want = transformers.AutoTokenizer.from_pretrained(TINY_MOE)(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(builtin_gguf.parent, gguf_file=builtin_gguf.name)(
        text)["input_ids"] == want
    with open_checkpoint(builtin_gguf) as ckpt:
        ids = data.calibration_ids(data="builtin:heldout", token_ids=None, field=None, max_tokens=None,
                                   tokenizer_path=data.tokenizer_source(ckpt), default="builtin")
    same = data.calibration_ids(data="builtin:heldout", token_ids=None, field=None, max_tokens=None,
                                tokenizer_path=TINY_MOE, default="builtin")
    assert len(ids) > 40_000 and list(ids) == list(same)


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "MOETOOL_DEBUG"} | {"COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "moetool", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_profile_and_eval_of_builtin_gguf(builtin_gguf, tmp_path):
    proc = run("profile", builtin_gguf, "--max-tokens", 2048, "--seq-len", 128, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tokens"] == 2048 and len(report["layers"]) == 4
    proc = run("eval", builtin_gguf, "--reference", "builtin:tiny-moe", "--max-tokens", 2048, "--seq-len", 128,
               "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert 0 < report["kl_mean"] < 0.05 and report["top1_agreement"] > 0.9


def test_unsupported_architecture_is_refused(tmp_path):
    from tests.gguf_fixtures import write_family

    path = write_family("olmoe", tmp_path / "o.gguf")[0]
    proc = run("profile", path, "--token-ids", "[1, 2, 3, 4]")
    assert proc.returncode == 7 and "Traceback" not in proc.stderr
    assert "qwen3_moe" in proc.stderr and "olmoe" in proc.stderr


def test_text_without_a_tokenizer_in_the_file(tmp_path):
    path = write_runnable("qwen3_moe", tmp_path / "m.gguf")[0]   # token list only, no tokenizer model
    proc = run("profile", path, "--seq-len", 16, "--max-tokens", 64)
    assert proc.returncode == 11 and "--token-ids" in proc.stderr and "Traceback" not in proc.stderr


def test_load_model_streamed_gguf(tmp_path):
    path = write_runnable("mixtral", tmp_path / "m.gguf", qtype="Q8_0")[0]
    with open_checkpoint(path) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
    assert loaded.mode == "streamed" and loaded.config["model_type"] == "mixtral"
    assert sorted(loaded.layer_plan) == [0, 1]


@pytest.mark.parametrize("family", RUNNABLE)
def test_llama_cpp_gives_the_runners_logits(tmp_path, family):
    """llama.cpp itself (llama-cpp-python, when installed; not in CI) runs the same F32 file: its
    logits equal those of the model moetool builds from the GGUF. (llama.cpp builds Qwen2-MoE with
    experts in every layer.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = source_model(family, **({"mlp_only_layers": []} if family == "qwen2_moe" else {}))
    vocab = model.config.vocab_size
    tokenizer = {"add_tokenizer_model": "llama", "add_token_scores": [0.0] * vocab, "add_token_types": [1] * vocab,
                 "add_bos_token_id": 1, "add_eos_token_id": 2}
    path = write_runnable(family, tmp_path / "m.gguf", model=model, metadata=tokenizer)[0]
    tokens = torch.randint(3, vocab, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=2, verbose=False, logits_all=True)
    llm.eval(tokens)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(tokens)], dtype=np.float32))
    with torch.no_grad():
        ours = load_pretrained(path)(torch.tensor([tokens])).logits[0]
    assert (ours - theirs).abs().max() <= 1e-3 * max(1.0, ours.abs().max().item())


@pytest.mark.parametrize("criterion, sequential", [("frequency", False), ("reap", False), ("reap", True)])
def test_prune_gguf_calibrated_on_the_gguf_itself(tmp_path, tiny_saved, token_file, criterion, sequential):
    """Without --profile, prune of a GGUF profiles the GGUF: it keeps the experts prune of the
    safetensors model keeps on the same tokens (with --sequential too)."""
    from moetool.ops.prune import PruneOptions, prune

    model = source_model("qwen3_moe")
    folder = tiny_saved(model, tmp_path / "hf")
    (tmp_path / "g").mkdir()
    path = write_runnable("qwen3_moe", tmp_path / "g" / "m.gguf", model=model)[0]
    calibration = ProfileOptions(token_ids=token_file, seq_len=40, batch_size=4, dtype="fp32")
    kept = []
    for src, out in ((folder, tmp_path / "st-out"), (path, tmp_path / "out.gguf")):
        with open_checkpoint(src) as ckpt:
            kept.append(prune(ckpt, out, PruneOptions(keep=2, criterion=criterion, calibration=calibration,
                                                      sequential=sequential)).kept)
    assert kept[0] == kept[1] and all(len(v) == 2 for v in kept[1].values())


def test_quantize_refuses_a_gguf_plainly(tmp_path):
    """quantize writes safetensors from safetensors (a GGUF is requantized by llama-quantize): exit 7,
    one line naming GGUF, nothing written."""
    path = write_runnable("qwen3_moe", tmp_path / "m.gguf")[0]
    proc = subprocess.run([sys.executable, "-m", "moetool", "quantize", str(path), str(tmp_path / "q")],
                          capture_output=True, text=True)
    assert proc.returncode == 7 and "not GGUF" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "q").exists()
