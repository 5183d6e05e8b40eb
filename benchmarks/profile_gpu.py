"""`moetool profile` on a GPU: a Qwen3-30B-A3B-shaped model (its real widths: hidden 2048, 128
experts of FFN 768, top-8, 32 query / 4 KV heads of 128; random weights; --layers decoder layers
instead of 48) in bf16, full and streamed (layer-major) mode, with transformers' default grouped_mm
experts and SDPA attention.

Printed per mode: tokens/s beside the compute floor (2 x active parameters of the decoder stack
FLOPs per token at the GPU's peak dense bf16 rate, --peak-tflops), the share of that floor reached,
and the host synchronisations per micro-batch step (CUDA's sync debug mode counts every
synchronising call; loading a layer's weights is not counted; goal: at most one), device peak
memory, and for streamed mode the time spent waiting for weights.

Run (CUDA only): python benchmarks/profile_gpu.py [--layers 4] [--tokens 65536] [--seq-len 2048]
"""

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path


def qwen3_30b_a3b(layers: int):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1e6, norm_topk_prob=True,
        tie_word_embeddings=False)


def active_stack_params(config) -> int:
    """Parameters one token multiplies through in the decoder stack (no embedding lookup, no head)."""
    h, heads, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    experts = config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
    router = h * config.num_experts
    return config.num_hidden_layers * (attention + experts + router)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()

    import torch
    import transformers

    if not torch.cuda.is_available():
        sys.exit("profile_gpu.py needs a CUDA device")
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.profile import ProfileOptions, profile
    from moetool.runner.model import LoadedModel

    tmp = Path(tempfile.mkdtemp(prefix="moetool-profile-gpu-"))
    src = args.keep or tmp / "model"
    try:
        config = qwen3_30b_a3b(args.layers)
        if not (src / "config.json").exists():
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(src)
            del model
            torch.cuda.empty_cache()
        ids = tmp / "ids.txt"
        ids.write_text(" ".join(str((i * 7919) % config.vocab_size) for i in range(args.tokens)))
        active = active_stack_params(config)
        floor = args.peak_tflops * 1e12 / (2 * active)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"{torch.cuda.get_device_name()}: Qwen3-30B-A3B widths, {args.layers} layers, {size / 1e9:.1f} GB bf16; "
              f"{args.tokens} tokens in sequences of {args.seq_len}, micro-batches of {args.batch_size}")
        print(f"compute floor: 2 x {active / 1e6:.0f}M active stack parameters per token at {args.peak_tflops:.0f} "
              f"TFLOP/s = {floor:,.0f} tokens/s")

        install = LoadedModel.install_layer

        def install_uncounted(self, index, tensors):   # weight uploads are not micro-batch syncs
            torch.cuda.set_sync_debug_mode(0)
            try:
                install(self, index, tensors)
            finally:
                torch.cuda.set_sync_debug_mode("warn")

        LoadedModel.install_layer = install_uncounted
        for mode in ("full", "streamed", "full"):   # full twice: the first run warms the kernels up
            options = ProfileOptions(token_ids=ids, max_tokens=args.tokens, seq_len=args.seq_len,
                                     batch_size=args.batch_size, mode=mode, device="cuda", dtype="bf16")
            with open_checkpoint(src) as ckpt, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    report = profile(ckpt, options)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            batches = -(-report.sequences // args.batch_size)
            steps = batches * (args.layers if mode == "streamed" else 1)
            rate = report.timing["tokens_per_second"]
            waited = f", {report.timing['weight_wait_seconds']:.2f} s waiting for weights" if mode == "streamed" else ""
            print(f"{mode:9s} {rate:12,.0f} tokens/s = {rate / floor:6.1%} of the floor; {syncs / steps:.2f} host "
                  f"syncs per micro-batch step ({syncs} in {steps}); device peak "
                  f"{report.memory.get('device_peak_bytes', 0) / 1e9:.1f} GB{waited}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
