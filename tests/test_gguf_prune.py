"""`moetool prune FILE.gguf OUT.gguf`: kept experts copied byte for byte, metadata consistent,
layout kept; in transformers' GGUF loader the pruned file equals the unpruned one with the
removed experts' router logits at -inf before top-k (the masked-router oracle of test_prune.py)."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from moetool.checkpoint import open_checkpoint
from moetool.errors import OutputExistsError, OutputWriteError, UnsupportedError, UsageError
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.prune import PruneOptions, prune
from tests.gguf_fixtures import build, gguf_metadata, gguf_tensors
from tests.gguf_fixtures import write_family as _write_family
from tests.gguf_fixtures import write_gguf as _write_gguf
from tests.test_gguf import imported_modules, run

gguf = pytest.importorskip("gguf")

def write_family(family, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_family(family, path, **kwargs)


def write_gguf(path, *args, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_gguf(path, *args, **kwargs)


STACKED = ("_exps.", ".ffn_gate_inp.", ".exp_probs_b.")   # tensors cut by expert (the oracle's own list)


def assert_one_line_error(proc, code, *names):
    """Exit CODE, one 'Error:' line naming NAMES (and at most a 'Hint:' line), no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[0].startswith("Error: "), proc.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("Hint: ")), proc.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def _prune(src, out, force=False, **options):
    with open_checkpoint(src) as ckpt:
        return prune(ckpt, out, PruneOptions(**{"criterion": "random", **options}), force=force)


def _raw(t) -> bytes:
    return np.asarray(t.data).tobytes()


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def assert_pruned(src_parts, out_parts, report, experts, changed=()):
    """Every part: same tensors in the same order, kept experts' bytes equal to the source's slices,
    the other tensors' bytes equal, offsets aligned, metadata equal but for expert_count (+ CHANGED)."""
    assert len(src_parts) == len(out_parts)
    keep = report.experts_after
    for src_path, out_path in zip(src_parts, out_parts):
        src, out = gguf.GGUFReader(src_path), gguf.GGUFReader(out_path)
        assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
        assert out.alignment == src.alignment and out.data_offset % out.alignment == 0
        for s, o in zip(src.tensors, out.tensors):
            assert (o.data_offset - out.data_offset) % out.alignment == 0, o.name
            assert o.tensor_type == s.tensor_type, o.name
            found = s.name.split(".")
            layer = int(found[1]) if found[0] == "blk" else None
            if layer in report.kept and any(m in s.name for m in STACKED):
                per = len(_raw(s)) // experts
                want = b"".join(_raw(s)[e * per:(e + 1) * per] for e in report.kept[layer])
                assert list(o.shape[:-1]) == list(s.shape[:-1]) or s.shape[-1] == 1, o.name
                assert keep in o.shape.tolist(), (o.name, o.shape)
            else:
                want = _raw(s)
                assert o.shape.tolist() == s.shape.tolist(), o.name
            assert _raw(o) == want, o.name
        before, after = _fields(src), _fields(out)
        assert before.keys() == after.keys()
        arch = before.get("general.architecture") or _fields(gguf.GGUFReader(src_parts[0]))["general.architecture"]
        for key in before:
            if key == f"{arch}.expert_count":
                assert after[key] == keep
            elif key in changed:
                assert after[key] == changed[key], key
            else:
                assert after[key] == before[key], key


QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_kept_bytes_equal_the_source_slices(tmp_path, qtype):
    k_quant = qtype.endswith("_K")
    model = build("qwen3_moe", hidden_size=256) if k_quant else build("qwen3_moe")   # whole K-quant blocks
    src = write_family("qwen3_moe", tmp_path / "src" / "m.gguf", qtype=qtype, model=model)[0]
    report = _prune(src, tmp_path / "out.gguf", keep=3, seed=3)
    assert_pruned([src], [tmp_path / "out.gguf"], report, 4)
    out = gguf.GGUFReader(tmp_path / "out.gguf")
    types = {t.tensor_type.name for t in out.tensors if "_exps" in t.name}
    assert qtype in types
    with open_checkpoint(tmp_path / "out.gguf") as ckpt:
        info = inspect_checkpoint(ckpt)
    assert info.problems == [] and info.num_experts == 3 and info.top_k == 2
    removed = os.path.getsize(src) - os.path.getsize(tmp_path / "out.gguf")
    assert abs(removed - report.bytes_removed) <= 32 * len(out.tensors)


def _model_for(family):
    if family == "deepseek_v3":   # 8 experts in 2 groups, so that each group can keep 2
        return build(family, n_routed_experts=8)
    return build(family)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen2_moe", "mixtral", "glm4_moe", "ernie4_5_moe",
                                    "llama4_text", "olmoe", "granitemoeshared", "hunyuan_v1_moe", "dots1",
                                    "qwen3_5_moe_text", "lfm2_moe", "exaone_moe", "afmoe"])
def test_expert_biases_router_and_correction_are_sliced(tmp_path, family):
    model = _model_for(family)
    src = write_family(family, tmp_path / "src" / "m.gguf", model=model)[0]
    with open_checkpoint(src) as ckpt:
        experts = inspect_checkpoint(ckpt).num_experts
    keep = 4 if family == "deepseek_v3" else experts - 1
    report = _prune(src, tmp_path / "out.gguf", keep=keep, seed=1)
    assert_pruned([src], [tmp_path / "out.gguf"], report, experts)
    if family == "deepseek_v3":   # 2 of 4 in each group: group counts unchanged
        size = experts // 2
        assert all(sum(e < size for e in kept) == 2 for kept in report.kept.values())
    with open_checkpoint(tmp_path / "out.gguf") as ckpt:
        info = inspect_checkpoint(ckpt)
    assert info.problems == [] and info.num_experts == keep


def test_split_set_keeps_its_layout(tmp_path):
    parts = write_family("qwen3_moe", tmp_path / "src" / "m.gguf", split_max_tensors=12)
    assert len(parts) == 3
    report = _prune(parts[1], tmp_path / "out" / "pruned.gguf", keep=2, seed=5)
    out = sorted((tmp_path / "out").glob("*.gguf"))
    assert [p.name for p in out] == [f"pruned-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert report.out == str(tmp_path / "out" / "pruned.gguf")
    assert_pruned(parts, out, report, 4)   # split.count / split.no / split.tensors.count unchanged
    with open_checkpoint(out[2]) as ckpt:
        info = inspect_checkpoint(ckpt)
    assert info.problems == [] and info.num_experts == 2 and info.disk["shards"] == 3


def test_old_per_expert_tensors_are_dropped_and_renumbered(tmp_path):
    """Mixtral GGUFs from before April 2024 store one tensor per expert (blk.L.ffn_gate.E.weight)."""
    model = build("mixtral")
    tensors = []
    for name, array in gguf_tensors("mixtral", model):
        if "_exps." in name:
            stem = name.replace("_exps.weight", "")
            tensors += [(f"{stem}.{e}.weight", array[e]) for e in range(array.shape[0])]
        else:
            tensors.append((name, array))
    src = write_gguf(tmp_path / "src" / "m.gguf", "llama", gguf_metadata("mixtral", model), tensors)[0]
    report = _prune(src, tmp_path / "out.gguf", experts={0: [1, 3], 1: [0, 2]})
    source, out = gguf.GGUFReader(src), gguf.GGUFReader(tmp_path / "out.gguf")
    by_name = {t.name: t for t in source.tensors}
    names = [t.name for t in out.tensors]
    assert len(names) == len(source.tensors) - 2 * 2 * 3
    for t in out.tensors:
        parts = t.name.split(".")
        if len(parts) == 5 and parts[3].isdigit():   # blk.L.ffn_x.E.weight
            layer, new = int(parts[1]), int(parts[3])
            old = report.kept[layer][new]
            assert _raw(t) == _raw(by_name[".".join(parts[:3] + [str(old), "weight"])])
    assert report.top_k == 2 and report.warnings == []
    with open_checkpoint(tmp_path / "out.gguf") as ckpt:
        info = inspect_checkpoint(ckpt)
    assert info.problems == [] and info.num_experts == 2


# ---------------------------------------------------------------- transformers' GGUF loader

def _qwen2_moe_file(path, model):
    """transformers reads Qwen2-MoE's shared-expert gate as llama.cpp stores it: 1-D."""
    tensors = [(n, a.reshape(-1) if "ffn_gate_inp_shexp" in n else a) for n, a in gguf_tensors("qwen2_moe", model)]
    return write_gguf(path, "qwen2moe", gguf_metadata("qwen2_moe", model), tensors)[0]


@pytest.mark.parametrize("family, keep", [("qwen3_moe", 3), ("qwen2_moe", 1)])
def test_transformers_loads_it_and_matches_the_masked_oracle(tmp_path, family, keep):
    """transformers' GGUF config mapping reads no expert_feed_forward_length: the models use the
    configs' default expert FFN sizes (and Qwen2-MoE no dense layer, which its metadata cannot say)."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from tests.test_prune import routers_restricted

    assert family in GGUF_SUPPORTED_ARCHITECTURES
    if family == "qwen3_moe":
        model = build(family, moe_intermediate_size=768)
        src = write_family(family, tmp_path / "src.gguf", model=model)[0]
    else:
        model = build(family, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, mlp_only_layers=[])
        src = _qwen2_moe_file(tmp_path / "src.gguf", model)
    report = _prune(src, tmp_path / "out.gguf", keep=keep, seed=7)
    if keep < 2:
        assert report.top_k == keep and "top-k lowered" in report.warnings[0]
    load = transformers.AutoModelForCausalLM.from_pretrained
    original = load(tmp_path, gguf_file="src.gguf", dtype=torch.float32).eval()
    pruned = load(tmp_path, gguf_file="out.gguf", dtype=torch.float32).eval()
    assert pruned.config.num_experts == keep and pruned.config.num_experts_per_tok == min(2, keep)
    removed = {layer: [e for e in range(4) if e not in kept] for layer, kept in report.kept.items()}
    routers = {layer: original.model.layers[layer].mlp.gate.weight for layer in report.kept}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routers_restricted(original, removed, routers):
        want = original(ids).logits
    with torch.no_grad():
        got = pruned(ids).logits
        unmasked = original(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (unmasked - want).abs().max() > 1e-3   # the removed experts did matter


def test_llama_cpp_runs_it(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = build("qwen3_moe")
    md = gguf_metadata("qwen3_moe", model) | {
        "add_tokenizer_model": "llama", "add_token_scores": [0.0] * 64,
        "add_token_types": [1] * 64, "add_bos_token_id": 1, "add_eos_token_id": 2,
        "add_layer_norm_rms_eps": model.config.rms_norm_eps}   # llama.cpp requires it
    src = write_gguf(tmp_path / "src.gguf", "qwen3moe", md, gguf_tensors("qwen3_moe", model))[0]
    _prune(src, tmp_path / "out.gguf", keep=3)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out.gguf"), n_ctx=32, verbose=False, logits_all=True)
    llm.eval([3, 4, 5, 6])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()


# ---------------------------------------------------------------- criteria

def test_profile_of_the_safetensors_model_and_weight_norm_choose_as_for_safetensors(tmp_path):
    from tests.test_prune import _profile_json

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "st")
    src = write_family("qwen3_moe", tmp_path / "g" / "m.gguf", model=model)[0]
    profile, _ = _profile_json(tmp_path, tmp_path / "st")
    for options in (dict(keep=2, criterion="frequency", profile=profile), dict(keep=3, criterion="weight-norm"),
                    dict(keep=3, criterion="random", seed=4)):
        st = _prune(tmp_path / "st", tmp_path / "st-out", **options)
        shutil.rmtree(tmp_path / "st-out")
        with open_checkpoint(src) as ckpt:
            report = prune(ckpt, tmp_path / "g.gguf", PruneOptions(**options), dry_run=True)
        assert report.kept == st.kept, options
        if options["criterion"] == "frequency":
            assert report.routing_mass_removed == pytest.approx(st.routing_mass_removed)
    assert not (tmp_path / "g.gguf").exists()   # --dry-run writes nothing
    build("qwen2_moe").save_pretrained(tmp_path / "other")   # MoE layers 0 and 2
    other, _ = _profile_json(tmp_path, tmp_path / "other")
    with pytest.raises(UsageError, match="another model"):
        _prune(src, tmp_path / "x.gguf", keep=2, criterion="frequency", profile=other)


def test_data_criteria_need_a_profile_merge_and_global_scope_are_refused(tmp_path):
    """Data criteria without --profile calibrate on the GGUF (tests/test_gguf_run.py), for the
    architectures moetool runs; the others are refused with the hint."""
    olmoe = write_family("olmoe", tmp_path / "olmoe.gguf")[0]
    with pytest.raises(UnsupportedError, match="running a GGUF model") as info:
        _prune(olmoe, tmp_path / "o.gguf", keep=2, criterion="reap")
    assert info.value.exit_code == 7 and "--profile" in info.value.hint
    src = write_family("qwen3_moe", tmp_path / "m.gguf")[0]
    with pytest.raises(UnsupportedError, match="one expert count per model"):
        _prune(src, tmp_path / "o.gguf", keep=2, scope="global")
    with pytest.raises(UnsupportedError, match="merge"):
        _prune(src, tmp_path / "o.gguf", keep=2, merge=True)


# ---------------------------------------------------------------- bad input, through the CLI

@pytest.fixture
def src(tmp_path):
    return write_family("qwen3_moe", tmp_path / "src" / "m.gguf")[0]


def test_cli_json_and_existing_output(src, tmp_path):
    out = tmp_path / "out.gguf"
    proc = run("prune", src, out, "--keep", "3", "--criterion", "random", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["experts_after"] == 3 and data["bytes_removed"] > 0 and data["out"] == str(out)
    assert_one_line_error(run("prune", src, out, "--keep", "2", "--criterion", "random"), 8, out)
    proc = run("prune", src, out, "--keep", "2", "--criterion", "random", "--force")
    assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(out).fields["qwen3moe.expert_count"].contents() == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_bad_requests(src, tmp_path):
    before = src.read_bytes()
    out = tmp_path / "o.gguf"
    line = assert_one_line_error(run("prune", src, out, "--experts", "0:0,1,9;1:0,1,2"), 2)
    assert "0..3" in line
    assert_one_line_error(run("prune", src, out, "--keep", "9", "--criterion", "random"), 2)
    assert "one expert count" in assert_one_line_error(run("prune", src, out, "--keep", "2", "--scope", "global"), 7)
    proc = run("prune", src, out, "--keep", "2")   # frequency: calibrates on the GGUF, which has no tokenizer
    assert proc.returncode == 11 and "tokenizer" in proc.stderr and "--token-ids" in proc.stderr
    assert_one_line_error(run("prune", src.parent, src.parent / "p.gguf", "--keep", "2", "--criterion", "random"), 2,
                          src.parent)
    assert_one_line_error(run("prune", src, src, "--keep", "2", "--criterion", "random", "--force"), 2, src)
    assert_one_line_error(run("prune", src, tmp_path / "o", "--keep", "2", "--criterion", "random"), 2)
    assert not out.exists() and src.read_bytes() == before


def test_top_k_that_cannot_be_checked_or_groups_that_cannot_stay_equal(tmp_path):
    model = build("qwen3_moe")
    md = {k: v for k, v in gguf_metadata("qwen3_moe", model).items() if k != "add_expert_used_count"}
    path = write_gguf(tmp_path / "k.gguf", "qwen3moe", md, gguf_tensors("qwen3_moe", model))[0]
    assert "expert_used_count" in assert_one_line_error(
        run("prune", path, tmp_path / "o.gguf", "--keep", "1", "--criterion", "random"), 5, path)
    v3 = write_family("deepseek_v3", tmp_path / "v3" / "m.gguf", model=build("deepseek_v3", n_routed_experts=8))[0]
    for keep, reason in (("3", "multiple of 2"), ("2", "at least 2 per group")):
        line = assert_one_line_error(run("prune", v3, tmp_path / "o.gguf", "--keep", keep, "--criterion", "random"), 2)
        assert reason in line
    line = assert_one_line_error(run("prune", v3, tmp_path / "o.gguf", "--experts", "1:0,1,2,3;2:0,1,4,5"), 2)
    assert "every group" in line


def test_disk_full_leaves_nothing(src, tmp_path, monkeypatch):
    import moetool.checkpoint.gguf_write as gguf_write

    parts = write_family("qwen3_moe", tmp_path / "split" / "m.gguf", split_max_tensors=12)
    calls = {"n": 0}
    real = gguf_write._copy_range

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 30:   # in the third part
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(gguf_write, "_copy_range", failing)
    with pytest.raises(OutputWriteError, match="No space left"):
        _prune(parts[0], tmp_path / "out" / "p.gguf", keep=2)
    assert calls["n"] == 30 and not (tmp_path / "out").exists()   # (the folder made for it goes too)
    with pytest.raises(OutputExistsError):
        (tmp_path / "taken.gguf").write_bytes(b"x")
        _prune(src, tmp_path / "taken.gguf", keep=2)
    assert (tmp_path / "taken.gguf").read_bytes() == b"x"


def test_a_failed_rename_leaves_the_earlier_split_set_whole(tmp_path, monkeypatch):
    """--force over an earlier split set: if renaming the new parts into place fails part-way, every
    earlier part is back as it was (never a set that is part new and part old), and no file is left over."""
    import moetool.checkpoint.gguf_write as gguf_write

    parts = write_family("qwen3_moe", tmp_path / "split" / "m.gguf", split_max_tensors=12)
    _prune(parts[0], tmp_path / "out" / "p.gguf", keep=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert len(before) == 3
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(Path(src).name)
        if ".moetool-tmp-" in calls[-1] and sum(".moetool-tmp-" in c for c in calls) == 2:   # the second new part
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(gguf_write.os, "replace", failing)
    with pytest.raises(OutputWriteError, match="Input/output error"):
        _prune(parts[0], tmp_path / "out" / "p.gguf", keep=2, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    monkeypatch.setattr(gguf_write.os, "replace", real)
    _prune(parts[0], tmp_path / "out" / "p.gguf", keep=2, force=True)   # and with no failure: replaced, no leftovers
    after = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in after] == sorted(before) and any(p.read_bytes() != before[p.name] for p in after)


@pytest.mark.parametrize("at", range(1, 7))
def test_an_interrupted_rename_leaves_the_earlier_split_set_whole(tmp_path, monkeypatch, at):
    """Ctrl-C at any of the renames (3 earlier parts aside, 3 new ones into place): every earlier part is
    back as it was, and no file is left over."""
    import moetool.checkpoint.gguf_write as gguf_write

    parts = write_family("qwen3_moe", tmp_path / "split" / "m.gguf", split_max_tensors=12)
    _prune(parts[0], tmp_path / "out" / "p.gguf", keep=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(gguf_write.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prune(parts[0], tmp_path / "out" / "p.gguf", keep=2, force=True)
    monkeypatch.setattr(gguf_write.os, "replace", real)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_prune_imports_neither_torch_nor_gguf_py(src, tmp_path):
    """Choosing experts from --experts or a --profile file and copying bytes needs neither."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layers": [{"layer": i, "experts": 4, "counts": [5, 1, 3, 2],
                                               "weight_mass": [0.4, 0.1, 0.3, 0.2]} for i in (0, 1)]}))
    for options in (["--experts", "0:0,1,2;1:1,2,3"], ["--keep", "3", "--profile", profile]):
        imported = imported_modules("prune", src, tmp_path / "o.gguf", *options, "--force")
        assert "moetool.checkpoint.gguf_write" in imported
        assert not [m for m in imported if m.split(".")[0] in ("torch", "gguf")], options


def test_writeback_in_small_steps_writes_the_same_bytes(src, tmp_path, monkeypatch):
    """The output's writeback is started every WRITEBACK_STEP bytes, over consecutive ranges."""
    import moetool.checkpoint.gguf_write as gguf_write

    _prune(src, tmp_path / "a.gguf", keep=3, seed=2)
    real = gguf_write._sync_file_range()
    ranges = []

    def spy(fd, start, length, flags):
        ranges.append((start, length))
        return real(fd, start, length, flags) if real else 0

    monkeypatch.setattr(gguf_write, "_sync_file_range", lambda: spy)
    monkeypatch.setattr(gguf_write, "WRITEBACK_STEP", 4096)
    _prune(src, tmp_path / "b.gguf", keep=3, seed=2)
    data = (tmp_path / "b.gguf").read_bytes()
    assert data == (tmp_path / "a.gguf").read_bytes()
    assert len(ranges) > 3 and ranges[0][0] == 0
    assert all(start + length == after for (start, length), (after, _) in zip(ranges, ranges[1:]))
    assert all(length >= 4096 for _, length in ranges) and len(data) - sum(n for _, n in ranges) < 4096


def test_multi_token_prediction_blocks_are_dropped(tmp_path):
    """GLM-4.5's GGUF counts its MTP (nextn) blocks in block_count; no routing reaches them, so prune
    drops them and says so: the rest equals the pruned file that never had them."""
    import gguf as gg

    model = build("glm4_moe")
    arch = gg.MODEL_ARCH_NAMES[gg.MODEL_ARCH.GLM4_MOE]
    tensors, metadata = gguf_tensors("glm4_moe", model), gguf_metadata("glm4_moe", model)
    blocks = model.config.num_hidden_layers
    last = f"blk.{blocks - 1}."
    mtp = [(f"blk.{blocks}." + n.removeprefix(last), a) for n, a in tensors if n.startswith(last)]
    mtp += [(f"blk.{blocks}.nextn.eh_proj.weight", np.ones((32, 64), np.float32)),
            (f"blk.{blocks}.nextn.enorm.weight", np.ones(32, np.float32))]
    plain = write_gguf(tmp_path / "plain.gguf", arch, metadata, tensors)[0]
    with_mtp = write_gguf(tmp_path / "mtp.gguf", arch, metadata | {"add_block_count": blocks + 1,
                                                                   "add_nextn_predict_layers": 1}, tensors + mtp)[0]
    experts = {layer: [0, 2] for layer in range(1, blocks)}
    want = _prune(plain, tmp_path / "plain-out.gguf", experts=experts)
    got = _prune(with_mtp, tmp_path / "mtp-out.gguf", experts=experts)
    assert got.kept == want.kept and any("multi-token-prediction" in w for w in got.warnings)
    a, b = gg.GGUFReader(tmp_path / "mtp-out.gguf"), gg.GGUFReader(tmp_path / "plain-out.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(_raw(x) == _raw(y) for x, y in zip(a.tensors, b.tensors))
    assert _fields(a)[f"{arch}.block_count"] == blocks and _fields(a)[f"{arch}.nextn_predict_layers"] == 0


def test_a_split_set_losing_tensors_counts_them_in_every_part(tmp_path):
    """split.tensors.count is the set's total: dropping tensors from one part (here the MTP block, in
    the last) lowers it in every part, or llama.cpp and moetool refuse the set."""
    import gguf as gg

    model = build("glm4_moe")
    arch = gg.MODEL_ARCH_NAMES[gg.MODEL_ARCH.GLM4_MOE]
    tensors, metadata = gguf_tensors("glm4_moe", model), gguf_metadata("glm4_moe", model)
    blocks = model.config.num_hidden_layers
    mtp = [(f"blk.{blocks}." + n.removeprefix(f"blk.{blocks - 1}."), a) for n, a in tensors
           if n.startswith(f"blk.{blocks - 1}.")]
    parts = write_gguf(tmp_path / "src" / "m.gguf", arch, metadata | {"add_block_count": blocks + 1,
                                                                       "add_nextn_predict_layers": 1},
                       tensors + mtp, split_max_tensors=20)
    assert len(parts) > 2
    _prune(parts[0], tmp_path / "out" / "p.gguf", keep=2)
    out = sorted((tmp_path / "out").glob("*.gguf"))
    readers = [gg.GGUFReader(p) for p in out]
    total = sum(len(r.tensors) for r in readers)
    assert total == len(tensors) and all(_fields(r)["split.tensors.count"] == total for r in readers)
    with open_checkpoint(out[0]) as ckpt:
        assert inspect_checkpoint(ckpt).problems == []


def test_what_llama_cpp_cannot_route_is_refused(tmp_path):
    """llama.cpp asserts expert_group_count < expert_count (convert_hf_to_gguf.py writes a count of 1
    for GLM-4.5 and Kimi-K2); and a token's best groups must still hold its top-k experts."""
    glm = write_family("glm4_moe", tmp_path / "glm.gguf", metadata={"add_expert_group_count": 1,
                                                                    "add_expert_group_used_count": 1})[0]
    assert "expert_group_count is 1" in assert_one_line_error(
        run("prune", glm, tmp_path / "o.gguf", "--keep", "1", "--criterion", "random"), 2)
    model = build("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=4)
    v3 = write_family("deepseek_v3", tmp_path / "v3" / "m.gguf", model=model)[0]
    line = assert_one_line_error(run("prune", v3, tmp_path / "o.gguf", "--keep", "8", "--criterion", "random"), 2)
    assert "fewer than its top-4" in line


def test_a_token_table_gguf_is_refused_not_renumbered_wrong(tmp_path):
    """A GGUF whose layer holds a token table (llama.cpp's deepseek4 ffn_gate_tid2eid: expert ids as values) is
    refused with the reason, nothing written: renumbering the experts would leave the table naming the wrong ones."""
    hidden, inter, experts, k, vocab = 8, 4, 4, 2, 16
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors = [("token_embd.weight", f(vocab, hidden)), ("output.weight", f(vocab, hidden)),
               ("output_norm.weight", f(hidden))]
    for layer in range(2):
        b = f"blk.{layer}."
        tensors += [(b + "attn_norm.weight", f(hidden)), (b + "ffn_norm.weight", f(hidden)),
                    (b + "attn_q_a.weight", f(hidden, hidden)), (b + "ffn_gate_inp.weight", f(experts, hidden)),
                    (b + "ffn_gate_exps.weight", f(experts, inter, hidden)),
                    (b + "ffn_up_exps.weight", f(experts, inter, hidden)),
                    (b + "ffn_down_exps.weight", f(experts, hidden, inter))]
    tensors.append(("blk.0.ffn_gate_tid2eid.weight", rng.integers(0, experts, (vocab, k)).astype(np.int32)))
    metadata = {"add_block_count": 2, "add_embedding_length": hidden, "add_expert_count": experts,
                "add_expert_used_count": k, "add_vocab_size": vocab, "add_context_length": 64, "add_head_count": 2,
                "add_expert_feed_forward_length": inter, "add_feed_forward_length": inter}
    path = tmp_path / "ds4.gguf"
    _write_gguf(path, "deepseek4", metadata, tensors)
    with open_checkpoint(path) as ckpt, pytest.raises(UnsupportedError, match="fixed table"):
        prune(ckpt, tmp_path / "out.gguf", PruneOptions(experts={0: [2, 3], 1: [2, 3]}))
    assert not (tmp_path / "out.gguf").exists()
