"""Prune builtin:tiny-moe by each criterion at 25% and 50% of its experts removed, and measure
the result against the unpruned model on the held-out play: KL(original || pruned) per token,
top-1 agreement and perplexity. The profile (with saliency) is computed once on the training plays.

Run: python benchmarks/prune_quality.py [--tokens N]
"""

import argparse
import json
import tempfile
from pathlib import Path

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.prune import PruneOptions, prune

CRITERIA = ("reap", "frequency", "soft-count", "ean", "weight-norm", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens evaluated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_checkpoint("builtin:tiny-moe") as original:
            report = profile(original, ProfileOptions(max_tokens=16384, seq_len=256, saliency=True))
            (tmp / "profile.json").write_text(json.dumps(report.to_dict()))
            evaluation = EvalOptions(max_tokens=args.tokens, seq_len=128)
            base = evaluate(original, evaluation)
            print(f"builtin:tiny-moe (8 experts, top-2): held-out perplexity {base.perplexity:.2f}")
            print(f"{'removed':>8} {'criterion':>12} {'KL mean':>9} {'top-1 agree':>11} {'perplexity':>10}")
            for ratio in (0.25, 0.5):
                for criterion in CRITERIA:
                    out = tmp / f"{criterion}-{ratio}"
                    prune(original, out, PruneOptions(ratio=ratio, criterion=criterion, profile=tmp / "profile.json"
                                                      if criterion != "weight-norm" else None, seed=0))
                    with open_checkpoint(out) as pruned:
                        result = evaluate(pruned, evaluation, original)
                    print(f"{ratio:>8.0%} {criterion:>12} {result.kl_mean:9.4f} {result.top1_agreement:11.1%} "
                          f"{result.perplexity:10.2f}")


if __name__ == "__main__":
    main()
