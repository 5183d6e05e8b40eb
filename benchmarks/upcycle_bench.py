"""Benchmark `moetool upcycle` on a generated dense checkpoint of about 2.2 GB (Llama architecture,
fp32, hidden 2048, FFN 5632, 8 layers) upcycled to 8 experts: wall time until the output is on
disk and peak anonymous memory, against `cp -r` of the output (same bytes), in the same run.

Run: python benchmarks/upcycle_bench.py [--keep DIR]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import run  # noqa: E402

H, F, L, V = 2048, 5632, 8, 32000


def make_dense(root: Path) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 16,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    weight_map, total = {}, 0
    shards = [{"model.embed_tokens.weight": (V, H)}]
    for layer in range(L):
        p = f"model.layers.{layer}."
        shards.append({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       **{p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"},
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)})
    shards.append({"model.norm.weight": (H,), "lm_head.weight": (V, H)})
    for i, shapes in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
        save_file(tensors, root / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="generate the dense checkpoint here and keep it")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moetool-upcycle-bench-"))
    src = args.keep or tmp / "dense"
    try:
        if not (src / "config.json").exists():
            make_dense(src)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        seconds, peak = run([sys.executable, "-m", "moetool", "upcycle", str(src), str(tmp / "moe"), "--experts",
                             "8", "--top-k", "2"])
        out_size = sum(f.stat().st_size for f in (tmp / "moe").glob("*.safetensors"))
        cp_seconds, _ = run(["cp", "-r", str(tmp / "moe"), str(tmp / "moe-copy")])
        largest = V * H * 4
        print(f"dense checkpoint {size / 1e9:.2f} GB -> 8-expert MoE {out_size / 1e9:.2f} GB")
        print(f"  moetool upcycle   {seconds:6.2f} s, peak anonymous memory {peak / 1e6:6.0f} MB")
        print(f"  cp -r of the output {cp_seconds:6.2f} s: upcycle takes {seconds / cp_seconds:.2f}x cp's time")
        bound = 2 * largest + 500e6
        print(f"  memory bound 2 x largest tensor ({largest / 1e6:.0f} MB) + 500 MB = {bound / 1e6:.0f} MB: "
              f"{'met' if peak <= bound else 'MISSED'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
