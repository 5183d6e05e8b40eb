"""`moetool inspect` on bad input: one `Error: ` line naming the file, a specific exit code, no
traceback, and the input left untouched.

Exit codes (moetool/errors.py): 3 source not found, 4 bad weights file or index, 5 bad config.json,
6 config disagrees with the tensors (or --strict and warnings). Every input is built by hand in
tmp_path (see badfiles.py) and moetool runs as a real subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.badfiles import (
    MIXTRAL_CONFIG,
    expert_tensors,
    layout,
    mixtral_shapes,
    snapshot,
    split_shapes,
    st_bytes,
    valid_st_bytes,
    write_checkpoint,
    write_config,
    write_index,
    write_sharded,
)

NORM = "model.norm.weight"
LAST = "model.layers.0.self_attn.o_proj.weight"     # last tensor in the data buffer
W1, W3 = (f"model.layers.0.block_sparse_moe.experts.0.{w}.weight" for w in ("w1", "w3"))
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


# ---------------------------------------------------------------- helpers

def start(cwd: Path, *args: str) -> subprocess.Popen:
    """Start `python -m moetool ARGS` in CWD (offline, without MOETOOL_DEBUG)."""
    env = {k: v for k, v in os.environ.items() if k != "MOETOOL_DEBUG"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "moetool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def moetool(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m moetool ARGS` in tmp_path and check that no file under it changed or appeared."""
    before = snapshot(tmp_path)
    result = finish(start(tmp_path, *args))
    assert snapshot(tmp_path) == before, "moetool changed, created or deleted files"
    return result


def inspect(tmp_path: Path, target: Path | str, *options: str) -> subprocess.CompletedProcess:
    return moetool(tmp_path, "inspect", str(target), *options)


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """One `Error: ` line (optionally one `Hint: ` line) naming NAMES, exit CODE, no traceback."""
    assert result.returncode == code, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert len(lines) <= 2 and all(line.startswith("Hint: ") for line in lines[1:]), result.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    if code != 6:   # only a checkpoint that was read has a report to print
        assert result.stdout == "", result.stdout
    return lines[0]


def corrupt_weights(tmp_path: Path, weights: bytes) -> Path:
    """A checkpoint folder with a good config.json and WEIGHTS as model.safetensors."""
    return write_checkpoint(tmp_path / "ckpt", weights=weights)


def valid_header() -> tuple[dict[str, Any], bytes]:
    return layout(mixtral_shapes())


def edit_entry(name: str, **changes: Any) -> Callable[[], bytes]:
    """A builder for the valid file with header entry NAME changed (a value of None deletes the key)."""
    def build() -> bytes:
        header, data = valid_header()
        for key, value in changes.items():
            if value is None:
                del header[name][key]
            else:
                header[name][key] = value
        return st_bytes(header, data)
    return build


def shift_offsets(name: str, delta_begin: int, delta_end: int) -> Callable[[], bytes]:
    def build() -> bytes:
        header, data = valid_header()
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta_begin, end + delta_end]
        return st_bytes(header, data)
    return build


def with_header(change: Callable[[dict[str, Any], bytes], Any]) -> Callable[[], bytes]:
    """A builder for the valid file after CHANGE(header, data); a non-None return replaces the header."""
    def build() -> bytes:
        header, data = valid_header()
        replaced = change(header, data)
        return st_bytes(header if replaced is None else replaced, data)
    return build


def _overlap(header: dict[str, Any], data: bytes) -> None:
    header[W3]["data_offsets"] = list(header[W1]["data_offsets"])


def _beyond_buffer(header: dict[str, Any], data: bytes) -> None:
    begin, end = header[LAST]["data_offsets"]
    header[LAST]["data_offsets"] = [begin + len(data), end + len(data)]


def _huge_length() -> bytes:
    header, data = valid_header()
    return st_bytes(header, data, length=2**64 - 1)


def _length_beyond_file() -> bytes:
    header, data = valid_header()
    body = json.dumps(header).encode()
    return st_bytes(header, data, length=len(body) + len(data) + 1000)


# ---------------------------------------------------------------- baseline

def test_valid_baseline_inspects_cleanly(tmp_path):
    """The hand-written baseline is valid for safetensors itself and for moetool: the corpus below breaks
    one thing at a time."""
    from safetensors.numpy import load_file

    folder = write_checkpoint(tmp_path / "ckpt")
    assert set(load_file(folder / "model.safetensors")) == set(mixtral_shapes())
    result = inspect(tmp_path, folder, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["family"] == "mixtral" and report["problems"] == []
    assert inspect(tmp_path, folder / "model.safetensors").returncode == 0


def test_valid_sharded_baseline_inspects_cleanly(tmp_path):
    folder = write_sharded(tmp_path / "ckpt", dict(zip(SHARDS, split_shapes(mixtral_shapes()))))
    result = inspect(tmp_path, folder)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- malformed safetensors files -> 4

CORRUPT_SAFETENSORS: dict[str, Callable[[], bytes]] = {
    "truncated_data": lambda: valid_st_bytes()[:-16],
    "header_length_beyond_file": _length_beyond_file,
    "header_length_2**64-1": _huge_length,
    "shorter_than_8_bytes": lambda: b"\x10\x00\x00",
    "empty_file": lambda: b"",
    "header_not_json": lambda: st_bytes(None, raw_header=b'{"model.norm.weight": {"dtype": '),
    "header_not_utf8": lambda: st_bytes(None, raw_header=b'{"\xff\xfe": 1}'),
    "header_is_list": with_header(lambda header, data: list(header.items())),
    "metadata_not_object": with_header(lambda header, data: header.update(__metadata__=["x"])),
    "entry_not_object": with_header(lambda header, data: header.update({NORM: "F32"})),
    "missing_data_offsets": edit_entry(NORM, data_offsets=None),
    "missing_dtype": edit_entry(NORM, dtype=None),
    "data_offsets_strings": edit_entry(NORM, data_offsets=["0", "32"]),
    "data_offsets_floats": with_header(
        lambda header, data: header[LAST].update(data_offsets=[float(o) for o in header[LAST]["data_offsets"]])),
    "overlapping_tensors": with_header(_overlap),
    "end_beyond_buffer": with_header(_beyond_buffer),
    "end_before_begin": with_header(
        lambda header, data: header[NORM].update(data_offsets=header[NORM]["data_offsets"][::-1])),
    "negative_offset": edit_entry(NORM, data_offsets=[-4, 28]),          # span still 32 bytes
    "span_shorter_than_shape": shift_offsets(LAST, 0, -4),
    "unknown_dtype": edit_entry(NORM, dtype="F7"),
    "dtype_not_string": edit_entry(NORM, dtype=["F32"]),
    "negative_shape": edit_entry(W1, shape=[-4, -8]),       # product 32 matches the span
    "float_shape": edit_entry(W1, shape=[4.0, 8]),
    "bool_shape": edit_entry(NORM, shape=[8, True]),       # True == 1 would match the span
    "header_nested_deeply": lambda: st_bytes(None, raw_header=b"[" * 200_000 + b"]" * 200_000),
    # no bytes, but a dimension no reader can hold (convert wrote it into an unreadable output)
    "dim_beyond_64_bits": with_header(lambda header, data: header.update(
        {"model.extra.weight": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [len(data)] * 2}})),
    "element_count_beyond_64_bits": with_header(lambda header, data: header.update(
        {"model.extra.weight": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [len(data)] * 2}})),
}


@pytest.mark.parametrize("case", CORRUPT_SAFETENSORS)
def test_malformed_safetensors_in_folder(tmp_path, case):
    folder = corrupt_weights(tmp_path, CORRUPT_SAFETENSORS[case]())
    assert_clean_error(inspect(tmp_path, folder), 4, str(folder / "model.safetensors"))


@pytest.mark.parametrize("case", ["truncated_data", "header_is_list"])
def test_malformed_safetensors_given_directly(tmp_path, case):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(CORRUPT_SAFETENSORS[case]())
    assert_clean_error(inspect(tmp_path, path), 4, "weights.safetensors")


def _one_f32(data_offsets=(0, 4)) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [1], "data_offsets": list(data_offsets)}


# Files that safetensors' own loader rejects; moetool must reject them too.
LAXER_THAN_SAFETENSORS: dict[str, Callable[[], bytes]] = {
    "hole_between_tensors": lambda: st_bytes({"a": _one_f32(), "b": _one_f32((8, 12))}, bytes(12)),
    "trailing_bytes_after_last_tensor": lambda: st_bytes({"a": _one_f32()}, bytes(12)),
    "duplicate_tensor_name_in_header": lambda: st_bytes(None, bytes(8), raw_header=json.dumps(
        {"a": _one_f32()})[:-1].encode() + b', "a": ' + json.dumps(_one_f32((4, 8))).encode() + b"}"),
    "metadata_value_not_string": lambda: st_bytes({"__metadata__": {"format": 1}, "a": _one_f32()}, bytes(4)),
    "dim_beyond_64_bits": lambda: st_bytes({"a": _one_f32(), "z": {"dtype": "F32", "shape": [0, 2**64],
                                                                   "data_offsets": [4, 4]}}, bytes(4)),
    "element_count_beyond_64_bits": lambda: st_bytes({"a": _one_f32(), "z": {
        "dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [4, 4]}}, bytes(4)),
}


def test_shapes_safetensors_reads_are_read(tmp_path):
    """The 64-bit limits are safetensors' own: a shape whose element count stays within 64 bits at every
    step (here with a zero) is read by both."""
    from safetensors import safe_open

    from moetool.checkpoint.header import read_header

    path = tmp_path / "weights.safetensors"
    for shape in ([0, 2**64 - 1], [2**62, 0, 2**62], [2**32, 2**32 - 1, 0]):
        path.write_bytes(st_bytes({"a": _one_f32(), "z": {"dtype": "F32", "shape": shape, "data_offsets": [4, 4]}},
                                  bytes(4)))
        assert read_header(path)[0][1][2] == tuple(shape)
        with safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == ["a", "z"]


@pytest.mark.parametrize("case", LAXER_THAN_SAFETENSORS)
def test_safetensors_rejects_the_lax_cases(tmp_path, case):
    from safetensors import SafetensorError, safe_open

    path = tmp_path / "weights.safetensors"
    path.write_bytes(LAXER_THAN_SAFETENSORS[case]())
    with pytest.raises(SafetensorError), safe_open(str(path), framework="numpy"):
        pass


@pytest.mark.parametrize("case", LAXER_THAN_SAFETENSORS)
def test_files_safetensors_rejects_are_rejected(tmp_path, case):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(LAXER_THAN_SAFETENSORS[case]())
    assert_clean_error(inspect(tmp_path, path), 4, "weights.safetensors")


# ---------------------------------------------------------------- bad index files -> 4

def _sharded(tmp_path: Path, edit: Callable[[dict[str, Any]], Any] | None = None, *,
             shards: dict[str, dict[str, list[int]]] | None = None) -> Path:
    """Two good shards and a good index, then EDIT(weight_map)."""
    shards = shards or dict(zip(SHARDS, split_shapes(mixtral_shapes())))
    folder = write_sharded(tmp_path / "ckpt", shards)
    if edit is not None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        edit(index["weight_map"])
        write_index(folder, index)
    return folder


def _norm_outside(tmp_path: Path, name: Callable[[Path], str]) -> tuple[Path, str]:
    """model.norm.weight stored only in a valid file outside the folder, which the index points to: had
    moetool followed the path, the checkpoint would be complete and consistent."""
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(valid_st_bytes({NORM: [8]}))
    inside = {k: v for k, v in mixtral_shapes().items() if k != NORM}
    folder = _sharded(tmp_path, lambda wm: wm.update({NORM: name(outside)}),
                      shards=dict(zip(SHARDS, split_shapes(inside))))
    folder_index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert folder_index["weight_map"][NORM] == name(outside)
    return folder, name(outside)


def _index_missing_shard(tmp_path):
    return _sharded(tmp_path, lambda wm: wm.update({NORM: "model-00003-of-00003.safetensors"})), \
        "model-00003-of-00003.safetensors"


def _index_wrong_shard(tmp_path):
    def move(wm):
        wm[NORM] = SHARDS[0] if wm[NORM] == SHARDS[1] else SHARDS[1]
    return _sharded(tmp_path, move), NORM


def _index_phantom_tensor(tmp_path):
    return _sharded(tmp_path, lambda wm: wm.update({"model.layers.0.phantom.weight": SHARDS[0]})), \
        "model.layers.0.phantom.weight"


def _index_replace(raw: bytes | None = None, index: Any = None):
    def build(tmp_path):
        folder = _sharded(tmp_path)
        write_index(folder, index, raw=raw)
        return folder, "model.safetensors.index.json"
    return build


def _index_shard_name(value: Any):
    def build(tmp_path):
        return _sharded(tmp_path, lambda wm: wm.update({NORM: value})), "model.safetensors.index.json"
    return build


def _same_tensor_in_two_shards(tmp_path):
    first, second = ({**part, NORM: [8]} for part in split_shapes(mixtral_shapes()))
    return _sharded(tmp_path, shards=dict(zip(SHARDS, (first, second)))), NORM


BAD_INDEX: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "names_missing_shard": _index_missing_shard,
    "shard_outside_folder_relative": lambda tmp_path: _norm_outside(tmp_path, lambda p: "../outside.safetensors"),
    "shard_outside_folder_absolute": lambda tmp_path: _norm_outside(tmp_path, str),
    "not_json": _index_replace(raw=b'{"weight_map": {'),
    "lacks_weight_map": _index_replace(index={"metadata": {"total_size": 0}}),
    "is_a_list": _index_replace(index=[SHARDS[0]]),
    "shard_name_is_a_number": _index_shard_name(3),
    "shard_name_is_a_list": _index_shard_name([SHARDS[0]]),
    "tensor_listed_in_wrong_shard": _index_wrong_shard,
    "tensor_listed_but_stored_nowhere": _index_phantom_tensor,
    "same_tensor_in_two_shards": _same_tensor_in_two_shards,
    "nested_deeply": _index_replace(raw=b'{"weight_map": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
}



@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_bad_index(tmp_path, case):
    folder, named = BAD_INDEX[case](tmp_path)
    assert_clean_error(inspect(tmp_path, folder), 4, named)


def test_same_tensor_in_two_unindexed_shards(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", file_name=SHARDS[0])
    (folder / SHARDS[1]).write_bytes(valid_st_bytes({NORM: [8]}))
    assert_clean_error(inspect(tmp_path, folder), 4, NORM, SHARDS[0])


@pytest.mark.parametrize("linked", ["model.safetensors", "config.json"])
def test_weights_and_config_linked_elsewhere_are_read(tmp_path, linked):
    """A shard (or config.json) that is a symlink to a file elsewhere is read where it leads: shared
    storage, `--local-dir` downloads and hub caches link their files, and reading leaks nothing (only
    side files copied into an output are refused when they lead out: test_convert_safety)."""
    folder = write_checkpoint(tmp_path / "ckpt")
    want = json.loads(inspect(tmp_path, folder, "--json").stdout)["total_params"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / linked).rename(elsewhere / linked)
    (folder / linked).symlink_to(f"../elsewhere/{linked}")
    result = inspect(tmp_path, folder, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_params"] == want


def test_a_symlink_loop_among_the_shards_is_one_line(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "model-00001-of-00001.safetensors").symlink_to("model-00001-of-00001.safetensors")
    assert_clean_error(inspect(tmp_path, folder), 4, "model-00001-of-00001.safetensors")


@pytest.mark.parametrize("indexed", [False, True], ids=["no_index", "index"])
def test_hub_cache_symlinked_shard(tmp_path, indexed):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot_dir = tmp_path / "snapshots" / "abc123"
    write_config(snapshot_dir)
    (blobs / "f00d").write_bytes(valid_st_bytes())
    (snapshot_dir / "model.safetensors").symlink_to("../../blobs/f00d")
    if indexed:
        write_index(snapshot_dir, {"weight_map": dict.fromkeys(mixtral_shapes(), "model.safetensors")})
    result = inspect(tmp_path, snapshot_dir)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- config.json missing or broken -> 5

def _config(**changes: Any) -> dict[str, Any]:
    config = dict(MIXTRAL_CONFIG, **changes)
    return {k: v for k, v in config.items() if v is not None}


BAD_CONFIG: dict[str, bytes | None] = {
    "missing": None,
    "not_json": b'{"model_type": "mixtral",',
    "not_utf8": b'{"model_type": "\xff"}',
    "is_a_list": json.dumps([MIXTRAL_CONFIG]).encode(),
    "lacks_num_local_experts": json.dumps(_config(num_local_experts=None)).encode(),
    "num_hidden_layers_is_a_string": json.dumps(_config(num_hidden_layers="1")).encode(),
    "num_hidden_layers_is_negative": json.dumps(_config(num_hidden_layers=-1)).encode(),
    "intermediate_size_is_a_float": json.dumps(_config(intermediate_size=4.0)).encode(),
    "num_experts_per_tok_is_a_string": json.dumps(_config(num_experts_per_tok="1")).encode(),
    "vocab_size_is_a_string": json.dumps(_config(vocab_size="16")).encode(),
    # bounds that keep a hostile config from hanging inspect
    "ten_million_layers": json.dumps(_config(num_hidden_layers=10**7)).encode(),
    "hundred_million_experts": json.dumps(_config(num_local_experts=10**8)).encode(),
    "nested_deeply": b'{"model_type": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
}



@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config(tmp_path, case):
    folder = write_checkpoint(tmp_path / "ckpt")
    raw = BAD_CONFIG[case]
    if raw is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_bytes(raw)
    assert_clean_error(inspect(tmp_path, folder), 5, "config.json")


def test_config_json_is_a_directory(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "config.json").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(valid_st_bytes())
    assert_clean_error(inspect(tmp_path, folder), 5, "config.json")


def test_huge_but_allowed_expert_count_is_fast(tmp_path):
    """500,000 experts in the config, 2 stored: work follows the tensors, not the config."""
    folder = write_checkpoint(tmp_path / "ckpt", config=_config(num_local_experts=500_000))
    start = time.perf_counter()
    line = assert_clean_error(inspect(tmp_path, folder), 6, "ckpt")
    assert time.perf_counter() - start < 10 and "expert" in line


# ---------------------------------------------------------------- config disagrees with tensors -> 6

def _shapes_without(name: str) -> dict[str, list[int]]:
    return {k: v for k, v in mixtral_shapes().items() if k != name}


DISAGREEMENTS: dict[str, tuple[dict[str, Any], dict[str, list[int]]]] = {
    "config_4_experts_2_stored": (_config(num_local_experts=4), mixtral_shapes()),
    "hidden_size_16_tensors_8": (_config(hidden_size=16), mixtral_shapes()),
    "expert_tensor_missing": (MIXTRAL_CONFIG, _shapes_without(
        "model.layers.0.block_sparse_moe.experts.1.w2.weight")),
    "extra_expert_5_stored": (MIXTRAL_CONFIG, {**mixtral_shapes(), **expert_tensors(0, 5)}),
}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_config_disagrees_with_tensors(tmp_path, case):
    config, shapes = DISAGREEMENTS[case]
    folder = write_checkpoint(tmp_path / "ckpt", config=config, shapes=shapes)
    assert_clean_error(inspect(tmp_path, folder), 6, str(folder))


def test_json_report_still_printed_on_disagreement(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", config=_config(num_local_experts=4))
    result = inspect(tmp_path, folder, "--json")
    assert_clean_error(result, 6, str(folder))
    report = json.loads(result.stdout)
    assert any(p["severity"] == "error" for p in report["problems"]), report["problems"]


def test_strict_turns_warnings_into_failure(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", config=_config(model_type="mystery_moe"))
    plain = inspect(tmp_path, folder, "--json")
    assert plain.returncode == 0, plain.stderr
    problems = json.loads(plain.stdout)["problems"]
    assert {p["code"] for p in problems} == {"guessed_architecture"}
    assert all(p["severity"] == "warning" for p in problems)
    assert_clean_error(inspect(tmp_path, folder, "--strict"), 6, str(folder), "guessed_architecture")


# ---------------------------------------------------------------- source not found -> 3

@pytest.mark.parametrize("spec", ["./nope/x.safetensors", "nope/x.safetensors", "/nonexistent-moetool/ckpt"])
def test_source_not_found(tmp_path, spec):
    line = assert_clean_error(inspect(tmp_path, spec), 3, spec)
    assert "no such file" in line   # a weights-file name is never taken for a hub id


def test_uncached_hub_id_offline(tmp_path):
    line = assert_clean_error(inspect(tmp_path, "acme/never-downloaded"), 3, "acme/never-downloaded")
    assert "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------- .bin files -> 4, never executed

class _RunsCode:
    """Unpickling this runs `touch SENTINEL` (when code execution is allowed)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


def _bin_random(tmp_path: Path) -> bytes:
    return bytes((i * 151 + 7) % 256 for i in range(512))


def _bin_raw_pickle(tmp_path: Path) -> bytes:
    return pickle.dumps({"model.norm.weight": _RunsCode(tmp_path / "SENTINEL")}, protocol=2)


def _bin_zip_pickle(tmp_path: Path) -> bytes:
    """The torch.save zip layout (archive/data.pkl, byteorder, version), written with zipfile, so the
    payload reaches torch's unpickler rather than failing on the container."""
    path = tmp_path / "payload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", _bin_raw_pickle(tmp_path))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    data = path.read_bytes()
    path.unlink()
    return data


def _bin_non_string_key(tmp_path: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({1: torch.zeros(2)}, buffer)
    return buffer.getvalue()


BAD_BIN = {"random_bytes": _bin_random, "pickle_running_code": _bin_raw_pickle,
           "torch_zip_pickle_running_code": _bin_zip_pickle, "state_dict_with_non_string_key": _bin_non_string_key}


def test_code_running_pickle_is_live(tmp_path):
    """The payload really runs code when unpickled unsafely, so the .bin tests below prove something."""
    pickle.loads(_bin_raw_pickle(tmp_path))
    assert (tmp_path / "SENTINEL").exists()


@pytest.fixture(scope="module")
def bin_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess, bool]]:
    """Every .bin case, run side by side (each moetool process imports torch, ~1.5 s):
    case -> (its folder, the result, whether any file under its tmp dir changed)."""
    started = {}
    for case, build in BAD_BIN.items():
        root = tmp_path_factory.mktemp(case)
        folder = root / "ckpt"
        write_config(folder)
        (folder / "pytorch_model.bin").write_bytes(build(root))
        started[case] = (root, folder, snapshot(root), start(root, "inspect", str(folder)))
    return {case: (folder, finish(proc), snapshot(root) != before)
            for case, (root, folder, before, proc) in started.items()}


@pytest.mark.parametrize("case", list(BAD_BIN))
def test_bad_bin(bin_runs, case):
    folder, result, changed = bin_runs[case]
    assert_clean_error(result, 4, str(folder / "pytorch_model.bin"))
    assert not changed, "moetool changed, created or deleted files (SENTINEL: the pickle ran code)"
    assert not (folder.parent / "SENTINEL").exists()


# ---------------------------------------------------------------- --debug

def test_debug_shows_traceback(tmp_path):
    folder = corrupt_weights(tmp_path, CORRUPT_SAFETENSORS["truncated_data"]())
    result = moetool(tmp_path, "--debug", "inspect", str(folder))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "CheckpointFormatError" in result.stderr


# ---------------------------------------------------------------- convert refuses what inspect refuses

CONVERT_CASES = ["truncated_data", "overlapping_tensors", "header_not_json", "unknown_dtype"]


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_refuses_malformed_safetensors(tmp_path, case):
    folder = corrupt_weights(tmp_path, CORRUPT_SAFETENSORS[case]())
    result = moetool(tmp_path, "convert", str(folder), str(tmp_path / "out"))
    assert_clean_error(result, 4, str(folder / "model.safetensors"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["shard_outside_folder_relative", "names_missing_shard"])
def test_convert_refuses_bad_index(tmp_path, case):
    folder, named = BAD_INDEX[case](tmp_path)
    result = moetool(tmp_path, "convert", str(folder), str(tmp_path / "out"))
    assert_clean_error(result, 4, named)


def test_convert_refuses_missing_config(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    assert_clean_error(moetool(tmp_path, "convert", str(folder), str(tmp_path / "out")), 5, "config.json")
