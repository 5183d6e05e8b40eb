"""The bulk paths `inspect` takes on large checkpoints, against their one-at-a-time meaning.

Classifier.classify_all against classify(); `moetool inspect SOURCE [flags]` parsed without typer
against typer's own parsing; results that depend on checkpoint order (first bad shape, most common
layout) against that order; the index and duplicate-name checks of a sharded folder.
"""

import json
import re
from functools import cache

import pytest

from moetool.arch import all_families, get_family
from moetool.arch.matcher import Classifier
from moetool.checkpoint import open_checkpoint
from moetool.cli import inspect as cli_inspect
from moetool.errors import CheckpointFormatError
from moetool.ops.inspect import inspect_checkpoint
from tests.badfiles import (
    MIXTRAL_CONFIG,
    expert_tensors,
    mixtral_shapes,
    split_shapes,
    valid_st_bytes,
    write_checkpoint,
    write_config,
    write_sharded,
)
from tests.headersets import MODELS

ODD_NAMES = [
    "model.layers.٣.mlp.experts.٧.up_proj.weight",         # other scripts' digits: the regex path
    "model.layers.03.mlp.experts.007.up_proj.weight",       # leading zeros
    "model.layers.3.mlp.experts.7.up_proj.weight_scale_inv",
    "model.layers.3.mlp.experts.7.gate_up_proj_blocks", "model.layers.3.mlp.experts.gate_up_proj_scales",
    "model.layers.12.block_sparse_moe.experts.3.w1.weight", "model.layers.12.block_sparse_moe.experts.3.w2.weight",
    "model.layers.12.block_sparse_moe.experts.3.w3.weight", "model.layers.12.block_sparse_moe.experts.3.w4.weight",
    "model.layers.1.experts.2.fc1.weight", "transformer.h.4.moe.experts.1.w2.weight", "model.layers.7.mlp.gate.weight",
    "language_model.model.layers.2.feed_forward.experts.gate_up_proj", "vision_tower.blocks.3.attn.qkv.weight",
    "decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight", "encoder.block.3.layer.1.mlp.router.classifier.weight",
    "model.layers.0.mixer.conv1d.weight", "model.layers.1.mixer.conv2d.weight",   # one generic rule for both
    "lm_head.weight", "model.embed_tokens.weight", "x", "7", "",
]


def _template_names(family) -> list[str]:
    """Names built from every template of FAMILY, for a few layer and expert numbers."""
    names = []
    for templates in (family.common, family.per_expert, family.fused):
        for alternatives in (templates or {}).values():
            for template in (alternatives,) if isinstance(alternatives, str) else alternatives:
                for layer, expert in ((0, 0), (3, 12), (11, 5), (40, 255)):
                    names.append(template.replace("{L}", str(layer)).replace("{D}", str(layer))
                                 .replace("{E}", str(expert)))
    return names


def _assert_groups_classify_each(family, names: list[str]) -> None:
    offset = 2 if family and family.decoder_offset else 0
    one_by_one = Classifier(family, offset)
    expected = [one_by_one.classify(name) for name in names]   # in order, as rules are cached
    groups = Classifier(family, offset).classify_all(names)
    assert sorted(i for g in groups for i in g.members) == list(range(len(names)))
    assert [g.members[0] for g in groups] == sorted(g.members[0] for g in groups)
    for g in groups:
        assert g.members == sorted(g.members) and g.names == [names[i] for i in g.members]
        for i, layer, expert in zip(g.members, g.layers, g.experts):
            assert g.match._replace(layer=layer, expert=expert) == expected[i], names[i]


@cache
def _header_set_names(per_form: int = 4) -> list[str]:
    """The tensor names of the header sets, the first PER_FORM of each masked form, in order."""
    kept: dict[str, int] = {}
    names = []
    for model in MODELS.values():
        for name, _, _ in model()[1]:
            form = re.sub(r"[0-9]", "#", name)
            kept[form] = kept.get(form, 0) + 1
            if kept[form] <= per_form:
                names.append(name)
    return names


@pytest.mark.parametrize("family", [f.name for f in all_families()] + [None])
def test_classify_all_is_classify_of_each_name(family):
    names = [*_header_set_names(), *ODD_NAMES]
    fam = get_family(family) if family else None
    if fam is not None:
        names += _template_names(fam)
    _assert_groups_classify_each(fam, list(dict.fromkeys(names)))


# ---------------------------------------------------------------- the CLI without typer

def _typer_call(args: list[str], monkeypatch) -> dict:
    """The run_inspect arguments typer's parsing of `moetool inspect ARGS` passes."""
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("inspect")(cli_inspect.typer_command())
    app.command("other")(lambda: None)   # (two commands: typer then expects the command name)
    calls = []
    monkeypatch.setattr(cli_inspect, "run_inspect", lambda source, **options: calls.append({"source": source,
                                                                                             **options}))
    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exit_code == 0, result.output
    return calls[0]


DEFAULTS = {"json_out": False, "layers": False, "experts": False, "check_values": False,
            "duplicate_threshold": cli_inspect.DUPLICATE_THRESHOLD, "strict": False}


@pytest.mark.parametrize("args", [["m"], ["m", "--json"], ["--json", "m"], ["m", "--layers", "--strict"],
                                  ["m", "--experts", "--check-values", "--json", "--json"], ["org/name@rev"]])
def test_fast_args_are_typer_args(args, monkeypatch):
    assert {**DEFAULTS, **cli_inspect.fast_args(args)} == _typer_call(args, monkeypatch)


@pytest.mark.parametrize("args", [[], ["a", "b"], ["m", "-h"], ["m", "--help"], ["m", "--duplicate-threshold", "0.5"],
                                  ["m", "--duplicate-threshold=0.5"], ["m", "--jsn"], ["m", "--json=1"], ["-"],
                                  ["--", "m"], ["m", "-j"]])
def test_fast_args_leave_the_rest_to_typer(args):
    assert cli_inspect.fast_args(args) is None


def test_fast_flags_are_the_typer_commands_flags():
    import typer
    import typer.main

    app = typer.Typer(add_completion=False)
    app.command("inspect")(cli_inspect.typer_command())
    params = typer.main.get_command(app).params
    flags = {opt: param.name for param in params if param.type_descriptor.annotation is bool for opt in param.opts}
    assert flags == cli_inspect.FLAGS


# ---------------------------------------------------------------- checkpoint order

def _inspect(path):
    with open_checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)


def test_first_bad_shape_is_the_first_stored(tmp_path):
    shapes = {"model.layers.0.block_sparse_moe.gate.weight": [2, 8],             # fine, first of its group
              "model.layers.0.block_sparse_moe.experts.0.w1.weight": [5, 8],     # wrong: the first wrong one
              "model.layers.1.block_sparse_moe.gate.weight": [3, 8]}             # wrong, in the first group
    shapes = {**shapes, **{k: v for k, v in mixtral_shapes().items() if k not in shapes}}
    write_checkpoint(tmp_path, config={**MIXTRAL_CONFIG, "num_hidden_layers": 2}, shapes=shapes)
    bad = [p for p in _inspect(tmp_path).problems if p.code == "bad_shape"]
    assert bad and bad[0].message.startswith(
        "2 tensors have the wrong shape (model.layers.0.block_sparse_moe.experts.0.w1.weight is [5, 8]")


QWEN3_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 8,
             "moe_intermediate_size": 4, "num_experts": 2, "num_experts_per_tok": 1, "vocab_size": 16,
             "tie_word_embeddings": False}


@pytest.mark.parametrize("fused_first", [True, False])
def test_equally_common_layouts_give_the_first_stored(tmp_path, fused_first):
    fused = {"model.layers.0.mlp.experts.gate_up_proj": [2, 8, 8], "model.layers.0.mlp.experts.down_proj": [2, 8, 4]}
    per_expert = {"model.layers.1.mlp.experts.0.gate_proj.weight": [4, 8],
                  "model.layers.1.mlp.experts.0.up_proj.weight": [4, 8]}
    write_checkpoint(tmp_path, config=QWEN3_MOE, shapes={**fused, **per_expert} if fused_first else
                     {**per_expert, **fused})
    report = _inspect(tmp_path)
    assert report.layout == ("fused" if fused_first else "per-expert")
    mixed = [p.message for p in report.problems if p.code == "mixed_layout"]
    assert mixed == ["expert tensors are stored in both the per-expert and the fused layout: " +
                     ("2 fused, 2 per-expert" if fused_first else "2 per-expert, 2 fused")]


# ---------------------------------------------------------------- sharded folders

def test_a_tensor_stored_twice_names_the_shard_that_had_it(tmp_path):
    a, b = split_shapes(mixtral_shapes())
    twice = next(iter(b))
    write_config(tmp_path)
    for i, shapes in enumerate((a, {twice: b[twice]}, b), 1):
        (tmp_path / f"model-0000{i}-of-00003.safetensors").write_bytes(valid_st_bytes(shapes))
    with pytest.raises(CheckpointFormatError, match=f"00003.safetensors: tensor '{twice}' is also stored in "
                                                    "model-00002-of-00003.safetensors"):
        open_checkpoint(tmp_path)


def test_index_may_name_a_shard_two_ways(tmp_path):
    a, b = split_shapes(mixtral_shapes())
    weight_map = {**dict.fromkeys(a, "one.safetensors"), **dict.fromkeys(b, "two.safetensors")}
    weight_map[next(iter(b))] = "./two.safetensors"
    write_sharded(tmp_path, {"one.safetensors": a, "two.safetensors": b}, weight_map=weight_map)
    with open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt.tensors) == len(a) + len(b) and ckpt.notes == []


def test_index_errors_follow_the_index_order(tmp_path):
    a, b = split_shapes(mixtral_shapes())
    wrong = next(iter(b))
    weight_map = {wrong: "one.safetensors"}   # first in the index; the ghost comes last
    weight_map.update((n, "one.safetensors") for n in a)
    weight_map.update((n, "two.safetensors") for n in b if n != wrong)
    weight_map["ghost.weight"] = "two.safetensors"
    write_sharded(tmp_path, {"one.safetensors": a, "two.safetensors": b}, weight_map=weight_map)
    with pytest.raises(CheckpointFormatError, match=f"lists '{wrong}' in one.safetensors, but that shard"):
        open_checkpoint(tmp_path)


def test_header_out_of_file_order_reads_the_same(tmp_path):
    shapes = {**mixtral_shapes(), **expert_tensors(0, 2)}
    write_checkpoint(tmp_path / "in_order", shapes=shapes)
    raw = valid_st_bytes(shapes)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    reordered = json.dumps(dict(reversed(header.items()))).encode()
    write_checkpoint(tmp_path / "reversed", shapes=shapes,
                     weights=len(reordered).to_bytes(8, "little") + reordered + raw[8 + length:])
    with open_checkpoint(tmp_path / "in_order") as one, open_checkpoint(tmp_path / "reversed") as other:
        assert {n: (r.dtype, r.shape, r.start - 8 - length) for n, r in one.tensors.items()} == \
            {n: (r.dtype, r.shape, r.start - 8 - len(reordered)) for n, r in other.tensors.items()}
