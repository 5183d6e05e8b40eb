"""Benchmark `moetool quantize --format nf4` against calling bitsandbytes' quantize_4bit directly
on the same expert tensors, in the same run.

The checkpoint is a Mixtral-architecture model in bf16 (8 layers of 8 experts, hidden 2048,
expert FFN 1408: 1.15 GB of expert weights) with random normal weights. Each job runs in its own
process, after its imports:

* baseline: every expert matrix read into memory first (not timed), then quantize_4bit(nf4,
  block 64) on each, one after the other, as a user would call it (torch uses both cores)
* moetool: `moetool.ops.quantize.quantize` on the checkpoint folder, timed until the output is
  on disk (the call, then `sync`): reading, quantizing, writing every shard and the config

The ratio printed is the rate of moetool over the rate of the baseline (>= 0.9 is the goal).
Peak anonymous memory (RssAnon sampled every 10 ms) of the moetool job is compared with the
bound used for convert: 2 x the largest tensor + 500 MB. Best of --runs.

Run: python benchmarks/quantize_speed.py [--keep DIR] [--runs N]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from convert_speed import run_with_output  # noqa: E402

H, F, E, L, V = 2048, 1408, 8, 8, 1024
JOB = """
import json, subprocess, sys, time
from pathlib import Path
import torch
from moetool.quant import bnb
F = bnb()
src, out, which = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if which == "baseline":
    from safetensors import safe_open
    tensors = []
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors += [f.get_tensor(k) for k in f.keys() if ".experts." in k]
    start = time.perf_counter()
    for t in tensors:
        F.quantize_4bit(t, blocksize=64, quant_type="nf4")
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
else:
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.quantize import QuantizeOptions, quantize
    start = time.perf_counter()
    with open_checkpoint(src) as ckpt:
        report = quantize(ckpt, out, QuantizeOptions(format="nf4-b64"), force=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    nbytes = report.expert_bytes_before
print(json.dumps({"seconds": seconds, "bytes": nbytes}))
"""


def make_checkpoint(root: Path) -> int:
    """A bf16 Mixtral-architecture checkpoint; returns its largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": H,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 4,
              "num_local_experts": E, "num_experts_per_tok": 2, "tie_word_embeddings": False,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config, indent=2))

    def w(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map, largest = {}, 0
    for layer in range(L):
        p = f"model.layers.{layer}."
        shard = {p + "input_layernorm.weight": w(H), p + "post_attention_layernorm.weight": w(H),
                 p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(H // 4, H),
                 p + "self_attn.v_proj.weight": w(H // 4, H), p + "self_attn.o_proj.weight": w(H, H),
                 p + "block_sparse_moe.gate.weight": w(E, H)}
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            shard.update({q + "w1.weight": w(F, H), q + "w2.weight": w(H, F), q + "w3.weight": w(F, H)})
        if layer == 0:
            shard.update({"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H), "lm_head.weight": w(V, H)})
        file = f"model-{layer + 1:05d}-of-{L:05d}.safetensors"
        save_file(shard, root / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        largest = max([largest] + [t.numel() * t.element_size() for t in shard.values()])
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return largest


def job(src: Path, out: Path, which: str) -> tuple[float, int, int]:
    """(seconds the job timed itself, expert bytes, peak anonymous memory of the process)."""
    _, peak, printed = run_with_output([sys.executable, "-c", JOB, str(src), str(out), which])
    result = json.loads(printed.strip().splitlines()[-1])
    return result["seconds"], result["bytes"], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the checkpoint here and keep it")
    parser.add_argument("--runs", type=int, default=2, help="runs per job; the best time is kept")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moetool-qbench-"))
    src = args.keep or tmp / "src"
    try:
        largest = make_checkpoint(src) if not (src / "config.json").exists() else 2 * V * H
        best = {"baseline": (float("inf"), 0, 0), "moetool": (float("inf"), 0, 0)}
        for _ in range(args.runs):
            for which in best:
                result = job(src, tmp / "out", which)
                if result[0] < best[which][0]:
                    best[which] = result
        (b_s, b_bytes, _), (m_s, m_bytes, m_peak) = best["baseline"], best["moetool"]
        bound = 2 * largest + 500_000_000
        print(f"expert weights: {b_bytes / 1e9:.2f} GB bf16 ({m_bytes / 1e9:.2f} GB quantized by moetool)")
        print(f"bitsandbytes quantize_4bit loop (in memory): {b_s:6.2f} s  {b_bytes / b_s / 1e6:7.1f} MB/s")
        print(f"moetool quantize (read, quantize, write, sync): {m_s:6.2f} s  {m_bytes / m_s / 1e6:7.1f} MB/s, "
              f"peak anonymous memory {m_peak / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB)")
        print(f"rate ratio moetool / bitsandbytes: {(m_bytes / m_s) / (b_bytes / b_s):.3f}x (goal >= 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
