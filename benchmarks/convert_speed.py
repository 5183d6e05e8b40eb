"""Benchmark `moetool convert` on a generated checkpoint of about 2.4 GB, against `cp -r` and
against transformers' from_pretrained + save_pretrained, measured in the same run.

The checkpoint is a Mixtral-architecture model (8 layers, 8 experts, hidden 1024, expert FFN
2816, fp32, 1 GB shards) with random normal weights, written to a temporary folder. Each job
runs as its own process; peak anonymous memory (RssAnon, sampled every 10 ms from /proc)
and the wall time until the output is on disk (the job, then `sync`) are recorded, best of
--runs. The source is in the page cache for every job alike.

Run: python benchmarks/convert_speed.py [--keep DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

H, F, E, L, V = 1024, 2816, 8, 8, 32000
TRANSFORMERS_JOB = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2], max_shard_size="1GB")
"""


def make_checkpoint(root: Path) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": H,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 8, "num_key_value_heads": 8,
              "num_local_experts": E, "num_experts_per_tok": 2, "tie_word_embeddings": False,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    (root / "config.json").write_text(json.dumps(config, indent=2))

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    shards, current, size = [], {}, 0
    tensors = [("model.embed_tokens.weight", (V, H))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
        tensors += [(p + f"self_attn.{n}_proj.weight", (H, H)) for n in "qkvo"]
        tensors += [(p + "block_sparse_moe.gate.weight", (E, H))]
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            tensors += [(q + "w1.weight", (F, H)), (q + "w2.weight", (H, F)), (q + "w3.weight", (F, H))]
    tensors += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    for name, shape in tensors:
        current[name] = w(*shape)
        size += current[name].nbytes
        if size > 1_000_000_000:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, root / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(argv: list[str]) -> tuple[float, int]:
    """Wall seconds until the output is on disk (the command, then `sync`) and its peak anonymous
    memory (bytes). Earlier writes are flushed first, so no job pays for another's."""
    elapsed, peak, _ = run_with_output(argv)
    return elapsed, peak


def run_with_output(argv: list[str]) -> tuple[float, int, str]:
    """run(), also returning what the command printed."""
    subprocess.run(["sync"], check=True)
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{argv} failed:\n{err.decode()[-2000:]}")
    return elapsed, peak, out.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the checkpoint here and keep it")
    parser.add_argument("--runs", type=int, default=2, help="runs per job; the best time is kept")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moetool-bench-"))
    src = args.keep or tmp / "src"
    try:
        if not (src / "config.json").exists():
            total = make_checkpoint(src)
        else:
            total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        largest_in = F * H * 4 if V * H < F * H else V * H * 4
        largest_fused = E * 2 * F * H * 4
        moetool = [sys.executable, "-m", "moetool", "convert", str(src)]
        jobs = {
            "cp -r": (["cp", "-r", str(src), str(tmp / "cp")], largest_in),
            "moetool convert --layout fused": (moetool + [str(tmp / "fused"), "--layout", "fused"], largest_fused),
            "moetool convert --dtype bf16": (moetool + [str(tmp / "bf16"), "--dtype", "bf16"], largest_in),
            "moetool convert --dtype bf16 --layout fused": (moetool + [str(tmp / "bf16f"), "--dtype", "bf16",
                                                                       "--layout", "fused"], largest_fused),
            "transformers from_pretrained + save_pretrained (bf16)": (
                [sys.executable, "-c", TRANSFORMERS_JOB, str(src), str(tmp / "hf")], largest_in),
        }
        results = {}
        for label, (argv, largest) in jobs.items():
            best_seconds, best_peak = float("inf"), 0
            for _ in range(args.runs):
                seconds, peak = run(argv)
                best_seconds, best_peak = min(best_seconds, seconds), max(best_peak, peak)
                for out in ("cp", "fused", "bf16", "bf16f", "hf"):
                    shutil.rmtree(tmp / out, ignore_errors=True)
            results[label] = (best_seconds, best_peak, largest)
        cp_seconds = results["cp -r"][0]
        hf_seconds, hf_peak, _ = results["transformers from_pretrained + save_pretrained (bf16)"]
        print(f"checkpoint: {total / 1e9:.2f} GB fp32 Mixtral-architecture, {E} experts x {L} layers")
        print(f"{'job':58s} {'time s':>7s} {'GB/s':>6s} {'vs cp':>6s} {'peak anon':>10s} "
              f"{'/largest':>8s} {'vs hf time':>10s} {'vs hf mem':>9s}")
        for label, (seconds, peak, largest) in results.items():
            print(f"{label:58s} {seconds:7.2f} {total / seconds / 1e9:6.2f} {cp_seconds / seconds:6.2f} "
                  f"{peak / 1e6:8.0f}MB {peak / largest:8.2f} {seconds / hf_seconds:10.2f} {peak / hf_peak:9.2f}")
        print("goals: throughput vs cp >= 0.7 for layout/shard changes; "
              "peak anonymous memory <= 2 x largest tensor + 500 MB")
        for label, (_, peak, largest) in results.items():
            if label.startswith("moetool"):
                ok = peak <= 2 * largest + 500e6
                print(f"  {label}: memory bound {'met' if ok else 'MISSED'} "
                      f"({peak / 1e6:.0f} MB <= {(2 * largest + 500e6) / 1e6:.0f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
