"""NVIDIA ModelOpt checkpoints (`quant_method: modelopt`, nvidia/*-FP4 and *-FP8 releases): read dequantized.

* NVFP4: ``X.weight`` uint8 [rows, cols / 2] (two e2m1 values a byte, the low nibble first),
  ``X.weight_scale`` fp8 e4m3 [rows, cols / 16], ``X.weight_scale_2`` float32 (one per tensor);
  value = e2m1 x weight_scale x weight_scale_2.
* FP8: ``X.weight`` fp8 e4m3, ``X.weight_scale`` float32 (per tensor, or per row); value = code x scale.

``X.input_scale`` and the kv-cache scales are used at serving only. Each weight's form follows from its stored
tensors (MIXED_PRECISION releases mix both). The values are ModelOpt's own dequantization's
(modelopt/torch/quantization/qtensor/nvfp4_tensor.py NVFP4QTensor.dequantize: e2m1 x (fp8 scale x weight_scale_2)
in float32, rounded once to the model's dtype; fp8: code x scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from moetool.arch.matcher import FUSED_EXPERT_TENSORS
from moetool.errors import CheckpointFormatError
from moetool.quant import compressed_tensors as ct

QUANT_METHOD = "modelopt"
NVFP4_GROUP = 16


@dataclass(frozen=True)
class ModeloptScheme:
    algo: str                 # "nvfp4" | "fp8"
    strategy: str = "tensor"  # fp8: "tensor" | "channel"
    unreadable: str | None = None
    fused: bool = False       # a 3-D experts tensor [E, in, out] (FUSED_EXPERT_TENSORS), scales W_weight_scale...

    @property
    def id(self) -> str:
        return ("nvfp4" if self.algo == "nvfp4" else f"fp8 {self.strategy}") + (" fused experts" if self.fused else "")

    def stored(self, weight: str) -> dict[str, str]:
        module, dot = (weight, "_") if self.fused else (weight.removesuffix(".weight"), ".")
        out = {"codes": weight, "scale": f"{module}{dot}weight_scale"}
        if self.algo == "nvfp4":
            out["scale_2"] = f"{module}{dot}weight_scale_2"
        return out

    def _as_compressed(self) -> ct.StoredScheme:
        if self.algo == "nvfp4":
            return ct.StoredScheme("nvfp4-pack-quantized", "float", 4, "tensor_group", NVFP4_GROUP)
        return ct.StoredScheme("float-quantized", "float", 8, self.strategy)

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        if self.fused:   # [E, in / 2, out] e2m1 pairs along the inputs; fp8 as stored
            if len(stored) != 3:
                raise CheckpointFormatError(f"{name or 'a fused experts tensor'} is {list(stored)}, not 3-D")
            return (stored[0], stored[1] * 2, stored[2]) if self.algo == "nvfp4" else tuple(stored)
        return self._as_compressed().original_shape(stored, name=name)

    def params(self, stored: tuple[int, ...]) -> int:
        return prod(self.original_shape(stored))

    def dequantized_dtype(self, parts) -> str:
        return "BF16" if self.algo == "nvfp4" else parts["scale"].dtype

    def dequantize(self, parts: dict, shape: tuple[int, ...], dtype, state=None, name=None):
        import torch

        scale = parts["scale"]
        if self.fused:
            return self._dequantize_fused(parts, shape, dtype, name or "a fused experts tensor")
        if self.algo == "fp8":
            held = {"": parts["codes"], ct.SCALE: scale.reshape(-1, 1) if self.strategy == "channel" else scale}
            return self._as_compressed().dequantize(held, shape, dtype, name=name)
        rows, cols = shape
        where = name or "a weight"
        blocks = (rows, cols // NVFP4_GROUP)
        if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != blocks or cols % NVFP4_GROUP:
            raise CheckpointFormatError(f"{where}: NVFP4 scales are float8_e4m3fn [{rows}, {cols // NVFP4_GROUP}], "
                                        f"not {scale.dtype} {list(scale.shape)}")
        scale_2 = parts["scale_2"]
        if scale_2.numel() != 1:
            raise CheckpointFormatError(f"{where}: weight_scale_2 holds {scale_2.numel()} values, not one")
        per_block = scale.to(torch.float32) * scale_2.to(torch.float32).reshape(())
        values = ct.e2m1_values(parts["codes"], rows, cols).unflatten(-1, (-1, NVFP4_GROUP)) * per_block.unsqueeze(-1)
        return values.flatten(-2).to(dtype or torch.bfloat16)

    def _dequantize_fused(self, parts: dict, shape: tuple[int, ...], dtype, where: str):
        """[E, in, out] from ModelOpt's fused export (unified_export_hf.py): each expert's weight, as its [out, in]
        transpose is quantized, with NVFP4QTensor.dequantize's arithmetic (scale x weight_scale_2 first, in float32);
        weight_scale_2 one for the tensor (or one an expert); fp8: code x the one scale."""
        import torch

        experts, inputs, outputs = shape
        scale = parts["scale"]
        if self.algo == "fp8":
            if scale.numel() != 1:
                raise CheckpointFormatError(f"{where}: fp8 scale {list(scale.shape)}, not one for the tensor")
            return (parts["codes"].to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype or scale.dtype)
        blocks = (experts, inputs // NVFP4_GROUP, outputs)
        if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != blocks or inputs % NVFP4_GROUP:
            raise CheckpointFormatError(f"{where}: NVFP4 scales are float8_e4m3fn {list(blocks)}, not {scale.dtype} "
                                        f"{list(scale.shape)}")
        scale_2 = parts["scale_2"].to(torch.float32)
        if scale_2.numel() not in (1, experts):
            raise CheckpointFormatError(f"{where}: weight_scale_2 holds {scale_2.numel()} values, not 1 or {experts}")
        per_block = scale.transpose(1, 2).to(torch.float32) * scale_2.reshape(-1, 1, 1)      # [E, out, in / 16]
        codes = parts["codes"].transpose(1, 2).reshape(experts * outputs, inputs // 2)
        values = ct.e2m1_values(codes, experts * outputs, inputs).reshape(experts, outputs, -1, NVFP4_GROUP)
        return (values * per_block.unsqueeze(-1)).flatten(-2).transpose(1, 2).to(dtype or torch.bfloat16)


# the quant_algo values whose weights this reads (W4A16_NVFP4: NVFP4's tensors without input scales)
READ_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "MIXED_PRECISION")


def is_modelopt(method) -> bool:
    """QUANT_METHOD, or a spelling vLLM also takes for it (any quant_method starting "modelopt": modelopt_fp4)."""
    return isinstance(method, str) and method.lower().startswith(QUANT_METHOD)


def schemes(config: dict | None, names=()) -> dict[str, ModeloptScheme]:
    """Weight name -> scheme of every weight a ModelOpt checkpoint stores quantized, told by its tensors' dtypes
    (NAMES: name -> anything with .dtype and .shape)."""
    algo = str(((config or {}).get("quantization_config") or {}).get("quant_algo") or "").upper()
    out = {}
    for name, ref in dict(names).items() if isinstance(names, dict) else ():
        if name.endswith(FUSED_EXPERT_TENSORS) and name + "_weight_scale" in names:   # (Llama 4's, gpt-oss's)
            out[name] = _fused_scheme(algo, ref, names[name + "_weight_scale"], name + "_weight_scale_2" in names)
            continue
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        scale = names.get(module + ".weight_scale")
        if scale is None:
            continue
        if algo and algo not in READ_ALGOS:
            out[name] = ModeloptScheme("nvfp4", unreadable=f"ModelOpt's {algo} checkpoints are not read (its "
                                                           f"{', '.join(READ_ALGOS)} ones are)")
        elif module + ".pre_quant_scale" in names:
            out[name] = ModeloptScheme("nvfp4", unreadable="ModelOpt's AWQ checkpoints (pre-quantization input "
                                                           "scales, pre_quant_scale) are not read")
        elif ref.dtype == "U8" and module + ".weight_scale_2" in names:
            out[name] = ModeloptScheme("nvfp4")
        elif ref.dtype == "F8_E4M3" and scale.dtype not in ("F32", "BF16", "F16"):
            out[name] = ModeloptScheme("fp8", unreadable=f"ModelOpt fp8 scales stored as {scale.dtype} are not read")
        elif ref.dtype == "F8_E4M3":
            rows = ref.shape[0] if ref.shape else 0
            shape = tuple(scale.shape)
            if prod(shape) == 1:
                out[name] = ModeloptScheme("fp8")
            elif shape in ((rows,), (rows, 1)):   # (told by shape: block scales can hold as many as there are rows)
                out[name] = ModeloptScheme("fp8", "channel")
            else:
                out[name] = ModeloptScheme("fp8", "tensor", f"ModelOpt fp8 scales {list(scale.shape)} for a "
                                                           f"{list(ref.shape)} weight are not read (per tensor or "
                                                           "per row are)")
        else:
            out[name] = ModeloptScheme("nvfp4", unreadable=f"a ModelOpt weight stored as {ref.dtype} beside "
                                                           "weight_scale is not one moetool reads")
    return out


def _fused_scheme(algo: str, ref, scale, has_scale_2: bool) -> ModeloptScheme:
    """The scheme of a fused experts tensor REF beside its W_weight_scale SCALE."""
    if algo and algo not in READ_ALGOS:
        return ModeloptScheme("nvfp4", unreadable=f"ModelOpt's {algo} checkpoints are not read (its "
                                                  f"{', '.join(READ_ALGOS)} ones are)", fused=True)
    if ref.dtype == "U8" and has_scale_2:
        return ModeloptScheme("nvfp4", fused=True)
    if ref.dtype == "F8_E4M3" and prod(scale.shape) == 1 and scale.dtype in ("F32", "BF16", "F16"):
        return ModeloptScheme("fp8", fused=True)
    return ModeloptScheme("nvfp4" if ref.dtype == "U8" else "fp8", fused=True,
                          unreadable=f"ModelOpt fused experts stored as {ref.dtype} with a {scale.dtype} "
                                     f"{list(scale.shape)} scale are not read (nvfp4, and fp8 per tensor, are)")


def activation_note(config: dict | None, names=()) -> str | None:
    """ModelOpt quantizes the inputs of its quantized Linears (their X.input_scale) and, with kv_cache_quant_algo,
    the kv cache: the warning that moetool does not."""
    qc = (config or {}).get("quantization_config") or {}
    served = []
    if any(name.endswith((".input_scale", "_input_scale")) for name in names):   # (fused experts': W_input_scale)
        served.append(f"{str(qc.get('quant_algo') or 'quantized').lower()} inputs, static scales")
    kv = qc.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme")   # (hf_quant_config.json's; config.json's)
    if isinstance(kv, dict):
        kv = f"{'fp' if kv.get('type') == 'float' else 'int'}{kv.get('num_bits')}"
    if kv:
        served.append(f"kv cache {str(kv).lower()}")
    return ct.served_note(served)
