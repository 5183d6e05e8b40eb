"""The vLLM-servable formats of `quantize --layout compressed-tensors` on builtin:tiny-moe: KL(original ||
quantized) on the held-out play (moetool eval's defaults), top-1 agreement and perplexity, expert bits per
parameter and seconds, for every routed expert in fp8 (one scale per row), fp8-b128 (one per 128 x 128 tile: the
tiny model's expert matrices are one tile each), int8-g128-sym and int4-g128-sym by round-to-nearest, and
int4-g128-sym by GPTQ. Each checkpoint is read back as vLLM would read its weights (the dequantized view moetool
runs; activations unquantized: the fp8 rows measure the weights alone, not vLLM's fp8 activations).

Run: python benchmarks/ct_formats_quality.py
"""

import tempfile
import time
from pathlib import Path

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions
from moetool.ops.quantize import QuantizeOptions, quantize

CALIBRATION = ProfileOptions(max_tokens=16384, seq_len=256, batch_size=8)
RUNS = [("fp8", {}), ("fp8-b128", {}), ("int8-g128-sym", {}), ("int4-g128-sym", {}),
        ("int4-g128-sym", {"method": "gptq", "calibration": CALIBRATION})]


def main() -> None:
    print(f"{'format':>22} {'bits':>6} {'KL mean':>9} {'top-1':>7} {'perplexity':>10} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp, open_checkpoint("builtin:tiny-moe") as original:
        for i, (fmt, extra) in enumerate(RUNS):
            out = Path(tmp) / str(i)
            start = time.perf_counter()
            report = quantize(original, out, QuantizeOptions(format=fmt, layout="compressed-tensors", **extra))
            seconds = time.perf_counter() - start
            with open_checkpoint(out) as quantized:
                result = evaluate(quantized, EvalOptions(), original)
            label = fmt + (" gptq" if extra else "")
            print(f"{label:>22} {report.expert_bits:6.3f} {result.kl_mean:9.5f} {result.top1_agreement:7.1%} "
                  f"{result.perplexity:10.2f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
