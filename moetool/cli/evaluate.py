"""`moetool eval`: parse options, run ops.evaluate, render."""

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.options import (
    FLAG,
    PATH,
    BatchSizeOpt,
    ChatTemplateOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    MaxTokensOpt,
    Mode,
    ModelArg,
    ModeOpt,
    OffloadDirOpt,
    SeqLenOpt,
    TokenIdsOpt,
    TrustRemoteCodeOpt,
)
from moetool.cli.output import PassProgress, emit_json, esc, stdout


def evaluate(
    model: ModelArg = "builtin:tiny-moe",
    reference: Annotated[str | None, typer.Option(help="Compare with this checkpoint: KL(reference || model), "
                                                  "top-1 agreement, largest logit difference.")] = None,
    data: Annotated[Path | None, typer.Option(**PATH, help="Evaluation data (formats as for profile --data; default: "
                                              "builtin:heldout, the built-in corpus's held-out play).")] = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    chat_template: ChatTemplateOpt = None,
    max_tokens: MaxTokensOpt = 16384,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    mode: ModeOpt = Mode.auto,
    device_map: DeviceMapOpt = None,
    offload_dir: OffloadDirOpt = None,
    per_sequence: Annotated[bool, typer.Option("--per-sequence", **FLAG, help="List each sequence's mean NLL (and KL, "
                                               "top-1 agreement): in --json all, otherwise the five that diverge "
                                               "most.")] = False,
    json_out: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Measure perplexity, and divergence from a reference checkpoint."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.evaluate import EvalOptions
    from moetool.ops.evaluate import evaluate as run_eval
    from moetool.runner.distributed import is_primary

    options = EvalOptions(data=data, token_ids=token_ids, field=field, chat_template=chat_template,
                          max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype,
                          mode=mode.value, device_map=device_map, offload_dir=offload_dir,
                          trust_remote_code=trust_remote_code, per_sequence=per_sequence)
    primary = is_primary()
    with open_checkpoint(model) as ckpt, PassProgress(enabled=primary and not json_out) as progress:
        if reference is None:
            report = run_eval(ckpt, options, progress=progress.update)
        else:
            with open_checkpoint(reference) as ref:
                report = run_eval(ckpt, options, ref, progress=progress.update)
    if not primary:   # torchrun: rank 0 alone prints
        return
    if json_out:
        emit_json(report.to_dict())
        return
    stdout.print(f"[bold]{esc(report.model)}[/]: perplexity {report.perplexity:.3f}"
                 f"{_pm(report.perplexity_stderr, '.3f')} (mean NLL {report.nll_mean:.4f}"
                 f"{_pm(report.nll_stderr, '.4f')}) over {report.tokens:,} predicted tokens "
                 f"({report.sequences} x {report.seq_len}), {report.mode} mode on {report.device}")
    if report.reference is not None:
        stdout.print(f"against [bold]{esc(report.reference)}[/] (perplexity {report.reference_perplexity:.3f}): "
                     f"KL(reference || model) mean {report.kl_mean:.6g}{_pm(report.kl_stderr, '.2g')} nats, "
                     f"max {report.kl_max:.6g}; top-1 agreement {report.top1_agreement:.2%}"
                     f"{_pm(report.top1_stderr, '.2%')}; largest logit difference {report.max_logit_diff:.4g}")
        stdout.print("KL percentiles per token: "
                     + ", ".join(f"{q}% {v:.4g}" for q, v in report.kl_percentiles.items()))
    if report.per_sequence:
        key = "kl_mean" if report.reference is not None else "nll_mean"
        worst = sorted(report.per_sequence, key=lambda row: -row[key])[:5]
        stdout.print(f"highest {key.replace('_', ' ')} by sequence: "
                     + ", ".join(f"#{row['sequence']} {row[key]:.4g}" for row in worst))
    if report.nll_stderr is not None:
        stdout.print("[dim]± one standard error over sequences[/]")
    for warning in report.warnings:
        stdout.print(f"[yellow]warning[/] {esc(warning)}")


def _pm(stderr: float | None, fmt: str) -> str:
    return f" ± {stderr:{fmt}}" if stderr is not None else ""
