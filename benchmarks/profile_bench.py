"""Benchmarks for `moetool profile`, each measured against its baseline in the same run.

1. Overhead of routing capture: a plain transformers forward of the decoder stack over the same
   tokens, without and with moetool's router hooks (best of --runs; ratio printed, goal <= 1.10).
2. Streamed-mode memory: `moetool profile --mode streamed` on a generated 2.6 GB checkpoint
   (the convert benchmark's Mixtral-architecture model), peak anonymous memory sampled from /proc,
   against twice the largest layer plus the activations plus 500 MB; full mode for comparison.

Run: python benchmarks/profile_bench.py [--keep DIR]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import E, F, H, V, make_checkpoint, run  # noqa: E402


def overhead(runs: int) -> tuple[float, float]:
    import torch
    import transformers

    from moetool.arch import detect_family
    from moetool.runner.capture import RouterCapture

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
    capture = RouterCapture(model, detect_family(config.to_dict()), config.to_dict(), list(range(4)), lambda _: 2)
    hooked = timed()
    capture.close()
    return plain, hooked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the 2.6 GB checkpoint here and keep it")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    plain, hooked = overhead(args.runs)
    print("1. capture overhead (Mixtral-architecture, 4 layers x 8 experts, hidden 512, 2048 tokens, CPU):")
    print(f"   plain forward {plain:.3f} s, with routing capture {hooked:.3f} s: ratio {hooked / plain:.3f} "
          f"(goal <= 1.10)")

    tmp = Path(tempfile.mkdtemp(prefix="moetool-profile-bench-"))
    src = args.keep or tmp / "src"
    try:
        if not (src / "config.json").exists():
            make_checkpoint(src)
        tokens, seq_len = 2048, 256
        (tmp / "ids.json").write_text(json.dumps([(i * 7919) % V for i in range(tokens)]))
        layer_bytes = (3 * E * F * H + 4 * H * H + E * H + 2 * H) * 4
        activations = tokens * H * 4 * 12   # hidden states, attention and expert intermediates, generously
        base = [sys.executable, "-m", "moetool", "profile", str(src), "--token-ids", str(tmp / "ids.json"),
                "--seq-len", str(seq_len), "--dtype", "fp32", "--json"]
        results = {}
        for mode in ("streamed", "full"):
            seconds, peak = run(base + ["--mode", mode])
            results[mode] = (seconds, peak)
        bound = 2 * layer_bytes + activations + 500e6
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"2. memory on a {size / 1e9:.2f} GB fp32 checkpoint ({tokens} tokens, largest layer "
              f"{layer_bytes / 1e6:.0f} MB, activations ~{activations / 1e6:.0f} MB):")
        for mode, (seconds, peak) in results.items():
            print(f"   {mode:9s} {seconds:6.2f} s, peak anonymous memory {peak / 1e6:7.0f} MB "
                  f"({peak / size:.2f}x the checkpoint)")
        streamed_peak = results["streamed"][1]
        print(f"   streamed bound 2 x layer + activations + 500 MB = {bound / 1e6:.0f} MB: "
              f"{'met' if streamed_peak <= bound else 'MISSED'}; streamed / full memory "
              f"{streamed_peak / results['full'][1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
