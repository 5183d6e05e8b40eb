"""NVIDIA ModelOpt checkpoints (`quant_method: modelopt`, nvidia/*-FP4 and *-FP8 releases): read dequantized.

* NVFP4: ``X.weight`` uint8 [rows, cols / 2] (two e2m1 values a byte, the low nibble first),
  ``X.weight_scale`` fp8 e4m3 [rows, cols / 16], ``X.weight_scale_2`` float32 (one per tensor);
  value = e2m1 x weight_scale x weight_scale_2.
* FP8: ``X.weight`` fp8 e4m3, ``X.weight_scale`` float32 (per tensor, or per row); value = code x scale.

``X.input_scale`` and the kv-cache scales are used at serving only. Each weight's form follows from its stored
tensors (MIXED_PRECISION releases mix both). The values are computed as compressed-tensors computes them after
its own ModelOpt converter (entrypoints/convert/converters/modelopt_nvfp4.py: weight_scale_2 -> its reciprocal,
a global scale), so its decompression is the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetool.quant import compressed_tensors as ct

QUANT_METHOD = "modelopt"
NVFP4_GROUP = 16


@dataclass(frozen=True)
class ModeloptScheme:
    algo: str                 # "nvfp4" | "fp8"
    strategy: str = "tensor"  # fp8: "tensor" | "channel"
    unreadable: str | None = None

    @property
    def id(self) -> str:
        return "nvfp4" if self.algo == "nvfp4" else f"fp8 {self.strategy}"

    def stored(self, weight: str) -> dict[str, str]:
        module = weight.removesuffix(".weight")
        out = {"codes": weight, "scale": module + ".weight_scale"}
        if self.algo == "nvfp4":
            out["scale_2"] = module + ".weight_scale_2"
        return out

    def _as_compressed(self) -> ct.StoredScheme:
        if self.algo == "nvfp4":
            return ct.StoredScheme("nvfp4-pack-quantized", "float", 4, "tensor_group", NVFP4_GROUP)
        return ct.StoredScheme("float-quantized", "float", 8, self.strategy)

    def original_shape(self, stored: tuple[int, ...], parts=None, name: str | None = None) -> tuple[int, ...]:
        return self._as_compressed().original_shape(stored, name=name)

    def params(self, stored: tuple[int, ...]) -> int:
        rows, cols = self.original_shape(stored)
        return rows * cols

    def dequantized_dtype(self, parts) -> str:
        return "BF16" if self.algo == "nvfp4" else parts["scale"].dtype

    def dequantize(self, parts: dict, shape: tuple[int, ...], dtype, state=None, name=None):
        scale = parts["scale"]
        if self.algo == "nvfp4":
            # the global scale keeps the stored shape: a 0-d one divides the bf16 scales in bf16, as in the package
            held = {ct.PACKED: parts["codes"], ct.SCALE: scale, "_global_scale": 1 / parts["scale_2"]}
        else:
            held = {"": parts["codes"], ct.SCALE: scale.reshape(-1, 1) if self.strategy == "channel" else scale}
        return self._as_compressed().dequantize(held, shape, dtype, name=name)


READ_ALGOS = ("NVFP4", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "MIXED_PRECISION")


def schemes(config: dict | None, names=()) -> dict[str, ModeloptScheme]:
    """Weight name -> scheme of every weight a ModelOpt checkpoint stores quantized, told by its tensors' dtypes
    (NAMES: name -> anything with .dtype and .shape)."""
    algo = str(((config or {}).get("quantization_config") or {}).get("quant_algo") or "").upper()
    out = {}
    for name, ref in dict(names).items() if isinstance(names, dict) else ():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        scale = names.get(module + ".weight_scale")
        if scale is None:
            continue
        if (algo and algo not in READ_ALGOS) or module + ".pre_quant_scale" in names:
            out[name] = ModeloptScheme("nvfp4", unreadable=f"ModelOpt's {algo or 'AWQ'} checkpoints (pre-quantization "
                                                           "input scales, pre_quant_scale) are not read (NVFP4 and "
                                                           "FP8 are)")
        elif ref.dtype == "U8" and module + ".weight_scale_2" in names:
            out[name] = ModeloptScheme("nvfp4")
        elif ref.dtype == "F8_E4M3" and scale.dtype not in ("F32", "BF16", "F16"):
            out[name] = ModeloptScheme("fp8", unreadable=f"ModelOpt fp8 scales stored as {scale.dtype} are not read")
        elif ref.dtype == "F8_E4M3":
            elements = 1
            for n in scale.shape:
                elements *= n
            rows = ref.shape[0] if ref.shape else 0
            if elements == 1:
                out[name] = ModeloptScheme("fp8")
            elif elements == rows:
                out[name] = ModeloptScheme("fp8", "channel")
            else:
                out[name] = ModeloptScheme("fp8", "tensor", f"ModelOpt fp8 scales {list(scale.shape)} for a "
                                                           f"{list(ref.shape)} weight are not read (per tensor or "
                                                           "per row are)")
        else:
            out[name] = ModeloptScheme("nvfp4", unreadable=f"a ModelOpt weight stored as {ref.dtype} beside "
                                                           "weight_scale is not one moetool reads")
    return out


def activation_note(config: dict | None, names=()) -> str | None:
    """ModelOpt quantizes the inputs of its quantized Linears (their X.input_scale) and, with kv_cache_quant_algo,
    the kv cache: the warning that moetool does not."""
    qc = (config or {}).get("quantization_config") or {}
    served = []
    if any(name.endswith(".input_scale") for name in names):
        served.append(f"{str(qc.get('quant_algo') or 'quantized').lower()} inputs, static scales")
    kv = qc.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme")   # (hf_quant_config.json's; config.json's)
    if isinstance(kv, dict):
        kv = f"{'fp' if kv.get('type') == 'float' else 'int'}{kv.get('num_bits')}"
    if kv:
        served.append(f"kv cache {str(kv).lower()}")
    return ct.served_note(served)
