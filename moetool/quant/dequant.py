"""Exact dequantization of the quantized forms MoE releases ship (torch, CPU).

* block FP8 (DeepSeek-V3, Kimi-K2, MiniMax-M2; DeepSeek-V4 with E8M0 or F32 scales): W = q * scale_inv[row // 128,
  col // 128]
* FP4 e2m1 (DeepSeek-V4's experts): int8, two values a byte (low nibble first), one scale (E8M0) per 32 inputs
* MXFP4 (GPT-OSS): 4-bit e2m1 values, two per byte (low nibble first), one power-of-two
  scale (E8M0, bias 127) per 32 values along the input axis
* bitsandbytes 4-bit (nf4/fp4) through bitsandbytes' own dequantize_4bit
* bitsandbytes int8 (LLM.int8 row-wise) through bitsandbytes' own int8_vectorwise_dequant
"""

from __future__ import annotations

from math import prod

import torch

from moetool.errors import CheckpointFormatError
from moetool.quant.formats import bnb4_quant_state, bnb4_state

FP8_BLOCK = 128
MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                         block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    """[rows, cols] fp8 weight times its [ceil(rows/b0), ceil(cols/b1)] inverse scales."""
    rows, cols = q.shape
    scale = scale_inv.float().reshape(-(-rows // block[0]), -(-cols // block[1]))
    scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (q.float() * scale).to(dtype)


def check_fp8_grid(shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, ...],
                   name: str | None = None) -> None:
    """CheckpointFormatError unless SCALE_SHAPE holds one scale per BLOCK of a weight of SHAPE (its last two
    axes; ceil: a partial block at the edges; stacked experts: their leading axes alike)."""
    if len(block) != 2 or len(shape) < 2 or \
            prod(scale_shape) != prod(shape[:-2]) * -(-shape[-2] // block[0]) * -(-shape[-1] // block[1]) or \
            (len(scale_shape) == len(shape) and tuple(scale_shape[:-2]) != tuple(shape[:-2])):
        raise CheckpointFormatError(f"{name or 'a block-fp8 weight'}: scales {list(scale_shape)} do not fit the "
                                    f"weight {list(shape)} in blocks of {list(block)}")


def fp4_shape(packed: tuple[int, ...], scale_shape: tuple[int, ...], name: str | None = None) -> tuple[int, int]:
    """The [rows, cols] a packed FP4 e2m1 weight [rows, cols / 2] holds, checked against its scales
    [rows, cols / group] (CheckpointFormatError)."""
    if len(packed) != 2 or len(scale_shape) != 2 or scale_shape[0] != packed[0] or not scale_shape[1] or \
            (2 * packed[1]) % scale_shape[1]:
        raise CheckpointFormatError(f"{name or 'an fp4 weight'}: scales {list(scale_shape)} do not fit the packed "
                                    f"fp4 weight {list(packed)} (two values a byte, a scale per group of a row)")
    return packed[0], 2 * packed[1]


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, cols / 2] int8 of e2m1 pairs (the low nibble first) and [rows, groups] scales (E8M0 or
    float) -> [rows, cols] values, each group of cols / groups inputs times its scale (DeepSeek-V4's experts)."""
    lut = torch.tensor(MXFP4_VALUES, dtype=torch.float32)
    codes = packed.contiguous().view(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1)
    rows, groups = scale.shape
    values = values.reshape(rows, groups, -1) * scale.float().unsqueeze(-1)
    return values.reshape(rows, -1).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., G, 16] uint8 blocks and [..., G] uint8 exponents -> [..., G * 32] values."""
    lut = torch.tensor(MXFP4_VALUES, dtype=torch.float32)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], 32)
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).to(dtype)


def bnb4_shape(quant_state: torch.Tensor, packed_bytes: int | None = None, *, name: str | None = None,
               parts: dict | None = None) -> tuple[int, ...]:
    """The original shape recorded in a bitsandbytes quant_state blob, checked (`formats.bnb4_state`:
    CheckpointFormatError) against PACKED_BYTES, the packed weight's size, and PARTS (companion suffix ->
    shape) where given. NAME: the weight's, for messages."""
    return bnb4_state(quant_state, name, packed_bytes=packed_bytes, parts=parts)["shape"]


def dequantize_bnb4(components: dict[str, torch.Tensor], dtype: torch.dtype, name: str | None = None) -> torch.Tensor:
    """COMPONENTS: the packed weight under "weight" and its companions by suffix
    ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"),
    checked first (CheckpointFormatError)."""
    from moetool.quant import bnb

    blobs = [v for k, v in components.items() if k.startswith("quant_state.bitsandbytes__")]
    if len(blobs) != 1:
        raise CheckpointFormatError(f"{name or 'a bitsandbytes 4-bit weight'}: needs one quant_state.bitsandbytes__"
                                    f"nf4 or fp4 companion, has {len(blobs)}")
    packed = components["weight"]
    bnb4_state(blobs[0], name, packed_bytes=packed.numel() * packed.element_size(),
               parts={k: tuple(v.shape) for k, v in components.items() if k != "weight"})
    qs = bnb4_quant_state({k: v for k, v in components.items() if k != "weight"}, torch.device("cpu"), name)
    return bnb().dequantize_4bit(packed, qs).to(dtype)


def dequantize_bnb8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-wise int8 through bitsandbytes' own int8_vectorwise_dequant (q * SCB / 127)."""
    from moetool.quant import bnb

    return bnb().int8_vectorwise_dequant(q, scb.float()).to(dtype)
