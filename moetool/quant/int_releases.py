"""AutoAWQ and GPTQ checkpoints (`quant_method: awq` / `gptq`): integer weights packed in int32, read dequantized.

AutoAWQ GEMM (`version: gemm`), per quantized Linear X:

* ``X.qweight`` int32 [in, out / 8]: eight 4-bit codes a word, in AutoAWQ's order (word nibble j holds
  column AWQ_ORDER[j] of its eight), ``X.qzeros`` int32 [in / group, out / 8] the same way (with
  ``zero_point``), ``X.scales`` float16 [in / group, out];
* value[o, i] = (code - zero) x scale of i's group (zero 8 without zero points), computed as compressed-
  tensors computes it after its own AutoAWQ converter (entrypoints/convert/converters/autoawq.py), in the
  scales' dtype, so its decompression is the oracle.

GPTQ (AutoGPTQ, GPTQModel, optimum; `bits` 2, 4 or 8), per quantized Linear X with K inputs and N outputs:

* ``X.qweight`` int32 [K * bits / 32, N]: packed along the inputs, field j (bits j*bits up, lowest first) of
  word [r, n] holding input r * 32 / bits + j; ``X.qzeros`` int32 [G, N * bits / 32] packed the same way along
  the outputs; ``X.scales`` [G, N]; ``X.g_idx`` int32 [K], each input's group (any order with ``desc_act``);
* `checkpoint_format` "gptq" (the default: v1) stores each zero minus one, "gptq_v2" the zero itself;
* value[n, i] = scale[g_idx[i], n] x (code[i, n] - zero[g_idx[i], n]), in float32 then rounded once to the
  scales' dtype, as GPTQModel's torch kernel computes it (gptqmodel/nn_modules/qlinear/torch.py
  TorchLinear.dequantize_weight; v1 zeros are converted by a whole-word add, utils/model.py
  convert_gptq_v1_to_v2_format_module).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetool.errors import CheckpointFormatError

AWQ, GPTQ = "awq", "gptq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble j of a word holds column AWQ_ORDER[j] (AutoAWQ's pack order)


def _unpack_awq(words, bits: int):
    """[rows, n] int32 -> [rows, n * 32 / bits] unsigned codes in column order."""
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)            # [rows, n, per] in nibble order
    order = torch.tensor(AWQ_ORDER if bits == 4 else range(per), device=words.device)
    columns = torch.empty_like(codes)
    columns[..., order] = codes                                            # nibble j -> column order[j]
    return columns.reshape(words.shape[0], -1)


class _Int32Packed:
    """What AWQ's and GPTQ's schemes share: the parameters follow from the shape, the values take the scales' dtype."""

    def params(self, stored: tuple[int, ...]) -> int:
        rows, cols = self.original_shape(stored)
        return rows * cols

    def dequantized_dtype(self, parts) -> str:
        return parts["scales"].dtype


@dataclass(frozen=True)
class AwqScheme(_Int32Packed):
    bits: int
    group: int
    zero_point: bool = True
    unreadable: str | None = None

    @property
    def id(self) -> str:
        return f"int{self.bits} g{self.group}" + ("" if self.zero_point else " sym")

    def stored(self, weight: str) -> dict[str, str]:
        module = weight.removesuffix(".weight")
        out = {"qweight": module + ".qweight", "scales": module + ".scales"}
        if self.zero_point:
            out["qzeros"] = module + ".qzeros"
        return out

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        if len(stored) != 2:
            raise CheckpointFormatError(f"{name or 'an AWQ weight'}: qweight is {list(stored)}, not 2-D")
        inputs, words = stored
        return (words * 32 // self.bits if self.bits else words), inputs

    def dequantize(self, parts: dict, shape: tuple[int, ...], dtype, state=None, name=None):
        rows, cols = shape
        scales = parts["scales"]
        groups = cols // self.group if self.group > 0 else 1
        if tuple(scales.shape) != (groups, rows) or (self.group > 0 and cols % self.group):
            raise CheckpointFormatError(f"{name or 'an AWQ weight'}: scales {list(scales.shape)} do not fit "
                                        f"[{rows}, {cols}] in groups of {self.group}")
        codes = _unpack_awq(parts["qweight"], self.bits).T                       # [out, in]
        zeros = _unpack_awq(parts["qzeros"], self.bits).T if self.zero_point else None   # [out, groups]
        if zeros is not None and tuple(zeros.shape) != (rows, groups):
            raise CheckpointFormatError(f"{name or 'an AWQ weight'}: qzeros hold {list(zeros.T.shape)} zeros for "
                                        f"[{groups}, {rows}]")
        offset = 1 << (self.bits - 1)
        q = (codes - offset).to(scales.dtype).unflatten(-1, (groups, cols // groups))
        if zeros is not None:
            q = q - (zeros - offset).to(scales.dtype).unsqueeze(-1)
        out = (q * scales.T.unsqueeze(-1)).flatten(-2)
        return out if dtype is None else out.to(dtype)


def awq_schemes(config: dict | None, tensors=()) -> dict[str, AwqScheme]:
    """Weight name -> scheme of every weight an AutoAWQ checkpoint stores quantized (X.qweight stored)."""
    qc = (config or {}).get("quantization_config") or {}
    bits, group = qc.get("bits", qc.get("w_bit", 4)), qc.get("group_size", qc.get("q_group_size", 128))
    zero_point = bool(qc.get("zero_point", True))
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()   # (transformers' AwqConfig: format)
    why = None
    if version != "gemm":
        why = f"AutoAWQ's {version} layout is not read (gemm is)"
    elif bits != 4 or not isinstance(group, int) or group == 0:
        why = f"AutoAWQ int{bits} with group size {group} is not read (int4 with groups is)"
    out = {}
    for name in tensors:
        if name.endswith(".qweight"):   # (zero points read wherever stored: GPTQModel's AWQ writes them always)
            module = name.removesuffix(".qweight")
            out[module + ".weight"] = AwqScheme(bits if isinstance(bits, int) and 0 < bits <= 8 else 0,
                                                group if isinstance(group, int) else 0,
                                                zero_point or module + ".qzeros" in tensors, why)
    return out


V1_ZERO_ADD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}   # + 1 in every field of a word (GPTQModel's v1 -> v2)


def _fields(words, bits: int, axis: int):
    """Unsigned BITS-bit fields of int32 WORDS along AXIS, lowest bits first: for BITS dividing 32, field j of a word
    is element j of its run; otherwise (3, 5, 6, 7 bits) each run of BITS words holds 32 elements, element i in bits
    [i * BITS, (i + 1) * BITS) of the run, spilling into the next word (AutoGPTQ's 3-bit packing, AutoRound's
    bit stream: auto_round/utils/bit_packing.py pack_bitstream)."""
    import torch

    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        fields = (unsigned.unsqueeze(-1) >> (torch.arange(per, device=words.device) * bits)) & mask
        if axis == 0:   # [R, N, per] -> [R * per, N]
            return fields.permute(0, 2, 1).reshape(-1, words.shape[1])
        return fields.reshape(words.shape[0], -1)
    runs = unsigned.movedim(axis, -1)
    if runs.shape[-1] % bits:
        raise CheckpointFormatError(f"{runs.shape[-1]} words cannot hold {bits}-bit fields (runs of {bits} words)")
    runs = runs.reshape(*runs.shape[:-1], -1, bits)                        # [..., runs, BITS words]
    start = torch.arange(32, device=words.device) * bits
    word, offset = start // 32, start % 32
    low = runs[..., word] >> offset
    spill = offset + bits > 32                                             # the element's high bits: next word
    high = torch.where(spill, runs[..., (word + 1).clamp(max=bits - 1)] << (32 - offset), 0)
    fields = ((low | high) & mask).flatten(-2)                             # [..., runs * 32]
    return fields.movedim(-1, axis)


@dataclass(frozen=True)
class GptqScheme(_Int32Packed):
    bits: int
    group: int                # inputs a group (-1: one group, per channel)
    v1_zeros: bool = True     # checkpoint_format "gptq": each stored zero is the zero minus one
    unreadable: str | None = None
    g_idx: bool = True        # stored (else input i is in group i // group, as writers store it without act-order)
    # how the writer's own loader computes the values (GPTQModel's, by default): v1 zeros restored by a whole-word
    # add (else each zero + 1 after unpacking, as AutoRound's kernels do), the scales cast to the model's dtype
    # before the product (else the product rounded in the scales' dtype, float16, then cast, as AutoRound's)
    word_add: bool = True
    scales_first: bool = True

    @property
    def id(self) -> str:
        return f"int{self.bits} " + (f"g{self.group}" if self.group > 0 else "channel")

    def stored(self, weight: str) -> dict[str, str]:
        module = weight.removesuffix(".weight")
        keys = ("qweight", "qzeros", "scales") + (("g_idx",) if self.g_idx else ())
        return {key: f"{module}.{key}" for key in keys}

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        if len(stored) != 2:
            raise CheckpointFormatError(f"{name or 'a GPTQ weight'}: qweight is {list(stored)}, not 2-D")
        words, outputs = stored
        inputs = words * 32 // self.bits if self.bits else words   # (no bits: counted as stored)
        g_idx = (parts or {}).get("g_idx")
        if g_idx is not None and tuple(g_idx.shape) != (inputs,):
            raise CheckpointFormatError(f"{name or 'a GPTQ weight'}: g_idx {list(g_idx.shape)} for {inputs} inputs")
        return outputs, inputs

    def dequantize(self, parts: dict, shape: tuple[int, ...], dtype, state=None, name=None):
        import torch

        outputs, inputs = shape
        scales, zeros = parts["scales"], parts["qzeros"]
        if self.g_idx:
            g_idx = parts["g_idx"].long()
        else:   # (GPTQModel and AutoGPTQ register g_idx = i // group_size whenever act-order is off)
            g_idx = torch.arange(inputs, device=scales.device) // (self.group if self.group > 0 else inputs)
        if scales.ndim != 2 or scales.shape[1] != outputs or zeros.shape != (scales.shape[0],
                                                                               outputs * self.bits // 32):
            raise CheckpointFormatError(f"{name or 'a GPTQ weight'}: scales {list(scales.shape)} and qzeros "
                                        f"{list(zeros.shape)} do not fit {outputs} outputs")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]):
            raise CheckpointFormatError(f"{name or 'a GPTQ weight'}: g_idx names groups outside its "
                                        f"{scales.shape[0]} scales")
        groups = -(-inputs // self.group) if self.group > 0 else 1
        if not self.g_idx and scales.shape[0] != groups:   # (a group size the stored scales do not have)
            raise CheckpointFormatError(f"{name or 'a GPTQ weight'}: {scales.shape[0]} groups of scales for "
                                        f"{inputs} inputs in groups of {self.group} ({groups})")
        if self.v1_zeros and self.word_add:   # as GPTQModel converts v1 zeros (a carry when a field was all ones)
            added = (zeros.to(torch.int64) + V1_ZERO_ADD[self.bits]) & 0xFFFFFFFF
            zeros = torch.where(added >= 1 << 31, added - (1 << 32), added).to(torch.int32)
        codes = _fields(parts["qweight"], self.bits, 0)[:inputs]                 # [K, N]
        zero = _fields(zeros, self.bits, 1)[:, :outputs]                         # [G, N]
        if self.v1_zeros and not self.word_add:
            zero = zero + 1
        if self.scales_first and dtype is not None and dtype.is_floating_point:
            scales = scales.to(dtype)
        out = ((codes - zero[g_idx]).float() * scales.float()[g_idx]).to(scales.dtype).T
        return out if dtype is None else out.to(dtype)


def gptq_schemes(config: dict | None, tensors=()) -> dict[str, GptqScheme]:
    """Weight name -> scheme of every weight a GPTQ checkpoint stores quantized (X.qweight stored), with
    GPTQModel's per-module `dynamic` overrides of bits and group size (the first pattern re.match-ing the
    module's name; "-:" patterns name unquantized modules, which store no qweight)."""
    import re

    qc = (config or {}).get("quantization_config") or {}
    fmt = str(qc.get("format") or qc.get("checkpoint_format") or "gptq").lower()   # (GPTQModel: format first)
    pack = str(qc.get("pack_dtype") or "int32").removeprefix("torch.")
    dynamic = [(pattern.removeprefix("+:"), override) for pattern, override in (qc.get("dynamic") or {}).items()
               if not pattern.startswith("-:") and isinstance(override, dict)]
    out = {}
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        override = next((o for pattern, o in dynamic if re.match(pattern, module)), {})
        bits, group = override.get("bits", qc.get("bits", 4)), override.get("group_size", qc.get("group_size", 128))
        why = None
        if fmt not in ("gptq", "gptq_v2"):
            why = f"GPTQ's {fmt} layout is not read (gptq and gptq_v2 are)"
        elif pack != "int32" or tensors[name].dtype != "I32":
            why = f"GPTQ codes packed in {pack} ({tensors[name].dtype}) are not read (int32 are)"
        elif bits not in V1_ZERO_ADD or not isinstance(group, int) or group == 0 or group < -1:
            why = f"GPTQ int{bits} with group size {group} is not read (int2, int4 and int8 are)"
        elif qc.get("rotation"):   # (GPTQModel re-applies it to the activations as it loads)
            why = f"GPTQModel's {qc['rotation']} rotation is not read"
        elif module + ".g_idx" not in tensors and qc.get("desc_act") and group > 0:   # (one group: no order needed)
            why = "GPTQ with activation order (desc_act) but no g_idx: the order of its inputs is not stored"
        out[module + ".weight"] = GptqScheme(bits if isinstance(bits, int) and 0 < bits <= 8 else 0,
                                             group if isinstance(group, int) else 0, fmt == "gptq", why,
                                             module + ".g_idx" in tensors)
    return out
