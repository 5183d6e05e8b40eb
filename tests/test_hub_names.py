"""Checkpoints whose experts are fused already but whose other tensors carry hub names transformers 5
renames, splits or joins on load (Hy4: linear_gate, learnable_sink_param, hc_*; LARA-mini: one in_proj split
in four, out_norm): moetool's own loaders (the tensor plan) name them as transformers does; convert without
a layout change keeps the checkpoint's names."""

import pytest
import torch

from moetool.arch import detect_family
from moetool.checkpoint import open_checkpoint
from moetool.layout.plan import PlanOptions, plan_tensors
from moetool.ops.convert import ConvertOptions, convert
from moetool.runner.model import _load_planned
from tests.tiny import load_reference

FAMILIES = ["hy_v4", "lara_mini"]
HUB_ONLY = {"hy_v4": ".linear_gate.", "lara_mini": ".linear_attn.in_proj."}


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_load_of_hub_names_equals_transformers(tiny, family):
    path = tiny(family)
    with open_checkpoint(path) as ckpt:
        assert any(HUB_ONLY[family] in name for name in ckpt.tensors)        # really hub-named
        plan = plan_tensors(ckpt, PlanOptions(model_names=True))
        assert plan.source_layout == plan.target_layout == "fused"          # no layout change
        assert not any(HUB_ONLY[family] in t.name for t in plan.tensors)
        model = _load_planned(ckpt, detect_family(ckpt.config), dtype=torch.float32, device="cpu",
                              trust_remote_code=False)
    reference = load_reference(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dtype_only_convert_keeps_the_hub_names(tmp_path, tiny, family):
    path = tiny(family)
    with open_checkpoint(path) as ckpt:
        names = set(ckpt.tensors)
        convert(ckpt, tmp_path / "out", ConvertOptions(dtype="bf16"), verify=False)
    with open_checkpoint(tmp_path / "out") as out:
        assert set(out.tensors) == names


def _renaming_families() -> list[str]:
    """The tiny families whose hub names differ from transformers 5's beyond the expert templates."""
    from moetool.arch import get_family
    from tests.tiny import TINY

    out = []
    for fixture in TINY:
        family = detect_family({"model_type": fixture})
        if family is not None and (family.renames or family.row_splits or family.row_joins or family.row_shards):
            out.append(fixture)
    assert get_family("axk1").renames   # (the list below is not empty by accident)
    return sorted(out)


@pytest.mark.parametrize("family", _renaming_families())
def test_checkpoints_transformers_saved_fused_load_unrenamed(tiny, family):
    """A checkpoint transformers saved fused has transformers 5's names already: the loaders rename
    nothing (A.X-K1's hub .post_mlp_layernorm. is a part of its own target, .mlp.post_mlp_layernorm.),
    and the planned model's logits are transformers' own."""
    path = tiny(family, fused=True)
    with open_checkpoint(path) as ckpt:
        plan = plan_tensors(ckpt, PlanOptions(model_names=True))
        assert plan.actions.get("renamed", 0) == 0 and not plan.renamed
        model = _load_planned(ckpt, detect_family(ckpt.config), dtype=torch.float32, device="cpu",
                              trust_remote_code=False)
    reference = load_reference(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# --rules under transformers 5's module names, and under the hub's: (rules, the checkpoint's tensors they quantize
# in layer 0 -> format, transformers' modules of layer 0 held quantized, and those left in float)
RULES = {
    # query_key_value is split into q/k/v_proj (only q quantized), attention.dense renamed to o_proj
    "sarvam_moe": (("self_attn.q_proj=int8-g8", "o_proj=int4-g8"),
                   {"self_attn.q_proj.weight": "int8-g8-sym", "attention.dense.weight": "int4-g8-asym"},
                   ["self_attn.q_proj", "self_attn.o_proj"], ["self_attn.k_proj", "self_attn.v_proj"]),
    # linear_gate is transformers' gate_proj, in attention and in the MLPs
    "hy_v4": (("self_attn.gate_proj=int8-g8", "linear_gate=int4-g8"),
              {"self_attn.linear_gate.weight": "int8-g8-sym", "mlp.linear_gate.weight": "int4-g8-asym"},
              ["self_attn.gate_proj", "mlp.gate_proj"], []),
    # in_proj is split into in_proj_qkv / _z / _b / _a; a rule under the hub's name reaches every part
    "lara_mini": (("linear_attn.in_proj\\.=int8-g8",),
                  {f"linear_attn.in_proj_{p}.weight": "int8-g8-sym" for p in ("qkv", "z", "b", "a")},
                  [f"linear_attn.in_proj_{p}" for p in ("qkv", "z", "b", "a")], ["linear_attn.out_proj"]),
}


@pytest.mark.parametrize("family", sorted(RULES))
def test_rules_quantize_weights_stored_under_hub_names(tmp_path, tiny, family):
    """--rules reach the weights the checkpoint names apart from transformers 5, under either name:
    moetool.load_model holds them quantized, and its logits equal transformers' on the same weights dequantized
    first."""
    import moetool
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.ops.quantize import QuantizeOptions, quantize
    from moetool.runner.quantized import QuantLinear

    rules, stored, quantized, plain = RULES[family]
    with open_checkpoint(tiny(family)) as ckpt:
        report = quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8", rules=rules))
    layer0 = {n.removeprefix("model.layers.0."): f for n, f in report.rule_tensors.items() if ".layers.0." in n}
    assert layer0 == stored
    with open_checkpoint(tmp_path / "q") as ckpt:
        assert [p.code for p in inspect_checkpoint(ckpt).problems] == []
        convert(ckpt, tmp_path / "d", ConvertOptions(dtype="fp32", dequantize=True, layout="fused"))
    model = moetool.load_model(tmp_path / "q")
    layer = model.get_submodule("model.layers.0")
    assert all(isinstance(layer.get_submodule(m), QuantLinear) for m in quantized)
    assert all(isinstance(layer.get_submodule(m), torch.nn.Linear) for m in plain)
    reference = load_reference(tmp_path / "d", dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
