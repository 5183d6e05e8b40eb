"""Intel AutoRound checkpoints (`quant_method: auto-round`, the Intel/*-AutoRound releases): integer weights
packed in int32, read dequantized.

Per quantized Linear X (auto-round 0.16's export, export/export_to_autoround/export.py), by the config's
`packing_format`:

* ``auto_round:auto_gptq`` (symmetric weights; the default when none is named): GPTQ's layout, ``X.qweight``
  int32 [K * bits / 32, N], ``X.qzeros`` int32 [G, N * bits / 32], ``X.scales`` float16 [G, N], each stored zero
  the zero minus one (clamped at 0: auto_round_extension/torch/qlinear_torch_zp.py);
* ``auto_round`` and ``auto_round:gptqmodel`` (asymmetric, other bit widths): the same layout with the zeros as
  they are (qlinear_torch.py; gptqmodel also stores ``X.g_idx``, always i // group);
* ``auto_round:auto_awq`` (asymmetric int4): AutoAWQ's GEMM layout, zeros as they are
  (export/export_to_awq/utils.py).

2 to 8 bits in GPTQ's layout: widths that do not divide 32 (3, 5, 6, 7) run as a bit stream, 32 values in
`bits` words. value[n, i] = scale x (code - zero), the product rounded once in float16, then cast to the model's
dtype, as AutoRound's own torch kernels compute it (QuantLinear.forward); tests/test_autoround.py checks the
values against those kernels, and against the model transformers' AutoRound integration loads.

Per-layer settings come from `extra_config`, as AutoRound's loader reads it (inference/utils.py
_expand_regex_config): a key naming the module itself first, then the first key that, as a regular expression,
re.search-es the module's name (keys naming another module of the checkpoint are not patterns; the loader's
list is of its Linear layers, moetool's of every module the checkpoint stores, and the loader also remaps a
vision-language model's keys: configs AutoRound writes name every layer that differs exactly, before any
pattern, so these do not part). Routers and other layers left in 16 bits store a plain X.weight; the stored
tensors say which modules are quantized. The model-free export (`model_free`: inputs padded to whole groups, the
original width not stored), activation-quantized, rotated, fp8 and fp4 forms are named and refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from moetool.quant.int_releases import AwqScheme, GptqScheme

QUANT_METHOD = "auto-round"
SPELLINGS = ("auto-round", "intel/auto-round", "auto_round")   # (older transformers; vLLM's INC loader)
DEFAULT_PACKING = "auto_round:auto_gptq"
# packing_format -> (layout, stored zeros are the zero minus one); the aliases are AutoRound's loader's
# (inference/convert_model.py: "auto" and "auto_round:gptq" as auto_gptq, "auto_round:awq" as auto_awq)
PACKINGS = {"auto_round:auto_gptq": ("gptq", True), "auto_round:gptq": ("gptq", True), "auto": ("gptq", True),
            "auto_round": ("gptq", False), "auto_round:gptqmodel": ("gptq", False),
            "auto_round:auto_awq": ("awq", False), "auto_round:awq": ("awq", False)}
ROTATIONS = ("rotation_config", "spinquant_config")   # (Hadamard / SpinQuant transforms, applied when loaded)


def is_autoround(method) -> bool:
    return isinstance(method, str) and method.lower() in SPELLINGS


def layer_key(extra: dict, modules, module: str) -> str | None:
    """The key of EXTRA (extra_config) whose settings MODULE takes, as AutoRound's loader resolves it (None: the
    global settings); MODULES: the checkpoint's module names (a key naming one of them is no pattern)."""
    if isinstance(extra.get(module), dict):
        return module
    for key, value in extra.items():
        if key in modules or not isinstance(value, dict) or not value:
            continue
        try:
            if re.search(key, module):
                return key
        except re.error:   # (the loader skips a key that is no pattern)
            continue
    return None


def layer_settings(qc: dict, modules, module: str) -> dict:
    """MODULE's settings (bits, group_size, data_type, ...) under the quantization config QC: QC's own, overlaid
    by the module's extra_config entry (MODULES: the checkpoint's module names)."""
    extra = qc.get("extra_config") if isinstance(qc.get("extra_config"), dict) else {}
    key = layer_key(extra, modules, module)
    return {k: v for k, v in qc.items() if k != "extra_config"} | (extra[key] if key is not None else {})


@dataclass(frozen=True)
class UnreadForm:
    """A weight AutoRound stores in a form moetool does not read (its fp8, MX/NV fp4 exports): counted, named in
    inspect, refused by the commands that read values."""
    suffix: str      # the codes' tensor after the module's name: ".weight" (fp8), ".weight_packed" (fp4 pairs)
    per_code: int    # values one stored element holds
    id: str
    unreadable: str

    def stored(self, weight: str) -> dict[str, str]:
        return {"codes": weight.removesuffix(".weight") + self.suffix}

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        return (*stored[:-1], stored[-1] * self.per_code)

    def params(self, stored: tuple[int, ...]) -> int:
        return prod(self.original_shape(stored))


def schemes(config: dict | None, tensors=()) -> dict:
    """Weight name -> scheme of every weight an AutoRound checkpoint stores quantized (X.qweight; the fp8 and fp4
    forms it does not read, X.weight in fp8 and X.weight_packed, as UnreadForm)."""
    qc = (config or {}).get("quantization_config") or {}
    packing = str(qc.get("packing_format") or DEFAULT_PACKING)
    layout, minus_one = PACKINGS.get(packing, (None, False))
    modules = {name.rpartition(".")[0] for name in tensors}
    rotation = next((key for key in ROTATIONS if qc.get(key)), None)
    out = {}
    for name in tensors:
        module, _, tail = name.rpartition(".")
        unread = tail == "weight_packed" or (tail == "weight" and str(tensors[name].dtype).startswith("F8"))
        if not unread and tail != "qweight":
            continue
        own = layer_settings(qc, modules, module)   # (only for the weights it describes: a pattern search per key)
        if unread:
            form = "fp4" if tail == "weight_packed" else "fp8"
            out[module + ".weight"] = UnreadForm("." + tail, 2 if form == "fp4" else 1, f"{form} ({packing})",
                                                 f"AutoRound's {packing} form ({own.get('data_type', form)} "
                                                 "weights) is not read (its integer packings are)")
            continue
        bits, group = own.get("bits", 4), own.get("group_size", 128)
        data_type, act_bits = own.get("data_type", "int"), own.get("act_bits", 16)
        why = None
        if layout is None:
            why = f"AutoRound's {packing} packing is not read ({', '.join(p for p in PACKINGS if ':' in p)} are)"
        elif isinstance(bits, int) and bits >= 16:
            why = "its extra_config leaves it unquantized (16 bits), yet it stores packed codes"
        elif not str(data_type).startswith("int"):
            why = f"AutoRound's {data_type} weights are not read (int are)"
        elif isinstance(act_bits, int) and act_bits < 16:
            why = f"AutoRound's W{bits}A{act_bits} layout (activations quantized too) is not read"
        elif rotation:
            why = f"AutoRound's {rotation} (a transform applied as it loads) is not read"
        elif not isinstance(bits, int) or not isinstance(group, int) or group == 0 or group < -1 or \
                (layout == "gptq" and not 2 <= bits <= 8) or (layout == "awq" and (bits != 4 or group < 1)):
            why = (f"AutoRound int{bits} with group size {group} in the {packing} packing is not read (" +
                   ("2 to 8 bits are" if layout == "gptq" else "int4 with groups is") + ")")
        elif tensors[name].dtype != "I32":
            why = f"AutoRound codes stored as {tensors[name].dtype} are not read (int32 are)"
        elif qc.get("model_free") and group > 0:   # (model_free_utils.py pads the inputs with zeros)
            why = ("AutoRound's model-free export pads each weight's inputs to whole groups and stores no original "
                   "width, so it is not read")
        bits = bits if isinstance(bits, int) and 0 < bits <= 8 else 0
        group = group if isinstance(group, int) else 0
        if layout == "awq":
            out[module + ".weight"] = AwqScheme(bits, group, module + ".qzeros" in tensors, why)
        else:
            out[module + ".weight"] = GptqScheme(bits, group, minus_one, why, module + ".g_idx" in tensors,
                                                 word_add=False, scales_first=False)
    return out
