"""`moetool eval`: parse options, run ops.evaluate, render."""

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.output import emit_json, stdout
from moetool.cli.profile import Mode


def evaluate(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, hub id or builtin:tiny-moe.")] = "builtin:tiny-moe",
    reference: Annotated[str | None, typer.Option(help="Compare with this checkpoint: KL(reference || model), "
                                                  "top-1 agreement, largest logit difference.")] = None,
    data: Annotated[Path | None, typer.Option(help="Evaluation text: a .txt, a .jsonl, a folder, or builtin:heldout "
                                              "(the default).")] = None,
    token_ids: Annotated[Path | None, typer.Option(help="Token ids instead of text.")] = None,
    field: Annotated[str, typer.Option(help="Text field of .jsonl records.")] = "text",
    max_tokens: Annotated[int, typer.Option(min=2, help="Use at most this many tokens.")] = 16384,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass (full mode).")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    mode: Annotated[Mode, typer.Option(help="full, streamed (one layer at a time) or auto.")] = Mode.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
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
