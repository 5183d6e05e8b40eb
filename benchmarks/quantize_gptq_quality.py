"""GPTQ against round-to-nearest on builtin:tiny-moe, routed experts only.

Calibration: the first 16,384 tokens of the built-in training corpus (64 sequences of 256).
Evaluation: KL(original || quantized) per token on the held-out play (moetool eval's defaults),
with top-1 agreement and perplexity beside it. Rows: int4-g32-sym and int3-g32-sym by
round-to-nearest, by GPTQ (sequential, the default), GPTQ without --sequential and with
--act-order; then a 3-bit budget over integer candidates with GPTQ, uniform against
routing-aware (mass) allocation. The reference figures of issue 14 (llm-compressor 0.14 on the
same model, tokens and text) are printed beside them.

Run: python benchmarks/quantize_gptq_quality.py
"""

import json
import tempfile
import time
from pathlib import Path

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.quantize import QuantizeOptions, quantize

CALIBRATION = ProfileOptions(max_tokens=16384, seq_len=256, batch_size=8)
LLM_COMPRESSOR = {"int4": (0.0246, 0.0193, 0.0162), "int3": (0.0968, 0.0726, 0.0611)}   # rtn, gptq, per-expert gptq


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_checkpoint("builtin:tiny-moe") as original:
            prof = profile(original, CALIBRATION)
            (tmp / "profile.json").write_text(json.dumps(prof.to_dict()))
            runs = []
            for fmt in ("int4-g32-sym", "int3-g32-sym"):
                runs += [(f"{fmt} rtn", QuantizeOptions(format=fmt)),
                         (f"{fmt} gptq", QuantizeOptions(format=fmt, method="gptq", calibration=CALIBRATION)),
                         (f"{fmt} gptq --no-sequential", QuantizeOptions(format=fmt, method="gptq", sequential=False,
                                                                        calibration=CALIBRATION)),
                         (f"{fmt} gptq --act-order", QuantizeOptions(format=fmt, method="gptq", act_order=True,
                                                                    calibration=CALIBRATION))]
            for policy in ("uniform", "mass"):
                runs.append((f"3-bit budget, {policy}, gptq",
                             QuantizeOptions(bits_budget=3.0, policy=policy, profile=tmp / "profile.json",
                                             method="gptq", calibration=CALIBRATION)))
            print(f"{'run':>34} {'bits':>6} {'KL mean':>9} {'top-1':>7} {'perplexity':>10} {'seconds':>8}")
            kl = {}
            for label, options in runs:
                out = tmp / str(len(kl))
                start = time.perf_counter()
                report = quantize(original, out, options)
                seconds = time.perf_counter() - start
                with open_checkpoint(out) as quantized:
                    result = evaluate(quantized, EvalOptions(), original)
                kl[label] = result.kl_mean
                print(f"{label:>34} {report.expert_bits:6.3f} {result.kl_mean:9.4f} {result.top1_agreement:7.1%} "
                      f"{result.perplexity:10.2f} {seconds:8.1f}")
    for fmt in ("int4-g32-sym", "int3-g32-sym"):
        rtn, ours = kl[f"{fmt} rtn"], kl[f"{fmt} gptq"]
        theirs = LLM_COMPRESSOR[fmt[:4]]
        print(f"{fmt}: gptq / rtn {ours / rtn:.3f} (goal <= 0.7); llm-compressor rtn {theirs[0]}, gptq {theirs[1]}, "
              f"per-expert gptq {theirs[2]}: moetool gptq {ours:.4f} {'<=' if ours <= theirs[2] else '>'} the best")
    uniform, mass = kl["3-bit budget, uniform, gptq"], kl["3-bit budget, mass, gptq"]
    print(f"3-bit budget with gptq: routing-aware (mass) {mass:.4f} vs uniform {uniform:.4f} ({mass / uniform:.2f}x)")


if __name__ == "__main__":
    main()
