"""`moetool eval`: perplexity of a checkpoint, and its divergence from a reference checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.checkpoint import Checkpoint

SCHEMA_VERSION = 1
LOGIT_CHUNK = 1024   # tokens per lm_head chunk: logits never exist for all tokens at once


@dataclass
class EvalOptions:
    data: Path | None = None            # default: the built-in corpus's held-out play
    token_ids: Path | None = None
    field: str = "text"
    max_tokens: int | None = 16384
    seq_len: int = 256
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    mode: str = "auto"
    trust_remote_code: bool = False


@dataclass
class EvalReport:
    model: str
    reference: str | None
    tokens: int                          # predicted tokens (each sequence's first token has no prediction)
    sequences: int
    seq_len: int
    nll_mean: float
    perplexity: float
    kl_mean: float | None = None         # mean over tokens of KL(reference || model), nats
    kl_max: float | None = None
    top1_agreement: float | None = None
    max_logit_diff: float | None = None
    reference_perplexity: float | None = None
    seconds: float = 0.0
    mode: str = ""
    device: str = ""
    schema_version: int = SCHEMA_VERSION
    moetool_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), "moetool_version": data.pop("moetool_version"),
                **data}


def _tokens(ckpt: Checkpoint, options: EvalOptions):
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.runner import data

    if options.token_ids is not None:
        ids = data.read_token_ids(options.token_ids)
    else:
        texts = data.read_texts(options.data or Path("builtin:heldout"), options.field)
        if not texts:
            raise data.DataError(f"{options.data}: holds no text")
        ids = data.tokenize(texts, ckpt.root)
    structure = inspect_checkpoint(ckpt)
    config = ckpt.config or {}
    return data.pack(ids, seq_len=options.seq_len, max_tokens=options.max_tokens, vocab_size=structure.vocab_size,
                     max_positions=config.get("max_position_embeddings"))


def _hidden_states(loaded, ids, batch: int):
    """Final hidden states [N, S, H] of every sequence (streamed: one forward for all, each layer read once)."""
    import torch

    step = ids.shape[0] if loaded.mode == "streamed" else max(1, batch)
    out = []
    with torch.no_grad():
        for first in range(0, ids.shape[0], step):
            chunk = ids[first:first + step].to(loaded.device)
            out.append(loaded.base_forward(chunk).last_hidden_state)
    return torch.cat(out)


def _logprobs(loaded, hidden):
    """Yield log-softmax over the vocabulary for chunks of predicting positions (all but the last)."""
    import torch

    head = loaded.model.get_output_embeddings()
    scale = getattr(loaded.model.config, "logits_scaling", None) or 1.0   # Granite divides logits
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    for start in range(0, flat.shape[0], LOGIT_CHUNK):
        logits = head(flat[start:start + LOGIT_CHUNK]).float() / scale
        yield logits, torch.log_softmax(logits, dim=-1)


def evaluate(ckpt: Checkpoint, options: EvalOptions, reference: Checkpoint | None = None) -> EvalReport:
    """Perplexity of CKPT on the data; with REFERENCE also KL(reference || model), top-1 agreement and
    the largest absolute logit difference, token by token."""
    import torch

    from moetool.arch import detect_family
    from moetool.errors import UnsupportedError
    from moetool.runner.device import pick_device, pick_dtype
    from moetool.runner.model import load_model

    for source in (ckpt, reference):
        family = detect_family(source.config) if source is not None else None
        if family is not None and family.decoder_offset is not None:
            raise UnsupportedError(f"{source.source}: eval supports decoder-only models; "
                                   f"{family.title} is an encoder-decoder")
    ids = _tokens(ckpt, options)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    start = time.perf_counter()
    models = [(ckpt, "model")] + ([(reference, "reference")] if reference is not None else [])
    hidden = {}
    loaded = {}
    for source, role in models:
        loaded[role] = load_model(source, device=device, dtype=dtype, mode=options.mode, with_head=True,
                                  trust_remote_code=options.trust_remote_code)
        hidden[role] = _hidden_states(loaded[role], ids, options.batch_size)
    targets = ids[:, 1:].reshape(-1).to(device)
    nll = {role: 0.0 for role in hidden}
    kl_sum, kl_max, agree, max_diff = 0.0, 0.0, 0, 0.0
    streams = {role: _logprobs(loaded[role], hidden[role]) for role in hidden}
    position = 0
    with torch.no_grad():
        for model_logits, model_lp in streams["model"]:
            n = model_lp.shape[0]
            target = targets[position:position + n]
            nll["model"] += float(-model_lp.gather(1, target[:, None]).sum())
            if reference is not None:
                ref_logits, ref_lp = next(streams["reference"])
                nll["reference"] += float(-ref_lp.gather(1, target[:, None]).sum())
                kl = (ref_lp.exp() * (ref_lp - model_lp)).sum(-1).clamp_min(0)
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                agree += int((ref_logits.argmax(-1) == model_logits.argmax(-1)).sum())
                max_diff = max(max_diff, float((ref_logits - model_logits).abs().max()))
            position += n
    tokens = position
    report = EvalReport(model=ckpt.source, reference=reference.source if reference else None, tokens=tokens,
                        sequences=ids.shape[0], seq_len=ids.shape[1], nll_mean=nll["model"] / tokens,
                        perplexity=math.exp(nll["model"] / tokens), seconds=round(time.perf_counter() - start, 3),
                        mode=loaded["model"].mode, device=str(device))
    if reference is not None:
        report.kl_mean = kl_sum / tokens
        report.kl_max = kl_max
        report.top1_agreement = agree / tokens
        report.max_logit_diff = max_diff
        report.reference_perplexity = math.exp(nll["reference"] / tokens)
    return report
