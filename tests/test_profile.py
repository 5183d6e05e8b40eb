"""`moetool profile` end to end on tiny models (CPU), its outputs and its bad inputs."""

import json
import subprocess
import sys

import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.errors import UnsupportedError, UsageError
from moetool.ops.profile import ProfileOptions, profile
from moetool.runner.data import DataError


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    g = torch.Generator().manual_seed(0)
    path.write_text(json.dumps(torch.randint(0, 64, (1200,), generator=g).tolist()))
    return path


def run(path, token_file, **kw):
    options = ProfileOptions(token_ids=token_file, seq_len=kw.pop("seq_len", 40), **kw)
    with open_checkpoint(path) as ckpt:
        return profile(ckpt, options)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "gpt_oss", "llama4_text", "dbrx", "jetmoe"])
def test_full_and_streamed_agree(tiny, token_file, family):
    full = run(tiny(family), token_file, mode="full", batch_size=4)
    streamed = run(tiny(family), token_file, mode="streamed")
    assert full.tokens == streamed.tokens == 1200
    for a, b in zip(full.layers, streamed.layers):
        assert a.counts == b.counts and a.coactivation == b.coactivation
        assert sum(a.counts) == a.tokens * a.top_k                  # every token routed to k experts
        assert a.weight_mass == pytest.approx(b.weight_mass, rel=1e-5)
        assert 0 < a.entropy_normalized <= 1.0 + 1e-6
        assert a.coactivation[0][0] == a.counts[0]


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_encoder_decoder_profile(tiny, token_file, family):
    report = run(tiny(family), token_file, max_tokens=640, seq_len=32)
    assert report.mode == "full" and [lp.layer for lp in report.layers] == [1, 3]
    assert all(sum(lp.counts) == lp.tokens * lp.top_k for lp in report.layers)


def test_report_json_and_files(tmp_path, tiny, token_file):
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("mixtral")), "--token-ids",
                           str(token_file), "--seq-len", "40", "--ep", "2", "--ep-replicas", "1", "--json",
                           "--csv", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "p.png"),
                           "--html", str(tmp_path / "p.html")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["schema_version"] == 1 and data["family"] == "mixtral" and data["tokens"] == 1200
    layer = data["layers"][0]
    for key in ("counts", "share", "weight_mass", "dead_experts", "entropy_normalized", "top1_prob_mean",
                "margin_mean", "imbalance", "capacity_drop", "coactivation", "distinct_experts_per_sequence",
                "consecutive_reuse", "lru_hit_rate", "ep"):
        assert key in layer
    assert set(layer["capacity_drop"]) == {"1.0", "1.25", "1.5", "2.0"}
    balanced = layer["ep"]["balanced"]
    assert sum(len(d) for d in balanced["placement"]) == 5           # 4 experts + 1 replica
    assert sum(map(sum, balanced["all_to_all_tokens"])) == 1200 * 2
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "p.html").read_text()
    assert "<svg" in page or "data:image/png;base64," in page
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "layer,expert,tokens,share,weight_mass,saliency,dead"


def test_text_input_with_a_tokenizer(tmp_path, tiny):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), model)
    text = "the quick brown fox jumps over the lazy dog " * 50
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(model)
    (tmp_path / "data.jsonl").write_text(json.dumps({"content": text}) + "\n")
    options = ProfileOptions(data=tmp_path / "data.jsonl", field="content", seq_len=50)
    with open_checkpoint(model) as ckpt:
        report = profile(ckpt, options)
    assert report.tokens == 450 and report.sequences == 9
    # no --data: the built-in corpus, tokenized with the model's tokenizer
    with open_checkpoint(model) as ckpt:
        report = profile(ckpt, ProfileOptions(seq_len=50, max_tokens=500))
    assert report.tokens == 500


def test_builtin_corpus():
    from moetool.runner.data import builtin_texts, read_texts

    train, heldout = builtin_texts("train")[0], builtin_texts("heldout")[0]
    assert len(train) > 900_000 and "THE TEMPEST" in train and "JULIUS CAESAR" not in train
    assert "JULIUS CAESAR" in heldout
    assert read_texts(__import__("pathlib").Path("builtin:heldout")) == [heldout]


def test_dense_model_is_refused(tiny, token_file):
    with pytest.raises(UnsupportedError, match="no MoE layers"):
        run(tiny("llama"), token_file)


def test_empty_text_is_refused(tmp_path, tiny):
    (tmp_path / "empty.txt").write_text("  \n")
    with open_checkpoint(tiny("mixtral")) as ckpt, pytest.raises(DataError, match="holds no text"):
        profile(ckpt, ProfileOptions(data=tmp_path / "empty.txt"))


def test_seq_len_beyond_the_model(tiny, token_file):
    with pytest.raises(UsageError, match="beyond the model's maximum of 64"):
        run(tiny("mixtral"), token_file, seq_len=65)


def test_out_of_memory_suggests_streamed(tiny, token_file, monkeypatch):
    from moetool.runner.device import DeviceError
    from moetool.runner.model import LoadedModel

    def oom(self, input_ids, attention_mask=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LoadedModel, "base_forward", oom)
    with pytest.raises(DeviceError) as info:
        run(tiny("mixtral"), token_file, mode="full")
    assert "out of memory" in str(info.value) and "--mode streamed" in info.value.hint


def test_cli_errors_are_one_line(tmp_path, tiny, token_file):
    proc = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tiny("llama")), "--token-ids",
                           str(token_file)], capture_output=True, text=True)
    assert proc.returncode == 7 and "no MoE layers" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_gpu_bf16_matches_cpu_choices_mostly(tiny, token_file, family):
    """On CUDA in bf16 the routing is recorded; choices agree with fp32 CPU up to near-ties."""
    cpu = run(tiny(family), token_file, device="cpu", dtype="fp32")
    gpu = run(tiny(family), token_file, device="cuda", dtype="bf16")
    for a, b in zip(cpu.layers, gpu.layers):
        assert sum(b.counts) == b.tokens * b.top_k
        overlap = sum(min(x, y) for x, y in zip(a.counts, b.counts)) / sum(a.counts)
        assert overlap > 0.9


def _experts_inputs(model, modules: dict, ids) -> dict:
    """Layer -> the (hidden, index, weights) its experts module (MODULES: layer -> module) is called with as
    MODEL's decoder runs IDS."""
    inputs = {}
    hooks = [module.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a))
             for i, module in modules.items()]
    try:
        with torch.no_grad():
            model.model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def test_saliency_against_expert_outputs_computed_by_hand(tiny, token_file):
    """REAP saliency = mean over routed tokens of ||w * expert(x)||, with the Mixtral expert written out."""
    import transformers

    path = tiny("mixtral")
    report = run(path, token_file, saliency=True, seq_len=40, max_tokens=200)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(token_file.read_text())[:200]).reshape(5, 40)
    inputs = _experts_inputs(model, {i: model.model.layers[i].mlp.experts for i in range(2)}, ids)
    torch.set_grad_enabled(False)
    for layer in report.layers:
        hidden, index, weights = inputs[layer.layer]
        experts = model.model.layers[layer.layer].mlp.experts
        total, count = torch.zeros(4, dtype=torch.float64), torch.zeros(4)
        for t in range(hidden.shape[0]):
            for j in range(index.shape[1]):
                e = int(index[t, j])
                gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
                y = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                total[e] += float((weights[t, j] * y).norm())
                count[e] += 1
        want = (total / count.clamp_min(1)).tolist()
        assert layer.saliency == pytest.approx(want, rel=1e-4)
    torch.set_grad_enabled(True)


def test_latent_saliency_is_measured_where_the_experts_output_joins_the_hidden_states(tiny, token_file):
    """Nemotron-H's latent MoE (Nemotron 3 Super): ||w * fc2_latent_proj.weight @ expert(fc1_latent_proj(x))||,
    the expert's contribution to the hidden states, not its norm in the latent space."""
    import transformers

    path = tiny("nemotron_h-latent")
    report = run(path, token_file, saliency=True, seq_len=40, max_tokens=200)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(token_file.read_text())[:200]).reshape(5, 40)
    inputs = _experts_inputs(model, {layer.layer: model.model.layers[layer.layer].mixer.experts
                                     for layer in report.layers}, ids)
    torch.set_grad_enabled(False)
    for layer in report.layers:
        latent, index, weights = inputs[layer.layer]
        mixer = model.model.layers[layer.layer].mixer
        assert latent.shape[-1] == model.config.moe_latent_size
        totals, count = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4)
        for t in range(latent.shape[0]):
            for j in range(index.shape[1]):
                e = int(index[t, j])
                y = weights[t, j] * (mixer.experts.down_proj[e] @ torch.relu(mixer.experts.up_proj[e] @ latent[t]) ** 2)
                totals[0, e] += float((mixer.fc2_latent_proj.weight @ y).norm())
                totals[1, e] += float(y.norm())
                count[e] += 1
        want, in_latent = (totals / count.clamp_min(1)).tolist()
        assert layer.saliency == pytest.approx(want, rel=1e-4)
        assert layer.saliency != pytest.approx(in_latent, rel=1e-2)   # the test can fail
    torch.set_grad_enabled(True)


def test_latent_saliency_of_streamed_mode_is_full_mode_s(tiny, token_file):
    """Streamed mode loads each layer as it runs: the latent projection's weight is read then."""
    full = run(tiny("nemotron_h-latent"), token_file, saliency=True, mode="full", max_tokens=200)
    streamed = run(tiny("nemotron_h-latent"), token_file, saliency=True, mode="streamed", max_tokens=200)
    for a, b in zip(full.layers, streamed.layers, strict=True):
        assert b.saliency == pytest.approx(a.saliency, rel=1e-6) and sum(a.saliency) > 0


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "granitemoe", "jamba", "qwen2_moe"])
def test_saliency_runs_for_families_with_an_experts_module(tiny, token_file, family):
    report = run(tiny(family), token_file, saliency=True, max_tokens=400)
    for layer in report.layers:
        assert len(layer.saliency) == layer.experts
        assert all((s > 0) == (c > 0) for s, c in zip(layer.saliency, layer.counts))


def test_saliency_unsupported_family_says_so(tiny, token_file):
    with pytest.raises(UnsupportedError, match="saliency"):
        run(tiny("llama4_text"), token_file, saliency=True, max_tokens=200)


def test_expert_parallelism_over_too_many_devices_is_refused_before_the_run(tmp_path, monkeypatch):
    from moetool.errors import UsageError

    def no_run(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr("moetool.ops.profile.load_model", no_run)
    with open_checkpoint("builtin:tiny-moe") as ckpt, pytest.raises(UsageError, match="--ep 9"):
        profile(ckpt, ProfileOptions(ep=9, trace=tmp_path / "trace"))
    assert not any(tmp_path.iterdir())


def test_a_bad_device_or_offload_folder_is_a_one_line_error(tmp_path, tiny, token_file):
    from moetool.errors import OutputWriteError

    with pytest.raises(UsageError, match="--device foo"):
        run(tiny("mixtral"), token_file, device="foo")
    with pytest.raises(UsageError, match="--dtype fp8"):
        run(tiny("mixtral"), token_file, dtype="fp8")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(OutputWriteError, match="offloaded activations"):
        run(tiny("mixtral"), token_file, mode="streamed", offload_dir=not_a_folder)


def test_a_malformed_profile_file_names_the_file_and_the_field(tmp_path):
    """prune/quantize --profile FILE: every layer's fields are checked (one-line UsageError naming the file
    and the field), never a KeyError, TypeError or ValueError from deep inside a command."""
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.ops.profile import routing_profile

    with open_checkpoint("builtin:tiny-moe") as ckpt:
        structure = inspect_checkpoint(ckpt)

        def read(report):
            path = tmp_path / "profile.json"
            path.write_text(json.dumps(report))
            return routing_profile(ckpt, structure, profile=path, calibration=None, saliency=False)

        def good():
            return {"layers": [{"layer": info.index, "experts": info.experts, "top_k": 2,
                                "counts": list(range(info.experts)), "weight_mass": [1.5] * info.experts,
                                "saliency": None} for info in structure.layers if info.index in structure.moe_layers]}

        layers = read(good())
        assert sorted(layers) == structure.moe_layers and layers[structure.moe_layers[0]]["counts"] == list(range(8))
        cases = [
            (lambda r: r["layers"][0].pop("experts"), r"layers\[0\]\.experts is missing"),
            (lambda r: r["layers"][0].pop("layer"), r"layers\[0\]\.layer is missing"),
            (lambda r: r["layers"][0].update(layer="0"), r"layers\[0\]\.layer is \"0\", not a non-negative integer"),
            (lambda r: r["layers"][0].update(experts=8.0), r"layers\[0\]\.experts is 8.0"),
            (lambda r: r["layers"][0].update(counts=["a"] * 8), r"layers\[0\]\.counts holds \"a\""),
            (lambda r: r["layers"][0].update(counts=[float("nan")] * 8), r"layers\[0\]\.counts holds NaN"),
            (lambda r: r["layers"][0].update(counts=[-1] * 8), r"layers\[0\]\.counts holds -1"),
            (lambda r: r["layers"][0].update(counts=5), r"layers\[0\]\.counts is 5, not a list of 8 values"),
            (lambda r: r["layers"][2].update(weight_mass=[1.0] * 7), r"layers\[2\]\.weight_mass is \[1.0"),
            (lambda r: r["layers"][1].update(saliency=[True] * 8), r"layers\[1\]\.saliency holds true"),
            (lambda r: r["layers"][1]["weight_mass"].__setitem__(2, float("nan")),
             r"layers\[1\]\.weight_mass holds NaN, not a finite number"),
            (lambda r: r["layers"][3].update(saliency=[float("inf")] * 8), r"layers\[3\]\.saliency holds Infinity"),
            (lambda r: r["layers"][1].update(activation_norm={"0": 1}), r"layers\[1\]\.activation_norm is"),
            (lambda r: r.update(layers=[1, 2]), r"layers\[0\] is not a JSON object"),
            (lambda r: r.update(layers={}), r"its layers are not a list"),
            (lambda r: r.pop("layers"), r"its layers are missing"),
            (lambda r: r["layers"].append(dict(r["layers"][0])), r"layers\[4\]\.layer repeats layer"),
        ]
        for mutate, message in cases:
            report = good()
            mutate(report)
            with pytest.raises(UsageError, match=r"profile\.json: not a moetool profile --json file: " + message):
                read(report)
        for text in ("[1, 2]", "{", "[" * 100_000):
            (tmp_path / "profile.json").write_text(text)
            with pytest.raises(UsageError, match=r"profile\.json: not a moetool profile --json file"):
                routing_profile(ckpt, structure, profile=tmp_path / "profile.json", calibration=None, saliency=False)
        null = good()
        null["layers"][1]["weight_mass"][3] = None                      # --json writes a NaN as null
        assert read(null)[structure.moe_layers[1]]["weight_mass"][3] is None
        other = good()
        for entry in other["layers"]:
            entry.update(experts=4, counts=[1] * 4, weight_mass=None)
        with pytest.raises(UsageError, match="another model"):
            read(other)


def test_expert_parallel_loads_are_what_the_all_to_all_sends(tiny, token_file):
    """Device loads (and the busiest over the mean) are the all-to-all matrix's column sums: with
    replicas, a token goes to its own device's copy first, not half to each copy. Without replicas
    they are the experts' token counts summed per device."""
    report = run(tiny("qwen3_moe"), token_file, ep=2, ep_replicas=1)
    for layer in report.layers:
        for ep in layer.ep.values():
            received = [sum(row[d] for row in ep["all_to_all_tokens"]) for d in range(2)]
            assert ep["device_load"] == received and sum(received) == sum(layer.counts)
            assert ep["busiest_over_mean"] == pytest.approx(max(received) / (sum(received) / 2), abs=1e-4)
        contiguous = layer.ep["contiguous"]
        assert contiguous["device_load"] == [sum(layer.counts[e] for e in d) for d in contiguous["placement"]]
