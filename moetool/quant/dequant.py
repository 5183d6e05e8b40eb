"""Exact dequantization of the quantized forms MoE releases ship (torch, CPU).

* block FP8 (DeepSeek-V3, Kimi-K2, MiniMax-M2): W = q * scale_inv[row // 128, col // 128]
* MXFP4 (GPT-OSS): 4-bit e2m1 values, two per byte (low nibble first), one power-of-two
  scale (E8M0, bias 127) per 32 values along the input axis
* bitsandbytes 4-bit (nf4/fp4) through bitsandbytes' own dequantize_4bit
* bitsandbytes int8 (LLM.int8 row-wise) through bitsandbytes' own int8_vectorwise_dequant
"""

from __future__ import annotations

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
