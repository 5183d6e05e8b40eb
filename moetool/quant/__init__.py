"""Quantization formats, dequantization of released forms, llama.cpp allocation files."""

import logging


def bnb():
    """bitsandbytes.functional, imported without its CPU-kernel notice (an optional package it
    looks for on every import; moetool does not use that kernel)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional

    return bitsandbytes.functional
