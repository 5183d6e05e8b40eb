"""Sequential calibration on builtin:tiny-moe: GPTQ against round-to-nearest (routed experts only),
and prune --sequential against per-layer scoring.

Calibration: the first 16,384 tokens of the built-in training corpus (64 sequences of 256).
Evaluation: KL(original || compressed) per token on the held-out play (moetool eval's defaults),
with top-1 agreement and perplexity beside it. Rows: int4-g32-sym and int3-g32-sym by
round-to-nearest, by GPTQ (the defaults: sequential, act-order), GPTQ --no-act-order and
--no-sequential; a 3-bit budget over integer candidates with GPTQ (each candidate weighed by its
measured GPTQ error), uniform against routing-aware (mass) allocation; then prune at 50% by
frequency and REAP, per-layer against --sequential, on the same tokens and, to show how much one
calibration set decides, on the next 16,384-token windows of the corpus (mean over WINDOWS), and on
the first window paired sequence by sequence over the held-out text (mean difference and its
standard error). The
reference figures of issue 14 (llm-compressor 0.14 on the same model, tokens and text) are printed
beside them.

Run: python benchmarks/quantize_gptq_quality.py [--windows 5]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from moetool.checkpoint import open_checkpoint
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.profile import ProfileOptions, profile
from moetool.ops.prune import PruneOptions, prune
from moetool.ops.quantize import QuantizeOptions, quantize
from moetool.runner import data

CALIBRATION = ProfileOptions(max_tokens=16384, seq_len=256, batch_size=8)
LLM_COMPRESSOR = {"int4": (0.0246, 0.0193, 0.0162), "int3": (0.0968, 0.0726, 0.0611)}   # rtn, gptq, per-expert gptq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=5, help="calibration windows of the prune comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_checkpoint("builtin:tiny-moe") as original:
            prof = profile(original, CALIBRATION)
            (tmp / "profile.json").write_text(json.dumps(prof.to_dict()))
            runs = []
            for fmt in ("int4-g32-sym", "int3-g32-sym"):
                runs += [(f"{fmt} rtn", QuantizeOptions(format=fmt)),
                         (f"{fmt} gptq", QuantizeOptions(format=fmt, method="gptq", calibration=CALIBRATION)),
                         (f"{fmt} gptq --no-act-order", QuantizeOptions(format=fmt, method="gptq", act_order=False,
                                                                       calibration=CALIBRATION)),
                         (f"{fmt} gptq --no-sequential", QuantizeOptions(format=fmt, method="gptq", sequential=False,
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
            print(f"{'prune 50%':>34} {'window':>6} {'KL mean':>9} {'top-1':>7} {'perplexity':>10} {'seconds':>8}")
            windows = _windows(original, tmp, args.windows)
            per_sequence = {}   # window 0: each held-out sequence's KL, to pair the two scorings
            reports = {}        # window 0: the prune reports (kept experts and their scores)
            for w, calibration in enumerate(windows):
                for criterion in ("frequency", "reap"):
                    for sequential in (False, True):
                        label = f"{criterion} {'--sequential' if sequential else 'per-layer'}"
                        out = tmp / f"prune-{w}-{label}"
                        start = time.perf_counter()
                        report = prune(original, out, PruneOptions(ratio=0.5, criterion=criterion,
                                                                   sequential=sequential, calibration=calibration))
                        seconds = time.perf_counter() - start
                        with open_checkpoint(out) as pruned:
                            result = evaluate(pruned, EvalOptions(per_sequence=w == 0), original)
                        kl[(w, label)] = result.kl_mean
                        if w == 0:
                            reports[label] = report
                            per_sequence[label] = np.array([row["kl_mean"] for row in result.per_sequence])
                            print(f"{label:>34} {w:>6} {result.kl_mean:9.4f} {result.top1_agreement:7.1%} "
                                  f"{result.perplexity:10.2f} {seconds:8.1f}")
            for label in ("frequency per-layer", "frequency --sequential", "reap per-layer", "reap --sequential"):
                values = [kl[(w, label)] for w in range(len(windows))]
                print(f"{label:>34} {'mean':>6} {sum(values) / len(values):9.4f}  over {len(values)} windows: "
                      + " ".join(f"{v:.4f}" for v in values))
    for fmt in ("int4-g32-sym", "int3-g32-sym"):
        rtn, ours = kl[f"{fmt} rtn"], kl[f"{fmt} gptq"]
        theirs = LLM_COMPRESSOR[fmt[:4]]
        print(f"{fmt}: gptq / rtn {ours / rtn:.3f} (goal <= 0.7); llm-compressor rtn {theirs[0]}, gptq {theirs[1]}, "
              f"per-expert gptq {theirs[2]}: moetool gptq {ours:.4f} {'<=' if ours <= theirs[2] else '>'} the best")
    uniform, mass = kl["3-bit budget, uniform, gptq"], kl["3-bit budget, mass, gptq"]
    print(f"3-bit budget with gptq: routing-aware (mass) {mass:.4f} vs uniform {uniform:.4f} ({mass / uniform:.2f}x)")
    for criterion in ("frequency", "reap"):
        flat, seq = kl[(0, f"{criterion} per-layer")], kl[(0, f"{criterion} --sequential")]
        print(f"prune 50% {criterion}: --sequential {seq:.4f} vs per-layer {flat:.4f} ({seq / flat:.3f}x; goal <= 1)")
        flat_report, seq_report = reports[f"{criterion} per-layer"], reports[f"{criterion} --sequential"]
        for layer, kept in seq_report.kept.items():   # where the two choices differ, and by how much
            other = set(flat_report.kept[layer])
            ours, theirs = sorted(set(kept) - other), sorted(other - set(kept))
            if ours:
                print(f"    layer {layer}: --sequential keeps {ours}, per-layer {theirs}; {criterion} per-layer "
                      + ", ".join(f"{e}: {flat_report.scores[layer][e]:.4f}" for e in ours + theirs) + "; --sequential "
                      + ", ".join(f"{e}: {seq_report.scores[layer][e]:.4f}" for e in ours + theirs))
        diff = per_sequence[f"{criterion} --sequential"] - per_sequence[f"{criterion} per-layer"]
        if not diff.any():
            print(f"    paired over the {diff.size} held-out sequences: the two pruned models are identical")
            continue
        stderr = diff.std(ddof=1) / np.sqrt(diff.size)
        print(f"    paired over the {diff.size} held-out sequences: sequential - per-layer = {diff.mean():+.4f} "
              f"± {stderr:.4f} (one standard error; {diff.mean() / stderr:+.2f} of them), sequential lower on "
              f"{int((diff < 0).sum())} of {diff.size} sequences")


def _windows(original, tmp: Path, count: int) -> list[ProfileOptions]:
    """CALIBRATION, then the next COUNT - 1 windows of 16,384 tokens of the training corpus."""
    ids = np.asarray(data.calibration_ids(data="builtin:train", token_ids=None, field="text", max_tokens=None,
                                          tokenizer_path=data.tokenizer_source(original), chat_template=None,
                                          default="builtin")).reshape(-1)
    out = [CALIBRATION]
    for w in range(1, min(count, ids.size // 16384)):
        path = tmp / f"window{w}.json"
        path.write_text(json.dumps(ids[w * 16384:(w + 1) * 16384].tolist()))
        out.append(ProfileOptions(token_ids=path, max_tokens=16384, seq_len=256, batch_size=8))
    return out


if __name__ == "__main__":
    main()
