"""`moetool profile`: parse options, run ops.profile, render."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moetool.cli.options import (
    FLAG,
    PATH,
    BatchSizeOpt,
    ChatTemplateOpt,
    DataOpt,
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

BLOCKS = " ▁▂▃▄▅▆▇█"


def profile(
    model: ModelArg = "builtin:tiny-moe",
    data: DataOpt = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    chat_template: ChatTemplateOpt = None,
    max_tokens: MaxTokensOpt = 8192,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchSizeOpt = 8,
    capacity_window: Annotated[int | None, typer.Option(min=1, help="Tokens per capacity window for the drop "
                                                        "figures (default: one sequence, --seq-len).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    mode: ModeOpt = Mode.auto,
    device_map: DeviceMapOpt = None,
    offload_dir: OffloadDirOpt = None,
    ep: Annotated[int | None, typer.Option(min=1, help="Plan expert-parallel placement on this many devices.")] = None,
    ep_replicas: Annotated[int, typer.Option(min=0, help="Extra copies of hot experts in the balanced "
                                             "placement.")] = 0,
    saliency: Annotated[bool, typer.Option("--saliency", **FLAG, help="Also measure each expert's REAP saliency (gate "
                                           "weight x output norm); costs top-k extra expert passes.")] = False,
    trace: Annotated[Path | None, typer.Option(**PATH, help="Stream every token's routing to this folder (format in "
                                               "README).")] = None,
    from_trace: Annotated[Path | None, typer.Option(**PATH, help="Compute the report from a trace (moetool's, or vLLM "
                                                    "routed-experts .npy arrays) instead of running the model; "
                                                    "MODEL gives the structure.")] = None,
    force: Annotated[bool, typer.Option("--force", **FLAG, help="Replace an earlier --trace folder, and existing "
                                        "--csv, --plot and --html files (never the model's or the input's "
                                        "own).")] = False,
    json_out: JsonOpt = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", **PATH, help="Write per-expert rows as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option(**PATH, help="Write the figures as a PNG (needs "
                                              "moetool\\[plot]).")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", **PATH, help="Write a self-contained HTML report (needs "
                                                  "moetool\\[plot]).")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Run text through the model and report how it routes tokens to experts."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops import profile_files
    from moetool.ops.profile import ProfileOptions
    from moetool.ops.profile import profile as run_profile
    from moetool.runner.distributed import is_primary

    options = ProfileOptions(data=data, token_ids=token_ids, field=field, chat_template=chat_template,
                             max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                             capacity_window=capacity_window, device=device, dtype=dtype, mode=mode.value,
                             device_map=device_map, offload_dir=offload_dir, ep=ep, ep_replicas=ep_replicas,
                             saliency=saliency, trace=trace, from_trace=from_trace, force=force,
                             trust_remote_code=trust_remote_code)
    primary = is_primary()
    if plot or html_out:
        profile_files.require_matplotlib()   # before the run, not after it
    reports = {"--csv": csv_out, "--plot": plot, "--html": html_out}
    inputs = {"--data": data, "--token-ids": token_ids, "--chat-template": chat_template, "--from-trace": from_trace}
    profile_files.check_report_paths(reports, force=force, inputs=inputs)   # before the model is opened
    with open_checkpoint(model, headers_only=from_trace is not None) as ckpt:
        profile_files.check_report_paths(reports, force=force, source=ckpt, inputs=inputs)
        with PassProgress(enabled=primary and not json_out) as progress:
            report = run_profile(ckpt, options, progress=progress.update)
    if not primary:   # torchrun: rank 0 alone prints and writes
        return
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


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _render(report) -> None:
    shape = f"sequences of {report.seq_len}" if report.seq_len else "sequences"
    ranks = f" x {report.world_size} ranks" if report.world_size > 1 else ""
    stdout.print(f"[bold]{esc(report.source)}[/] ({esc(str(report.family))}): {report.tokens:,} tokens in "
                 f"{report.sequences} {shape}, {report.mode} mode on {report.device}{ranks} ({report.dtype}), "
                 f"{report.timing['tokens_per_second']} tokens/s")
    table = Table(show_edge=False, title="Routing per MoE layer (all figures: --json, --html)",
                  title_justify="left")
    for col in ("layer", "H/logE", "top1 p", "max/mean", "Gini", "drop@1", "dead", "reuse", "LRU@k"):
        table.add_column(col, justify="right")
    for lp in report.layers:
        lru = lp.lru_hit_rate.get(str(lp.top_k))
        table.add_row(str(lp.layer), _num(lp.entropy_normalized, ".3f"), _num(lp.top1_prob_mean, ".3f"),
                      f"{lp.imbalance['max_over_mean']:.2f}", f"{lp.imbalance['gini']:.2f}",
                      f"{lp.capacity_drop['1.0']:.1%}", str(len(lp.dead_experts)), f"{lp.consecutive_reuse:.0%}",
                      "" if lru is None else f"{lru:.0%}")
    stdout.print(table)
    # a router that also picks identity or skip experts
    identity = [lp.identity for lp in report.layers if lp.identity]
    if identity:
        shares = [i["share"] for i in identity]
        computed = [i["computed_experts_per_token"] for i in identity]
        stdout.print(f"[bold]Zero-computation experts[/] (identity or skip): {min(shares):.1%} to "
                     f"{max(shares):.1%} of the picks by layer (mean {sum(shares) / len(shares):.1%}); real experts "
                     "computed per token "
                     f"{min(computed):.2f} to {max(computed):.2f} of top-{report.layers[0].top_k}. The figures "
                     "above are of the real experts alone.")
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
    for note in report.notes:
        stdout.print(f"[yellow]note[/] {esc(note)}")
