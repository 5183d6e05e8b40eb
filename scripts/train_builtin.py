"""Train moetool's built-in reference models on the built-in corpus (CPU, seeded).

  builtin:tiny-moe    Qwen3-MoE, 4 layers, hidden 128, 8 experts of FFN 128, top-2, tied embeddings
  builtin:tiny-dense  Qwen3 (dense), 4 layers, hidden 128, FFN 256: the default upcycling source

Both share a byte-level BPE tokenizer (vocabulary 2048) trained on the corpus's training split
(moetool/data/corpus/train.txt.gz); Julius Caesar (heldout.txt.gz) is never trained on.
Writes moetool/data/models/{tiny-moe,tiny-dense}/ (bf16 safetensors, config, tokenizer) and
prints held-out perplexity beside a unigram baseline.

Run: python scripts/train_builtin.py [--out DIR] [--steps N]   (about 20 minutes on 2 cores)
"""

import argparse
import gzip
import json
import math
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 0
VOCAB = 2048
SEQ_LEN = 128
BATCH = 32


def corpus(split: str) -> str:
    return gzip.decompress(files("moetool.data").joinpath("corpus", f"{split}.txt.gz").read_bytes()).decode()


def train_tokenizer(text: str, out: Path) -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def model_config(kind: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, rope_theta=10000.0)
    if kind == "moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=256, moe_intermediate_size=128,
                                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                           router_aux_loss_coef=0.02, decoder_sparse_step=1)
    return transformers.Qwen3Config(**common, intermediate_size=256)


def batches(ids: torch.Tensor, steps: int, generator: torch.Generator):
    windows = ids.numel() - SEQ_LEN - 1
    for _ in range(steps):
        starts = torch.randint(0, windows, (BATCH,), generator=generator)
        yield torch.stack([ids[s:s + SEQ_LEN] for s in starts])


def heldout_perplexity(model, ids: torch.Tensor) -> float:
    model.eval()
    usable = (ids.numel() - 1) // SEQ_LEN * SEQ_LEN
    chunks = ids[:usable].reshape(-1, SEQ_LEN)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks.split(16):
            logits = model(chunk).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1),
                                                     reduction="sum")
            nll += float(loss)
            count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor) -> float:
    counts = torch.bincount(train, minlength=VOCAB).double() + 1.0   # add-one smoothing
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[heldout].mean()))


def train(kind: str, train_ids: torch.Tensor, heldout_ids: torch.Tensor, steps: int, out: Path,
          tokenizer) -> dict:
    torch.manual_seed(SEED)
    config = model_config(kind)
    model = transformers.AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(SEED)
    start = time.time()
    model.train()
    for step, batch in enumerate(batches(train_ids, steps, generator)):
        kwargs = {"output_router_logits": True} if kind == "moe" else {}
        loss = model(batch, labels=batch, **kwargs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {kind} step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f} s", flush=True)
    ppl = heldout_perplexity(model, heldout_ids)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    return {"heldout_perplexity": round(ppl, 3), "train_seconds": round(time.time() - start, 1),
            "steps": steps, "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "moetool/data/models")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per model")
    parser.add_argument("--only", choices=["moe", "dense"], help="train one model only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_text, heldout_text = corpus("train"), corpus("heldout")
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = train_tokenizer(train_text, Path(tok_dir))
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"])
    heldout_ids = torch.tensor(tokenizer(heldout_text)["input_ids"])
    results = {"unigram_heldout_perplexity": round(unigram_perplexity(train_ids, heldout_ids), 3),
               "train_tokens": train_ids.numel(), "heldout_tokens": heldout_ids.numel()}
    for kind in ("moe", "dense"):
        if args.only and kind != args.only:
            continue
        results[f"tiny-{kind}"] = train(kind, train_ids, heldout_ids, args.steps, args.out / f"tiny-{kind}",
                                        tokenizer)
    (args.out / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
