"""Quantized checkpoints other tools wrote, read by their stored tensors: compressed-tensors (llm-compressor),
NVIDIA ModelOpt, AutoAWQ, GPTQ (AutoGPTQ, GPTQModel) and Intel AutoRound.

Each quantized weight X.weight has a scheme that names the tensors holding it (`stored(weight)`: key ->
stored name, the codes first), its shape from theirs (`original_shape`, headers only), its parameters, and
its values (`dequantize`, torch, as the writing tool's own dequantization computes them). `dequantized_view`
puts the dequantized weights in place of what holds them, which is how convert --dequantize, profile, eval
and load_model read such checkpoints (moetool's own layouts, kept quantized in memory, are read elsewhere).
"""

from __future__ import annotations

from moetool.quant import autoround, compressed_tensors, int_releases, modelopt

# module-level scales of quantized activations (X.input_scale, ...) and of the kv cache (self_attn.k_scale):
# used at serving, not by moetool, which runs activations unquantized
SERVED_SCALES = (".input_scale", ".input_global_scale", ".input_zero_point", ".output_scale", ".output_global_scale",
                 ".output_zero_point", ".k_scale", ".v_scale", ".q_scale", ".k_zero_point", ".v_zero_point",
                 "_input_scale")   # (ModelOpt's fused experts: experts.gate_up_proj_input_scale)
METHODS = {compressed_tensors.QUANT_METHOD: compressed_tensors.stored_schemes, modelopt.QUANT_METHOD: modelopt.schemes,
           int_releases.AWQ: int_releases.awq_schemes, int_releases.GPTQ: int_releases.gptq_schemes,
           autoround.QUANT_METHOD: autoround.schemes}


def quant_method(config: dict | None) -> str | None:
    """CONFIG's quantization_config.quant_method (ModelOpt's other spellings, modelopt_fp4..., as "modelopt";
    AutoRound's, intel/auto-round and auto_round, as "auto-round")."""
    method = ((config or {}).get("quantization_config") or {}).get("quant_method")
    if modelopt.is_modelopt(method):
        return modelopt.QUANT_METHOD
    return autoround.QUANT_METHOD if autoround.is_autoround(method) else method


def quantized_weights(config: dict | None, names=()) -> dict | None:
    """Weight name -> scheme of every weight among NAMES (tensor names) a checkpoint of another tool stores
    quantized; None for a checkpoint no tool moetool reads quantized (its quant_method: METHODS)."""
    read = METHODS.get(quant_method(config))
    return None if read is None else read(config, names)


def codes_of(schemes: dict) -> dict:
    """The stored name of each scheme's codes (X.weight_packed, X.qweight, ...) -> (weight, scheme)."""
    return {next(iter(scheme.stored(weight).values())): (weight, scheme) for weight, scheme in schemes.items()}


def activation_note(config: dict | None, names=()) -> str | None:
    """What a released checkpoint quantizes at serving that moetool does not simulate (None: nothing):
    compressed-tensors' input_activations and kv_cache_scheme, ModelOpt's activation and kv-cache scales."""
    method = quant_method(config)
    if method == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.activation_note(config)
    if method == modelopt.QUANT_METHOD:
        return modelopt.activation_note(config, names)
    return None


def served_scales(config: dict | None, names) -> frozenset[str]:
    """The names among NAMES of a released checkpoint's activation and kv-cache scales (SERVED_SCALES)."""
    if quant_method(config) not in METHODS:
        return frozenset()
    return frozenset(name for name in names if name.endswith(SERVED_SCALES))


def check_readable(schemes: dict) -> None:
    """UnsupportedError (before any work) for the first weight whose scheme moetool cannot dequantize."""
    from moetool.errors import UnsupportedError

    for weight, scheme in schemes.items():
        if getattr(scheme, "unreadable", None):
            raise UnsupportedError(f"{weight}: {scheme.unreadable}")


def dequantized_view(ckpt, schemes: dict, dtype: str | None = None):
    """CKPT with each of SCHEMES' weights in place of the tensors that store it, dequantized when read (in DTYPE, a
    safetensors dtype name; None: as the writing tool's dequantization gives them), its activation and kv-cache
    scales dropped, and no quantization_config: what the tensor plan (which knows the releases'
    fp8/mxfp4/bitsandbytes forms besides) can lay out."""
    from dataclasses import replace

    from moetool.checkpoint.checkpoint import TORCH_DTYPES
    from moetool.checkpoint.pieces import ComputedRef
    from moetool.errors import CheckpointFormatError

    check_readable(schemes)
    held = {stored: weight for weight, scheme in schemes.items() for stored in scheme.stored(weight).values()}
    codes = codes_of(schemes)
    served = served_scales(ckpt.config, ckpt.tensors)
    tensors = {}
    for name, ref in ckpt.tensors.items():
        if name in codes:
            weight, scheme = codes[name]
            stored = scheme.stored(weight)
            missing = next((n for n in stored.values() if n not in ckpt.tensors), None)
            if missing is not None:
                raise CheckpointFormatError(f"{weight}: stored quantized without {missing}")
            parts = {key: ckpt.tensors[n] for key, n in stored.items()}
            shape = scheme.original_shape(ref.shape, parts=parts, name=weight)
            tensors[weight] = ComputedRef(weight, dtype or scheme.dequantized_dtype(parts), shape,
                                          lambda scheme=scheme, parts=parts, shape=shape, weight=weight:
                                          scheme.dequantize({k: r.load() for k, r in parts.items()}, shape,
                                                            TORCH_DTYPES[dtype] if dtype else None, name=weight))
        elif name not in held and name not in served:
            tensors[name] = ref
    config = ckpt.config
    if config and "quantization_config" in config:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    return replace(ckpt, tensors=tensors, config=config)
