"""Quantization formats for one weight matrix: parse, plan, quantize, dequantize.

A format is named by a short id: ``nf4``, ``fp4-b128-dq`` (bitsandbytes 4-bit, block size,
double quantization), ``bnb8-b256`` (bitsandbytes 8-bit blockwise), ``int3-g128-asym``
(group-wise round-to-nearest integers, symmetric or asymmetric) or ``keep`` (left as it is).

A quantized weight ``X.weight`` is stored as tensors named by suffix (``""`` is the weight itself):

* bitsandbytes 4-bit: exactly what bitsandbytes serializes (``Params4bit``): packed uint8 data
  and ``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map``,
  ``.quant_state.bitsandbytes__nf4`` (a JSON blob, space-padded to a planned length)
* bitsandbytes 8-bit blockwise: uint8 codes of the weight's shape, ``.absmax``, ``.quant_map``
* integers: uint8 codes ``[rows, groups, group * bits / 8]`` (values packed little-endian, eight
  per ``bits`` bytes), ``.scales`` float16 ``[rows, groups]``, ``.zeros`` uint8 (asymmetric)

Every component's dtype and shape is known from the format and the weight's shape alone, so a
checkpoint is planned before anything is quantized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from math import ceil, prod

from moetool.errors import CheckpointFormatError, UsageError

BNB4_BLOCKS = (32, 64, 128, 256)
BNB4_READ_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # block sizes a 4-bit checkpoint may record
BNB4_STATE_MAX = 1 << 16    # bytes: bitsandbytes' quant_state blobs are about 200
BNB8_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK = 256          # bitsandbytes quantizes absmax in blocks of 256 (double quantization)
CHUNK_VALUES = 1 << 19     # values quantized per bitsandbytes call
FLOAT_REPR_MAX = 24         # longest repr() of a float64, e.g. -2.2250738585072014e-308
INT_BITS = (2, 3, 4, 8)
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

_SPEC = re.compile(r"^(?P<kind>nf4|fp4|bnb8|int[2348]|fp8|keep)(?P<rest>(-[a-z0-9]+)*)$")


@dataclass(frozen=True)
class Format:
    kind: str                   # "nf4" | "fp4" | "bnb8" | "int" | "fp8" (compressed-tensors' layout only) | "keep"
    bits: int = 16              # code bits (integers: 2, 3, 4, 8)
    block: int = 0              # bitsandbytes block size or integer group size
    double_quant: bool = False  # bitsandbytes 4-bit: absmax quantized too
    symmetric: bool = True      # integers
    scale_dtype: str = "F16"    # integers: the scales' dtype (compressed-tensors stores the weight's)

    @property
    def id(self) -> str:
        if self.kind == "keep" or (self.kind == "fp8" and not self.block):
            return self.kind
        if self.kind == "fp8":
            return f"fp8-b{self.block}"
        if self.kind == "int":
            return f"int{self.bits}-g{self.block}-{'sym' if self.symmetric else 'asym'}"
        return f"{self.kind}-b{self.block}" + ("-dq" if self.double_quant else "")

    @property
    def is_bnb4(self) -> bool:
        return self.kind in ("nf4", "fp4")

    def describe(self) -> dict:
        """What the format is, for the quantization_config and reports."""
        if self.kind == "keep":
            return {"method": "none"}
        if self.kind == "int":
            return {"method": "rtn", "bits": self.bits, "group_size": self.block, "symmetric": self.symmetric,
                    "scale_dtype": "float16", "packing": "little-endian, 8 values per `bits` bytes"}
        if self.kind == "bnb8":
            return {"method": "bitsandbytes", "quant_type": "blockwise8", "blocksize": self.block}
        if self.kind == "fp8":
            return {"method": "rtn", "type": "float8_e4m3", "strategy": "channel"}
        return {"method": "bitsandbytes", "quant_type": self.kind, "blocksize": self.block,
                "double_quant": self.double_quant}

    # -- sizes
    def components(self, shape: tuple[int, ...], dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """(suffix, dtype, shape) of every stored tensor of a weight of SHAPE in DTYPE."""
        n = prod(shape)
        if self.kind == "keep":
            return [("", dtype, tuple(shape))]
        if self.kind == "fp8":   # (its stored form is compressed-tensors': quant.compressed_tensors.CompressedFloat8)
            raise CheckpointFormatError("fp8 is stored in compressed-tensors' layout only, not moetool's")
        if self.kind == "int":
            rows, cols = shape
            groups = cols // self.block
            out = [("", "U8", (rows, groups, self.block * self.bits // 8)), (".scales", self.scale_dtype,
                                                                             (rows, groups))]
            return out + ([] if self.symmetric else [(".zeros", "U8", (rows, groups))])
        blocks = ceil(n / self.block)
        if self.kind == "bnb8":
            return [("", "U8", tuple(shape)), (".absmax", "F32", (blocks,)), (".quant_map", "F32", (256,))]
        out = [("", "U8", ((n + 1) // 2, 1))]
        if self.double_quant:
            out += [(".absmax", "U8", (blocks,)), (".quant_map", "F32", (16,)),
                    (".nested_absmax", "F32", (ceil(blocks / NESTED_BLOCK),)), (".nested_quant_map", "F32", (256,))]
        else:
            out += [(".absmax", "F32", (blocks,)), (".quant_map", "F32", (16,))]
        return out + [(f".quant_state.bitsandbytes__{self.kind}", "U8", (len(self._blob(shape, dtype, 0.0, True)),))]

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The suffixes of the stored tensors (`components`), which do not depend on the shape."""
        return tuple(s for s, _, _ in self.components((1, max(1, self.block)), "F32"))

    def original_shape(self, stored_shape: tuple[int, ...], blob=None, name: str | None = None,
                       parts: dict | None = None) -> tuple[int, ...]:
        """The weight's shape from its stored codes' shape (bitsandbytes 4-bit: from its state BLOB,
        a callable returning the uint8 tensor, checked by `bnb4_state` against the packed codes and,
        given PARTS (suffix -> shape of its companions), their sizes). NAME: the weight's, for messages."""
        if self.kind == "int":
            rows, groups, _ = stored_shape
            return rows, groups * self.block
        if self.is_bnb4:
            if blob is None:
                raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: its quant_state "
                                            f".quant_state.bitsandbytes__{self.kind} is missing")
            return self._state_items(blob(), name, prod(stored_shape), parts)["shape"]   # (uint8 codes)
        return tuple(stored_shape)

    def _state_items(self, blob, name, packed_bytes, parts) -> dict:
        """`bnb4_state` of a moetool 4-bit weight, which must also agree with the recorded format."""
        items = bnb4_state(blob, name, packed_bytes=packed_bytes, parts=parts)
        nested = "nested_offset" in items
        if (items["quant_type"], items["blocksize"], nested) != (self.kind, self.block, self.double_quant):
            said = f"{items['quant_type']}-b{items['blocksize']}" + ("-dq" if nested else "")
            raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: its quant_state is {said}, "
                                        f"its quantization_config says {self.id}")
        return items

    def nbytes(self, shape: tuple[int, ...], dtype: str) -> int:
        from moetool.checkpoint.header import DTYPE_BYTES

        return sum(prod(s) * DTYPE_BYTES[d] for _, d, s in self.components(shape, dtype))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a weight this format cannot hold."""
        if self.kind == "int" and (len(shape) != 2 or shape[1] % self.block):
            raise UsageError(f"{name}: {self.id} needs a matrix whose columns ({shape[-1]}) are a multiple of "
                             f"the group size {self.block}; choose another group size")
        if self.kind != "keep" and len(shape) != 2:
            raise UsageError(f"{name}: only matrices are quantized, this one is {list(shape)}")

    def _blob(self, shape, dtype: str, offset: float, planning: bool) -> bytes:
        """bitsandbytes' JSON quant_state blob (non-tensor items); planning reserves room for any offset."""
        items = {"quant_type": self.kind, "blocksize": self.block, "dtype": TORCH_NAMES[dtype], "shape": list(shape)}
        if self.double_quant:
            items.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": offset})
        raw = json.dumps(items).encode()
        if planning and self.double_quant:
            raw += b" " * (FLOAT_REPR_MAX - len(repr(offset)))
        return raw

    # -- the work
    def quantize(self, weight, name: str = "weight") -> dict[str, object]:
        """Suffix -> stored tensor (CPU torch) for WEIGHT, a 2-D torch tensor; NAME is used in
        messages. Raises UsageError for a weight holding NaN or inf (every format but keep)."""
        if self.kind == "keep":
            return {"": weight}
        check_finite(weight, name)
        try:
            return self._quantize(weight)
        except UsageError as exc:   # a finite weight the format's scales cannot hold
            raise UsageError(f"{name}: {exc}") from None

    def _quantize(self, weight) -> dict[str, object]:
        if self.kind == "int":
            return _quantize_int(weight, self)
        from moetool.quant import bnb

        F = bnb()

        if self.kind == "bnb8":
            codes, state = F.quantize_blockwise(weight, blocksize=self.block)
            return {"": codes, ".absmax": state.absmax, ".quant_map": state.code}
        state = _quantize_4bit(F, weight, self)
        packed = state.pop("")
        parts = {"." + k: v for k, v in state.items()}
        dtype = next(k for k, v in TORCH_NAMES.items() if v == str(weight.dtype).removeprefix("torch."))
        blob_key = f".quant_state.bitsandbytes__{self.kind}"
        planned = self._blob(tuple(weight.shape), dtype, 0.0, True)
        actual = bytes(parts[blob_key].tolist())
        if len(actual) > len(planned):
            raise AssertionError(f"bitsandbytes' quant_state blob ({len(actual)} bytes) outgrew its plan")
        import torch

        parts[blob_key] = torch.tensor(list(actual + b" " * (len(planned) - len(actual))), dtype=torch.uint8)
        return {"": packed, **parts}

    def bnb_state(self, parts: dict[str, object], name: str | None = None):
        """bitsandbytes' QuantState of a stored 4-bit weight (parsing it once saves time per use), its
        state checked first (`bnb4_state`: CheckpointFormatError). NAME: the weight's, for messages."""
        blob = parts.get(f".quant_state.bitsandbytes__{self.kind}")
        if blob is None:
            raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: its quant_state "
                                        f".quant_state.bitsandbytes__{self.kind} is missing")
        packed = parts[""]
        self._state_items(blob, name, packed.numel() * packed.element_size(),
                          {k: tuple(v.shape) for k, v in parts.items()})
        return bnb4_quant_state({k.lstrip("."): v for k, v in parts.items() if k}, parts[""].device, name)

    def dequantize(self, parts: dict[str, object], shape: tuple[int, ...], dtype, state=None, name: str | None = None):
        """The weight (torch, DTYPE) from its stored PARTS (suffix -> tensor); STATE: bnb_state(PARTS)."""
        if self.kind == "keep":
            return parts[""].to(dtype)
        if self.kind == "int":
            return _dequantize_int(parts, self, shape).to(dtype)
        from moetool.quant import bnb

        F = bnb()

        if self.kind == "bnb8":
            state = F.QuantState(absmax=parts[".absmax"], code=parts[".quant_map"], blocksize=self.block,
                                 dtype=dtype)
            return F.dequantize_blockwise(parts[""], state).reshape(shape).to(dtype)
        state = state or self.bnb_state(parts, name)
        if tuple(state.shape) != tuple(shape):
            raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: its quant_state records shape "
                                        f"{list(state.shape)}, not {list(shape)}")
        return F.dequantize_4bit(parts[""], state).to(dtype)


def check_finite(weight, name: str) -> None:
    """Refuse WEIGHT (torch) if it holds NaN or inf: no quantized format holds them (bitsandbytes
    would write them, and with double quantization one spreads over the whole matrix through the
    mean its absmax are offset by). Checked in slices, so memory does not grow with the weight."""
    import torch

    flat = weight.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_VALUES):
        bad = ~torch.isfinite(flat[start:start + CHUNK_VALUES])
        if bool(bad.any()):
            total = sum(int((~torch.isfinite(flat[i:i + CHUNK_VALUES])).sum())
                        for i in range(start, flat.numel(), CHUNK_VALUES))
            first = start + int(bad.nonzero()[0, 0])
            index = [int(i) for i in reversed(_unravel(first, tuple(weight.shape)))]
            raise UsageError(f"{name}: {total} of {flat.numel()} values are not finite (NaN or inf; the first at "
                             f"{index}); no quantized format can hold them: fix the weight, or keep it unquantized")


def _unravel(flat_index: int, shape: tuple[int, ...]) -> list[int]:
    """FLAT_INDEX as indices into SHAPE, last axis first."""
    out = []
    for size in reversed(shape):
        flat_index, rest = divmod(flat_index, max(1, size))
        out.append(rest)
    return out


def bnb4_state(blob, name: str | None = None, *, packed_bytes: int | None = None, parts: dict | None = None) -> dict:
    """The items of a bitsandbytes 4-bit quant_state BLOB (the uint8 tensor, or bytes) of weight
    NAME, checked before anything trusts them: UTF-8 JSON of the items bitsandbytes writes, the
    shape's values held by the PACKED_BYTES of codes (two per byte, whatever dtype transformers'
    bnb_4bit_quant_storage stored them in), and with PARTS (companion suffix
    -> shape, with or without the leading dot) absmax one per block, the maps' sizes, and with
    double quantization nested_absmax one per nested block. Returns the items, "shape" a tuple.
    Raises CheckpointFormatError (one line) for anything else."""
    who = f"{name or 'a bitsandbytes 4-bit weight'}: its bitsandbytes quant_state"

    def bad(why: str):
        return CheckpointFormatError(f"{who} {why}")

    size = len(blob) if isinstance(blob, (bytes, bytearray)) else getattr(blob, "numel", lambda: 0)()
    if size > BNB4_STATE_MAX:
        raise bad(f"is {size} bytes, far more than bitsandbytes writes")
    try:
        raw = bytes(blob) if isinstance(blob, (bytes, bytearray)) else bytes(blob.reshape(-1).tolist())
        items = json.loads(raw.decode("utf-8"))
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:   # not bytes, not UTF-8, not JSON
        raise bad(f"is not bitsandbytes' JSON ({type(exc).__name__})") from None
    if not isinstance(items, dict):
        raise bad("is not a JSON object")
    known = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
    if set(items) - known:
        raise bad(f"has items bitsandbytes does not write ({', '.join(sorted(set(items) - known))})")

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if items.get("quant_type") not in ("nf4", "fp4"):
        raise bad(f"has quant_type {items.get('quant_type')!r}, not nf4 or fp4")
    if items.get("blocksize") not in BNB4_READ_BLOCKS or not whole(items.get("blocksize")):
        raise bad(f"has blocksize {items.get('blocksize')!r}, not one of {', '.join(map(str, BNB4_READ_BLOCKS))}")
    if items.get("dtype") not in TORCH_NAMES.values():
        raise bad(f"has dtype {items.get('dtype')!r}, not {', '.join(TORCH_NAMES.values())}")
    shape = items.get("shape")
    if not isinstance(shape, list) or not shape or not all(whole(d) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    nested = "nested_offset" in items or "nested_blocksize" in items or "nested_dtype" in items
    if nested:
        offset = items.get("nested_offset")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not abs(offset) < float("inf"):
            raise bad(f"has nested_offset {offset!r}, not a finite number")
        if not whole(items.get("nested_blocksize")) or items["nested_blocksize"] <= 0:
            raise bad(f"has nested_blocksize {items.get('nested_blocksize')!r}")
        if items.get("nested_dtype") not in TORCH_NAMES.values():
            raise bad(f"has nested_dtype {items.get('nested_dtype')!r}")
    n = prod(shape)
    if packed_bytes is not None and packed_bytes != (n + 1) // 2:
        raise bad(f"records shape {shape} ({n} values), but the {packed_bytes} packed bytes hold "
                  f"{2 * packed_bytes}")
    if parts is not None:
        sizes = {k.lstrip("."): prod(v) for k, v in parts.items()}
        blocks = ceil(n / items["blocksize"])
        want = {"absmax": blocks, "quant_map": 16}
        if nested:
            want.update(nested_absmax=ceil(blocks / items["nested_blocksize"]), nested_quant_map=256)
        elif "nested_absmax" in sizes:
            raise bad("has no nested_offset, but the weight has a nested_absmax")
        for key, count in want.items():
            if key not in sizes:
                raise bad(f"needs a {key} companion, which is missing")
            if sizes[key] != count:
                raise bad(f"records shape {shape} in blocks of {items['blocksize']}, which needs {count} "
                          f"{key} values, not {sizes[key]}")
    return {**items, "shape": tuple(shape)}


def bnb4_quant_state(components: dict[str, object], device, name: str | None):
    """bitsandbytes' QuantState.from_dict of checked COMPONENTS (keys without the leading dot);
    whatever bitsandbytes still refuses becomes a CheckpointFormatError."""
    from moetool.quant import bnb

    try:
        return bnb().QuantState.from_dict(dict(components), device=device)
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: bitsandbytes cannot read its "
                                    f"quant_state ({type(exc).__name__}: {first})") from None


def parse_format(spec: str) -> Format:
    """A format from its id (see the module docstring); defaults: nf4/fp4 block 64, bnb8 block 256,
    integers group 128, asymmetric below 8 bits."""
    text = spec.strip().lower()
    if text in ("none", "bf16", "fp16", "fp32", "keep"):
        return Format("keep")
    m = _SPEC.match(text)
    if not m:
        raise UsageError(f"format {spec!r}: use nf4, fp4, bnb8, int2/int3/int4/int8, fp8 or keep, with options "
                         "-b<block>, -dq, -g<group>, -sym/-asym (e.g. nf4-b64-dq, int3-g128-asym)")
    kind, opts = m["kind"], [o for o in m["rest"].split("-") if o]
    if kind == "fp8":   # e4m3, a scale per output row (FP8_DYNAMIC weights) or per -b<block> square tile (FP8_BLOCK)
        if len(opts) > 1 or (opts and not re.fullmatch(r"b\d+", opts[0])) or (opts and int(opts[0][1:]) < 1):
            raise UsageError(f"format {spec!r}: fp8 takes one option, -b<block> (a scale per block x block tile, "
                             "e.g. fp8-b128); without it, one scale per output row")
        return Format("fp8", 8, int(opts[0][1:]) if opts else 0)
    bits = int(kind[3:]) if kind.startswith("int") else (8 if kind == "bnb8" else 4)
    block = {"nf4": 64, "fp4": 64, "bnb8": 256}.get(kind, 128)
    double_quant, symmetric = False, bits == 8
    for opt in opts:
        if re.fullmatch(r"[bg]\d+", opt) and (opt[0] == "g") == kind.startswith("int"):
            block = int(opt[1:])
        elif opt == "dq" and kind in ("nf4", "fp4"):
            double_quant = True
        elif opt in ("sym", "asym") and kind.startswith("int"):
            symmetric = opt == "sym"
        else:
            raise UsageError(f"format {spec!r}: option {opt!r} does not apply to {kind}")
    if kind in ("nf4", "fp4") and block not in BNB4_BLOCKS:
        raise UsageError(f"format {spec!r}: bitsandbytes 4-bit block sizes are {', '.join(map(str, BNB4_BLOCKS))}")
    if kind == "bnb8" and block not in BNB8_BLOCKS:
        raise UsageError(f"format {spec!r}: bitsandbytes 8-bit block sizes are {', '.join(map(str, BNB8_BLOCKS))}")
    if kind.startswith("int") and (block < 8 or block % 8 or block > 4096):
        raise UsageError(f"format {spec!r}: the group size must be a multiple of 8 between 8 and 4096")
    return Format("int" if kind.startswith("int") else kind, bits, block, double_quant, symmetric)


def _quantize_4bit(F, weight, fmt: Format) -> dict[str, object]:
    """bitsandbytes' quantize_4bit, run on blocks of about CHUNK_VALUES values at a time: blocks are
    independent, so the codes and absmax are bit for bit bitsandbytes' own, while the temporaries
    stay small (a quarter faster, and memory does not grow with the tensor). Double quantization
    then runs on the whole absmax, as bitsandbytes does. Returns the serialized state with the
    codes under ""."""
    import torch

    flat = weight.reshape(-1)
    step = max(1, CHUNK_VALUES // fmt.block) * fmt.block
    codes, absmax = [], []
    for start in range(0, flat.numel(), step):
        packed, state = F.quantize_4bit(flat[start:start + step], blocksize=fmt.block, quant_type=fmt.kind)
        codes.append(packed)
        absmax.append(state.absmax)
    absmax = torch.cat(absmax)
    kwargs = dict(shape=weight.shape, dtype=weight.dtype, blocksize=fmt.block, code=state.code, quant_type=fmt.kind)
    if fmt.double_quant:
        offset = absmax.mean()
        if not bool(offset.isfinite()):
            raise UsageError(f"its values are too large for {fmt.id} (the mean of its blocks' absmax overflows "
                             "float32)")
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCK)
        whole = F.QuantState(absmax=qabsmax, offset=offset, state2=state2, **kwargs)
    else:
        whole = F.QuantState(absmax=absmax, **kwargs)
    return {"": torch.cat(codes), **whole.as_dict(packed=True)}


# ---------------------------------------------------------------- group-wise integers

def _stored_scale(scale, fmt: Format):
    """SCALE rounded to the dtype it is stored in (nearest), so that codes are chosen on the stored
    grid: float16 (moetool's layout; codes are clamped, so a value just outside the range is clipped)
    or bfloat16 (compressed-tensors' scales of bf16 weights)."""
    import torch

    if not bool(torch.isfinite(scale).all()):   # (weights are checked first: GPTQ's updates, or a direct call)
        raise UsageError("a weight group's scale is not finite: its values cannot be quantized")
    if fmt.scale_dtype == "BF16":
        return scale.clamp(min=2.0 ** -126).to(torch.bfloat16)
    if bool((scale > SCALE_MAX["F16"]).any()):
        raise UsageError("a weight group holds values too large for float16 scales; use a bitsandbytes format "
                         "for it")
    return scale.clamp(min=2.0 ** -24, max=SCALE_MAX["F16"]).half()


SCALE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38}   # the largest finite value of each scale dtype


# Clipping searched per group, as llama.cpp's and HQQ's quantizers do: the group's range times each
# ratio, the one with the least squared error kept (earlier ratios win ties).
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(15))   # 1.0 .. 0.65


def int_grid(w, fmt: Format, *, search: bool = True):
    """Scale and zero point (codes) of each group of W [..., groups, group]: the 2**bits levels of
    the format spread over the group's range (symmetric: codes -2**(bits-1) .. 2**(bits-1) - 1 over
    [-absmax, absmax], as compressed-tensors does; asymmetric: 0 .. 2**bits - 1 over [min, max]
    with zero inside), the range clipped by the searched ratio that rounds W with the least error
    (symmetric: or stretched so that the top code holds +absmax).
    Returns (scale in the format's scale dtype, zero float32) shaped [..., groups]. Float64 W is searched in float64."""
    import torch

    w = w if w.dtype == torch.float64 else w.float()
    best_scale = best_zero = best_err = None
    # symmetric: also the grid whose top code holds +absmax exactly (the lowest code then unused)
    stretch = ((1 << fmt.bits) - 1) / 2 / ((1 << (fmt.bits - 1)) - 1) if fmt.symmetric else None
    ratios = ((1.0,) if not search else CLIP_RATIOS) + ((stretch,) if search and stretch else ())
    for ratio in ratios:
        # the stretched grid is an option only: a group whose stretched scale the scale dtype cannot
        # hold (while the plain grid's fits) keeps the other grids
        scale, zero, unfit = _range_grid(w, fmt, ratio, optional=ratio == stretch)
        err = (int_round(w, scale, zero, fmt) - w).square().sum(-1)
        if unfit is not None:
            err = err.masked_fill(unfit, float("inf"))
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def _range_grid(w, fmt: Format, ratio: float, optional: bool = False):
    """(scale, zero, unfit) of the grid over W's groups' range times RATIO. OPTIONAL (the symmetric
    stretched grid): groups whose scale the scale dtype cannot hold are marked in UNFIT (their scale
    a placeholder) instead of refused; otherwise UNFIT is None."""
    import torch

    top = (1 << fmt.bits) - 1
    unfit = None
    if fmt.symmetric:
        raw = w.abs().amax(-1) * ratio / (top / 2)
        if optional:
            unfit = ~(raw <= SCALE_MAX[fmt.scale_dtype])   # (NaN too: _stored_scale refuses it on the plain grid)
            raw = raw.masked_fill(unfit, 1.0)
        scale = _stored_scale(raw, fmt)
        return scale, torch.full_like(scale, 1 << (fmt.bits - 1), dtype=torch.float32), unfit
    low, high = w.amin(-1).clamp(max=0) * ratio, w.amax(-1).clamp(min=0) * ratio   # zero stays representable
    scale = _stored_scale((high - low) / top, fmt)
    return scale, torch.round(-low / scale.float()).clamp(0, top), unfit


def int_codes(w, scale, zero, fmt: Format):
    """W [..., groups, group] rounded to the codes 0 .. 2**bits - 1 of the grid (SCALE, ZERO)."""
    import torch

    return (torch.round(w / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, (1 << fmt.bits) - 1)


def int_round(w, scale, zero, fmt: Format):
    """W rounded to the grid and back: what a weight quantized with (SCALE, ZERO) holds."""
    return (int_codes(w, scale, zero, fmt) - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)


def int_parts(codes, scale, zero, fmt: Format) -> dict[str, object]:
    """The stored tensors of an integer weight from its CODES [rows, groups, group] (0 .. 2**bits - 1),
    SCALE [rows, groups] (in the format's scale dtype) and ZERO [rows, groups] (stored only when asymmetric; symmetric
    formats imply 2**(bits-1)). Shared by round-to-nearest and GPTQ, so both write the same layout."""
    import torch

    scale = scale.to(getattr(torch, TORCH_NAMES[fmt.scale_dtype]))
    parts = {"": _pack(codes.to(torch.uint8), fmt.bits), ".scales": scale}
    if not fmt.symmetric:
        parts[".zeros"] = zero.to(torch.uint8)
    return parts


def _quantize_int(weight, fmt: Format) -> dict[str, object]:
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // fmt.block, fmt.block)
    scale, zero = int_grid(w, fmt)
    return int_parts(int_codes(w, scale, zero, fmt), scale, zero, fmt)


def _dequantize_int(parts: dict[str, object], fmt: Format, shape: tuple[int, ...]):
    rows, cols = shape
    q = _unpack(parts[""], fmt.bits, fmt.block).float()
    zero = (parts[".zeros"].float() if ".zeros" in parts else
            (1 << (fmt.bits - 1)) + q.new_zeros(q.shape[:-1]))
    w = (q - zero.unsqueeze(-1)) * parts[".scales"].float().unsqueeze(-1)
    return w.reshape(rows, cols)


def _pack(codes, bits: int):
    """[..., n] codes < 2**bits -> [..., n * bits / 8] bytes (eight codes per `bits` bytes)."""
    import torch

    if bits == 8:
        return codes
    *lead, n = codes.shape
    eight = codes.reshape(*lead, n // 8, 8).to(torch.int64)
    word = (eight << (torch.arange(8, device=codes.device) * bits)).sum(-1)                     # 8 * bits <= 32 bits
    out = (word.unsqueeze(-1) >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n // 8 * bits)


def _unpack(packed, bits: int, n: int):
    import torch

    if bits == 8:
        return packed
    *lead, _ = packed.shape
    chunks = packed.reshape(*lead, n // 8, bits).to(torch.int64)
    word = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(-1)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, n)


def slice_name(stacked: str, expert: int) -> str:
    """The name moetool stores expert EXPERT of a stacked [E, out, in] tensor under (Granite's
    `input_linear.weight` -> `input_linear.3.weight`), so each expert is quantized on its own."""
    return f"{stacked.removesuffix('.weight')}.{expert}.weight"


def stacked_slices(config: dict | None) -> dict[str, tuple[str, int]]:
    """Slice name -> (stacked tensor name, expert) recorded in a moetool quantization_config."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != "moetool" or not isinstance(qc.get("stacked"), dict):
        return {}
    return {slice_name(name, e): (name, e) for name, count in qc["stacked"].items() for e in range(int(count))}
