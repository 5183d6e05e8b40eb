"""`moetool eval`: parse options, run ops.evaluate, render."""

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    MaxTokensOpt,
    Mode,
    ModelArg,
    ModeOpt,
    SeqLenOpt,
    TokenIdsOpt,
    TrustRemoteCodeOpt,
)
from moetool.cli.output import emit_json, stdout


def evaluate(
    model: ModelArg = "builtin:tiny-moe",
    reference: Annotated[str | None, typer.Option(help="Compare with this checkpoint: KL(reference || model), "
                                                  "top-1 agreement, largest logit difference.")] = None,
    data: Annotated[Path | None, typer.Option(help="Evaluation text: a .txt, a .jsonl, a folder, or builtin:heldout "
                                              "(the default).")] = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    max_tokens: MaxTokensOpt = 16384,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    mode: ModeOpt = Mode.auto,
    json_out: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Measure perplexity, and divergence from a reference checkpoint."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.evaluate import EvalOptions
    from moetool.ops.evaluate import evaluate as run_eval

    options = EvalOptions(data=data, token_ids=token_ids, field=field, max_tokens=max_tokens, seq_len=seq_len,
                          batch_size=batch_size, device=device, dtype=dtype, mode=mode.value,
                          trust_remote_code=trust_remote_code)
    with open_checkpoint(model) as ckpt:
        if reference is None:
            report = run_eval(ckpt, options)
        else:
            with open_checkpoint(reference) as ref:
                report = run_eval(ckpt, options, ref)
    if json_out:
        emit_json(report.to_dict())
        return
    stdout.print(f"[bold]{report.model}[/]: perplexity {report.perplexity:.3f} (mean NLL {report.nll_mean:.4f}) "
                 f"over {report.tokens:,} predicted tokens ({report.sequences} x {report.seq_len}), "
                 f"{report.mode} mode on {report.device}")
    if report.reference is not None:
        stdout.print(f"against [bold]{report.reference}[/] (perplexity {report.reference_perplexity:.3f}): "
                     f"KL(reference || model) mean {report.kl_mean:.6g} nats, max {report.kl_max:.6g}; "
                     f"top-1 agreement {report.top1_agreement:.2%}; largest logit difference "
                     f"{report.max_logit_diff:.4g}")
