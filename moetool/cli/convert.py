"""`moetool convert`: parse options, plan, show or write, render."""

import re
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moetool.checkpoint.writer import refuse_inside_source
from moetool.cli.options import FLAG, DryRunOpt, ForceOpt, MaxShardSizeOpt, OutArg
from moetool.cli.output import emit_json, esc, report_json, size, stderr, stdout
from moetool.errors import UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Layout(str, Enum):
    per_expert = "per-expert"
    fused = "fused"


def parse_size(text: str) -> int:
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not found:
        raise UsageError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    value = int(float(found.group(1)) * _UNITS[found.group(2) or ""])
    if value <= 0:
        raise UsageError("--max-shard-size must be positive")
    return value


def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors/.bin file, or hub id.")],
    out: OutArg,
    dtype: Annotated[Dtype | None, typer.Option(help="Cast floating weights (routers a family keeps in fp32 "
                                                "stay fp32 unless --cast-routers).")] = None,
    layout: Annotated[Layout | None, typer.Option(help="Expert layout: per-expert (hub) or fused "
                                                  "(transformers 5).")] = None,
    max_shard_size: MaxShardSizeOpt = "5GB",
    dequantize: Annotated[bool, typer.Option("--dequantize", **FLAG, help="Dequantize fp8 (block scales), mxfp4 and "
                                             "bitsandbytes 4/8-bit weights to --dtype (default bf16).")] = False,
    cast_routers: Annotated[bool, typer.Option("--cast-routers", **FLAG, help="Also cast router weights and biases "
                                               "that the family keeps in fp32.")] = False,
    verify: Annotated[bool, typer.Option("--verify", **FLAG, help="Re-read the output and compare every tensor with "
                                         "the source.")] = False,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", **FLAG, help="Print the plan or report as JSON.")] = False,
) -> None:
    """Convert dtype, expert layout, sharding and format, streaming tensor by tensor."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.convert import ConvertOptions, plan_convert
    from moetool.ops.convert import convert as run_convert

    options = ConvertOptions(dtype=dtype.value if dtype else None, layout=layout.value if layout else None,
                             max_shard_size=parse_size(max_shard_size), dequantize=dequantize,
                             cast_fp32_roles=cast_routers,
                             command=shlex.join(["moetool", *sys.argv[1:]]) if sys.argv else "moetool convert")
    with open_checkpoint(source) as ckpt:
        if dry_run:   # the checks of OUT the run makes first, but for an existing OUT (the run needs --force)
            refuse_inside_source(out, ckpt)
            plan = plan_convert(ckpt, options)
            emit_json(report_json(plan.summary())) if json_out else _render_plan(plan.summary(), out)
            return
        bar = None if json_out else _Bar()
        try:
            report = run_convert(ckpt, out, options, force=force, verify=verify, progress=bar.advance if bar else None)
        finally:
            if bar:
                bar.close()
    if json_out:
        emit_json(report.to_dict())
    else:
        _render_plan(report.plan, out)
        rate = report.bytes_written / report.seconds if report.seconds else 0
        stdout.print(f"Wrote {esc(str(out))} ({size(report.bytes_written)} in {report.seconds:.1f} s, "
                     f"{size(int(rate))}/s)"
                     + (", verified" if report.verified else ""))


class _Bar:
    def __init__(self, label: str = "writing"):
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._bar = Progress(label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=stderr,
                             transient=True)
        self._task = self._bar.add_task("write", total=None)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)

    def close(self) -> None:
        self._bar.stop()


def _render_plan(plan: dict, out: Path) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Source", esc(f"{plan['source']} ({plan['family'] or 'unknown family'})"))
    grid.add_row("Output", esc(str(out)))
    if plan["source_layout"]:
        grid.add_row("Expert layout", f"{plan['source_layout']} -> {plan['target_layout']}")
    grid.add_row("Tensors", f"{plan['tensors']:,} ({size(plan['output_bytes'])}) in {len(plan['shards'])} shard"
                            f"{'s' if len(plan['shards']) != 1 else ''}")
    grid.add_row("Actions", ", ".join(f"{k} {v:,}" for k, v in sorted(plan["actions"].items())) or "copy only")
    if plan["files_copied"]:
        grid.add_row("Also copied", esc(", ".join(plan["files_copied"])))
    for note in plan["notes"]:
        grid.add_row("Note", esc(note))
    stdout.print(grid)
