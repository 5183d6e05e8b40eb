"""Benchmark GPTQ (`moetool.quant.gptq`) against round-to-nearest (`Format.quantize`) on one MoE
layer's experts, measured in the same run.

The weights are one layer of Qwen3-30B-A3B's shapes: 128 experts of gate and up [768, 2048] and
down [2048, 768], 1.21 GB in bf16, random normal. Each expert's Hessians come from --tokens random
inputs with a non-identity covariance (a shared low-rank part and uneven channel scales, as
activations have): the gate/up input [tokens, 2048] and the down input [tokens, 768], added in
batches of 256 tokens as a calibration pass would. Gate and up share their Hessian and are
quantized as one stacked [1536, 2048] matrix (GPTQ's rows are independent; one factorization).

Each method runs in its own process, so that its peak RSS is its own, and holds one expert at a
time: its weights and inputs are generated (not timed), quantized (timed), then dropped. The
methods run alternately, --runs times each, and each one's fastest run is reported.

* rtn: Format.quantize of gate, up and down
* gptq: Hessian accumulation (timed on its own) and gptq() of [gate; up] and of down, with
  act_order (quantize --method gptq's default)

Printed for each: seconds, GB/s of bf16 expert weights, the process's peak RSS and its RSS before
the first expert; then the rate ratio, and GPTQ's output error trace((W-Q) H (W-Q)^T) over
round-to-nearest's on the first two experts (a check that the speed is that of real work).

Run: python benchmarks/gptq_speed.py [--format int4-g32-sym] [--experts 128] [--tokens 1024] [--runs 2]
     [--quick]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

HIDDEN, FFN, RANK, BATCH = 2048, 768, 32, 256


def rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def expert(e: int, tokens: int, with_inputs: bool):
    """Expert E's gate, up, down (bf16) and, WITH_INPUTS, its gate/up and down inputs (float32),
    the same in every process."""
    import torch

    gen = torch.Generator().manual_seed(1000 + e)
    gate, up = ((torch.randn(FFN, HIDDEN, generator=gen) * 0.02).bfloat16() for _ in range(2))
    down = (torch.randn(HIDDEN, FFN, generator=gen) * 0.02).bfloat16()
    if not with_inputs:
        return gate, up, down, None, None
    layer = torch.Generator().manual_seed(0)   # the layer's covariance: shared by its experts

    def inputs(cols):
        mix = torch.randn(RANK, cols, generator=layer) / RANK ** 0.5   # as much shared as own variance
        scale = torch.rand(cols, generator=layer) * 1.5 + 0.25
        return (torch.randn(tokens, RANK, generator=gen) @ mix + torch.randn(tokens, cols, generator=gen)) * scale

    return gate, up, down, inputs(HIDDEN), inputs(FFN)


def job(which: str, spec: str, experts: int, tokens: int) -> dict:
    import torch

    from moetool.quant.formats import parse_format
    from moetool.quant.gptq import Hessian, gptq, output_error

    fmt = parse_format(spec)
    warm = torch.randn(64, 256)   # first calls' one-time costs, not timed
    fmt.quantize(warm)
    gptq(warm, torch.eye(256), fmt)
    base, seconds, hessian_s, nbytes, errors = rss(), 0.0, 0.0, 0, []
    for e in range(experts):
        gate, up, down, x_in, x_mid = expert(e, tokens, which == "gptq")
        nbytes += sum(t.numel() * t.element_size() for t in (gate, up, down))
        if which == "rtn":
            start = time.perf_counter()
            for w in (gate, up, down):
                fmt.quantize(w)
            seconds += time.perf_counter() - start
            continue
        start = time.perf_counter()
        h_in, h_mid = Hessian(HIDDEN), Hessian(FFN)
        for batch in x_in.split(BATCH):
            h_in.add(batch)
        for batch in x_mid.split(BATCH):
            h_mid.add(batch)
        H_in, H_mid = h_in.matrix(), h_mid.matrix()
        middle = time.perf_counter()
        gate_up = torch.cat([gate, up])
        results = [gptq(gate_up, H_in, fmt, act_order=True), gptq(down, H_mid, fmt, act_order=True)]
        end = time.perf_counter()
        hessian_s, seconds = hessian_s + middle - start, seconds + end - middle
        assert all(r.fallback is None for r in results)
        del gate, up, down, x_in, x_mid, h_in, h_mid, H_in, H_mid, gate_up, results
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for e in range(min(2, experts) if which == "gptq" else 0):   # after the peak: the error against rtn's
        gate, up, down, x_in, x_mid = expert(e, tokens, True)
        for w, x in ((torch.cat([gate, up]), x_in), (down, x_mid)):
            h = Hessian(x.shape[1])
            h.add(x)
            H, rtn = h.matrix(), fmt.dequantize(fmt.quantize(w), tuple(w.shape), torch.float32)
            errors.append(output_error(w, gptq(w, H, fmt, act_order=True).weight, H) / output_error(w, rtn, H))
    return {"seconds": seconds, "hessian_seconds": hessian_s, "bytes": nbytes, "peak": peak, "base": base,
            "error_ratios": errors, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="int4-g32-sym", help="an integer format (default int4-g32-sym)")
    parser.add_argument("--experts", type=int, default=128, help="experts of the layer (default 128: 1.21 GB)")
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens per expert (default 1024)")
    parser.add_argument("--quick", action="store_true", help="4 experts, one run: a smoke test")
    parser.add_argument("--runs", type=int, default=2, help="runs of each method; the fastest is kept (default 2)")
    parser.add_argument("--job", choices=("rtn", "gptq"), help=argparse.SUPPRESS)   # one method, in this process
    args = parser.parse_args()
    experts, args.runs = (4, 1) if args.quick else (args.experts, args.runs)
    if args.job:
        print(json.dumps(job(args.job, args.format, experts, args.tokens)))
        return
    results = {}
    for _ in range(args.runs):   # alternating, the fastest run of each kept: the machine may be shared
        for which in ("rtn", "gptq"):
            argv = [sys.executable, __file__, "--job", which, "--format", args.format, "--experts", str(experts),
                    "--tokens", str(args.tokens)]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"the {which} job failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if which not in results or result["seconds"] < results[which]["seconds"]:
                results[which] = result
    rtn, gq = results["rtn"], results["gptq"]
    gb = rtn["bytes"] / 1e9
    print(f"{experts} experts of gate/up [{FFN}, {HIDDEN}] and down [{HIDDEN}, {FFN}]: {gb:.3f} GB bf16, "
          f"format {args.format}, {args.tokens} calibration tokens per expert, {gq['threads']} torch threads")
    print(f"round-to-nearest: {rtn['seconds']:8.2f} s  {gb / rtn['seconds']:7.4f} GB/s  "
          f"peak RSS {rtn['peak'] / 1e6:6.0f} MB (before the first expert {rtn['base'] / 1e6:.0f} MB)")
    print(f"GPTQ:             {gq['seconds']:8.2f} s  {gb / gq['seconds']:7.4f} GB/s  "
          f"peak RSS {gq['peak'] / 1e6:6.0f} MB (before the first expert {gq['base'] / 1e6:.0f} MB)")
    both = gq["seconds"] + gq["hessian_seconds"]
    print(f"GPTQ + Hessians:  {both:8.2f} s  {gb / both:7.4f} GB/s  "
          f"(accumulating the Hessians: {gq['hessian_seconds']:.2f} s)")
    print(f"rate ratio GPTQ / round-to-nearest: {rtn['seconds'] / gq['seconds']:.4f} "
          f"(GPTQ takes {gq['seconds'] / rtn['seconds']:.1f}x as long)")
    ratios = ", ".join(f"{r:.3f}" for r in gq["error_ratios"])
    print(f"output error GPTQ / round-to-nearest, experts 0-1 (gate+up, down): {ratios}")


if __name__ == "__main__":
    main()
