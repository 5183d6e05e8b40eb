"""The `quantization_config` moetool records in a checkpoint it quantized, read back."""

from __future__ import annotations

from moetool.quant.formats import Format, parse_format

QUANT_METHOD = "moetool"


def recorded_formats(config: dict | None) -> dict[str, Format] | None:
    """Weight name -> format of a checkpoint moetool quantized (None for any other checkpoint)."""
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    return {name: parse_format(fid) for name, fid in qc.get("tensors", {}).items()}
