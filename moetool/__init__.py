"""moetool: inspect, convert, upcycle, quantize, prune and profile Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"


def load_model(path, *, dtype=None, device="cpu"):
    """Load a checkpoint written by moetool as a transformers model (CPU by default), including
    quantized checkpoints (`moetool quantize`: weights dequantized when used) and globally pruned
    checkpoints whose layers keep different numbers of experts; also GGUF files of the families
    moetool runs from GGUF (Qwen2/3-MoE, Mixtral), dequantized."""
    from moetool.runner.model import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device)
