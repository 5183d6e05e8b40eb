"""compressed-tensors' `pack-quantized` layout: what llm-compressor writes and vLLM serves.

A weight ``X.weight`` in a group-wise integer format (int4 or int8, symmetric or asymmetric) is
stored as compressed-tensors (0.20) stores the module ``X``:

* ``X.weight_packed``      int32 ``[rows, cols * bits / 32]``: each code plus 2**(bits-1) (so
  unsigned), 32 / bits codes a word, code i at bit i * bits (little-endian)
* ``X.weight_scale``       the weight's dtype ``[rows, groups]`` (the package's convention: the
  scale takes the dtype of the weight it was observed on)
* ``X.weight_zero_point``  int32 ``[ceil(rows * bits / 32), groups]``, asymmetric only: the zero
  points plus 2**(bits-1), packed the same way along the rows
* ``X.weight_shape``       int64 ``[2]``: rows, cols

moetool's integer parts convert without re-rounding: its codes are already unsigned with the
symmetric zero at 2**(bits-1) (compressed-tensors' signed code + offset), its packed bytes are the
same little-endian bit stream, and its zero points are compressed-tensors' plus the same offset.
Only the scales change dtype: chosen in float16, or for a bf16 weight in bfloat16 (`base_for`),
then stored in the weight's dtype, exactly. Anything that returns moetool's parts (round-to-nearest,
GPTQ) is written through `CompressedFormat.from_parts`.

Dequantization follows the package's own (lifecycle/forward.py `_dequantize`) operation by
operation, in the scale's dtype: ``(code - zero_point) * scale``, so the values are identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from math import ceil, prod

from moetool.errors import CheckpointFormatError, UnsupportedError, UsageError
from moetool.quant.formats import Format, parse_format

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
PACKAGE_VERSION = "0.20.1"    # the compressed-tensors release whose format this follows
BITS = (4, 8)                 # what vLLM's WNA16 MoE kernels take
# stored tensors of X.weight, as suffixes of that name: X.weight_packed, X.weight_scale, ...
PACKED, SCALE, ZERO_POINT, SHAPE = "_packed", "_scale", "_zero_point", "_shape"
FLOAT_DTYPES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class CompressedFormat:
    """A moetool integer format stored the compressed-tensors way; used wherever a Format is."""

    base: Format

    kind = "int"
    is_bnb4 = False

    @property
    def id(self) -> str:
        return self.base.id

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def block(self) -> int:
        return self.base.block

    @property
    def symmetric(self) -> bool:
        return self.base.symmetric

    # -- sizes
    @property
    def suffixes(self) -> tuple[str, ...]:
        return (PACKED, SCALE, SHAPE) if self.symmetric else (PACKED, SCALE, ZERO_POINT, SHAPE)

    def components(self, shape: tuple[int, ...], dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
        rows, cols = shape
        out = [(PACKED, "I32", (rows, ceil(cols * self.bits / 32))),
               (SCALE, dtype if dtype in FLOAT_DTYPES else "F16", (rows, cols // self.block))]
        if not self.symmetric:
            out.append((ZERO_POINT, "I32", (ceil(rows * self.bits / 32), cols // self.block)))
        return out + [(SHAPE, "I64", (2,))]

    nbytes = Format.nbytes   # the bytes of its components, as for any format

    def original_shape(self, packed_shape: tuple[int, ...], blob=None, parts=None, name=None) -> tuple[int, ...]:
        """The weight's shape from its weight_packed shape (columns are a multiple of 32 / bits)."""
        rows, words = packed_shape
        return rows, words * 32 // self.bits

    def dequantized_dtype(self, parts) -> str:
        return parts[SCALE].dtype

    def stored(self, weight: str) -> dict[str, str]:
        """Suffix -> the stored tensor of WEIGHT (X.weight -> X.weight_packed, ...), the codes first."""
        return {suffix: weight + suffix for suffix in self.suffixes}

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        self.base.check(name, shape)

    # -- the work
    def base_for(self, dtype) -> Format:
        """The integer format that rounds a weight stored in DTYPE (torch dtype or safetensors name): its
        scales are chosen in the dtype they are stored in (bfloat16 for a bf16 weight: codes chosen on
        float16 scales would be off the stored grid)."""
        bf16 = str(dtype).removeprefix("torch.") in ("bfloat16", "BF16")
        return replace(self.base, scale_dtype="BF16") if bf16 else self.base

    def quantize(self, weight, name: str = "weight") -> dict[str, object]:
        """Suffix -> stored tensor of WEIGHT (2-D torch): moetool's quantization, converted."""
        return self.from_parts(self.base_for(weight.dtype).quantize(weight, name), weight.dtype)

    def from_parts(self, parts: dict[str, object], dtype) -> dict[str, object]:
        """moetool's integer PARTS ("" codes, ".scales", ".zeros") as compressed-tensors' tensors,
        scales in DTYPE (the weight's)."""
        import torch

        codes = parts[""]
        rows, groups = codes.shape[0], codes.shape[1]
        out = {PACKED: _words(codes.reshape(rows, -1), 8),   # the same bit stream, read as 32-bit words
               SCALE: parts[".scales"].to(dtype)}
        if not self.symmetric:   # moetool's unsigned zeros are compressed-tensors' zero points + offset
            out[ZERO_POINT] = _words(parts[".zeros"].T, self.bits).T.contiguous()
        out[SHAPE] = torch.tensor([rows, groups * self.block], dtype=torch.int64)
        return out

    def dequantize(self, parts: dict[str, object], shape: tuple[int, ...], dtype, state=None, name=None):
        """The weight in DTYPE (None: the scale's), computed as compressed-tensors' decompression
        computes it: in the scale's dtype, the zero point subtracted, then times the scale."""
        rows, cols = shape
        offset = 1 << (self.bits - 1)
        scale = parts[SCALE]
        q = (_codes(parts[PACKED], self.bits, cols) - offset).reshape(rows, -1, self.block).to(scale.dtype)
        if ZERO_POINT in parts:
            zero = _zero_points(parts[ZERO_POINT], self.bits, rows, scale.shape[-1], name)
            q = q - zero.to(scale.dtype).unsqueeze(-1)
        weight = (q * scale.unsqueeze(-1)).reshape(rows, cols)
        return weight if dtype is None else weight.to(dtype)


def _zero_points(packed, bits: int, rows: int, groups: int, name=None):
    """Signed zero points [rows, groups] from their int32 words, packed along the rows (compressed-tensors since
    0.10; the unpacked int8 ones before it are refused, never broadcast into wrong values)."""
    import torch

    words = (-(-rows * bits // 32), groups)
    if packed.dtype != torch.int32 or tuple(packed.shape) != words:
        raise CheckpointFormatError(f"{name or 'a weight'}: weight_zero_point {packed.dtype} {list(packed.shape)} is "
                                    f"not int32 {list(words)}, packed along the rows as compressed-tensors stores it")
    return (_codes(packed.T, bits, rows).T - (1 << (bits - 1))).to(torch.int8)


FP8_MAX = 448.0   # e4m3's largest value


@dataclass(frozen=True)
class CompressedFloat8:
    """fp8 e4m3 stored as compressed-tensors' float-quantized format, with one scale per output row (BLOCK 0:
    llm-compressor's FP8_DYNAMIC weights, served with fp8 activations quantized per token at run time) or per BLOCK x
    BLOCK tile (its FP8_BLOCK weights, activations per token and group of BLOCK): X.weight itself holds the codes,
    X.weight_scale [rows, 1] or [ceil(rows / BLOCK), ceil(cols / BLOCK)] the scales in the weight's dtype. Quantized
    as the package's observer and compressor compute it: scale = max |values| / 448 in the weight's dtype (0 -> the
    dtype's eps), code = clamp(weight / scale, -448, 448) cast to e4m3; dequantized as its `decompress`."""

    block: int = 0

    kind = "fp8"
    bits = 8
    symmetric = True
    is_bnb4 = False
    suffixes = ("", SCALE)
    nbytes = Format.nbytes

    @property
    def id(self) -> str:
        return f"fp8-b{self.block}" if self.block else "fp8"

    def _grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape
        return (rows, 1) if not self.block else (-(-rows // self.block), -(-cols // self.block))

    def components(self, shape: tuple[int, ...], dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
        return [("", "F8_E4M3", tuple(shape)), (SCALE, dtype if dtype in FLOAT_DTYPES else "F16", self._grid(shape))]

    def original_shape(self, stored: tuple[int, ...], blob=None, parts=None, name=None) -> tuple[int, ...]:
        return tuple(stored)

    def dequantized_dtype(self, parts) -> str:
        return parts[SCALE].dtype

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise UsageError(f"{name}: only matrices are quantized, this one is {list(shape)}")

    def base_for(self, dtype):
        return self

    def _full(self, scale, shape):
        """SCALE [grid] repeated over the values it scales."""
        rows, cols = shape
        if not self.block:
            return scale
        return scale.repeat_interleave(self.block, 0)[:rows].repeat_interleave(self.block, 1)[:, :cols]

    def quantize(self, weight, name: str = "weight") -> dict[str, object]:
        import torch

        from moetool.quant.formats import check_finite

        check_finite(weight, name)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float16
        w = weight.to(dtype)
        if self.block:   # (zero padding to whole tiles, as the package pads)
            grid = self._grid(tuple(w.shape))
            padded = torch.nn.functional.pad(w, (0, grid[1] * self.block - w.shape[1],
                                                 0, grid[0] * self.block - w.shape[0]))
            amax = padded.reshape(grid[0], self.block, grid[1], self.block).abs().amax(dim=(1, 3))
        else:
            amax = w.abs().amax(dim=1, keepdim=True)
        scale = amax / torch.tensor(FP8_MAX, dtype=dtype)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)
        codes = torch.clamp(w / self._full(scale, tuple(w.shape)), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"": codes, SCALE: scale}

    def dequantize(self, parts: dict[str, object], shape: tuple[int, ...], dtype, state=None, name=None):
        scale = parts[SCALE]
        out = parts[""].to(scale.dtype) * self._full(scale, shape)
        return out if dtype is None else out.to(dtype)


def compressed_format(fmt: Format | str, option: str = ""):
    """FMT in the compressed-tensors layout; a UsageError for a format the layout cannot hold
    (OPTION: how the message names it before its id, e.g. "--format ")."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if isinstance(fmt, (CompressedFormat, CompressedFloat8)):
        return fmt
    if fmt.kind == "fp8":
        return CompressedFloat8(fmt.block)
    if fmt.kind != "int" or fmt.bits not in BITS:
        raise UsageError("--layout compressed-tensors holds int4 and int8 group formats (e.g. int4-g128-sym, "
                         f"int8-g32-asym) and fp8, what vLLM's MoE kernels run; {option}{fmt.id} "
                         "is not one of them")
    return CompressedFormat(fmt)


def _words(codes, bits: int):
    """[..., n] unsigned codes below 2**BITS -> [..., ceil(n * BITS / 32)] int32 words, code i at bit
    i * BITS, padded with zeros (compressed-tensors' pack_to_int32 for 4 and 8 bits)."""
    import torch

    per = 32 // bits
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, -codes.shape[-1] % per))
    words = (c.reshape(*c.shape[:-1], -1, per) << (torch.arange(per, device=c.device) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # two's complement


def _codes(words, bits: int, n: int):
    """The first N unsigned codes of each row of int32 WORDS (the inverse of _words), as int64."""
    import torch

    per = 32 // bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    codes = (unsigned.unsqueeze(-1) >> (torch.arange(per, device=words.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)[..., :n]


# ---------------------------------------------------------------- quantization_config

FLOAT_FORMAT = "float-quantized"
# fp8 weights' activations, as llm-compressor's FP8_DYNAMIC preset serves them: fp8, a scale per token, at run time
FP8_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                   "dynamic": True}


def fp8_activations(fmt) -> dict:
    """The input activations of FMT's fp8 weights when served: per token (FP8_DYNAMIC), or per token and group of
    the block's width for block weights (FP8_BLOCK)."""
    if not fmt.block:
        return dict(FP8_ACTIVATIONS)
    return dict(FP8_ACTIVATIONS, strategy="group", group_size=fmt.block)


def scheme_weights(fmt) -> dict:
    """The `weights` QuantizationArgs of FMT as compressed-tensors serializes them."""
    if fmt.kind == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                "strategy": "block" if fmt.block else "channel", "dynamic": False,
                **({"block_structure": [fmt.block, fmt.block]} if fmt.block else {})}
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "group_size": fmt.block,
            "strategy": "group", "dynamic": False}


def quantization_config(groups: list[tuple[object, list[str]]], ignore: list[str]) -> dict:
    """config.json's quantization_config as compressed-tensors' ModelCompressor.update_config writes
    it: one config group (in order) per format with its targets, IGNORE for modules left as they are
    (a checkpoint of integer and fp8 groups is "mixed-precision", each group naming its format)."""
    config_groups = {f"group_{i}": {"targets": targets, "weights": scheme_weights(fmt),
                                    "input_activations": fp8_activations(fmt) if fmt.kind == "fp8" else None,
                                    "output_activations": None,
                                    "format": FLOAT_FORMAT if fmt.kind == "fp8" else PACK_FORMAT}
                     for i, (fmt, targets) in enumerate(groups)}
    formats = {group["format"] for group in config_groups.values()}
    return {"config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None,
            "ignore": ignore, "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": QUANT_METHOD,
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": PACKAGE_VERSION}


def patterns(names: list[str], tail: str = "$") -> list[str]:
    """`re:` targets matching exactly NAMES (module names; or prefixes, completed by TAIL): names
    that differ only in their first number (the layer) share one pattern, e.g.
    ``re:model\\.layers\\.(?:0|1|2)\\.self_attn\\.q_proj$``."""
    merged: dict[tuple[str, str], list[str]] = {}
    for name in sorted(set(names)):
        found = re.search(r"\d+", name)
        key = (name[:found.start()], name[found.end():]) if found else (name, "")
        merged.setdefault(key, []).append(found.group() if found else "")
    out = []
    for (head, rest), numbers in merged.items():
        if len(numbers) == 1 and tail == "$":   # one module: its name (an exact target)
            out.append(head + numbers[0] + rest)
            continue
        middle = "" if numbers == [""] else numbers[0] if len(numbers) == 1 else \
            "(?:" + "|".join(sorted(numbers, key=int)) + ")"
        out.append("re:" + re.escape(head) + middle + re.escape(rest) + tail)
    return out


# Every projection directly under an expert's module. vLLM asks for the scheme of
# `<experts>.0.gate_proj`, `.0.up_proj` and `.0.down_proj` whatever the family calls them.
EXPERT_TAIL = r"\d+\.[^.]+$"


def expert_prefix(module: str, expert: int) -> str | None:
    """`...experts.` of an expert projection MODULE (`...experts.5.gate_proj`, expert 5; also
    `...experts.expert_5.wi`): the name up to the expert's number, or None if it has none there."""
    parent = module.rpartition(".")[0]
    found = re.fullmatch(r"(.*\D)(\d+)", parent)
    return found.group(1) if found and int(found.group(2)) == expert else None


# ---------------------------------------------------------------- reading a checkpoint back

def recorded_formats(config: dict | None, names=()) -> dict[str, CompressedFormat] | None:
    """Weight name -> format of a compressed-tensors pack-quantized checkpoint moetool can run
    (every config group a static int4/int8 group scheme of weights only), for the weights among
    NAMES (tensor names) its groups target; None for any other checkpoint."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD or not isinstance(qc.get("config_groups"), dict):
        return None
    groups = []
    for group in qc["config_groups"].values():
        fmt = _group_format(group, qc.get("format"))
        if fmt is None:
            return None
        groups.append((fmt, group.get("targets") or []))
    ignore = qc.get("ignore") or []
    by_target = _by_target(groups)
    out = {}
    for name in names:
        if not name.endswith(".weight" + PACKED):
            continue
        module = name.removesuffix(".weight" + PACKED)
        if any(_match(module, target) for target in ignore):
            continue
        fmt = _group_of(module, by_target)
        if fmt is not None:
            out[module + ".weight"] = fmt
    return out


def _group_format(group: dict, default_format: str | None) -> CompressedFormat | None:
    weights = group.get("weights") or {}
    if (group.get("format") or default_format) != PACK_FORMAT or group.get("input_activations") \
            or group.get("output_activations") or weights.get("type", "int") != "int" \
            or weights.get("strategy", "group") != "group" or weights.get("dynamic") \
            or weights.get("actorder") not in (None, "weight", "static") or weights.get("num_bits") not in BITS:
        return None
    try:
        fmt = parse_format(f"int{weights['num_bits']}-g{int(weights.get('group_size') or 0)}-"
                           f"{'sym' if weights.get('symmetric', True) else 'asym'}")
    except UsageError:
        return None
    return CompressedFormat(fmt)


def _match(name: str, target: str) -> bool:
    """compressed-tensors' match_name: a `re:` pattern matched at the start, else the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _by_target(groups) -> dict:
    """Target -> group of GROUPS ((group, targets) pairs): a target two groups list is the later one's (the
    package's apply_quantization_config builds its target_to_scheme so), sorted as its match_targets ranks a
    module's targets: exact names, then `re:` patterns, each alphabetically."""
    mapping = {}
    for group, targets in groups:
        for target in targets:
            mapping[target] = group
    return {t: mapping[t] for t in sorted(mapping, key=lambda t: ("re:" in t, t))}


def _group_of(module: str, by_target: dict):
    """The group a MODULE gets: its first matching target by name, else a class-name target (a module moetool
    reads stored quantized is a Linear: Linear and any other class name are taken to match), or None."""
    named = next((g for t, g in by_target.items() if _match(module, t)), None)
    if named is not None:
        return named
    return next((g for t, g in by_target.items() if not t.startswith("re:") and "." not in t), None)


# ---------------------------------------------------------------- any compressed-tensors checkpoint

# the compressors of compressed-tensors 0.20 moetool reads (compressors/*/base.py), and the tensors each
# stores for X.weight, as suffixes of that name (the first: the codes)
STORED_FORMATS = {
    PACK_FORMAT: (PACKED, SCALE, SHAPE),
    "naive-quantized": ("", SCALE),
    "int-quantized": ("", SCALE),
    "float-quantized": ("", SCALE),
    "nvfp4-pack-quantized": (PACKED, SCALE, "_global_scale"),
    "mxfp4-pack-quantized": (PACKED, SCALE),
}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # fp4 magnitudes by the low three bits (compressed-tensors' kE2M1)


@dataclass(frozen=True)
class StoredScheme:
    """The weights of one compressed-tensors config group, as its compressor stores them: read and
    dequantized exactly as the package's `decompress` computes (quantization/lifecycle/forward_helpers.py
    `_dequantize`, by strategy), never run quantized. UNREADABLE: why moetool cannot dequantize it (None: it can)."""

    format: str
    type: str              # "int" | "float"
    bits: int
    strategy: str          # "tensor" | "channel" | "group" | "tensor_group" | "block"
    group: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    activations: str | None = None   # how the input activations are quantized when served ("fp8 token dynamic")
    unreadable: str | None = None

    @property
    def id(self) -> str:
        kind = {"nvfp4-pack-quantized": "nvfp4", "mxfp4-pack-quantized": "mxfp4"}.get(self.format)
        if kind is None:
            grid = {"group": f"g{self.group}", "tensor_group": f"g{self.group}",
                    "block": "block " + "x".join(map(str, self.block or ()))}.get(self.strategy, self.strategy)
            kind = f"{'fp' if self.type == 'float' else 'int'}{self.bits} {grid}" + \
                ("" if self.symmetric else " asym")
        return kind + (f", activations {self.activations}" if self.activations else "")

    @property
    def suffixes(self) -> tuple[str, ...]:
        found = STORED_FORMATS.get(self.format, STORED_FORMATS[PACK_FORMAT])
        if self.format == "nvfp4-pack-quantized" and self.strategy != "tensor_group":   # (no global scale)
            found = found[:2]
        return found + ((ZERO_POINT,) if not self.symmetric else ())

    def stored(self, weight: str) -> dict[str, str]:
        """Suffix -> the stored tensor of WEIGHT (X.weight -> X.weight_packed, ...), the codes first."""
        return {suffix: weight + suffix for suffix in self.suffixes}

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        """The weight's shape from its codes' stored shape (headers only): packed integers hold 32 / bits
        values a word (grouped ones as many as their scales' groups cover), fp4 two a byte."""
        if len(stored) != 2:
            raise CheckpointFormatError(f"{name or 'a weight'}: compressed-tensors weights are 2-D, not {list(stored)}")
        rows, cols = stored
        if self.format == PACK_FORMAT:
            scale = parts.get(SCALE) if parts else None
            if self.strategy == "group" and scale is not None and len(scale.shape) == 2:
                return rows, scale.shape[1] * self.group
            held = parts.get(SHAPE) if parts else None
            if held is not None and hasattr(held, "load"):   # the exact width (its 16 bytes read)
                exact = [int(v) for v in held.load().tolist()]
                if len(exact) == 2 and exact[0] == rows and ceil(exact[1] * self.bits / 32) == cols:
                    return tuple(exact)
            return rows, cols * 32 // self.bits
        if self.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            return rows, cols * 2
        return rows, cols

    def params(self, stored: tuple[int, ...]) -> int:
        if len(stored) != 2 or not self.bits:   # (not a shape this reads: counted as stored; reading is refused)
            return int(prod(stored))
        rows, cols = self.original_shape(stored)
        return rows * cols

    def dequantized_dtype(self, parts) -> str:
        """The safetensors dtype `decompress` gives: the scale's (bfloat16 for fp4, whose scales it reads so)."""
        if self.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            return "BF16"
        return parts[SCALE].dtype if parts[SCALE].dtype in FLOAT_DTYPES else "F32"

    def dequantize(self, parts: dict[str, object], shape: tuple[int, ...], dtype, state=None, name=None):
        """The weight [rows, cols] in DTYPE (None: as `decompress` gives it), from its stored PARTS (suffix ->
        torch tensor), operation by operation as compressed-tensors 0.20 computes it."""
        import torch

        if self.unreadable:
            raise UnsupportedError(f"{name or 'a weight'}: {self.unreadable}")
        rows, cols = shape
        scale, zero = parts[SCALE], parts.get(ZERO_POINT)
        global_scale = None
        if self.format == PACK_FORMAT:
            stored = parts[SHAPE]
            if [int(v) for v in stored.tolist()] != [rows, cols]:
                raise CheckpointFormatError(f"{name or 'a weight'}: weight_shape {stored.tolist()} is not the "
                                            f"{[rows, cols]} its codes and scales hold")
            codes = (_codes(parts[PACKED], self.bits, cols) - (1 << (self.bits - 1))).to(torch.int8)
            if zero is not None and self.strategy in ("group", "channel"):   # packed along the rows (only these)
                zero = _zero_points(zero, self.bits, rows, scale.shape[-1] if scale.ndim == 2 else 1, name)
        elif self.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            codes = e2m1_values(parts[PACKED], rows, cols).to(torch.bfloat16)
            wanted = torch.uint8 if self.format == "mxfp4-pack-quantized" else torch.float8_e4m3fn
            if scale.dtype != wanted:
                raise CheckpointFormatError(f"{name or 'a weight'}: {self.format} scales are {wanted}, not "
                                            f"{scale.dtype}")
            if self.format == "mxfp4-pack-quantized":   # E8M0 exponents, bias 127
                scale = (2.0 ** (scale.to(torch.int32) - 127).to(torch.bfloat16)).to(torch.bfloat16)
            else:
                scale = scale.to(torch.bfloat16)
                global_scale = parts.get("_global_scale")
        else:
            codes = parts[""]
        if global_scale is not None:
            scale = scale / global_scale
        if self.strategy in ("group", "tensor_group"):
            if scale.ndim != 2 or cols % self.group or scale.shape != (rows, cols // self.group):
                raise CheckpointFormatError(f"{name or 'a weight'}: scales {list(scale.shape)} do not fit "
                                            f"[{rows}, {cols}] in groups of {self.group}")
            q = codes.unflatten(-1, (cols // self.group, self.group)).to(scale.dtype)
            if zero is not None:
                q = q - zero.to(scale.dtype).unsqueeze(-1)
            out = (q * scale.unsqueeze(-1)).flatten(-2)
        elif self.strategy == "block":
            b0, b1 = self.block
            blocks = (-(-rows // b0), -(-cols // b1))
            if tuple(scale.shape) != blocks:
                raise CheckpointFormatError(f"{name or 'a weight'}: scales {list(scale.shape)} do not fit "
                                            f"[{rows}, {cols}] in blocks of {b0}x{b1}")
            padded = torch.nn.functional.pad(codes.to(scale.dtype),
                                             (0, blocks[1] * b1 - cols, 0, blocks[0] * b0 - rows))
            q = padded.reshape(blocks[0], b0, blocks[1], b1).transpose(1, 2)
            if zero is not None:
                q = q - zero.to(scale.dtype)[..., None, None]
            out = (q * scale[..., None, None]).transpose(1, 2).reshape(blocks[0] * b0, blocks[1] * b1)[:rows, :cols]
        else:   # tensor [1] or channel [rows, 1]: broadcast
            if scale.numel() not in (1, rows):
                raise CheckpointFormatError(f"{name or 'a weight'}: {scale.numel()} scales for a {self.strategy}-"
                                            f"wise [{rows}, {cols}] weight")
            q = codes.to(scale.dtype)
            if zero is not None:
                q = q - zero.to(scale.dtype)
            out = q * scale
        if self.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            out = out.to(torch.bfloat16)
        return out if dtype is None else out.to(dtype)


def e2m1_values(packed, rows: int, cols: int):
    """Packed fp4 (e2m1) codes [rows, cols / 2] uint8, two a byte with the low nibble first -> float32 values."""
    import torch

    magnitudes = torch.tensor(E2M1, dtype=torch.float32)
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, cols)
    return magnitudes[(pairs & 0x07).long()] * torch.where((pairs & 0x08).bool(), -1.0, 1.0)


def stored_schemes(config: dict | None, names=()) -> dict[str, StoredScheme] | None:
    """Weight name -> scheme of every weight among NAMES (tensor names) that a compressed-tensors checkpoint
    stores quantized (a config group targets its module, it is not ignored, its codes and scales are stored);
    None for a checkpoint that is not compressed-tensors'."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD or not isinstance(qc.get("config_groups"), dict):
        return None
    groups = [(_stored_scheme(group, qc.get("format")), group.get("targets") or [])
              for group in qc["config_groups"].values() if isinstance(group, dict)]
    ignore = qc.get("ignore") or []
    by_target = _by_target(groups)
    transforms = qc.get("transform_config")
    names = set(names)
    out = {}
    for name in names:   # (every quantized weight has a scale)
        if not name.endswith(".weight" + SCALE):
            continue
        weight = name.removesuffix(SCALE)
        module = weight.removesuffix(".weight")
        if any(_match(module, target) for target in ignore):
            continue
        scheme = _group_of(module, by_target)
        if scheme is None:
            scheme = StoredScheme("pack-quantized", "int", 0, "tensor", unreadable="no config group targets it, "
                                  "yet it is stored with a weight_scale")
        elif transforms:
            scheme = replace(scheme, unreadable="the checkpoint applies online transforms (transform_config: QuIP, "
                             "SpinQuant rotations) at run time, which moetool does not")
        elif not scheme.unreadable and weight + scheme.suffixes[0] not in names:
            scheme = replace(scheme, unreadable=f"its codes ({weight}{scheme.suffixes[0]}) are not stored")
        out[weight] = scheme
    return out


def activation_note(config: dict | None) -> str | None:
    """What a compressed-tensors checkpoint quantizes at serving that moetool does not simulate (None: nothing)."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    served = sorted({s.activations for s, _ in ((_stored_scheme(g, qc.get("format")), None)
                                                for g in (qc.get("config_groups") or {}).values()
                                                if isinstance(g, dict)) if s.activations})
    kv = qc.get("kv_cache_scheme")
    if kv:
        served.append(f"kv cache {_args_text(kv)}")
    return served_note(served)


def quantizes_weights(config: dict | None) -> bool:
    """Whether a compressed-tensors CONFIG quantizes any weights (a kv-cache scheme alone does not)."""
    groups = ((config or {}).get("quantization_config") or {}).get("config_groups") or {}
    return any(isinstance(g, dict) and g.get("weights") for g in groups.values()) if isinstance(groups, dict) \
        else False


def served_note(served: list[str]) -> str | None:
    """The warning for activations quantized when served (SERVED: how each is), None for none."""
    if not served:
        return None
    return (f"the checkpoint quantizes activations when served ({'; '.join(served)}); moetool runs its dequantized "
            "weights with activations unquantized, so its outputs measure the weights' quantization alone")


def _args_text(args: dict) -> str:
    kind = "fp" if args.get("type") == "float" else "int"
    dynamic = {True: " dynamic", "local": " dynamic (local)"}.get(args.get("dynamic"), " static")
    return f"{kind}{args.get('num_bits')} {args.get('strategy') or 'tensor'}{dynamic}"


def _stored_scheme(group: dict, default_format: str | None) -> StoredScheme:
    weights = group.get("weights") or {}
    fmt = group.get("format") or default_format or PACK_FORMAT
    kind, bits = weights.get("type", "int"), weights.get("num_bits")
    strategy = weights.get("strategy")
    group_size = weights.get("group_size")
    if strategy is None:   # as QuantizationArgs infers it
        strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
    block = weights.get("block_structure")
    activations = group.get("input_activations")
    scheme = StoredScheme(fmt if fmt in STORED_FORMATS else PACK_FORMAT, kind, bits if isinstance(bits, int) else 0,
                          strategy, group_size if isinstance(group_size, int) and group_size > 0 else None,
                          tuple(block) if isinstance(block, (list, tuple)) and len(block) == 2 else None,
                          bool(weights.get("symmetric", True)),
                          _args_text(activations) if isinstance(activations, dict) else None)
    why = None
    if fmt not in STORED_FORMATS:
        why = f"compressed-tensors' {fmt} format is not one moetool reads ({', '.join(STORED_FORMATS)} are)"
    elif not weights:
        why = "its config group quantizes no weights"
    elif weights.get("dynamic"):
        why = "its weights are quantized dynamically (at run time), so no stored scales describe them"
    elif str(weights.get("actorder")).lower() in ("group", "true", "dynamic"):
        why = ("its groups are activation-ordered (actorder group: a weight_g_idx per input), which compressed-"
               "tensors 0.20 itself does not dequantize")
    elif strategy not in ("tensor", "channel", "group", "tensor_group", "block") or \
            (strategy in ("group", "tensor_group") and scheme.group is None) or \
            (strategy == "block" and scheme.block is None):
        why = f"its weights' strategy {strategy} is not one moetool reads"
    elif fmt == PACK_FORMAT and not (kind == "int" and scheme.bits in (2, 4, 8)):   # (whole codes a word)
        why = f"pack-quantized {kind}{scheme.bits} weights are not read (int2, int4 and int8 are)"
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized") and (kind != "float" or scheme.bits != 4):
        why = f"{fmt} with {kind}{scheme.bits} weights is not compressed-tensors' own"
    elif fmt == "float-quantized" and (kind != "float" or scheme.bits != 8):
        why = f"float-quantized {kind}{scheme.bits} weights are not read (fp8 e4m3 are)"
    elif fmt in ("naive-quantized", "int-quantized") and not (kind == "int" and scheme.bits == 8):
        why = f"{fmt} {kind}{scheme.bits} weights are not read (int8 are)"
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized") and not scheme.symmetric:
        why = f"asymmetric {fmt} weights are not read"
    return replace(scheme, unreadable=why) if why else scheme
