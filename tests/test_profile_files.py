"""moetool.ops.profile_files: the PNG, the HTML page (rendered in headless Chromium where one is
installed) and the CSV, from ProfileReports built directly from the dataclasses."""

import builtins
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from moetool.errors import UnsupportedError
from moetool.ops import profile_files
from moetool.ops.profile import LayerProfile, ProfileReport

pytest.importorskip("matplotlib")


def _layer(layer: int, experts: int, top_k: int, tokens: int, rng: np.random.Generator, dead: int) -> LayerProfile:
    """Tokens routed to top_k distinct experts of log-normal popularity, two of them hot; `dead` experts never."""
    popularity = rng.lognormal(0.0, 0.4, experts)
    popularity[rng.choice(experts, 2, replace=False)] *= 3.0
    popularity[rng.choice(experts, dead, replace=False)] = 0.0
    with np.errstate(divide="ignore"):
        keys = np.log(popularity) + rng.gumbel(size=(tokens, experts))
    index = np.argsort(keys, axis=1)[:, -top_k:]                     # weighted sampling without replacement
    onehot = np.zeros((tokens, experts), dtype=np.int64)
    np.put_along_axis(onehot, index, 1, axis=1)
    counts = onehot.sum(axis=0)
    total = int(counts.sum())
    values = np.sort(counts.astype(float))
    mean = values.mean()
    gini = float(((2 * np.arange(1, experts + 1) - experts - 1) * values).sum() / (experts * values.sum()))
    return LayerProfile(
        layer=layer, experts=experts, top_k=top_k, tokens=tokens, counts=counts.tolist(),
        share=[round(c / total, 6) for c in counts.tolist()],
        weight_mass=[round(float(c) / tokens, 6) for c in counts], saliency=None, activation_norm=None,
        dead_experts=[e for e in range(experts) if counts[e] == 0],
        entropy_mean=0.0, entropy_normalized=float(rng.uniform(0.6, 0.95)), top1_prob_mean=float(rng.uniform(0.2, 0.6)),
        margin_mean=float(rng.uniform(0.05, 0.3)),
        imbalance={"max_over_mean": float(values.max() / mean), "cv": float(values.std() / mean), "gini": gini},
        capacity_drop={"1.0": 0.12, "1.25": 0.06, "1.5": 0.03, "2.0": 0.01},
        coactivation=(onehot.T.astype(float) @ onehot).astype(int).tolist(),
        distinct_experts_per_sequence=float(min(experts, 5 * top_k)),
        consecutive_reuse=0.3, lru_hit_rate={str(top_k): 0.4})


def make_report(layers: int = 4, experts: int | list[int] = 8, top_k: int = 2, tokens: int = 2000,
                first_layer: int = 0, dead: int = 1, seed: int = 0, source: str = "tiny-moe") -> ProfileReport:
    rng = np.random.default_rng(seed)
    sizes = experts if isinstance(experts, list) else [experts] * layers
    return ProfileReport(
        source=source, family="deepseek_v3", mode="full", device="cpu", dtype="float32", tokens=tokens,
        sequences=tokens // 500, seq_len=500, timing={"seconds": 1.0, "tokens_per_second": float(tokens)},
        memory={}, layers=[_layer(first_layer + i, e, top_k, tokens, rng, dead) for i, e in enumerate(sizes)],
        notes=["a note with <markup> & ampersands"])


def _without_traces(report: ProfileReport) -> ProfileReport:
    """What a trace without gate weights or probabilities holds."""
    for lp in report.layers:
        lp.weight_mass = lp.saliency = lp.entropy_normalized = lp.top1_prob_mean = lp.margin_mean = None
    return report


def _image(path):
    from matplotlib.image import imread

    return imread(path)                                          # floats in [0, 1], H x W x (3 | 4)


def _not_blank(pixels) -> bool:
    rgb = pixels[..., :3]
    return float(rgb.std()) > 0.05 and len(np.unique(rgb.reshape(-1, 3).round(2), axis=0)) > 20


def _labels(fig):
    return {(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.get_axes()}


def test_png_decodes_is_sized_and_not_blank(tmp_path):
    path = tmp_path / "p.png"
    profile_files.write_png(make_report(), path)
    pixels = _image(path)
    height, width = pixels.shape[:2]
    assert 1200 <= width <= 1800 and 1000 <= height <= 4000
    assert _not_blank(pixels)


def test_figure_has_labels_titles_and_colour_bars():
    report = make_report(source="models/$weird_name$")           # `$` must not start mathtext
    fig = profile_files.build_figure(report)
    fig.canvas.draw()                                               # everything lays out and renders
    axes = fig.get_axes()
    heatmap = next(ax for ax in axes if ax.get_ylabel() == "MoE layer" and ax.get_xlabel() == "expert")
    assert r"models/\$weird_name\$ (deepseek_v3): 2,000 tokens" in heatmap.get_title()   # drawn as typed
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["0", "1", "2", "3"]
    bars = [ax.get_ylabel() for ax in axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2                                           # the heatmap's and the co-activation's
    assert bars[0].startswith("load ÷ uniform") and bars[1].startswith("P(j | i) ÷ uniform")
    labels = {label for pair in _labels(fig) for label in pair}
    assert {"tokens", "expert j", "expert i", "Gini coefficient", "busiest expert ÷ mean",
            "MoE layer"} <= labels
    titles = {ax.get_title() for ax in axes}
    assert "Router entropy (normalized) and confidence per layer" in titles and "Load imbalance per layer" in titles
    assert sum(t.startswith("layer ") for t in titles) == 8      # 4 load charts, 4 co-activation maps
    # dead experts are marked on their layer's load chart
    dead = report.layers[0].dead_experts
    load = next(ax for ax in axes if ax.get_title().startswith("layer 0:"))
    assert dead and f"{len(dead)} dead" in load.get_title()
    assert any(list(line.get_xdata()) == dead for line in load.get_lines())


def test_sections_are_figures_of_their_own():
    figures = profile_files.build_figures(make_report())
    assert list(figures) == list(profile_files.SECTIONS)
    assert len(figures["load"].get_axes()) == 4 and len(figures["coactivation"].get_axes()) == 5


def test_none_fields_uneven_experts_and_top1(tmp_path):
    report = _without_traces(make_report(experts=[8, 16, 4], top_k=1, first_layer=3))
    profile_files.write_png(report, tmp_path / "p.png")
    profile_files.write_html(report, tmp_path / "p.html")
    profile_files.write_csv(report, tmp_path / "p.csv")
    assert _not_blank(_image(tmp_path / "p.png"))
    assert "–" in (tmp_path / "p.html").read_text()                 # None shown as a dash in the table
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "layer,expert,tokens,share,weight_mass,saliency,dead" and len(rows) == 1 + 8 + 16 + 4
    assert rows[1].split(",")[4:6] == ["", ""]


def test_large_model_stays_legible(tmp_path):
    report = make_report(layers=61, experts=256, top_k=8, tokens=1024, first_layer=3, dead=3)
    fig = profile_files.build_figure(report)
    fig.savefig(tmp_path / "big.png", dpi=100)                    # what write_png does; draws once
    heatmap = next(ax for ax in fig.get_axes() if ax.get_ylabel() == "MoE layer" and ax.get_xlabel() == "expert")
    assert [t.get_text() for t in heatmap.get_yticklabels()][:3] == ["3", "5", "7"]    # every other layer
    assert [t.get_text() for t in heatmap.get_xticklabels()][:3] == ["0", "8", "16"]   # every 8th expert
    small = [ax for ax in fig.get_axes() if ax.get_title() == "layer 3"]               # a co-activation map
    assert [t.get_text() for t in small[0].get_xticklabels()] == ["0", "64", "128", "192"]
    pixels = _image(tmp_path / "big.png")
    assert 1500 <= pixels.shape[1] <= 1700 and pixels.shape[0] <= 6000 and _not_blank(pixels)


@pytest.mark.parametrize("writer", [profile_files.write_png, profile_files.write_html])
def test_missing_matplotlib_gives_the_hint(tmp_path, monkeypatch, writer):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UnsupportedError) as err:
        writer(make_report(), tmp_path / "out")
    assert err.value.exit_code == 7 and err.value.hint == "pip install 'moetool[plot]'"
    assert "matplotlib" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_html_is_self_contained_and_escaped(tmp_path):
    report = make_report(source="<script>alert(1)</script>")
    profile_files.write_html(report, tmp_path / "p.html")
    page = (tmp_path / "p.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;markup&gt; &amp; ampersands" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert page.count("<svg ") == len(profile_files.SECTIONS) and "<?xml" not in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))                                # the inline SVGs' ids do not collide
    assert page.count("<tr>") == 1 + len(report.layers)


def _browser() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "google-chrome-stable", "chrome"))), None)


_CHECK = """<script>
window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img, svg").forEach(function (el) {
    var box = el.getBoundingClientRect();
    out.push({tag: el.tagName, width: box.width, height: box.height,
              complete: el.complete !== false});
  });
  var pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_html_renders_in_a_headless_browser(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chrome binary on PATH (apt-get install chromium)")
    profile_files.write_html(make_report(layers=6, experts=16), tmp_path / "p.html")
    page = (tmp_path / "p.html").read_text()
    checked = tmp_path / "checked.html"                               # a test-only copy that reports its images
    checked.write_text(page.replace("</body>", _CHECK + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800", "--virtual-time-budget=10000"]

    def run(*args):
        try:
            return subprocess.run(flags + list(args), capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{browser} did not finish within 90 s")

    proc = run("--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no render check in the DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    elements = json.loads(html.unescape(found.group(1)))
    assert len(elements) == len(profile_files.SECTIONS)
    assert [e["tag"].lower() for e in elements] == ["svg"] * len(profile_files.SECTIONS)
    assert all(e["width"] > 500 and e["height"] > 100 and e["complete"] for e in elements)

    shot = tmp_path / "shot.png"
    run(f"--screenshot={shot}", (tmp_path / "p.html").as_uri())
    assert shot.exists(), "the browser wrote no screenshot"
    assert _not_blank(_image(shot))
