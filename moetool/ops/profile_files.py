"""Profile reports as files: CSV, a multi-panel PNG and a self-contained HTML page.

The figures are drawn with matplotlib (the optional extra ``moetool[plot]``), imported only when a
figure is asked for, on its own ``Figure`` and Agg canvas: pyplot and the caller's backend are left alone.

The PNG is one tall figure of four sections, top to bottom (``SECTIONS``):

- ``heatmap``: layers x experts, each expert's load relative to uniform (share x E) on a log colour scale
  centred on 1x (blue: under-used, red: over-used, black: dead, grey: the layer has no such expert);
- ``routing``: per layer, the normalized router entropy and mean top-1 gate probability (lines), and
  the load imbalance, busiest/mean (bars) with the Gini coefficient (line);
- ``load``: a grid of small bar charts, tokens per expert for each layer, with the mean and dead experts;
- ``coactivation``: a grid of small heatmaps, one per layer, of P(expert j chosen | expert i chosen)
  (co-activation counts over the diagonal; the diagonal itself hidden) relative to uniform routing,
  (k-1)/(E-1), on one shared log colour scale centred on 1x.

Small multiples go 4, 6 or 8 to a row (up to 8, 24, more layers), tick labels are thinned to round steps,
and layers with 64 experts or more get filled step charts instead of bars.

The HTML page inlines the same four sections as SVG (text as paths, heatmaps as embedded images),
around the per-layer table.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moetool.checkpoint.writer import refuse_inside_source
from moetool.errors import OutputExistsError, OutputWriteError, UnsupportedError, UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

    from moetool.ops.profile import LayerProfile, ProfileReport

SECTIONS = ("heatmap", "routing", "load", "coactivation")
PLOT_HINT = "pip install 'moetool[plot]'"
_BLUE, _MEAN, _DEAD = "#3b6ea8", "#222222", "#d62728"


def write_csv(report: ProfileReport, path: Path) -> None:
    """One row per (layer, expert)."""
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["layer", "expert", "tokens", "share", "weight_mass", "saliency", "dead"])
    for layer in report.layers:
        for e in range(layer.experts):
            out.writerow([layer.layer, e, layer.counts[e], layer.share[e],
                          "" if layer.weight_mass is None else layer.weight_mass[e],
                          "" if layer.saliency is None else layer.saliency[e], int(e in layer.dead_experts)])
    _write(path, text.getvalue().encode("utf-8"))


def require_matplotlib() -> None:
    """Raise UnsupportedError (exit 7, hint: the install command) unless matplotlib can be imported."""
    _matplotlib()


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError("plotting a profile needs matplotlib, which is not installed",
                               hint=PLOT_HINT) from None
    return Figure, FigureCanvasAgg


# ---------------------------------------------------------------------------------------------- layout


def _columns(layers: int) -> int:
    """Small multiples per row: every layer in one row up to 4, then 6, then 8 a row."""
    return max(1, min(layers, 4 if layers <= 8 else 6 if layers <= 24 else 8))


def _layout(report: ProfileReport) -> tuple[float, dict[str, float]]:
    """Figure width and each section's height, in inches."""
    count = max(1, len(report.layers))
    width = 14.0 if count <= 24 else 16.0
    cols = _columns(count)
    rows = math.ceil(count / cols)
    heights = {"heatmap": min(11.0, max(3.2, 1.2 + 0.16 * count)), "routing": 3.4,
               "load": 0.6 + 1.9 * rows, "coactivation": 0.7 + rows * min(3.2, 0.9 * (width - 1.2) / cols)}
    if all(lp.top_k < 2 for lp in report.layers):
        heights["coactivation"] = 1.0                                 # a line saying there is none
    return width, heights


def _text(value: object) -> str:
    """Plain text for a matplotlib label: `$` would start mathtext."""
    return str(value).replace("$", r"\$")


def _short(value: str, limit: int = 70) -> str:
    return value if len(value) <= limit else value[:20] + "…" + value[-(limit - 21):]


def _title(report: ProfileReport) -> str:
    return _text(f"{_short(report.source)} ({report.family}): {report.tokens:,} tokens")


def _grid(fig, count: int):
    cols = _columns(count)
    rows = math.ceil(count / cols)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return axes[:count], cols


def _every(count: int, most: int) -> int:
    """The smallest round step that leaves at most MOST of COUNT ticks."""
    need = math.ceil(count / most)
    return next(step for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 256, 512, need)
                if step >= need)


def _ticks(axis, count: int, most: int, labels=None) -> None:
    """Ticks at every `_every`-th of COUNT positions 0..COUNT-1 (labelled LABELS[i], or i)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator

    chosen = list(range(0, count, _every(count, most)))
    axis.set_major_locator(FixedLocator(chosen))
    axis.set_major_formatter(FixedFormatter([str(i if labels is None else labels[i]) for i in chosen]))


def _times(value: float, _=None) -> str:
    """1/4×, 1×, 8×: a colour-bar tick on a log scale of ratios."""
    return f"{value:g}×" if value >= 1 else f"1/{1 / value:g}×"


def _log_ratio_norm(ratios, robust: bool = False):
    """A log colour scale centred on 1 for ratios to uniform, spanning 2x to 64x either way (ROBUST: wide
    enough for the 1st to 99th percentiles, not for every outlier)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    positive = ratios[np.isfinite(ratios) & (ratios > 0)]
    low, high = np.percentile(positive, [1, 99]) if robust and positive.size else (
        (positive.min(), positive.max()) if positive.size else (0.5, 2.0))
    spread = max(float(high), 1.0 / float(low))
    span = 2.0 ** min(6, max(1, math.ceil(math.log2(spread) - 1e-9)))
    return LogNorm(1 / span, span)


def _ratio_bar(fig, image, axes, label: str, **kw):
    from matplotlib.ticker import FuncFormatter, NullLocator

    low, high = image.norm.vmin, image.norm.vmax
    bar = fig.colorbar(image, ax=axes, extend="both", extendfrac=0.03, **kw)
    bar.set_ticks([2.0 ** k for k in range(round(math.log2(low)), round(math.log2(high)) + 1)])
    bar.ax.yaxis.set_minor_locator(NullLocator())
    bar.ax.yaxis.set_major_formatter(FuncFormatter(_times))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(label)
    return bar


def _number(value) -> float:
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------- sections


def _relative(report: ProfileReport):
    """Layers x max(E): share x E (1 = uniform); NaN where a layer has fewer experts."""
    import numpy as np

    grid = np.full((len(report.layers), max(lp.experts for lp in report.layers)), np.nan)
    for row, lp in enumerate(report.layers):
        grid[row, :lp.experts] = np.asarray(lp.share, dtype=float)[:lp.experts] * lp.experts
    return grid


def _draw_heatmap(fig: Figure | SubFigure, report: ProfileReport) -> None:
    import numpy as np
    from matplotlib import colormaps

    grid = _relative(report)
    norm = _log_ratio_norm(grid)
    shown = np.where(grid == 0, norm.vmin / 4, np.maximum(grid, norm.vmin))   # only the dead below the scale
    cmap = colormaps["coolwarm"].with_extremes(under="black", over="#67000d", bad="#d9d9d9")
    ax = fig.add_subplot()
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    layers, experts = grid.shape
    _ticks(ax.yaxis, layers, 32, [lp.layer for lp in report.layers])
    _ticks(ax.xaxis, experts, 32)
    ax.tick_params(labelsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{_title(report)}: expert load relative to uniform")
    _ratio_bar(fig, image, ax, "load ÷ uniform (share × E)\nblack: dead expert",
               fraction=0.04, pad=0.01, aspect=max(12, min(40, 3 * layers)))


def _draw_routing(fig: Figure | SubFigure, report: ProfileReport) -> None:
    layers = [lp.layer for lp in report.layers]
    left, right = fig.subplots(1, 2)
    entropy = [_number(lp.entropy_normalized) for lp in report.layers]
    top1 = [_number(lp.top1_prob_mean) for lp in report.layers]
    if all(math.isnan(v) for v in entropy + top1):
        left.text(0.5, 0.5, "no gate probabilities in this trace", ha="center", va="center",
                  transform=left.transAxes, color="grey")
        left.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    else:
        left.plot(layers, entropy, "o-", ms=3, color=_BLUE, label="router entropy ÷ log E")
        left.plot(layers, top1, "s--", ms=3, color="#e07b00", label="mean top-1 gate probability")
        left.legend(fontsize=8, loc="best")
    left.set_ylim(0, 1.05)
    left.set_title("Router entropy (normalized) and confidence per layer")
    left.set_ylabel("0 … 1 (entropy 1: uniform routing)")

    ratio = [_number(lp.imbalance.get("max_over_mean")) for lp in report.layers]
    gini = [_number(lp.imbalance.get("gini")) for lp in report.layers]
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    right.bar(layers, ratio, width=0.8 * min(gaps, default=1), color=_BLUE, label="busiest ÷ mean (left)")
    right.axhline(1.0, color=_MEAN, lw=0.8, ls=":")
    right.set_ylabel("busiest expert ÷ mean")
    twin = right.twinx()
    twin.plot(layers, gini, "o-", ms=3, color=_DEAD, label="Gini (right)")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("Gini coefficient")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    right.set_title("Load imbalance per layer")
    for ax in (left, right, twin):
        ax.tick_params(labelsize=8)
    for ax in (left, right):
        ax.set_xlabel("MoE layer")
        ax.set_xticks(layers[::_every(len(layers), 20)])


def _draw_loads(fig: Figure | SubFigure, report: ProfileReport) -> None:
    import numpy as np
    from matplotlib.ticker import EngFormatter

    axes, cols = _grid(fig, len(report.layers))
    for index, (ax, lp) in enumerate(zip(axes, report.layers)):
        counts = np.asarray(lp.counts[:lp.experts], dtype=float)
        if lp.experts <= 64:
            ax.bar(np.arange(lp.experts), counts, width=0.8, color=_BLUE)
        else:                                         # one patch, not hundreds of bars
            ax.stairs(counts, np.arange(lp.experts + 1) - 0.5, fill=True, color=_BLUE)
        ax.axhline(counts.mean() if counts.size else 0, color=_MEAN, lw=0.9, ls="--")
        if lp.dead_experts:
            ax.plot(lp.dead_experts, [0] * len(lp.dead_experts), "x", color=_DEAD, ms=5, mew=1.2, clip_on=False)
        ax.set_xlim(-0.5, lp.experts - 0.5)
        ratio = lp.imbalance.get("max_over_mean")
        title = f"layer {lp.layer}" + ("" if ratio is None else f": {ratio:.2f}×")
        ax.set_title(title + (f", {len(lp.dead_experts)} dead" if lp.dead_experts else ""),
                     fontsize=8 if cols <= 6 else 7)
        _ticks(ax.xaxis, lp.experts, 8 if cols <= 6 else 4)
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.tick_params(labelsize=7)
        if index % cols == 0:
            ax.set_ylabel("tokens", fontsize=8)
        if index + cols >= len(axes):
            ax.set_xlabel("expert", fontsize=8)
    fig.suptitle("Tokens per expert, by layer (title: busiest ÷ mean; dashed: mean; red ×: dead expert)")


def _conditional(lp: LayerProfile):
    """P(j chosen | i chosen) ÷ its value under uniform routing, (k-1)/(E-1): the co-activation rows over
    their diagonal. NaN on the diagonal, for dead experts i, and for top-1 layers (nothing co-activates)."""
    import numpy as np

    counts = np.asarray(lp.coactivation, dtype=float)
    if counts.shape != (lp.experts, lp.experts) or lp.top_k < 2 or lp.experts < 2:
        return None
    diagonal = np.diag(counts).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = counts / diagonal[:, None] / ((lp.top_k - 1) / (lp.experts - 1))
    out[diagonal == 0] = np.nan
    np.fill_diagonal(out, np.nan)
    return out


def _draw_coactivation(fig: Figure | SubFigure, report: ProfileReport) -> None:
    import numpy as np
    from matplotlib import colormaps

    matrices = [_conditional(lp) for lp in report.layers]
    if all(m is None for m in matrices):
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "Co-activation: none to show"
                + (" (top-1 routing: one expert per token)" if all(lp.top_k < 2 for lp in report.layers) else ""),
                ha="center", va="center", transform=ax.transAxes)
        return
    values = np.concatenate([m[np.isfinite(m)].ravel() for m in matrices if m is not None])
    norm = _log_ratio_norm(values, robust=True)
    cmap = colormaps["coolwarm"].with_extremes(bad="#d9d9d9")
    axes, cols = _grid(fig, len(report.layers))
    for index, (ax, lp, matrix) in enumerate(zip(axes, report.layers, matrices)):
        ax.set_title(f"layer {lp.layer}", fontsize=8)
        if matrix is None:                                              # a top-1 layer among top-k ones
            ax.text(0.5, 0.5, "top-1 routing:\nno co-activation" if lp.top_k < 2 else "not recorded",
                    ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=8)
            ax.set(xticks=[], yticks=[], box_aspect=1)
            continue
        image = ax.imshow(np.where(matrix == 0, norm.vmin, matrix), cmap=cmap, norm=norm,
                          interpolation="nearest" if lp.experts <= 64 else "antialiased")
        _ticks(ax.xaxis, lp.experts, 4)
        _ticks(ax.yaxis, lp.experts, 4)
        ax.tick_params(labelsize=7)
        if index % cols == 0:
            ax.set_ylabel("expert i", fontsize=8)
        if index + cols >= len(axes):
            ax.set_xlabel("expert j", fontsize=8)
    _ratio_bar(fig, image, list(axes), "P(j | i) ÷ uniform (k−1)/(E−1)", fraction=0.03, pad=0.02, aspect=40)
    fig.suptitle("Co-activation: how often expert j is chosen for the tokens that chose expert i, "
                 "relative to uniform routing (grey: diagonal, dead experts' rows)")


_DRAW = {"heatmap": _draw_heatmap, "routing": _draw_routing, "load": _draw_loads,
         "coactivation": _draw_coactivation}


# ---------------------------------------------------------------------------------------------- figures


def build_figure(report: ProfileReport) -> Figure:
    """The whole report as one Figure (what write_png saves): the SECTIONS stacked top to bottom."""
    Figure, FigureCanvasAgg = _matplotlib()
    _check(report)
    width, heights = _layout(report)
    fig = Figure(figsize=(width, sum(heights.values())), layout="constrained")
    FigureCanvasAgg(fig)
    for name, sub in zip(SECTIONS, fig.subfigures(len(SECTIONS), 1, height_ratios=[heights[s] for s in SECTIONS])):
        _DRAW[name](sub, report)
    return fig


def build_figures(report: ProfileReport) -> dict[str, Figure]:
    """Each of the SECTIONS as a Figure of its own (what write_html embeds), in that order."""
    Figure, FigureCanvasAgg = _matplotlib()
    _check(report)
    width, heights = _layout(report)
    figures = {}
    for name in SECTIONS:
        fig = Figure(figsize=(width, heights[name]), layout="constrained")
        FigureCanvasAgg(fig)
        _DRAW[name](fig, report)
        figures[name] = fig
    return figures


def _check(report: ProfileReport) -> None:
    if not report.layers:
        raise UnsupportedError(f"{report.source}: the profile has no MoE layers to plot")


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def check_report_paths(paths: dict[str, Path | None], *, force: bool = False, source=None,
                       inputs: dict[str, Path | str | None] | None = None) -> None:
    """Refuse, before the run, report files that cannot or must not be written. PATHS: each report's file
    by its option (--csv, --plot, --html; None: not asked for); two reports may not share a file. See
    `check_report_path` for FORCE, SOURCE and INPUTS."""
    given = {option: Path(path) for option, path in paths.items() if path is not None}
    seen: dict[Path, str] = {}
    for option, path in given.items():
        check_report_path(path, force=force, source=source, inputs=inputs)
        target = path.resolve()
        if target in seen:
            raise UsageError(f"{path}: given to both {seen[target]} and {option}; each report needs a file of its own")
        seen[target] = option


def check_report_path(path: Path, *, force: bool = False, source=None,
                      inputs: dict[str, Path | str | None] | None = None) -> None:
    """Refuse, before the run, a report file that cannot or must not be written: a folder, or in none
    (OutputWriteError); a file of the checkpoint SOURCE or inside its folder, or one of INPUTS (the input files
    and folders, by option: calibration data, a trace), even with FORCE (UsageError); an existing file without
    FORCE (OutputExistsError)."""
    path = Path(path)
    if path.is_dir():
        raise OutputWriteError(f"{path}: is a folder; give a file name")
    if not path.absolute().parent.is_dir():
        raise OutputWriteError(f"{path}: its folder does not exist")
    if source is not None:
        refuse_inside_source(path, source)
    target = path.resolve()
    for option, given in (inputs or {}).items():
        if given is None or str(given) in ("", "model", "builtin") or str(given).startswith("builtin:"):
            continue                                   # not a path: the built-in corpus, the model's template
        used = Path(given)
        if used.exists() and (target == used.resolve() or target.is_relative_to(used.resolve())):
            raise UsageError(f"{path}: would replace the {option} input {given}; the input is never overwritten",
                             hint="write to a new path")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(f"{path}: already exists", hint="use --force to replace it")


def _write(path: Path, data: bytes) -> None:
    """DATA as PATH, whole or not at all (a temporary file beside it, renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.moetool-tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(f"{path}: writing failed ({exc.strerror or exc})") from None


def write_png(report: ProfileReport, path: Path, *, dpi: int = 100) -> None:
    """The multi-panel figure of build_figure as a PNG (about 1400-1600 pixels wide at dpi 100)."""
    _write(path, _png(build_figure(report), dpi))


# ---------------------------------------------------------------------------------------------- HTML


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _table(report: ProfileReport) -> str:
    identity = any(lp.identity for lp in report.layers)   # a router that also picks identity experts
    headers = ("layer", "experts", "entropy / log E", "top-1 prob", "max/mean", "CV", "Gini", "drop @1.0",
               "drop @1.25", "dead", "distinct / seq", "reuse") + \
        (("zero-expert picks", "real experts / token") if identity else ())
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            str(lp.layer), str(lp.experts), _fmt(lp.entropy_normalized, ".3f"), _fmt(lp.top1_prob_mean, ".3f"),
            _fmt(lp.imbalance.get("max_over_mean"), ".2f"), _fmt(lp.imbalance.get("cv"), ".3f"),
            _fmt(lp.imbalance.get("gini"), ".3f"), _fmt(lp.capacity_drop.get("1.0"), ".2%"),
            _fmt(lp.capacity_drop.get("1.25"), ".2%"), str(len(lp.dead_experts)),
            _fmt(lp.distinct_experts_per_sequence, ".1f"), _fmt(lp.consecutive_reuse, ".2%"),
            *((_fmt((lp.identity or {}).get("share"), ".2%"),
               _fmt((lp.identity or {}).get("computed_experts_per_token"), ".2f")) if identity else ()))) + "</tr>"
        for lp in report.layers)
    return f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in headers)}</tr>{rows}</table>"


_CAPTIONS = {
    "heatmap": ("Load heatmap", "Layers x experts: each expert's share of the layer's assignments times the "
                "number of experts (1× = uniform), on a log colour scale; black: dead experts; grey: a layer with "
                "fewer experts."),
    "routing": ("Router entropy and imbalance", "Per layer: mean router entropy over log E and mean top-1 gate "
                "probability; busiest expert over the mean load, and the Gini coefficient of the loads."),
    "load": ("Tokens per expert", "One chart per layer; dashed line: the mean; red crosses: dead experts."),
    "coactivation": ("Co-activation", "Per layer, the share of the tokens routed to expert i that expert j "
                     "also gets (co-activation counts over the diagonal), relative to uniform routing, (k-1)/(E-1), "
                     "on a log colour scale; grey: the diagonal and dead experts' rows."),
}


def _svg(fig: Figure, name: str, label: str, dpi: int) -> str:
    """FIG as inline SVG (text drawn as paths, images embedded): its ids prefixed with NAME, so several can
    share a page, and no metadata (it names matplotlib's web site)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", dpi=dpi, facecolor="white",
                metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buffer.getvalue().decode("utf-8")
    svg = re.sub(r'(\bid="|href="#|url\(#)', rf"\g<1>{name}-", svg[svg.index("<svg"):])
    return svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(label)}" ', 1)


def write_html(report: ProfileReport, path: Path, *, dpi: int = 100) -> None:
    """A self-contained page (no network): the build_figures sections as inline SVG, and the per-layer table."""
    sections = {}
    for name, fig in build_figures(report).items():
        heading, caption = _CAPTIONS[name]
        sections[name] = (f'<h2>{html.escape(heading)}</h2><figure id="{name}">{_svg(fig, name, heading, dpi)}'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    speed = report.timing.get("tokens_per_second") if isinstance(report.timing, dict) else None
    summary = html.escape(
        f"{report.source} ({report.family}): {report.tokens:,} tokens in {report.sequences} sequences of "
        f"{report.seq_len}, {report.mode} mode on {report.device} ({report.dtype})"
        + ("" if speed is None else f", {speed} tokens/s") + f". moetool {report.moetool_version}.")
    notes = "".join(f"<li>{html.escape(str(note))}</li>" for note in report.notes)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1700px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "svg{max-width:100%;height:auto}figure{margin:0 0 1em 0}figcaption{color:#555;font-size:90%}")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>moetool profile: {html.escape(report.source)}</title><style>{style}</style></head><body>"
            f"<h1>Routing profile</h1><p>{summary}</p>{f'<ul>{notes}</ul>' if notes else ''}"
            f"{sections['heatmap']}{sections['routing']}<h2>Per layer</h2>{_table(report)}"
            f"{sections['load']}{sections['coactivation']}</body></html>")
    _write(path, page.encode("utf-8"))
