"""inspect of GGUF files written from the tiny transformers models (tests/gguf_fixtures.py).

Oracle: the same model saved with save_pretrained and inspected as safetensors, and
transformers' own parameter count; for bytes, gguf-py's block sizes and the file itself.
"""

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest

from moetool.checkpoint import open_checkpoint
from moetool.checkpoint.gguf import GGML_TYPES, MAX_DECODED_ARRAY, GgufArray, ggml_type, read_header
from moetool.errors import CheckpointFormatError
from moetool.ops.inspect import inspect_checkpoint
from tests.gguf_fixtures import (
    EXPECTED_FAMILY,
    FAMILY_ARCH,
    build,
    gguf_metadata,
    gguf_tensors,
    patch,
    tensor_info_offsets,
    write_family,
    write_gguf,
)
from tests.tiny import param_count

gguf = pytest.importorskip("gguf")

# fields of the report that must not depend on the format the model is stored in
SAME = ("moe_layers", "dense_layers", "num_layers", "hidden_size", "vocab_size", "num_experts", "top_k",
        "expert_ffn", "num_shared_experts", "shared_ffn", "tied_embeddings", "params", "total_params",
        "active_params", "active_params_with_embedding", "active_params_without_embeddings", "mtp_params",
        "buffer_params")


@pytest.fixture(scope="module")
def models():
    made = {}

    def get(family):
        if family not in made:
            made[family] = build(family)
        return made[family]
    return get


@pytest.fixture(scope="module")
def gguf_file(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(family, qtype="F32"):
        key = (family, qtype)
        if key not in made:
            made[key] = write_family(family, root / f"{family}-{qtype}.gguf", qtype=qtype, model=models(family))[0]
        return made[key]
    return get


def inspect(path):
    with open_checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "MOETOOL_DEBUG"} | {"COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "moetool", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_one_line_error(proc, code, *names):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- structure and counts

@pytest.mark.parametrize("family", sorted(FAMILY_ARCH))
def test_family_matches_safetensors(family, models, gguf_file, tmp_path):
    model = models(family)
    model.save_pretrained(tmp_path / "st")
    st = inspect(tmp_path / "st")
    report = inspect(gguf_file(family))
    assert report.kind == "gguf" and report.family == EXPECTED_FAMILY[family] and not report.guessed
    assert report.problems == [], report.problems
    assert report.total_params == param_count(model)
    for name in SAME:
        assert getattr(report, name) == getattr(st, name), name
    assert [(i.kind, i.experts, i.top_k, i.params, i.active_params) for i in report.layers] == \
        [(i.kind, i.experts, i.top_k, i.params, i.active_params) for i in st.layers]
    assert report.layout == "fused"
    assert report.router["score"] and report.router["top_k"] == st.top_k
    assert report.active_params_without_embeddings == report.active_params - report.params["lm_head"] - \
        (report.params["embedding"] if report.tied_embeddings else 0)


def test_router_semantics_from_metadata(gguf_file):
    v3 = inspect(gguf_file("deepseek_v3"))
    assert v3.family == "deepseek_v3" and v3.router["score"] == "sigmoid" and v3.router["correction_bias"]
    assert v3.router["group_limited"] == {"n_group": 2, "topk_group": 1}
    assert v3.router["scaling_factor"] == 2.5   # DeepseekV3Config default routed_scaling_factor
    assert v3.buffer_params == 2 * 4   # exp_probs_b is a buffer in transformers: not a parameter
    v2 = inspect(gguf_file("deepseek_v2"))
    assert v2.family == "deepseek_v2" and v2.router["score"] == "softmax"
    assert inspect(gguf_file("qwen3_moe")).router["renormalize"] is True   # llama.cpp's qwen3moe graph
    assert inspect(gguf_file("gpt_oss")).router["score"] == "softmax over top-k logits"


# llama.cpp architecture, the config's MoE layers, the scaling factor the GGUF states (LFM2-MoE's file has
# no expert_weights_scale: llama.cpp scales by nothing, as routed_scaling_factor's default 1.0 does)
NEWER = {"qwen3_5_moe_text": ("qwen35moe", lambda c: list(range(c.num_hidden_layers)), None),
         "lfm2_moe": ("lfm2moe", lambda c: list(range(c.num_dense_layers, c.num_hidden_layers)), None),
         "exaone_moe": ("exaone-moe", lambda c: [i for i, t in enumerate(c.mlp_layer_types) if t == "sparse"], 2.5),
         "afmoe": ("afmoe", lambda c: list(range(c.num_dense_layers, c.num_hidden_layers)), 2.0)}


@pytest.mark.parametrize("family", sorted(NEWER))
def test_newer_architectures_against_the_config(family, models, gguf_file, tmp_path):
    """Qwen3.5-MoE, LFM2-MoE, EXAONE-MoE and AFMoE: counts, experts, top-k, MoE layers and the router
    from the transformers model and config the file was written from."""
    model = models(family)
    c = model.config
    arch, moe_layers, scale = NEWER[family]
    report = inspect(gguf_file(family))
    assert report.model_type == arch and report.family == EXPECTED_FAMILY[family] and report.problems == []
    assert report.total_params == param_count(model)
    assert report.num_experts == c.num_experts and report.top_k == c.num_experts_per_tok
    assert report.moe_layers == moe_layers(c)
    assert report.dense_layers == [i for i in range(c.num_hidden_layers) if i not in report.moe_layers]
    model.save_pretrained(tmp_path / "st")
    st = inspect(tmp_path / "st")
    assert report.active_params == st.active_params and report.params == st.params
    want = dict(st.router, scaling_factor=scale)
    assert report.router == want
    assert report.router["score"] == ("softmax" if family == "qwen3_5_moe_text" else "sigmoid")
    assert report.router["renormalize"] is True and report.router["correction_bias"] == (family != "qwen3_5_moe_text")


def test_dense_layer_found_from_tensors(gguf_file):
    """Qwen2-MoE's metadata cannot say which layers are dense: the tensors do."""
    report = inspect(gguf_file("qwen2_moe"))
    assert report.moe_layers == [0, 2] and report.dense_layers == [1]
    assert report.layers[1].kind == "dense" and report.dense_ffn == 24


# ---------------------------------------------------------------- ggml types and bytes

def _expected_bytes(path):
    reader = gguf.GGUFReader(path)
    by_type = {}
    for t in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements) // block * size
    return by_type, reader


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_quantized_types_count_logical_values(qtype, gguf_file, models):
    path = gguf_file("qwen3_moe", qtype)
    report = inspect(path)
    reference = inspect(gguf_file("qwen3_moe"))
    assert report.problems == []
    for name in SAME:
        assert getattr(report, name) == getattr(reference, name), name
    by_type, reader = _expected_bytes(path)
    assert report.disk["bytes_by_dtype"] == by_type
    assert qtype in by_type and report.disk["tensor_bytes"] == sum(by_type.values())
    # the data section holds exactly these bytes plus alignment padding
    padding = os.path.getsize(path) - reader.data_offset - sum(by_type.values())
    assert 0 <= padding < 32 * len(reader.tensors)
    if qtype != "F16":
        assert f"ggml {qtype}" in report.quantization


def test_load_dequantizes_q8_0(gguf_file, models):
    import numpy as np

    tensors = dict(gguf_tensors("qwen3_moe", models("qwen3_moe")))
    with open_checkpoint(gguf_file("qwen3_moe", "Q8_0")) as ckpt:
        ref = ckpt.tensors["blk.0.ffn_gate_exps.weight"]
        assert ref.dtype == "Q8_0" and ref.shape == (4, 16, 32)
        assert ref.nbytes == 4 * 16 * 32 // 32 * 34
        value = ref.load()
    assert isinstance(value, np.ndarray) and value.shape == (4, 16, 32)
    original = tensors["blk.0.ffn_gate_exps.weight"]
    assert np.abs(value - original).max() <= np.abs(original).max() / 100


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_byte_sizes(qtype, tmp_path):
    model = build("qwen3_moe", hidden_size=256)   # rows of 256 values: whole K-quant blocks
    path = write_family("qwen3_moe", tmp_path / "k.gguf", qtype=qtype, model=model)[0]
    report = inspect(path)
    assert report.problems == [] and report.total_params == param_count(model)
    by_type, _ = _expected_bytes(path)
    assert report.disk["bytes_by_dtype"] == by_type
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    with open_checkpoint(path) as ckpt:
        ref = ckpt.tensors["blk.0.ffn_gate_exps.weight"]   # [E, I, H] = [4, 16, 256]
        assert ref.dtype == qtype and ref.numel == 4 * 16 * 256
        assert ref.end - ref.start == 4 * 16 * 256 // block * size
        assert ckpt.tensors["blk.0.ffn_down_exps.weight"].dtype == "F16"   # rows of 16 values


# ---------------------------------------------------------------- split sets

@pytest.fixture(scope="module")
def split_set(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    parts = write_family("qwen3_moe", root / "model.gguf", split_max_tensors=12, model=models("qwen3_moe"))
    return parts


def test_split_set_any_part_or_folder(split_set, gguf_file):
    assert len(split_set) == 3 and split_set[0].name == "model-00001-of-00003.gguf"
    single = inspect(gguf_file("qwen3_moe"))
    for source in (split_set[0], split_set[2], split_set[0].parent):
        report = inspect(source)
        assert report.problems == []
        assert report.disk["shards"] == 3 and report.disk["files"] == [p.name for p in split_set]
        for name in SAME:
            assert getattr(report, name) == getattr(single, name), name
        assert report.tensor_count == single.tensor_count


def test_split_part_missing(split_set, tmp_path):
    for p in split_set:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / split_set[1].name).unlink()
    assert_one_line_error(run("inspect", tmp_path / split_set[0].name), 4, split_set[1].name)


@pytest.mark.parametrize("family, per_part", [("qwen3_moe", 8), ("mixtral", 8)],
                         ids=["same-model-other-split", "other-model"])
def test_split_part_from_another_set(split_set, models, tmp_path, family, per_part):
    """A part of another split set named as part 2 of this one: another part count, or another
    tensor count. (Parts of two models with the very same tensor names and count cannot be told
    apart without reading values: gguf-split writes no set identifier.)"""
    for p in split_set:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "other").mkdir()
    other = write_family(family, tmp_path / "other" / "model.gguf", split_max_tensors=per_part, model=models(family))
    assert len(other) >= 3
    shutil.copy(other[1], tmp_path / split_set[1].name)
    line = assert_one_line_error(run("inspect", tmp_path / split_set[0].name), 4)
    assert "split set" in line


def test_folder_with_two_models_is_refused(gguf_file, tmp_path):
    shutil.copy(gguf_file("qwen3_moe"), tmp_path / "a.gguf")
    shutil.copy(gguf_file("olmoe"), tmp_path / "b.gguf")
    assert_one_line_error(run("inspect", tmp_path), 2, "a.gguf", "b.gguf")


# ---------------------------------------------------------------- the header parser against gguf-py's reader

def reader_value(field):
    """What open_gguf made of a gguf-py GGUFReader field when it read headers with it (the oracle)."""
    kind = field.types[0].name
    if kind == "STRING":
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind != "ARRAY":
        value = field.parts[field.data[0]][0].item()
        return bool(value) if kind == "BOOL" else value
    item = field.types[1].name if len(field.types) > 1 else "UNKNOWN"
    if len(field.data) > MAX_DECODED_ARRAY or item in ("ARRAY", "UNKNOWN"):
        return GgufArray(item, len(field.data))
    if item == "STRING":
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


def assert_header_matches_reader(path):
    header, reader = read_header(path), gguf.GGUFReader(path)
    want = {k: reader_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert repr(header.metadata) == repr(want)   # repr: 1, 1.0 and True differ
    assert header.alignment == reader.alignment and header.data_start == reader.data_offset
    assert [(t.name, t.dims, t.type_name, t.start, t.nbytes) for t in header.tensors] == \
        [(t.name, tuple(t.shape.tolist()), t.tensor_type.name, t.data_offset, t.n_bytes) for t in reader.tensors]
    return header


@pytest.mark.parametrize("family, qtype", [("qwen3_moe", "F32"), ("qwen3_moe", "Q8_0"), ("deepseek_v3", "F32"),
                                           ("gpt_oss", "Q4_0"), ("llama4_text", "F16")])
def test_header_matches_gguf_py(gguf_file, family, qtype):
    assert_header_matches_reader(gguf_file(family, qtype))


def test_header_of_split_parts_and_k_quants(split_set, tmp_path):
    for part in split_set:
        assert_header_matches_reader(part)
    path = write_family("qwen3_moe", tmp_path / "k.gguf", qtype="Q4_K", model=build("qwen3_moe", hidden_size=256))[0]
    assert "Q4_K" in {t.type_name for t in assert_header_matches_reader(path).tensors}


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_every_value_type_and_both_byte_orders(tmp_path, endian):
    import numpy as np

    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(path, "testarch", endianess=gguf.GGUFEndian[endian])
    for method, key, value in (("uint8", "u8", 200), ("int8", "i8", -5), ("uint16", "u16", 60000),
                               ("int16", "i16", -300), ("uint32", "u32", 4000000000), ("int32", "i32", -7),
                               ("float32", "f32", 1e-6), ("bool", "b", True), ("uint64", "u64", 2**63),
                               ("int64", "i64", -2**40), ("float64", "f64", 0.1), ("string", "s", "h\u00e9llo")):
        getattr(writer, f"add_{method}")(f"t.{key}", value)
    for key, value in (("strs", ["x", "yz", ""]), ("ints", [1, 2, 3]), ("floats", [0.5, 1.5]), ("bools", [True, False]),
                       ("long", list(range(MAX_DECODED_ARRAY + 1))), ("tokens", [f"t{i}" for i in range(1500)]),
                       ("nested", [[1, 2], [3], ["a", "b", "c"]])):
        writer.add_array(f"t.{key}", value)
    writer.add_custom_alignment(64)
    writer.add_tensor("w", np.ones((3, 32), dtype=np.float32))
    writer.add_tensor("v", np.ones(5, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = assert_header_matches_reader(path)
    assert header.byte_order == ("<" if endian == "LITTLE" else ">") and header.alignment == 64
    meta = header.metadata
    assert meta["t.tokens"] == GgufArray("STRING", 1500) and meta["t.nested"] == GgufArray("ARRAY", 6)
    assert meta["t.bools"] == [True, False] and meta["t.s"] == "h\u00e9llo"
    with open_checkpoint(path) as ckpt:
        assert ckpt.tensors["w"].shape == (3, 32) and ckpt.tensors["v"].start % 64 == 0


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_tensor_values_in_both_byte_orders_match_gguf_py(tmp_path, endian):
    import numpy as np

    from moetool.errors import UnsupportedError

    path = tmp_path / "values.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "testarch", endianess=gguf.GGUFEndian[endian])
    arrays = {"f32": rng.standard_normal((3, 32)).astype(np.float32),
              "f16": rng.standard_normal((2, 4, 32)).astype(np.float16),
              "f64": rng.standard_normal(32), "i32": rng.integers(-2**31, 2**31, (2, 32), dtype=np.int32),
              "i16": rng.integers(-2**15, 2**15, 32, dtype=np.int16), "i8": np.arange(-16, 16, dtype=np.int8)}
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    q8 = gguf.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    oracle = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with open_checkpoint(path) as ckpt:
        for name, array in arrays.items():
            value = ckpt.tensors[name].load()
            assert value.dtype == array.dtype and value.dtype.isnative and value.shape == array.shape
            assert np.array_equal(value, oracle[name].data) and np.array_equal(value, array)
            rows = ckpt.tensors[name].rows   # the last row alone, read at its offset
            assert np.array_equal(ckpt.tensors[name].read_rows(rows - 1, rows), value.reshape(rows, -1)[-1:])
        q8_ref = ckpt.tensors["q8"]
        if endian == "LITTLE":
            want = gguf.dequantize(oracle["q8"].data, gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(q8_ref.load(), want)
        else:   # which fields of a quantized block are swapped is not defined: refused, not guessed
            with pytest.raises(UnsupportedError, match="Q8_0 in a big-endian GGUF file"):
                q8_ref.load()


def test_ggml_types_are_gguf_pys():
    for qtype in gguf.GGMLQuantizationType:
        want = (qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
        assert ggml_type(qtype.value) == want   # ids newer than the table come from gguf-py
        assert GGML_TYPES.get(qtype.value, want) == want
    assert ggml_type(250) is None


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def raw_gguf(path, kvs: list[bytes], tensors: list[bytes] = (), data: bytes = b""):
    """A GGUF file from raw key/value pairs and tensor infos (see kv and tensor_info)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    path.write_bytes(head + bytes(-len(head) % 32) + data)
    return path


def kv(key: bytes, kind: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + payload


def tensor_info(name: bytes, dims: tuple[int, ...], kind: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)


ARCH = kv(b"general.architecture", 8, _string(b"testarch"))


def test_empty_array_as_gguf_py_reads_it(tmp_path):
    path = raw_gguf(tmp_path / "e.gguf", [ARCH, kv(b"t.empty", 9, struct.pack("<IQ", 8, 0)),
                                          kv(b"t.empty_bad_type", 9, struct.pack("<IQ", 99, 0))])
    header = assert_header_matches_reader(path)   # gguf-py types an array by its first item
    assert header.metadata["t.empty"] == GgufArray("UNKNOWN", 0)


@pytest.mark.parametrize("kvs, tensors, message", [
    ([ARCH, ARCH], [], "'general.architecture' is stored twice"),
    ([ARCH, kv(b"t.x", 13, b"")], [], "'t.x' has an unknown value type 13"),
    ([ARCH, kv(b"t.x", 9, struct.pack("<IQ", 42, 1))], [], "'t.x' has an unknown value type 42"),
    ([ARCH, kv(b"t.x", 9, struct.pack("<IQ", 8, 1 << 60))], [], "ends early"),
    ([ARCH, kv(b"t.x", 8, _string(b"\xff"))], [], "'t.x' is malformed"),
    ([ARCH, kv(b"t.\xff", 4, b"\0\0\0\0")], [], "not UTF-8"),
    ([ARCH, kv(b"general.alignment", 4, struct.pack("<I", 48))], [], "general.alignment is 48"),
    ([ARCH, kv(b"general.alignment", 10, struct.pack("<Q", 64))], [], "general.alignment is 64"),
    ([ARCH], [tensor_info(b"a", (4,)), tensor_info(b"a", (4,), offset=32)], "'a' is stored twice"),
    ([ARCH], [tensor_info(b"a", (16, 2), kind=8)], "rows of 16 values, not whole Q8_0 blocks of 32"),
    ([ARCH], [tensor_info(b"a", (4,), kind=250)], "'a' has an unknown ggml type 250"),
    ([ARCH], [tensor_info(b"a", (16,)), tensor_info(b"b", (4,), offset=32)], "'b' overlaps tensor 'a'"),
], ids=["duplicate-key", "value-type", "item-type", "array-count", "value-utf8", "key-utf8", "alignment",
        "alignment-type", "duplicate-tensor", "partial-block", "ggml-type", "overlap"])
def test_malformed_headers(tmp_path, kvs, tensors, message):
    path = raw_gguf(tmp_path / "bad.gguf", kvs, tensors, data=bytes(128))
    with pytest.raises(CheckpointFormatError, match=message) as error:
        open_checkpoint(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_any_truncation_or_damage_is_one_format_error(gguf_file, tmp_path):
    """Cut anywhere in the header or with header bytes overwritten: it opens, or it fails with a
    CheckpointFormatError (never another exception, never a long wait)."""
    source = gguf_file("qwen3_moe")
    data = source.read_bytes()
    end = read_header(source).data_start
    path = tmp_path / "cut.gguf"
    for size in [*range(0, end, 7), end - 1]:
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointFormatError, match=re.escape(str(path))):
            open_checkpoint(path)
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(end)] = rng.randrange(256)
        path.write_bytes(damaged)
        try:
            open_checkpoint(path).close()
        except CheckpointFormatError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------- bad input, through the CLI

@pytest.fixture
def copy(gguf_file, tmp_path):
    def make(name="bad.gguf", family="qwen3_moe"):
        path = tmp_path / name
        shutil.copy(gguf_file(family), path)
        return path
    return make


def test_truncated_data(copy):
    path = copy()
    os.truncate(path, os.path.getsize(path) - 100)
    assert "truncated" in assert_one_line_error(run("inspect", path), 4, path)


def test_truncated_header(copy):
    path = copy()
    os.truncate(path, 200)
    assert_one_line_error(run("inspect", path), 4, path)


def test_empty_and_tiny_files(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_one_line_error(run("inspect", path), 4, path)


def test_wrong_magic(copy):
    path = copy()
    patch(path, 0, "4s", b"GGUX")
    assert "magic" in assert_one_line_error(run("inspect", path), 4, path)


def test_unsupported_version(copy):
    path = copy()
    patch(path, 4, "<I", 4)
    assert "version 4" in assert_one_line_error(run("inspect", path), 4, path)


def test_tensor_offset_beyond_file(copy):
    path = copy()
    at = tensor_info_offsets(path, "blk.1.ffn_down_exps.weight")["offset"]
    patch(path, at, "<Q", os.path.getsize(path) * 2 // 32 * 32)
    assert_one_line_error(run("inspect", path), 4, path)


def test_tensor_size_beyond_file(copy):
    path = copy()
    at = tensor_info_offsets(path, "token_embd.weight")["dims"] + 8   # ne1: the vocabulary
    patch(path, at, "<Q", 1 << 24)
    assert_one_line_error(run("inspect", path), 4, path)


def test_misaligned_offset(copy):
    path = copy()
    info = tensor_info_offsets(path, "blk.1.ffn_down_exps.weight")
    with open(path, "rb") as fh:
        fh.seek(info["offset"])
        offset = int.from_bytes(fh.read(8), "little")
    patch(path, info["offset"], "<Q", offset + 2)
    assert_one_line_error(run("inspect", path), 4, path)


def test_unknown_ggml_type(copy):
    path = copy()
    patch(path, tensor_info_offsets(path, "blk.0.attn_q.weight")["type"], "<I", 250)
    assert "ggml type" in assert_one_line_error(run("inspect", path), 4, path)


def test_named_as_single_file_but_a_split_part(split_set, tmp_path):
    path = tmp_path / "renamed.gguf"
    shutil.copy(split_set[1], path)
    assert "split set" in assert_one_line_error(run("inspect", path), 4, path)


def test_metadata_disagrees_with_tensors(models, tmp_path):
    """expert_count and embedding_length that do not fit the tensors: problems, exit 6."""
    path = write_family("qwen3_moe", tmp_path / "m.gguf", model=models("qwen3_moe"),
                        metadata={"add_expert_count": 8})[0]
    proc = run("inspect", path, "--json")
    assert proc.returncode == 6, proc.stderr
    codes = {p["code"] for p in json.loads(proc.stdout)["problems"]}
    assert {"bad_shape", "expert_count_mismatch"} <= codes
    path = write_family("qwen3_moe", tmp_path / "h.gguf", model=models("qwen3_moe"),
                        metadata={"add_embedding_length": 48})[0]
    proc = run("inspect", path, "--json")
    assert proc.returncode == 6 and "bad_shape" in {p["code"] for p in json.loads(proc.stdout)["problems"]}


def test_missing_tensor_and_bad_top_k(models, tmp_path):
    path = write_family("qwen3_moe", tmp_path / "m.gguf", model=models("qwen3_moe"),
                        drop=("blk.1.ffn_up_exps.weight",), metadata={"add_expert_used_count": 9})[0]
    proc = run("inspect", path, "--json")
    assert proc.returncode == 6
    problems = json.loads(proc.stdout)["problems"]
    assert {"missing_tensors", "bad_metadata"} <= {p["code"] for p in problems}
    assert any("blk.1.ffn_up_exps.weight" in p["message"] for p in problems)


def test_missing_required_key(models, tmp_path):
    model = models("qwen3_moe")
    md = {k: v for k, v in gguf_metadata("qwen3_moe", model).items() if k != "add_embedding_length"}
    path = write_gguf(tmp_path / "k.gguf", "qwen3moe", md, gguf_tensors("qwen3_moe", model))[0]
    assert "embedding_length" in assert_one_line_error(run("inspect", path), 5, path)


def test_unknown_architecture_is_guessed(models, tmp_path):
    model = models("qwen3_moe")
    md = gguf_metadata("qwen3_moe", model)
    path = write_gguf(tmp_path / "u.gguf", "futuremoe", md, gguf_tensors("qwen3_moe", model))[0]
    report = inspect(path)
    assert report.guessed and report.family is None and report.model_type == "futuremoe"
    assert [p.code for p in report.problems] == ["guessed_architecture"]
    assert report.total_params == param_count(model) and report.moe_layers == [0, 1]


def test_cli_json_and_text(gguf_file):
    proc = run("inspect", gguf_file("deepseek_v3", "Q8_0"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "gguf" and data["family"] == "deepseek_v3" and data["model_type"] == "deepseek2"
    assert "Q8_0" in data["disk"]["bytes_by_dtype"] and data["active_params_without_embeddings"] > 0
    text = run("inspect", gguf_file("deepseek_v3"), "--layers")
    assert text.returncode == 0 and "without input and output embeddings" in text.stdout


def test_experts_option_is_refused_for_now(gguf_file):
    assert_one_line_error(run("inspect", gguf_file("qwen3_moe"), "--experts"), 7)


def imported_modules(*args):
    """The modules `moetool ARGS` imports (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "moetool", *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]


def test_inspect_gguf_never_imports_torch(gguf_file):
    """Nor gguf-py: the header is parsed with struct."""
    imported = imported_modules("inspect", gguf_file("qwen3_moe", "Q8_0"))
    assert "moetool.checkpoint.gguf" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "gguf")]


def test_deeply_nested_arrays(tmp_path):
    """Arrays nested 20,000 deep (a hostile file; a recursive reader overflows the stack) are stepped over,
    their items counted as gguf-py counts them (which it does, shallower, for the same layout)."""
    leaf = struct.pack("<IQ2I", 4, 2, 7, 8)   # two UINT32
    deep = raw_gguf(tmp_path / "deep.gguf", [ARCH, kv(b"t.deep", 9, struct.pack("<IQ", 9, 1) * 19_999 + leaf),
                                             kv(b"t.after", 4, struct.pack("<I", 5))])
    header = read_header(deep)
    assert header.metadata["t.deep"] == GgufArray("ARRAY", 2) and header.metadata["t.after"] == 5
    two = struct.pack("<IQ", 9, 2) + leaf + struct.pack("<IQ", 8, 1) + _string(b"ab")
    shallow = raw_gguf(tmp_path / "shallow.gguf", [ARCH, kv(b"t.n", 9, struct.pack("<IQ", 9, 3) + two * 3),
                                                   kv(b"t.after", 4, struct.pack("<I", 5))])
    assert assert_header_matches_reader(shallow).metadata["t.n"] == GgufArray("ARRAY", 9)
    cut = struct.pack("<IQ", 9, 1) * 19_999 + struct.pack("<IQ", 9, 1 << 40)   # more arrays than the file holds
    with pytest.raises(CheckpointFormatError, match="ends early"):
        open_checkpoint(raw_gguf(tmp_path / "cut.gguf", [ARCH, kv(b"t.deep", 9, cut)]))
