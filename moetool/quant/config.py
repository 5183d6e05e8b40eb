"""The `quantization_config` of a checkpoint moetool quantized (its own layout, or compressed-tensors'
pack-quantized one), read back."""

from __future__ import annotations

from moetool.quant import compressed_tensors, released
from moetool.quant.formats import Format, parse_format

QUANT_METHOD = "moetool"


def recorded_formats(config: dict | None, names=None) -> dict[str, Format] | None:
    """Weight name -> format of a checkpoint moetool quantized, or of a compressed-tensors
    pack-quantized one moetool runs (None for any other checkpoint). compressed-tensors targets
    modules by pattern, so its formats are only listed for the tensor NAMES given: without them the
    result is {} (quantized; formats known once matched against the names)."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.recorded_formats(config, names or ())
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    return {name: parse_format(fid) for name, fid in qc.get("tensors", {}).items()}


def tool_quantized(config: dict | None) -> bool:
    """Whether CONFIG is a checkpoint a quantization tool wrote: moetool, compressed-tensors in any format
    (llm-compressor's), ModelOpt, AutoAWQ, GPTQ or AutoRound; such weights are not pruned or quantized again in
    place."""
    if released.quant_method(config) == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.quantizes_weights(config)
    return recorded_formats(config) is not None or released.quantized_weights(config) is not None
