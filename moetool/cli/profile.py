"""`moetool profile`: parse options, run ops.profile, render."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from moetool.cli.output import emit_json, stderr, stdout

BLOCKS = " ▁▂▃▄▅▆▇█"


def profile(
    model: ModelArg = "builtin:tiny-moe",
    data: Annotated[Path | None, typer.Option(help="Calibration text: a .txt, a .jsonl, a folder of them, or "
                                              "builtin (default: the built-in Shakespeare sample corpus).")] = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    max_tokens: MaxTokensOpt = 8192,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    mode: ModeOpt = Mode.auto,
    ep: Annotated[int | None, typer.Option(min=1, help="Plan expert-parallel placement on this many devices.")] = None,
    ep_replicas: Annotated[int, typer.Option(min=0, help="Extra copies of hot experts in the balanced "
                                             "placement.")] = 0,
    saliency: Annotated[bool, typer.Option("--saliency", help="Also measure each expert's REAP saliency (gate "
                                           "weight x output norm); costs top-k extra expert passes.")] = False,
    json_out: JsonOpt = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-expert rows as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a layers x experts heatmap PNG.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Run text through the model and report how it routes tokens to experts."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops import profile_files
    from moetool.ops.profile import ProfileOptions
    from moetool.ops.profile import profile as run_profile

    options = ProfileOptions(data=data, token_ids=token_ids, field=field, max_tokens=max_tokens, seq_len=seq_len,
                             batch_size=batch_size, device=device, dtype=dtype, mode=mode.value, ep=ep,
                             ep_replicas=ep_replicas, saliency=saliency, trust_remote_code=trust_remote_code)
    with open_checkpoint(model) as ckpt:
        with _Progress(enabled=not json_out) as progress:
            report = run_profile(ckpt, options, progress=progress.update)
    if csv_out:
        profile_files.write_csv(report, csv_out)
    if plot:
        profile_files.write_png(report, plot)
    if html_out:
        profile_files.write_html(report, html_out)
    if json_out:
        emit_json(report.to_dict())
    else:
        _render(report)


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress("sequences", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=stderr, transient=True)
            self._task = self._bar.add_task("run", total=None)
            self._bar.start()
        return self

    def update(self, done: int, total: int) -> None:
        if self.enabled:
            self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()


def _render(report) -> None:
    stdout.print(f"[bold]{report.source}[/] ({report.family}): {report.tokens:,} tokens in {report.sequences} "
                 f"sequences of {report.seq_len}, {report.mode} mode on {report.device} ({report.dtype}), "
                 f"{report.timing['tokens_per_second']} tokens/s")
    table = Table(show_edge=False, title="Routing per MoE layer (all figures: --json, --html)",
                  title_justify="left")
    for col in ("layer", "H/logE", "top1 p", "max/mean", "Gini", "drop@1", "dead", "reuse", "LRU@k"):
        table.add_column(col, justify="right")
    for lp in report.layers:
        lru = lp.lru_hit_rate.get(str(lp.top_k))
        table.add_row(str(lp.layer), f"{lp.entropy_normalized:.3f}", f"{lp.top1_prob_mean:.3f}",
                      f"{lp.imbalance['max_over_mean']:.2f}", f"{lp.imbalance['gini']:.2f}",
                      f"{lp.capacity_drop['1.0']:.1%}", str(len(lp.dead_experts)), f"{lp.consecutive_reuse:.0%}",
                      "" if lru is None else f"{lru:.0%}")
    stdout.print(table)
    stdout.print("[bold]Load heatmap[/] (rows: layers; columns: experts; height: tokens relative to the busiest)")
    for lp in report.layers:
        peak = max(lp.share) or 1.0
        cells = "".join(BLOCKS[min(len(BLOCKS) - 1, round(s / peak * (len(BLOCKS) - 1)))] for s in lp.share)
        stdout.print(f"  {lp.layer:>4} {cells}")
    if report.layers and report.layers[0].ep:
        stdout.print("[bold]Expert parallelism[/] (busiest device / mean)")
        for lp in report.layers:
            ep = lp.ep
            stdout.print(f"  layer {lp.layer}: contiguous {ep['contiguous']['busiest_over_mean']:.2f}, balanced "
                         f"{ep['balanced']['busiest_over_mean']:.2f}; cross-device tokens "
                         f"{ep['contiguous']['cross_device_tokens']:,} -> {ep['balanced']['cross_device_tokens']:,}")
