"""Benchmarks for `moetool profile`, each measured against its baseline in the same run.

1. Overhead of routing capture: a plain transformers forward of the decoder stack over the same
   tokens, without and with moetool's router hooks feeding the on-device statistics (best of
   --runs; ratio printed, goal <= 1.05).
2. Streamed against full mode on a generated 2.6 GB checkpoint (the convert benchmark's
   Mixtral-architecture model): tokens/s of each (streamed: reading every layer included, full:
   the model already loaded), the time streamed mode waited for weights, and peak anonymous memory
   sampled from /proc, with what it is made of. Goal: streamed >= 0.8x full's tokens/s.

Run: python benchmarks/profile_bench.py [--keep DIR] [--tokens 8192]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import E, F, H, V, make_checkpoint, run_with_output  # noqa: E402


def overhead(runs: int) -> tuple[float, float]:
    import torch
    import transformers

    from moetool.arch import detect_family
    from moetool.runner.capture import RouterCapture
    from moetool.runner.stats import RoutingStats

    config = transformers.MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 32000, (8, 256))

    def timed() -> float:
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            with torch.no_grad():
                model.model(ids, use_cache=False)
            best = min(best, time.perf_counter() - start)
        return best

    timed()   # warm-up
    plain = timed()
    stats = RoutingStats({layer: (8, 2) for layer in range(4)}, torch.device("cpu"), capacity_window=2048)
    capture = RouterCapture(model, detect_family(config.to_dict()), config.to_dict(), list(range(4)), lambda _: 2,
                            stats=stats)
    capture.set_batch(0, *ids.shape)
    hooked = timed()
    capture.close()
    return plain, hooked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the 2.6 GB checkpoint here and keep it")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens of part 2 (profile's default)")
    args = parser.parse_args()

    plain, hooked = overhead(args.runs)
    print("1. capture overhead (Mixtral-architecture, 4 layers x 8 experts, hidden 512, 2048 tokens, CPU):")
    print(f"   plain forward {plain:.3f} s, with routing capture {hooked:.3f} s: ratio {hooked / plain:.3f} "
          f"(goal <= 1.05)")

    tmp = Path(tempfile.mkdtemp(prefix="moetool-profile-bench-"))
    src = args.keep or tmp / "src"
    try:
        if not (src / "config.json").exists():
            make_checkpoint(src)
        tokens, seq_len = args.tokens, 256
        (tmp / "ids.json").write_text(json.dumps([(i * 7919) % V for i in range(tokens)]))
        layer_bytes = (3 * E * F * H + 4 * H * H + E * H + 2 * H) * 4
        store = tokens * H * 4                    # streamed: every token's hidden state between layers
        base = [sys.executable, "-m", "moetool", "profile", str(src), "--token-ids", str(tmp / "ids.json"),
                "--seq-len", str(seq_len), "--max-tokens", str(tokens), "--dtype", "fp32", "--json"]
        results = {}
        for mode in ("streamed", "full"):
            seconds, peak, out = run_with_output(base + ["--mode", mode])
            results[mode] = (seconds, peak, json.loads(out))
        embedding = V * H * 4
        resident = 2 * layer_bytes + embedding + store   # the layer running, the one being read, embedding, store
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"2. a {size / 1e9:.2f} GB fp32 checkpoint, {tokens} tokens in sequences of {seq_len} (largest layer "
              f"{layer_bytes / 1e6:.0f} MB):")
        for mode, (seconds, peak, report) in results.items():
            timing = report["timing"]
            waited = f", {timing['weight_wait_seconds']:.2f} s of it waiting for weights" if mode == "streamed" else ""
            print(f"   {mode:9s} {timing['tokens_per_second']:9.1f} tokens/s ({timing['seconds']:.2f} s running"
                  f"{waited}; {seconds:.2f} s whole command), peak anonymous memory {peak / 1e6:7.0f} MB")
        rate = {mode: report["timing"]["tokens_per_second"] for mode, (_, _, report) in results.items()}
        ratio = rate["streamed"] / rate["full"]
        print(f"   streamed / full tokens/s {ratio:.3f} (goal >= 0.8): {'met' if ratio >= 0.8 else 'MISSED'}")
        io = results["streamed"][2]["io"]
        read, whole = io["weight_bytes_read"], io["checkpoint_bytes"]
        head = V * H * 4   # the lm_head: profiling needs no logits, so it is not read
        print(f"   streamed read {read / 1e9:.3f} GB of weights: {read / (whole - head):.3f}x the "
              f"{(whole - head) / 1e9:.3f} GB it needs (the checkpoint less its {head / 1e6:.0f} MB lm_head)")
        streamed_peak = results["streamed"][1]
        print(f"   streamed peak {streamed_peak / 1e6:.0f} MB = two layers (the one running, the next being read) "
              f"{2 * layer_bytes / 1e6:.0f} MB + embedding {embedding / 1e6:.0f} MB + hidden-state store "
              f"{store / 1e6:.0f} MB + {(streamed_peak - resident) / 1e6:.0f} MB for the process and one "
              f"micro-batch's activations; streamed / full memory {streamed_peak / results['full'][1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
