"""`moetool inspect`: parse options, call ops.inspect, render.

Neither typer nor rich is imported to run `inspect --json`: on a 90,000-tensor checkpoint it
must stay within 2x the bare header read, and typer costs 70 ms of it, rich 20 ms. moetool.cli.app
parses `inspect SOURCE [flags]` with fast_args; typer parses the rest (help, --duplicate-threshold,
mistakes), with the command typer_command() builds.
"""

from typing import Annotated

from moetool._util import gc_paused
from moetool.errors import ProblemsFoundError

DUPLICATE_THRESHOLD = 0.995
# the flags fast_args reads: those of the typer command below (a test checks that they agree)
FLAGS = {"--json": "json_out", "--layers": "layers", "--experts": "experts", "--check-values": "check_values",
         "--strict": "strict"}


def fast_args(args: list[str]) -> dict | None:
    """run_inspect's arguments for ARGS (those after `inspect`) when they are one source and
    FLAGS, else None (typer then parses them)."""
    sources = [a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    if len(sources) != 1 or not FLAGS.keys() >= set(flags):
        return None
    return {"source": sources[0], **{FLAGS[flag]: True for flag in flags}}


def typer_command():
    """The typer command: `moetool inspect`'s options, help and usage errors."""
    import typer

    def inspect(
        source: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors/.bin/.gguf file "
                                                         "(or GGUF split set), or hub id org/name[@rev].")],
        json_out: Annotated[bool, typer.Option("--json", metavar=" ",
                                               help="Print the report as JSON (schema in README).")] = False,
        layers: Annotated[bool, typer.Option("--layers", metavar=" ", help="Print a per-layer table.")] = False,
        experts: Annotated[bool, typer.Option("--experts", metavar=" ", help="Read expert weights: per-expert "
                                              "norms and pairwise similarity, flagging near-duplicate "
                                              "experts.")] = False,
        check_values: Annotated[bool, typer.Option("--check-values", metavar=" ",
                                                   help="Scan every tensor for NaN/Inf.")] = False,
        duplicate_threshold: Annotated[float, typer.Option(
            help="Cosine similarity at which two experts count as near-duplicates.", min=0.0, max=1.0,
        )] = DUPLICATE_THRESHOLD,
        strict: Annotated[bool, typer.Option("--strict", metavar=" ", help="Exit non-zero on warnings too, not only on "
                                             "errors (for CI).")] = False,
    ) -> None:
        """Show a checkpoint's family, experts, routing, parameters, memory and problems."""
        run_inspect(source, json_out=json_out, layers=layers, experts=experts, check_values=check_values,
                    duplicate_threshold=duplicate_threshold, strict=strict)

    return inspect


def run_inspect(source: str, *, json_out: bool = False, layers: bool = False, experts: bool = False,
                check_values: bool = False, duplicate_threshold: float = DUPLICATE_THRESHOLD,
                strict: bool = False) -> None:
    """`moetool inspect`, its options parsed."""
    # One collector pause from opening to the report: the ~100,000 acyclic objects of a large
    # index are freed before it ends, instead of rescanned (20 ms) when it resumes in between
    with gc_paused():
        report = _report(source, experts, check_values, duplicate_threshold, progress_bar=not json_out)
    if json_out:
        from moetool.cli.output import emit_json

        emit_json(report.to_dict())
    else:
        _render(report, layers=layers)
    failing = report.errors + (report.warnings if strict else [])
    if failing:
        raise ProblemsFoundError(f"{source}: {len(failing)} problem{'s' if len(failing) > 1 else ''} found "
                                 f"({failing[0].code}: {failing[0].message})")


def _report(source: str, experts: bool, check_values: bool, duplicate_threshold: float, *, progress_bar: bool):
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.inspect import inspect_checkpoint

    reads_values = experts or check_values
    with open_checkpoint(source, headers_only=not reads_values) as ckpt:
        progress = _progress() if reads_values and progress_bar else None
        try:
            return inspect_checkpoint(ckpt, experts=experts, check_values=check_values,
                                      duplicate_threshold=duplicate_threshold,
                                      progress=progress.update if progress else None)
        finally:
            if progress:
                progress.close()


class _progress:
    """A rich progress bar fed with (done_bytes, total_bytes)."""

    def __init__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        from moetool.cli.output import stdout

        self._bar = Progress("reading weights", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             transient=True, console=stdout.__class__(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task("read", total=None)

    def update(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._bar.stop()


def _render(report, *, layers: bool) -> None:
    from rich.table import Table

    from moetool.cli.output import count, esc, size, stdout

    out = stdout
    family = esc(f"{report.family_title} ({report.family})") if report.family else "unknown"
    if report.guessed:
        family += " [yellow](guessed from tensor names)[/]"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Source", esc(f"{report.source} ({report.kind})"))
    grid.add_row("Family", family + (f", {report.layout} layout" if report.layout else ""))
    n_moe = len(report.moe_layers)
    grid.add_row("Layers", f"{known(report.num_layers)} ({n_moe} MoE, {len(report.dense_layers)} dense)")
    if n_moe:
        shared = (f"{report.num_shared_experts} shared (FFN {known(report.shared_ffn)})"
                  if report.num_shared_experts else "no shared experts")
        identity = ""
        if report.zero_experts:   # (identity experts pass the token on times its weight; skip experts add nothing)
            skips = report.skip_experts
            kinds = [f"{n} {kind}" for n, kind in ((report.zero_experts - skips, "identity"), (skips, "skip"))
                     if n]
            identity = f" + {' + '.join(kinds)} (zero-computation)"
        grid.add_row("Experts", f"{known(report.num_experts)} routed{identity}, top-{known(report.top_k)}, expert FFN "
                                f"{known(report.expert_ffn)}; {shared}")
        grid.add_row("Router", report.router["description"])
    grid.add_row("Hidden / vocab", f"{known(report.hidden_size)} / {known(report.vocab_size)}"
                 + ("  (tied embeddings)" if report.tied_embeddings else ""))
    active = ""
    if report.active_params is not None and n_moe:
        most = "at most " if report.zero_experts else ""   # (a pick of an identity or skip expert computes nothing)
        active = (f" · {most}{count(report.active_params)} active per token "
                  f"({count(report.active_params_with_embedding)} counting the input embedding, "
                  f"{count(report.active_params_without_embeddings)} without input and output embeddings)")
    grid.add_row("Parameters", f"{count(report.total_params)} total{active}")
    disk = report.disk
    dtypes = ", ".join(f"{k} {size(v)}" for k, v in disk["bytes_by_dtype"].items())
    grid.add_row("On disk", f"{size(disk['tensor_bytes'])} in {disk['shards']} file"
                            f"{'s' if disk['shards'] != 1 else ''}, {report.tensor_count:,} tensors ({dtypes})")
    if report.quantization:
        grid.add_row("Quantized", ", ".join(report.quantization))
    mem = report.memory
    grid.add_row("Weights at", f"bf16 {size(mem['bf16'])} · fp8 {size(mem['fp8'])} · int4 {size(mem['int4'])}")
    out.print(grid)

    table = Table(title="Parameters by kind", title_justify="left", show_edge=False)
    table.add_column("kind")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for kind, n in report.params.items():
        if n:
            table.add_row(kind.replace("_", " "), f"{n:,}", f"{100 * n / max(report.total_params, 1):.1f}%")
    out.print(table)

    if layers:
        lt = Table(title="Layers", title_justify="left", show_edge=False)
        for col in ("layer", "kind", "experts", "top-k", "expert FFN", "shared", "params", "active"):
            lt.add_column(col, justify="right" if col not in ("kind",) else "left")
        for info in report.layers:
            moe = info.kind == "moe"
            lt.add_row(str(info.index), info.kind, str(info.experts) if moe else "", str(info.top_k or "") if moe
                       else "", str(info.expert_ffn or "") if moe else "", str(info.shared_experts or "") if moe
                       else "", count(info.params), count(info.active_params))
        out.print(lt)

    if report.experts:
        et = Table(title="Experts (weight norms; cosine similarity between experts)", title_justify="left",
                   show_edge=False)
        for col in ("layer", "norm min", "norm mean", "norm max", "most similar pair", "cosine", "near-dups"):
            et.add_column(col, justify="right")
        for stats in report.experts:
            norms = stats.norms
            best = _most_similar(stats.similarity)
            et.add_row(str(stats.layer), f"{min(norms):.3f}", f"{sum(norms) / len(norms):.3f}",
                       f"{max(norms):.3f}", f"{best[0]}~{best[1]}" if best else "",
                       f"{best[2]:.4f}" if best else "", str(len(stats.near_duplicates)))
        out.print(et)

    if report.problems:
        out.print("[bold]Problems[/]")
        colour = {"error": "red", "warning": "yellow", "info": "blue"}
        for p in report.problems:
            out.print(f"  [{colour[p.severity]}]{p.severity}[/] {p.code}: {esc(p.message)}", markup=True)
    else:
        out.print("[bold]Problems[/]  none found")


def _most_similar(sim: list[list[float]]):
    best = None
    for i, row in enumerate(sim):
        for j in range(i + 1, len(row)):
            if best is None or row[j] > best[2]:
                best = (i, j, row[j])
    return best


def known(value) -> str:
    """VALUE as text, "unknown" where the checkpoint does not say (a bare file has no config)."""
    return "unknown" if value is None else str(value)
