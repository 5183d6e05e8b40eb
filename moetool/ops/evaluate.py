"""`moetool eval`: perplexity of a checkpoint, and its divergence from a reference checkpoint."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.arch import detect_family
from moetool.checkpoint import Checkpoint
from moetool.errors import ProblemsFoundError, UnsupportedError, UsageError
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import calibration_ids
from moetool.quant import released
from moetool.runner import distributed, engine
from moetool.runner.data import DataError
from moetool.runner.device import pick_device, pick_dtype
from moetool.runner.engine import ActivationStore, micro_batches
from moetool.runner.model import check_runnable, load_model, runnable

SCHEMA_VERSION = 1
LOGIT_CHUNK = 1024   # tokens per lm_head chunk: logits never exist for all tokens at once
# Per-token KL percentiles from a histogram over log10(KL) (constant memory, whatever the token count):
# KL_BINS_PER_DECADE bins a decade from 1e-KL_LOW_DECADES up, 10 ** (1 / 100) apart, so a percentile is
# the bin's geometric middle, within 1.2% of the exact order statistic; KL below the range counts as 0.
KL_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
KL_BINS_PER_DECADE, KL_LOW_DECADES, KL_HIGH_DECADES = 100, 12, 4


@dataclass
class EvalOptions:
    data: Path | None = None            # default: the built-in corpus's held-out play
    token_ids: Path | None = None
    field: str = "text"
    chat_template: str | None = None
    max_tokens: int | None = 16384
    seq_len: int = 256
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    mode: str = "auto"
    device_map: str | None = None
    offload_dir: Path | None = None
    trust_remote_code: bool = False
    per_sequence: bool = False          # the report lists each sequence's figures


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
    # standard errors of the means above, over sequences (tokens of one sequence are not independent)
    nll_stderr: float | None = None
    perplexity_stderr: float | None = None   # perplexity x nll_stderr (first order, as llama.cpp's perplexity)
    kl_stderr: float | None = None
    kl_percentiles: dict[str, float] | None = None   # "50", "90", "95", "99", "99.9": per-token KL, within 1.2%
    top1_stderr: float | None = None
    per_sequence: list[dict[str, Any]] | None = None   # with per_sequence: [{sequence, nll_mean, kl_mean, top1}]
    warnings: list[str] = field(default_factory=list)   # what the run does not reproduce (served activation quant)
    seconds: float = 0.0
    mode: str = ""
    device: str = ""
    schema_version: int = SCHEMA_VERSION
    moetool_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), "moetool_version": data.pop("moetool_version"),
                **data}


class _Head:
    """A model's output head and logit scaling, kept after the rest of the model is freed."""

    def __init__(self, loaded):
        self.module = loaded.model.get_output_embeddings()
        config = loaded.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config   # a wrapper's text model
        setting = lambda key: getattr(text, key, None) or getattr(config, key, None)  # noqa: E731
        self.scale = setting("logits_scaling") or 1.0   # Granite divides logits
        self.multiplier = setting("output_multiplier") or 1.0   # Muse Spark multiplies them (before the cap)
        self.softcap = setting("final_logit_softcapping")   # Gemma 2: c * tanh(x / c)
        # Inkling divides the final hidden states by its width multiplier (the head has no bias: the logits
        # alike), and scores only the vocabulary's first unpadded_vocab_size entries
        self.scale *= setting("logits_mup_width_multiplier") or 1.0
        self.vocab = setting("unpadded_vocab_size")

    def logprobs(self, hidden):
        """(logits, log-softmax) of the predicting positions of HIDDEN [B, S, H] (all but the last),
        in chunks of LOGIT_CHUNK tokens: [tokens, vocab] never exists whole."""
        import torch

        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        for start in range(0, flat.shape[0], LOGIT_CHUNK):
            chunk = flat[start:start + LOGIT_CHUNK]   # (in the head's dtype: Hy4 keeps its lm_head in fp32)
            logits = self.module(chunk.to(self.module.weight.dtype)).float() * self.multiplier / self.scale
            if self.vocab:
                logits = logits[..., :self.vocab]
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            yield logits, torch.log_softmax(logits, dim=-1)


class _Metrics:
    """Sums and maxima on the device, filled micro-batch by micro-batch. Each sequence's means are
    summed squared too (the standard errors), and kept per sequence when asked."""

    FIELDS = ("nll", "kl", "top1")

    def __init__(self, device, sequences: int, per_sequence: bool):
        import torch

        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.nll, self.ref_nll, self.kl_sum, self.agree = zero(), zero(), zero(), zero()
        self.kl_max, self.max_diff = zero(), zero()
        self.squares = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        # bin 0: KL below the range (0 included); then KL_BINS_PER_DECADE a decade; the last: above it
        self.kl_hist = torch.zeros(2 + KL_BINS_PER_DECADE * (KL_LOW_DECADES + KL_HIGH_DECADES), dtype=torch.float64,
                                   device=device)
        # [sequences, FIELDS]: 24 bytes a sequence, only with per_sequence
        self.rows = torch.zeros(sequences, len(self.FIELDS), dtype=torch.float64, device=device) \
            if per_sequence else None
        self.tokens = 0

    def add(self, head: _Head, hidden, targets, first_sequence: int, ref_head: _Head | None = None,
            ref_hidden=None) -> None:
        import torch

        shape = targets.shape   # [B, S - 1]
        targets = targets.reshape(-1)
        position = 0
        ref_stream = ref_head.logprobs(ref_hidden) if ref_head is not None else None
        device = self.nll.device   # with a device map the head may sit on another GPU than the inputs
        per_token = {name: [] for name in self.FIELDS}
        for logits, lp in head.logprobs(hidden):
            logits, lp = logits.to(device), lp.to(device)
            target = targets[position:position + lp.shape[0], None]
            per_token["nll"].append(-lp.gather(1, target).double().squeeze(1))
            if ref_stream is not None:
                ref_logits, ref_lp = (t.to(device) for t in next(ref_stream))
                self.ref_nll -= ref_lp.gather(1, target).double().sum()
                # tokens the reference gives probability 0 (a -inf logit: a masked vocabulary) add 0, not NaN
                terms = torch.where(ref_lp > float("-inf"), ref_lp.exp() * (ref_lp - lp), 0.0)
                kl = terms.sum(-1).clamp_min(0)
                per_token["kl"].append(kl.double())
                self.kl_hist += _kl_bins(kl, self.kl_hist.numel())
                self.kl_max = torch.maximum(self.kl_max, kl.max().double())
                per_token["top1"].append((ref_logits.argmax(-1) == logits.argmax(-1)).double())
                self.max_diff = torch.maximum(self.max_diff, (ref_logits - logits).abs().max().double())
            position += lp.shape[0]
        self.tokens += position
        nll = torch.cat(per_token["nll"])
        self.nll += nll.sum()
        means = [nll.reshape(shape).mean(1)]
        if ref_stream is not None:
            kl, agree = torch.cat(per_token["kl"]), torch.cat(per_token["top1"])
            self.kl_sum += kl.sum()
            self.agree += agree.sum()
            means += [kl.reshape(shape).mean(1), agree.reshape(shape).mean(1)]
        means = torch.stack(means + [torch.zeros_like(means[0])] * (len(self.FIELDS) - len(means)), 1)
        self.squares += (means ** 2).sum(0)
        if self.rows is not None:
            self.rows[first_sequence:first_sequence + shape[0]] = means

    def reduce(self) -> None:
        """Sum (and max) over torchrun ranks; each rank filled its own sequences' rows."""
        import torch

        sums = torch.cat([torch.stack([self.nll, self.ref_nll, self.kl_sum, self.agree,
                                       torch.tensor(float(self.tokens), dtype=torch.float64, device=self.nll.device)]),
                          self.squares])
        maxima = torch.stack([self.kl_max, self.max_diff])
        distributed.all_reduce(sums, "sum")
        distributed.all_reduce(maxima, "max")
        distributed.all_reduce(self.kl_hist, "sum")
        if self.rows is not None:
            distributed.all_reduce(self.rows, "sum")
        self.nll, self.ref_nll, self.kl_sum, self.agree, tokens = sums[:5].unbind()
        self.squares = sums[5:]
        self.tokens = int(tokens)
        self.kl_max, self.max_diff = maxima.unbind()


def _kl_bins(kl, bins: int):
    """Counts of KL [tokens] in the histogram's bins."""
    import torch

    position = (torch.log10(kl.double().clamp_min(1e-300)) + KL_LOW_DECADES) * KL_BINS_PER_DECADE
    # below the range -> 0, above it -> the last; NaN (refused after the run) -> 0
    index = (position.nan_to_num(nan=-1.0).floor() + 1).clamp(0, bins - 1).long()
    return torch.bincount(index, minlength=bins).double()


def _kl_percentiles(hist: list[float]) -> dict[str, float]:
    """Each of KL_PERCENTILES: the geometric middle of the bin holding that order statistic (the
    smallest KL whose share of tokens at or below it reaches the percentile); 0 below the range."""
    import numpy as np

    cumulative = np.cumsum(hist)
    out = {}
    for q in KL_PERCENTILES:
        b = int(np.searchsorted(cumulative, q / 100 * cumulative[-1]))   # first bin reaching the rank
        b = min(b, len(hist) - 2)   # above the range: its top bin
        out[f"{q:g}"] = 0.0 if b == 0 else 10 ** ((b - 0.5) / KL_BINS_PER_DECADE - KL_LOW_DECADES)
    return out


def _stderr(mean: float, sum_of_squares: float, n: int) -> float | None:
    """Standard error of the mean of N equally long sequences' means, from their sum of squares."""
    if n < 2:
        return None
    return math.sqrt(max(0.0, (sum_of_squares - n * mean * mean) / (n * (n - 1))))


def evaluate(ckpt: Checkpoint, options: EvalOptions, reference: Checkpoint | None = None,
             progress=None) -> EvalReport:
    """Perplexity of CKPT on the data; with REFERENCE also KL(reference || model), top-1 agreement and
    the largest absolute logit difference, token by token. The reference runs first; its final
    hidden states are kept (device, then host, then --offload-dir) and both heads are applied micro-batch
    by micro-batch. Under torchrun each rank evaluates its share of the sequences."""
    import torch

    for source in (ckpt, reference):
        family = detect_family(source.config) if source is not None else None
        if family is not None and family.decoder_offset is not None:
            raise UnsupportedError(f"{source.source}: eval supports decoder-only models; "
                                   f"{family.title} is an encoder-decoder")
    for source in (ckpt, reference):
        if source is not None:
            check_runnable(source)
    vocab_size = inspect_checkpoint(ckpt).vocab_size
    ref_vocab = inspect_checkpoint(reference).vocab_size if reference is not None else None
    if None not in (ref_vocab, vocab_size) and ref_vocab != vocab_size:   # before both runs, not after them
        raise UsageError(f"{reference.source}: its vocabulary ({ref_vocab}) is not {ckpt.source}'s ({vocab_size}); "
                         "KL and top-1 agreement compare distributions over the same tokens")
    ckpt = runnable(ckpt)   # a GGUF as the transformers checkpoint it stands for, built once
    reference = runnable(reference) if reference is not None else None
    world = distributed.world_from_env()
    device = pick_device(options.device, local_rank=world.local_rank if world.distributed else None)
    dtype = pick_dtype(options.dtype, device)
    distributed.init(world, device)
    ids = calibration_ids(ckpt, options, default="builtin:heldout", vocab_size=vocab_size)
    if ids.shape[1] < 2:   # each token predicts the next: one-token sequences predict nothing
        raise DataError(f"the evaluation text holds sequences of {ids.shape[1]} token, which predict nothing",
                        hint="give more text, or a --seq-len of at least 2")
    first, count = distributed.share(ids.shape[0], world)
    batches = micro_batches(ids[first:first + count], options.batch_size, first)
    start = time.perf_counter()
    metrics = _Metrics(device, ids.shape[0], options.per_sequence)
    ref_head, store = None, None
    kwargs = dict(device=device, dtype=dtype, mode=options.mode, device_map=options.device_map, with_head=True,
                  trust_remote_code=options.trust_remote_code)
    try:
        if reference is not None:
            # a quarter of the device: the models run beside it
            store = ActivationStore.sized(device, options.offload_dir, device_share=0.25)
            loaded_ref = load_model(reference, **kwargs)
            engine.run(loaded_ref, batches, on_final=lambda batch, hidden: store.put(batch.slot, hidden),
                       progress=_labelled(progress, "reference"), offload_dir=options.offload_dir)
            ref_head = _Head(loaded_ref)
            del loaded_ref   # free it (transformers models hold reference cycles) before the model loads
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        loaded = load_model(ckpt, **kwargs)
        head = _Head(loaded)

        def on_final(batch, hidden):
            targets = batch.ids.to(device, non_blocking=True)[:, 1:]
            metrics.add(head, hidden, targets, batch.first_sequence, ref_head,
                        store.get(batch.slot) if store is not None else None)

        engine.run(loaded, batches, on_final=on_final, progress=_labelled(progress, "model"),
                   offload_dir=options.offload_dir)
    finally:
        if store is not None:
            store.close()
    metrics.reduce()
    tokens = max(1, metrics.tokens)
    nll = float(metrics.nll) / tokens
    for source, value in ((reference, metrics.ref_nll), (ckpt, metrics.nll)):
        if source is not None and not math.isfinite(float(value)):   # a NaN perplexity is not a result
            raise ProblemsFoundError(f"{source.source}: its log-probabilities are not finite (NaN or inf), so its "
                                     "perplexity and divergence mean nothing",
                                     hint="its weights may hold NaN or inf (moetool inspect reads the config, not "
                                          "the values), or --dtype overflows: try --dtype float32")
    report = EvalReport(model=ckpt.source, reference=reference.source if reference else None, tokens=metrics.tokens,
                        sequences=ids.shape[0], seq_len=ids.shape[1], nll_mean=nll, perplexity=math.exp(nll),
                        seconds=round(time.perf_counter() - start, 3), mode=loaded.mode, device=str(device),
                        warnings=[f"{source.source}: {note}" for source in (ckpt, reference) if source is not None
                                  and (note := released.activation_note(source.config, source.tensors))])
    squares = dict(zip(_Metrics.FIELDS, metrics.squares.tolist()))
    report.nll_stderr = _stderr(nll, squares["nll"], ids.shape[0])
    report.perplexity_stderr = report.perplexity * report.nll_stderr if report.nll_stderr is not None else None
    if reference is not None:
        report.kl_mean = float(metrics.kl_sum) / tokens
        report.kl_max = float(metrics.kl_max)
        report.top1_agreement = float(metrics.agree) / tokens
        report.max_logit_diff = float(metrics.max_diff)
        report.reference_perplexity = math.exp(float(metrics.ref_nll) / tokens)
        report.kl_stderr = _stderr(report.kl_mean, squares["kl"], ids.shape[0])
        report.top1_stderr = _stderr(report.top1_agreement, squares["top1"], ids.shape[0])
        report.kl_percentiles = _kl_percentiles(metrics.kl_hist.tolist())
    if metrics.rows is not None:
        names = ("nll_mean", "kl_mean", "top1_agreement") if reference is not None else ("nll_mean",)
        report.per_sequence = [{"sequence": i, **dict(zip(names, row[:len(names)]))}
                               for i, row in enumerate(metrics.rows.tolist())]
    return report


def _labelled(progress, role: str):
    if progress is None:
        return None
    return lambda label, done, total: progress(f"{role}: {label}", done, total)
