"""Speed and memory of `moetool prune FILE.gguf` against `cp` of its output.

Generates a Qwen3-MoE-shaped GGUF of about 2.4 GB (hidden 2048, 128 experts of FFN 768, 6 layers,
vocabulary 32,000): random bytes written as raw Q4_K (expert gate/up, embeddings), Q6_K (expert
down) and Q8_0 (attention, router) blocks, the header by gguf-py's writer. Then prunes 25% of the
experts (`--ratio 0.25`; default criterion frequency, from a synthetic `moetool profile --json`
file, as when the safetensors model was profiled) and copies the output with `cp`. Both timed until the data is on disk
(the command, then `sync`), best of --runs; each job's peak anonymous memory (RssAnon, sampled
every 10 ms) is compared with 2 x the largest tensor + 500 MB.

    python benchmarks/gguf_prune_speed.py [--keep DIR] [--runs 2] [--layers 6] [--criterion frequency]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from convert_speed import run_with_output  # noqa: E402

H, E, F, LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM, TOP_K = 2048, 128, 768, 6, 32000, 32, 4, 128, 8


def tensors(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy-order shape, ggml type) of every tensor, in file order."""
    out = [("token_embd.weight", (VOCAB, H), "Q4_K")]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (H,), "F32"),
                (b + "attn_q.weight", (HEADS * HEAD_DIM, H), "Q8_0"),
                (b + "attn_k.weight", (KV_HEADS * HEAD_DIM, H), "Q8_0"),
                (b + "attn_v.weight", (KV_HEADS * HEAD_DIM, H), "Q8_0"),
                (b + "attn_output.weight", (H, HEADS * HEAD_DIM), "Q8_0"),
                (b + "attn_q_norm.weight", (HEAD_DIM,), "F32"),
                (b + "attn_k_norm.weight", (HEAD_DIM,), "F32"),
                (b + "ffn_norm.weight", (H,), "F32"),
                (b + "ffn_gate_inp.weight", (E, H), "F32"),
                (b + "ffn_gate_exps.weight", (E, F, H), "Q4_K"),
                (b + "ffn_up_exps.weight", (E, F, H), "Q4_K"),
                (b + "ffn_down_exps.weight", (E, H, F), "Q6_K")]
    out += [("output_norm.weight", (H,), "F32"), ("output.weight", (VOCAB, H), "Q6_K")]
    return out


def make_gguf(path: Path, layers: int) -> tuple[int, int]:
    """Write the file; returns (its size, the largest tensor's bytes)."""
    import gguf

    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(path, "qwen3moe")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(6144)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_expert_count(E)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(F)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    sizes = []
    for name, shape, qtype in tensors(layers):
        byte_shape = gguf.quant_shape_to_byte_shape(shape, T[qtype])
        nbytes = int(np.prod(byte_shape))
        sizes.append(nbytes)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    rng = np.random.default_rng(0)
    align = writer.data_alignment
    fout.write(bytes(-fout.tell() % align))
    for nbytes in sizes:
        left = nbytes
        while left:
            step = min(left, 64 << 20)
            fout.write(rng.bytes(step))
            left -= step
        fout.write(bytes(-nbytes % align))
    writer.close()
    return path.stat().st_size, max(sizes)


def _largest(layers: int) -> int:
    import gguf

    return max(int(np.prod(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[qtype])))
               for _, shape, qtype in tensors(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the GGUF in this folder and keep it")
    parser.add_argument("--runs", type=int, default=2, help="runs per job; the best time is kept")
    parser.add_argument("--criterion", default="frequency", help="frequency (synthetic profile), random, weight-norm")
    parser.add_argument("--layers", type=int, default=LAYERS, help="MoE layers (6: a 2.57 GB file)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moetool-gguf-bench-", dir=args.keep))
    root = args.keep or tmp
    layers = args.layers
    src = root / f"qwen3moe-bench-{layers}.gguf"
    try:
        size, largest = (src.stat().st_size, _largest(layers)) if src.exists() else make_gguf(src, layers)
        out, copy = tmp / "pruned.gguf", tmp / "copy.gguf"
        prune = [sys.executable, "-m", "moetool", "prune", str(src), str(out), "--ratio", "0.25",
                 "--criterion", args.criterion, "--json"]
        if args.criterion == "frequency":
            profile = tmp / "profile.json"
            rng = np.random.default_rng(1)
            profile.write_text(json.dumps({"layers": [
                {"layer": i, "experts": E, "counts": rng.integers(0, 1000, E).tolist(),
                 "weight_mass": rng.random(E).tolist()} for i in range(layers)]}))
            prune += ["--profile", str(profile)]
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.runs):
            for job, argv in (("moetool prune", prune), ("cp", ["cp", str(out), str(copy)])):
                for target in (out,) if job == "moetool prune" else (copy,):
                    target.unlink(missing_ok=True)   # not timed: freeing a file's blocks (discard) is slow here
                elapsed, peak, _ = run_with_output(argv)
                seconds, top = best.get(job, (float("inf"), 0))
                best[job] = (min(seconds, elapsed), max(top, peak))
        written = out.stat().st_size
        limit = 2 * largest + 500 * 10**6
        print(f"source {size / 1e9:.3f} GB, output {written / 1e9:.3f} GB, largest tensor {largest / 1e6:.1f} MB, "
              f"{os.cpu_count()} CPUs")
        for job, (seconds, peak) in best.items():
            print(f"{job:14s} {seconds:7.2f} s  {written / seconds / 1e9:6.2f} GB/s of output  "
                  f"peak RssAnon {peak / 1e6:7.1f} MB")
        ratio = best["cp"][0] / best["moetool prune"][0]
        peak = best["moetool prune"][1]
        print(f"prune throughput {ratio:.2f}x cp's (goal >= 0.7x): {'ok' if ratio >= 0.7 else 'MISSED'}")
        print(f"prune peak RssAnon {peak / 1e6:.1f} MB vs 2 x largest tensor + 500 MB = {limit / 1e6:.1f} MB: "
              f"{'ok' if peak <= limit else 'MISSED'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
