"""Routing-aware against uniform bit allocation on builtin:tiny-moe, at an average of 3 bits per
expert parameter (scales and state included), measured against the unquantized model on the
held-out play: KL(original || quantized) per token, top-1 agreement and perplexity.

Every policy chooses each expert's format from the same candidates under the same budget; only
the importance differs: uniform (every expert alike: reconstruction error alone), frequency
(tokens routed), mass (gate weight) and saliency (REAP). The profile is computed once on the
training plays. One format for every expert is shown for reference (int3 at 3.19 bits is larger
than the budget).

Run: python benchmarks/quantize_quality.py [--tokens N] [--bits B]
"""

import argparse
import json
import tempfile
from pathlib import Path

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.quantize import QuantizeOptions, quantize

POLICIES = ("uniform", "frequency", "mass", "saliency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens evaluated")
    parser.add_argument("--bits", type=float, default=3.0, help="bits per expert parameter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_checkpoint("builtin:tiny-moe") as original:
            report = profile(original, ProfileOptions(max_tokens=16384, seq_len=256, saliency=True))
            (tmp / "profile.json").write_text(json.dumps(report.to_dict()))
            evaluation = EvalOptions(max_tokens=args.tokens, seq_len=128)
            base = evaluate(original, evaluation)
            print(f"builtin:tiny-moe (8 experts, top-2): held-out perplexity {base.perplexity:.2f}")
            print(f"{'allocation':>26} {'bits':>6} {'KL mean':>9} {'top-1 agree':>11} {'perplexity':>10}  formats")
            results = {}
            runs = [(f"{policy} ({scope})", QuantizeOptions(bits_budget=args.bits, policy=policy, budget_scope=scope,
                                                            profile=tmp / "profile.json"))
                    for scope in ("global", "layer") for policy in POLICIES]
            runs += [(f"one format: {fmt}", QuantizeOptions(format=fmt)) for fmt in ("int3-g128-asym", "nf4-b64")]
            for label, options in runs:
                out = tmp / label.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "")
                q = quantize(original, out, options)
                with open_checkpoint(out) as quantized:
                    result = evaluate(quantized, evaluation, original)
                results[label] = result.kl_mean
                formats = ", ".join(f"{k} x{v}" for k, v in sorted(q.formats.items()))
                print(f"{label:>26} {q.expert_bits:6.3f} {result.kl_mean:9.4f} {result.top1_agreement:11.1%} "
                      f"{result.perplexity:10.2f}  {formats}")
            for scope in ("global", "layer"):
                uniform = results[f"uniform ({scope})"]
                best = min(POLICIES[1:], key=lambda p: results[f"{p} ({scope})"])
                print(f"{scope} budget: best routing-aware policy {best} KL {results[f'{best} ({scope})']:.4f} vs "
                      f"uniform {uniform:.4f} ({results[f'{best} ({scope})'] / uniform:.2f}x)")


if __name__ == "__main__":
    main()
