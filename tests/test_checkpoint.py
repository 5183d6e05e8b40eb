"""The checkpoint abstraction against safetensors' and torch's own readers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.checkpoint import open_checkpoint
from moetool.checkpoint.hub import checkpoint_from_remote_metadata, looks_like_hub_id, split_hub_id
from moetool.errors import CheckpointFormatError, SourceNotFoundError


def test_sharded_folder_reads_like_safetensors(tmp_path, tiny):
    src = tiny("qwen3_moe")
    # re-shard the tiny model into three files with an index, as the hub does
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    weight_map = {}
    for i in range(3):
        part = names[i::3]
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with open_checkpoint(out) as ckpt:
        assert ckpt.kind == "dir" and len(ckpt.shards) == 3
        assert set(ckpt.tensors) == set(tensors)
        for name, ref in ckpt.tensors.items():
            with safe_open(out / weight_map[name], "pt") as f:
                assert list(ref.shape) == list(f.get_slice(name).get_shape())
                assert torch.equal(ref.load(), f.get_tensor(name))
            assert ref.nbytes == tensors[name].numel() * tensors[name].element_size()
            assert ref.end - ref.start == ref.nbytes


def test_load_slice_reads_one_expert_of_a_fused_tensor(tiny):
    with open_checkpoint(tiny("mixtral", fused=True)) as ckpt:
        ref = ckpt.tensors["model.layers.1.mlp.experts.gate_up_proj"]
        full = ref.load()
        for e in range(ref.shape[0]):
            assert torch.equal(ref.load_slice(e), full[e])
        assert torch.equal(ref.load_slice(slice(1, 3)), full[1:3])


def test_single_file_without_config(tiny):
    with open_checkpoint(tiny("olmoe") / "model.safetensors") as ckpt:
        assert ckpt.kind == "file" and ckpt.config is None
        assert "model.embed_tokens.weight" in ckpt.tensors


def test_pytorch_bin_is_read_with_weights_only(tmp_path, tiny):
    src = tiny("mixtral")
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    torch.save(tensors, out / "pytorch_model.bin")
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        ref = ckpt.tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
        assert ref.dtype == "F32" and ref.shape == (16, 32)
        assert torch.equal(ref.load(), tensors[ref.name])
        assert torch.equal(ref.load_slice(slice(0, 4)), tensors[ref.name][:4])


def _state_dict(src):
    with safe_open(src / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("saved", [
    lambda sd: {"state_dict": sd, "epoch": 3},        # a training checkpoint
    lambda sd: {"model": [sd], "step": 10},
    lambda sd: {"epoch": 3},                          # no tensors at all
    lambda sd: {},
], ids=["training-checkpoint", "list-of-state-dicts", "no-tensors", "empty"])
def test_bin_that_is_not_a_flat_state_dict_is_refused(tmp_path, tiny, saved):
    src = tiny("mixtral")
    out = tmp_path / "b3"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    torch.save(saved(_state_dict(src)), out / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="pytorch_model.bin: (is not a flat state dict|holds no tensors)"
                       ) as err:
        open_checkpoint(out)
    assert "state_dict()" in err.value.hint and "\n" not in str(err.value)


def test_bin_with_non_tensor_values_keeps_its_tensors(tmp_path, tiny):
    src = tiny("mixtral")
    tensors = _state_dict(src)
    path = tmp_path / "pytorch_model.bin"
    torch.save({**tensors, "version": 2}, path)
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.tensors) == set(tensors)


def test_legacy_non_zip_bin_is_read(tmp_path, tiny):
    src = tiny("mixtral")
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    torch.save(_state_dict(src), out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap"):   # what the first try meets
        torch.load(out / "pytorch_model.bin", weights_only=True, mmap=True)
    oracle = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.tensors) == set(oracle)
        for name, ref in ckpt.tensors.items():
            assert ref.shape == tuple(oracle[name].shape)
            assert torch.equal(ref.load(), oracle[name])


def test_legacy_bin_is_still_unpickled_with_weights_only(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "f": shutil.copy}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="cannot be loaded safely"):
        open_checkpoint(path)


def test_hub_id_parsing():
    assert looks_like_hub_id("deepseek-ai/DeepSeek-V3")
    assert looks_like_hub_id("Qwen/Qwen3-30B-A3B@refs/pr/1")
    assert not looks_like_hub_id("./local/dir")
    assert not looks_like_hub_id("just-a-name")
    assert split_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert split_hub_id("org/name") == ("org/name", None)


def _fake_hub_cache(repo: str, src, revision="main"):
    """Lay out huggingface_hub's cache for REPO holding the files of SRC."""
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / revision).write_text(sha)
    return snapshot


def test_hub_id_offline_uses_the_cache(tiny):
    _fake_hub_cache("acme/tiny-moe", tiny("qwen3_moe"))
    with open_checkpoint("acme/tiny-moe") as ckpt:
        assert ckpt.kind == "hub" and ckpt.config["model_type"] == "qwen3_moe"
        assert ckpt.tensors["model.layers.0.mlp.gate.weight"].load().shape == (4, 32)
    with pytest.raises(SourceNotFoundError, match="HF_HUB_OFFLINE"):
        open_checkpoint("acme/not-cached")


def test_hub_cache_snapshot_of_links_to_blobs(tiny, tmp_path):
    """As huggingface_hub lays out its cache: every file of a snapshot a symlink to ../../blobs/HASH.
    Those links leave the snapshot folder but not the repository's: they are read, and side files
    are copied into an output as files."""
    from moetool.checkpoint.writer import side_files
    from moetool.ops.convert import ConvertOptions, convert

    snapshot = _fake_hub_cache("acme/linked-moe", tiny("qwen3_moe"))
    (snapshot / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    blobs = snapshot.parents[1] / "blobs"
    blobs.mkdir()
    for n, file in enumerate(sorted(snapshot.iterdir())):
        file.rename(blobs / f"{n:040x}")
        file.symlink_to(f"../../blobs/{n:040x}")
    with open_checkpoint("acme/linked-moe") as ckpt:
        assert ckpt.kind == "hub" and ckpt.tensors["model.layers.0.mlp.gate.weight"].load().shape == (4, 32)
        assert "tokenizer_config.json" in [p.name for p in side_files(ckpt)]
        convert(ckpt, tmp_path / "out", ConvertOptions())
    copied = tmp_path / "out" / "tokenizer_config.json"
    assert not copied.is_symlink() and json.loads(copied.read_text()) == {"model_max_length": 64}


def _remote_metadata(src):
    """What HfApi.get_safetensors_metadata returns for a repo holding SRC/model.safetensors."""
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    raw = (src / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    infos = {k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
             for k, v in header.items()}
    return header, SafetensorsRepoMetadata(metadata=None, sharded=False,
                                           weight_map={k: "model.safetensors" for k in infos},
                                           files_metadata={"model.safetensors": SafetensorsFileMetadata(
                                               metadata={}, tensors=infos)})


def test_remote_headers_build_a_header_only_checkpoint(tiny):
    """get_safetensors_metadata's answer (here built from a real file) becomes TensorRefs."""
    src = tiny("mixtral")
    header, meta = _remote_metadata(src)
    config = json.loads((src / "config.json").read_text())
    ckpt = checkpoint_from_remote_metadata(meta, config, "acme/mixtral")
    assert ckpt.kind == "hub-headers" and set(ckpt.tensors) == set(header)
    with open_checkpoint(src) as local:
        for name, ref in ckpt.tensors.items():
            assert ref.shape == local.tensors[name].shape and ref.nbytes == local.tensors[name].nbytes
    from moetool.errors import UnsupportedError
    with pytest.raises(UnsupportedError):
        next(iter(ckpt.tensors.values())).load()
    twice = meta.files_metadata["model.safetensors"]   # a second shard holding the same tensors
    meta.files_metadata["model-2.safetensors"] = twice
    with pytest.raises(CheckpointFormatError, match="also stored in"):
        checkpoint_from_remote_metadata(meta, config, "acme/mixtral")


def fake_hub(monkeypatch, src, calls: list):
    """huggingface_hub's hf_hub_download and get_safetensors_metadata answering for a repository holding SRC's
    files (model.safetensors' header only), each call recorded in CALLS; online."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError  # (the hub raises its subclass RemoteEntryNotFoundError)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fake_download(repo, filename, revision=None, **kwargs):
        calls.append(("download", repo, filename, revision))
        assert filename.endswith(".json")
        if not (src / filename).is_file():
            raise EntryNotFoundError(f"404: {filename}")
        return str(src / filename)

    def fake_metadata(self, repo, revision=None, **kwargs):
        calls.append(("metadata", repo, revision))
        return _remote_metadata(src)[1]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", fake_metadata)


def test_hub_id_online_reads_only_headers(monkeypatch, tiny):
    """Online and not cached: config.json and the safetensors headers are fetched, no weights."""
    from moetool.ops.inspect import inspect_checkpoint

    src = tiny("qwen2_moe")
    calls = []
    fake_hub(monkeypatch, src, calls)
    with open_checkpoint("acme/remote-moe@v2", headers_only=True) as ckpt:
        report = inspect_checkpoint(ckpt)
    # (the files that may describe a quantization config.json does not: the repository has neither)
    assert calls == [("download", "acme/remote-moe", name, "v2")
                     for name in ("config.json", "quantize_config.json", "hf_quant_config.json")] + [
        ("metadata", "acme/remote-moe", "v2")]
    with open_checkpoint(src) as local:
        assert report.total_params == inspect_checkpoint(local).total_params
    assert report.kind == "hub-headers" and report.problems == []


def test_a_side_file_the_network_fails_on_is_an_error_not_absent(monkeypatch, tiny):
    """Fetching quantize_config.json fails (hf_hub_download's LocalEntryNotFoundError: a timeout, a 5xx): the
    open fails, naming the error, rather than reading the checkpoint as if it had no quantization."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    src = tiny("qwen2_moe")
    calls = []
    fake_hub(monkeypatch, src, calls)
    answer = huggingface_hub.hf_hub_download

    def failing(repo, filename, revision=None, **kwargs):
        if filename == "quantize_config.json":
            raise LocalEntryNotFoundError("connection timed out")
        return answer(repo, filename, revision=revision, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(SourceNotFoundError, match="LocalEntryNotFoundError: connection timed out"):
        open_checkpoint("acme/remote-moe", headers_only=True)


def test_partly_cached_hub_snapshot_is_completed_not_used(monkeypatch, tmp_path, tiny):
    """An index naming two shards, only the first cached: the snapshot is downloaded, not opened as is."""
    import huggingface_hub
    from huggingface_hub import constants

    src = tiny("qwen3_moe")
    tensors = _state_dict(src)
    names = sorted(tensors)
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(src / "config.json", full / "config.json")
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, full / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (full / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    snapshot = _fake_hub_cache("acme/partial-moe", full)
    (snapshot / "model-00002-of-00002.safetensors").unlink()

    # offline, the partial snapshot is not in the cache: no "names shard ... which does not exist"
    with pytest.raises(SourceNotFoundError, match="HF_HUB_OFFLINE"):
        open_checkpoint("acme/partial-moe")

    real = huggingface_hub.snapshot_download
    downloads = []

    def fake_snapshot_download(repo, revision=None, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo, revision=revision, local_files_only=True, **kwargs)
        downloads.append(repo)   # the network: fetch what is missing into the snapshot
        shutil.copy(full / "model-00002-of-00002.safetensors", snapshot)
        return str(snapshot)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with open_checkpoint("acme/partial-moe") as ckpt:
        assert downloads == ["acme/partial-moe"] and ckpt.kind == "hub"
        assert set(ckpt.tensors) == set(tensors)
        for name, ref in ckpt.tensors.items():
            assert torch.equal(ref.load(), tensors[name])
    # complete now: the cache is used, nothing downloaded
    with open_checkpoint("acme/partial-moe") as ckpt:
        assert downloads == ["acme/partial-moe"] and len(ckpt.tensors) == len(tensors)


def test_shard_planning_is_linear_in_the_tensor_count():
    """Upcycling to thousands of experts, or writing DeepSeek-V3's 90k tensors into one shard, plans in
    moments: the shard's running size is kept, not summed again per tensor (that took 391 s for 60k)."""
    import time

    from moetool.checkpoint.writer import OutputTensor, plan_shards

    tensors = [OutputTensor(f"t{i}", "F32", (3,), []) for i in range(200_000)]
    start = time.perf_counter()
    one = plan_shards(tensors, max_shard_size=10**12)
    assert time.perf_counter() - start < 10
    assert [s.file for s in one] == ["model.safetensors"] and len(one[0].tensors) == 200_000
    many = plan_shards(tensors[:10], max_shard_size=25)   # 12 bytes each: two per shard
    assert [len(s.tensors) for s in many] == [2] * 5 and many[-1].file == "model-00005-of-00005.safetensors"
    big = plan_shards([OutputTensor("big", "F32", (100,), []), *tensors[:1]], max_shard_size=25)
    assert [len(s.tensors) for s in big] == [1, 1]   # a tensor larger than the limit gets a shard of its own
