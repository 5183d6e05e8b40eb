"""Profile reports as files: CSV, a PNG heatmap (pure zlib, no plotting library) and a
self-contained HTML page with SVG charts."""

from __future__ import annotations

import csv
import html
import struct
import zlib
from pathlib import Path

from moetool.ops.profile import ProfileReport


def write_csv(report: ProfileReport, path: Path) -> None:
    """One row per (layer, expert)."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["layer", "expert", "tokens", "share", "weight_mass", "saliency", "dead"])
        for layer in report.layers:
            for e in range(layer.experts):
                out.writerow([layer.layer, e, layer.counts[e], layer.share[e], layer.weight_mass[e],
                              "" if layer.saliency is None else layer.saliency[e], int(e in layer.dead_experts)])


def _colour(value: float) -> tuple[int, int, int]:
    """0 -> dark blue, 1 -> yellow (a viridis-like ramp)."""
    stops = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
             (1.0, (253, 231, 37))]
    value = min(1.0, max(0.0, value))
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if value <= b:
            t = (value - a) / (b - a)
            return tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))
    return stops[-1][1]


def _relative(report: ProfileReport) -> list[list[float]]:
    """Each layer's expert shares relative to uniform (share x E), scaled to [0, 1] by the maximum."""
    grid = [[s * layer.experts for s in layer.share] for layer in report.layers]
    peak = max((v for row in grid for v in row), default=1.0) or 1.0
    return [[v / peak for v in row] for row in grid]


def write_png(report: ProfileReport, path: Path, cell: int | None = None, bar_height: int = 48) -> None:
    """A layers x experts heatmap (colour: load relative to the busiest cell), then one load chart
    per layer (bar height: the expert's share relative to that layer's busiest expert)."""
    grid = _relative(report)
    columns = max(len(r) for r in grid)
    cell = cell or max(4, min(32, 1200 // columns))
    width = columns * cell
    white, grey, bar = (255, 255, 255), (200, 200, 200), (59, 82, 139)
    pixels: list[bytes] = []
    for row in grid:
        line = b"".join(bytes(_colour(v)) * cell for v in row) + bytes(white) * (width - len(row) * cell)
        pixels += [line] * cell
    for layer in report.layers:
        pixels += [bytes(white) * width] * 4                              # gap
        peak = max(layer.share) or 1.0
        heights = [round(s / peak * bar_height) for s in layer.share]
        for y in range(bar_height, 0, -1):
            line = b"".join((bytes(bar) * (cell - 1) + bytes(white)) if h >= y else bytes(white) * cell
                            for h in heights)
            pixels.append(line + bytes(white) * (width - len(heights) * cell))
        pixels.append(bytes(grey) * width)                                 # axis
    height = len(pixels)
    raw = b"".join(b"\x00" + line for line in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _svg_heatmap(report: ProfileReport, cell: int = 14) -> str:
    grid = _relative(report)
    parts = []
    for y, (layer, row) in enumerate(zip(report.layers, grid)):
        parts.append(f'<text x="0" y="{y * cell + cell - 3}" font-size="10">L{layer.layer}</text>')
        for x, value in enumerate(row):
            r, g, b = _colour(value)
            title = f"layer {layer.layer} expert {x}: {layer.counts[x]} tokens ({layer.share[x]:.2%})"
            parts.append(f'<rect x="{40 + x * cell}" y="{y * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb({r},{g},{b})"><title>{html.escape(title)}</title></rect>')
    width = 40 + max(len(r) for r in grid) * cell
    return f'<svg width="{width}" height="{len(grid) * cell}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def _svg_bars(values: list[float], labels: list[str], width: int = 600, height: int = 120) -> str:
    peak = max(values, default=1.0) or 1.0
    step = width / max(1, len(values))
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - v / peak * height:.1f}" width="{max(1.0, step - 1):.1f}" '
        f'height="{v / peak * height:.1f}" fill="#3b528b"><title>{html.escape(labels[i])}: {v:.4g}</title></rect>'
        for i, v in enumerate(values))
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{bars}</svg>'


def write_html(report: ProfileReport, path: Path) -> None:
    rows = "".join(
        f"<tr><td>{lp.layer}</td><td>{lp.entropy_normalized:.3f}</td><td>{lp.top1_prob_mean:.3f}</td>"
        f"<td>{lp.imbalance['max_over_mean']:.2f}</td><td>{lp.imbalance['cv']:.3f}</td>"
        f"<td>{lp.imbalance['gini']:.3f}</td><td>{lp.capacity_drop['1.0']:.2%}</td>"
        f"<td>{lp.capacity_drop['1.25']:.2%}</td><td>{len(lp.dead_experts)}</td>"
        f"<td>{lp.distinct_experts_per_sequence:.1f}</td><td>{lp.consecutive_reuse:.2%}</td></tr>"
        for lp in report.layers)
    charts = "".join(
        f"<h3>Layer {lp.layer}: tokens per expert</h3>"
        + _svg_bars([float(c) for c in lp.counts], [f"expert {e}" for e in range(lp.experts)])
        for lp in report.layers)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}")
    headers = ("layer", "entropy / log E", "top-1 prob", "max/mean", "CV", "Gini", "drop @1.0", "drop @1.25",
               "dead", "distinct / seq", "reuse")
    summary = (f"{html.escape(report.source)} ({html.escape(report.family)}): {report.tokens:,} tokens in "
               f"{report.sequences} sequences of {report.seq_len}, {report.mode} mode on "
               f"{html.escape(report.device)} ({report.dtype}), {report.timing['tokens_per_second']} tokens/s. "
               f"moetool {report.moetool_version}.")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>moetool profile: '
            f"{html.escape(report.source)}</title><style>{style}</style></head><body>"
            f"<h1>Routing profile</h1><p>{summary}</p>"
            f"<h2>Load heatmap (layers x experts, relative to the busiest)</h2>{_svg_heatmap(report)}"
            f"<h2>Per layer</h2><table><tr>{''.join(f'<th>{h}</th>' for h in headers)}</tr>{rows}</table>"
            f"{charts}</body></html>")
    path.write_text(page, encoding="utf-8")
