"""Pictures of a Step-Saliency result: per-layer step maps, per-layer metric curves, band scores.

matplotlib is imported inside the functions so that ``import stepscope`` stays light. Figures are built as
``matplotlib.figure.Figure`` objects on an Agg canvas, never through ``pyplot`` (see :mod:`stepscope.figures`): no
global figure registry to leak into, and no interactive backend is touched, so the functions are safe in scripts,
servers and notebooks alike. ``path=`` writes PNG, PDF or SVG by its extension; no text is smaller than 8 pt at
a figure's natural size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..bands import Bands
from ..extras import require
from ..figures import PNG_DPI, figure_bytes, new_figure
from ..figures import save_figure as _save_by_extension
from .describe import band_text
from .result import StepSaliency

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

Results = StepSaliency | Mapping[str, StepSaliency]

# One colour per segment kind, shared with the HTML report so that step labels read the same everywhere.
KIND_COLORS = {"question": "#1f5fa8", "thinking": "#b35c00", "summary": "#237a3b"}
MAP_CMAP = "viridis"
INVALID_COLOR = "#d9d9d9"  # the upper triangle (key after query): no causal pair, so no value
BOUNDARY_COLOR = "#ff4f9a"  # question|thinking and thinking|summary lines: visible on both ends of viridis
MAX_PANELS = 36
DPI = PNG_DPI  # PNG files; PDF and SVG are vector

# The share metrics drawn as curves, with a plain-language label each; the block means are not shares.
CURVE_METRICS: dict[str, tuple[str, str]] = {
    "question_reach": ("question reach: thinking step ← question", "#1f77b4"),
    "local_share": ("local share: thinking step ← itself + previous", "#d62728"),
    "summary_thinking_share": ("summary ← thinking segment", "#2ca02c"),
    "summary_recency_share": ("summary recency: summary ← itself + last 2 steps", "#9467bd"),
    "sink_share": ("sink share: all saliency → first token (sink)", "#7f7f7f"),
}
LINESTYLES = ("-", "--", ":", "-.")


# -- small shared helpers ------------------------------------------------------------------------------------
def _new_figure(**kwargs) -> Figure:
    return new_figure(**kwargs)


def _as_dict(results: Results) -> dict[str, StepSaliency]:
    if isinstance(results, StepSaliency):
        return {"": results}
    out = dict(results)
    if not out:
        raise ValueError("no results to plot")
    return out


def save_figure(fig: Figure, path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG, PDF or SVG by ``path``'s extension (parent folders created); nothing is cut off
    thanks to the constrained layout."""
    return _save_by_extension(fig, path, dpi)


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The PNG bytes of ``fig`` (for embedding)."""
    return figure_bytes(fig, "png", dpi)


def layer_band(bands: Bands, layer: int) -> str | None:
    """``"shallow"``, ``"deep"`` or None (a layer can be both when there are very few layers)."""
    tags = [name for name, band in (("shallow", bands.shallow), ("deep", bands.deep)) if layer in band]
    return "+".join(tags) or None


# -- layer selection and the shared colour scale -------------------------------------------------------------
def select_layers(num_layers: int, bands: Bands | None = None, max_panels: int = MAX_PANELS) -> list[int]:
    """All layers when they fit in ``max_panels``; else evenly spaced ones, always with the first and last layer
    and the inner edges of the shallow and deep bands (where the two failure patterns are read)."""
    if num_layers <= max_panels:
        return list(range(num_layers))
    bands = bands or Bands(num_layers)
    required = {0, num_layers - 1, bands.shallow.stop - 1, bands.deep.start}
    chosen = set(required) | {round(float(x)) for x in np.linspace(0, num_layers - 1, max_panels)}
    # Drop the spaced layers that crowd a required one until the budget holds.
    while len(chosen) > max_panels:
        spare = sorted(chosen - required)
        crowding = min(spare, key=lambda x: min(abs(x - r) for r in required))
        chosen.discard(crowding)
    return sorted(chosen)


def step_map(result: StepSaliency, layer: int, kind: str = "mean") -> np.ndarray:
    """S x S map of one layer: ``"mean"`` (per causally valid token pair) or ``"sum"``; NaN above the diagonal."""
    if kind == "mean":
        return result.means[layer]
    if kind == "sum":
        return np.where(result.counts > 0, result.sums[layer], np.nan)
    raise ValueError(f"kind must be 'mean' or 'sum', not {kind!r}")


def map_norm(results: Results, layers: Sequence[int] | None = None, kind: str = "mean",
             percentiles: tuple[float, float] = (1.0, 99.5)) -> LogNorm:
    """One log colour scale for the maps of all ``layers`` of all ``results``.

    Robust percentiles of the positive values, so that a handful of extreme cells (the sink-like question block,
    a zero) do not squeeze every other cell into one colour.
    """
    LogNorm = require("matplotlib.colors", "drawing figures").LogNorm  # the first matplotlib use of a plot

    values = []
    for r in _as_dict(results).values():
        for layer in range(r.num_layers) if layers is None else layers:
            m = step_map(r, layer, kind)
            values.append(m[np.isfinite(m) & (m > 0)])
    pos = np.concatenate(values) if values else np.empty(0)
    if pos.size == 0:
        return LogNorm(vmin=1e-12, vmax=1.0)
    lo, hi = np.percentile(pos, percentiles)
    if not hi > lo:  # constant maps: open the range a little so the scale is valid
        lo, hi = lo / 2, hi * 2
    return LogNorm(vmin=float(lo), vmax=float(hi))


# -- the step maps -------------------------------------------------------------------------------------------
def _tick_positions(steps, max_ticks: int) -> list[int]:
    """Every step when few; else about ``max_ticks`` of them, placed so labels never touch.

    Segment starts (Q, T1, S1) and the last step come first, then every k-th step; a candidate too close to one
    already kept is skipped, so e.g. T1 gives way to Q and S2 to S1 rather than printing on top of them.
    """
    n = len(steps)
    if n <= max_ticks:
        return list(range(n))
    stride = math.ceil(n / max_ticks)
    gap = max(2, math.ceil(0.7 * stride))
    starts = [i for i, s in enumerate(steps) if i == 0 or steps[i - 1].kind != s.kind]
    summary_starts = [i for i in starts if steps[i].kind == "summary"]
    candidates = [0, *summary_starts, *starts, n - 1, *range(stride, n, stride)]
    kept: list[int] = []
    for c in candidates:
        if all(abs(c - k) >= gap for k in kept):
            kept.append(c)
    return sorted(kept)


def _boundaries(steps) -> list[float]:
    """Positions (between cells) where the segment kind changes."""
    return [i - 0.5 for i in range(1, len(steps)) if steps[i].kind != steps[i - 1].kind]


def _cmap():
    import matplotlib

    return matplotlib.colormaps[MAP_CMAP].with_extremes(bad=INVALID_COLOR)


def _draw_map(ax: Axes, result: StepSaliency, layer: int, norm: LogNorm, kind: str, *,
              max_ticks: int, fontsize: float, xlabels: bool, ylabels: bool, title_size: float) -> AxesImage:
    im = ax.imshow(_shown(step_map(result, layer, kind), norm), cmap=_cmap(), norm=norm, interpolation="nearest",
                   aspect="equal")
    for b in _boundaries(result.steps):
        ax.axhline(b, color=BOUNDARY_COLOR, lw=0.9)
        ax.axvline(b, color=BOUNDARY_COLOR, lw=0.9)
    ticks = _tick_positions(result.steps, max_ticks)
    labels = [result.steps[i].label for i in ticks]
    colors = [KIND_COLORS.get(result.steps[i].kind, "black") for i in ticks]
    ax.set_xticks(ticks, labels if xlabels else [], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels if ylabels else [], fontsize=fontsize)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for lab, c in zip(tick_labels, colors):
            lab.set_color(c)
    ax.tick_params(length=2, pad=1)
    _set_layer_title(ax, result.bands, layer, title_size)
    return im


def _shown(data: np.ndarray, norm: LogNorm) -> np.ndarray:
    """Valid cells that are zero (or below the scale) take the lowest colour, not the grey of invalid cells."""
    return np.where(np.isfinite(data), np.maximum(data, _limits(norm)[0]), np.nan)


def _limits(norm: LogNorm) -> tuple[float, float]:
    """The scale's ``(vmin, vmax)``, which every norm these plots draw with has (see ``map_norm``)."""
    if norm.vmin is None or norm.vmax is None:
        raise ValueError("the colour scale has no limits; make it with map_norm")
    return float(norm.vmin), float(norm.vmax)


def _set_layer_title(ax: Axes, bands: Bands, layer: int, size: float) -> None:
    band = layer_band(bands, layer)  # band layers in bold: that is where the two scores are read
    ax.set_title(f"layer {layer}" + (f" · {band}" if band else ""), fontsize=size, pad=3,
                 fontweight="bold" if band else "normal")


def _colorbar_label(kind: str) -> str:
    return ("mean saliency per token pair (log scale)" if kind == "mean"
            else "summed saliency over token pairs (log scale)")


def _log_ticks(norm: LogNorm) -> list[float]:
    """Two to seven round values within the scale: 1-2-5 steps, else 1-3, else powers of ten.

    Saliency spans one to three decades, where matplotlib's default would label only one or two powers of ten.
    """
    lo, hi = _limits(norm)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mults in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in decades for m in mults if lo <= m * 10.0**e <= hi]
        if len(ticks) <= 7:
            break
    if len(ticks) > 7:
        ticks = ticks[:: math.ceil(len(ticks) / 7)]
    if len(ticks) < 2:  # a narrow scale: evenly spaced values with two significant digits
        rounded = {float(f"{v:.1e}") for v in np.geomspace(lo, hi, 4)}
        ticks = sorted(v for v in rounded if lo <= v <= hi)
    return ticks


def _label_colorbar(cbar, norm: LogNorm, label: str, fontsize: float) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = _log_ticks(norm)
    cbar.ax.yaxis.set_minor_locator(NullLocator())
    cbar.ax.yaxis.set_minor_formatter(NullFormatter())
    cbar.set_ticks(ticks, labels=[f"{t:.2g}".replace("e-0", "e-") for t in ticks])
    cbar.ax.tick_params(labelsize=fontsize)
    cbar.set_label(label, fontsize=fontsize + 1)


def plot_layer_maps(result: StepSaliency, layers: Sequence[int] | None = None, path=None, *, kind: str = "mean",
                    norm: LogNorm | None = None, max_panels: int = MAX_PANELS, ncols: int | None = None,
                    title: str | None = None, dpi: int = DPI) -> Figure:
    """A grid of per-layer step maps (query step = row, key step = column) on one shared log colour scale.

    ``layers``: which layers (default: all up to ``max_panels``, else evenly spaced ones with the first, last and
    band-edge layers). ``kind``: ``"mean"`` (per causally valid token pair, the default) or ``"sum"``. ``norm``: a
    colour scale to share with other figures (see ``map_norm``). Grey cells above the diagonal have no causal pair.
    """
    layers = list(select_layers(result.num_layers, result.bands, max_panels) if layers is None else layers)
    if not layers:
        raise ValueError("no layers to plot")
    norm = norm or map_norm(result, layers, kind)
    n = len(layers)
    ncols = ncols or min(n, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    panel = 2.3 if n > 16 else 3.0  # inches; smaller panels keep a 6x6 grid on one screen
    fig = _new_figure(figsize=(panel * ncols + 1.0, panel * nrows + 0.7))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fontsize = 8.0  # the smallest text at the figure's natural size: readable in a paper
    max_ticks = max(4, int(panel * 72 / (fontsize * 1.7)))
    im: AxesImage | None = None
    for k, (ax, layer) in enumerate(zip(axes, layers)):
        row, col = divmod(k, ncols)
        last_in_col = k + ncols >= n  # the bottom-most panel of its column carries the x labels
        im = _draw_map(ax, result, layer, norm, kind, max_ticks=max_ticks, fontsize=fontsize,
                       xlabels=last_in_col, ylabels=col == 0, title_size=fontsize + 1.5)
        if col == 0 and row == nrows // 2:
            ax.set_ylabel("query step (receives)", fontsize=fontsize + 1)
        if last_in_col and col == ncols // 2:
            ax.set_xlabel("key step (is looked at)", fontsize=fontsize + 1)
    for ax in axes[n:]:
        ax.set_axis_off()
    assert im is not None  # layers is not empty
    cbar = fig.colorbar(im, ax=axes[:n].tolist(), shrink=0.6, extend="both", pad=0.01, aspect=40)
    _label_colorbar(cbar, norm, _colorbar_label(kind), fontsize)
    shown = "all layers" if len(layers) == result.num_layers else f"{len(layers)} of {result.num_layers} layers"
    fig.suptitle(title or f"Step-Saliency maps ({kind}), {shown}; pink lines: question | thinking | summary",
                 fontsize=fontsize + 3)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def default_layer(result: StepSaliency) -> int:
    """The layer a single map shows unless told: the first layer of the deep band (where Deep Decay is read)."""
    return result.bands.deep.start


def _single_map(result: StepSaliency, layer: int, norm: LogNorm, kind: str):
    """A figure with one layer's map and its colour bar; returns the figure, axes and image."""
    S = len(result.steps)
    side = min(7.0, max(3.6, 0.16 * S + 2.0))  # grow with the step count so labels keep their room
    fig = _new_figure(figsize=(side + 1.1, side + 0.3))
    ax = fig.add_subplot()
    fontsize = 8.0
    max_ticks = max(6, int(side * 72 / (fontsize * 1.7)))
    im = _draw_map(ax, result, layer, norm, kind, max_ticks=max_ticks, fontsize=fontsize, xlabels=True,
                   ylabels=True, title_size=fontsize + 3)
    ax.set_xlabel("key step (is looked at)", fontsize=fontsize + 1)
    ax.set_ylabel("query step (receives)", fontsize=fontsize + 1)
    cbar = fig.colorbar(im, ax=ax, shrink=0.8, extend="both", pad=0.02, aspect=30)  # shared scale: one bar
    _label_colorbar(cbar, norm, _colorbar_label(kind), fontsize)
    return fig, ax, im


def plot_step_map(result: StepSaliency, layer: int | None = None, path=None, *, kind: str = "mean",
                  norm: LogNorm | None = None, dpi: int = DPI) -> Figure:
    """One layer's step map (query step = row, key step = column) with its colour bar.

    ``layer``: default the first deep-band layer. ``norm``: a colour scale shared with other figures (default:
    one over all of this result's layers, so maps of different layers compare). ``path``: also write the figure
    (PNG, PDF or SVG by the extension).
    """
    layer = default_layer(result) if layer is None else int(layer)
    if not 0 <= layer < result.num_layers:
        raise ValueError(f"layer {layer} is out of range: the result has layers 0-{result.num_layers - 1}")
    fig, _, _ = _single_map(result, layer, norm or map_norm(result, None, kind), kind)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def layer_map_pngs(result: StepSaliency, norm: LogNorm, *, kind: str = "mean", dpi: int = 100,
                   layers: Sequence[int] | None = None, on_png: Callable[[int], None] | None = None) -> list[bytes]:
    """One small PNG per layer (for the report's slider), all on ``norm``; ``on_png(layer)`` after each (progress).

    One figure is drawn once and only its cells and title change per layer: several times faster than a figure
    per layer, which matters for 64-layer models with several conditions.
    """
    layers = list(range(result.num_layers) if layers is None else layers)
    if not layers:
        return []
    fig, ax, im = _single_map(result, layers[0], norm, kind)
    fontsize = 8.0
    out = []
    for layer in layers:
        # Same steps, ticks and scale for every layer: only the cells and the title change.
        im.set_data(_shown(step_map(result, layer, kind), norm))
        _set_layer_title(ax, result.bands, layer, fontsize + 3)
        out.append(figure_png(fig, dpi))
        if on_png is not None:
            on_png(layer)
    return out


# -- metric curves -------------------------------------------------------------------------------------------
def _shade_bands(ax: Axes, bands: Bands) -> None:
    for name, band, fill, ink in (("shallow", bands.shallow, "#4c9be8", "#1d5a99"),
                                  ("deep", bands.deep, "#e8a04c", "#995a10")):
        ax.axvspan(band.start - 0.5, band.stop - 0.5, color=fill, alpha=0.13, lw=0)
        ax.text((band.start + band.stop - 1) / 2, 1.005, f"{name} band (layers {band_text(band)})",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8.5, color=ink)


def _missing_note(results: dict[str, StepSaliency]) -> str:
    lines = []
    for name, r in results.items():
        for metric in CURVE_METRICS:
            if r.metrics.get(metric) is None:
                why = r.metric_reasons.get(metric, "not computed")
                label = CURVE_METRICS[metric][0].split(":")[0]
                lines.append(f"{name + ': ' if name else ''}{label} n/a ({why})")
    return "Not plotted: " + "; ".join(lines) if lines else ""


def plot_metric_curves(results: Results, path=None, *, dpi: int = DPI, title: str | None = None) -> Figure:
    """Per-layer share metrics with the shallow and deep bands shaded; y in [0, 1].

    Give a dict ``{"baseline": r0, "StepFlow": r1}`` to overlay conditions (solid, dashed, ...). The band scores
    are drawn as short thick segments over their bands: Shallow Lock-in on local share, Deep Decay on summary
    recency. Metrics a trace cannot have (no summary, one thinking step) are listed in a note, not drawn as 0.
    """
    import textwrap

    rs = _as_dict(results)
    fig = _new_figure(figsize=(10.0, 5.6))
    ax = fig.add_subplot()
    _shade_bands(ax, next(iter(rs.values())).bands)
    for r, ls in zip(rs.values(), itertools.cycle(LINESTYLES)):
        _draw_curves(ax, r, ls, annotate=len(rs) == 1)
    ax.set_xlim(-0.6, max(r.num_layers for r in rs.values()) - 0.4)
    ax.set_ylim(0, 1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.set_ylabel("share of incoming saliency")
    ax.grid(alpha=0.25)
    _curve_legends(ax, rs)
    note = _missing_note(rs)
    if note:
        text = textwrap.fill(note, 150)
        fig.text(0.01, 0.005, text, fontsize=8, color="#a33", va="bottom")
        bottom = 0.02 + 0.03 * (text.count("\n") + 1)
        from matplotlib.layout_engine import ConstrainedLayoutEngine

        engine = fig.get_layout_engine()
        if isinstance(engine, ConstrainedLayoutEngine):  # always: new_figure's constrained layout
            engine.set(rect=(0, bottom, 1, 1 - bottom))  # room for the note below the axes
    fig.suptitle(title or "Step-Saliency shares per layer", fontsize=11)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def _draw_curves(ax: Axes, r: StepSaliency, ls: str, annotate: bool) -> None:
    x = np.arange(r.num_layers)
    for metric, (_, color) in CURVE_METRICS.items():
        y = r.metrics.get(metric)
        if y is not None:
            ax.plot(x, y, color=color, ls=ls, lw=1.6, marker="o", ms=2.5)
    for score, label, metric, band in ((r.shallow_lock_in, "Lock-in", "local_share", r.bands.shallow),
                                       (r.deep_decay, "Decay", "summary_recency_share", r.bands.deep)):
        if score is None:
            continue
        color = CURVE_METRICS[metric][1]
        ax.hlines(score, band.start - 0.4, band.stop - 0.6, color=color, lw=4, alpha=0.45, ls=ls)
        if annotate:  # with several conditions the labels would pile up; the band-score chart has them
            ax.annotate(f"{label} {score:.2f}", (band.start - 0.4, score), xytext=(1, 4),
                        textcoords="offset points", fontsize=8, color=color, va="bottom",
                        fontweight="bold", bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5})


def _curve_legends(ax: Axes, rs: dict[str, StepSaliency]) -> None:
    from matplotlib.lines import Line2D

    drawn = [m for m in CURVE_METRICS if any(r.metrics.get(m) is not None for r in rs.values())]
    handles = [Line2D([], [], color=CURVE_METRICS[m][1], lw=2, label=CURVE_METRICS[m][0]) for m in drawn]
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                       title="metric (thick bars: band scores)", title_fontsize=8)
    if len(rs) > 1:
        ax.add_artist(legend)  # keep the first legend when adding the second
        cond = [Line2D([], [], color="black", ls=ls, lw=1.6, label=name)
                for name, ls in zip(rs, itertools.cycle(LINESTYLES))]
        ax.legend(handles=cond, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8, frameon=False,
                  title="condition", title_fontsize=8)


# -- band scores ---------------------------------------------------------------------------------------------
def plot_band_scores(results: Results, path=None, *, dpi: int = DPI) -> Figure:
    """Bars of Shallow Lock-in and Deep Decay per condition (higher is worse); n/a where a score cannot exist."""
    rs = _as_dict(results)
    names = list(rs)
    scores = [("Shallow Lock-in", [r.shallow_lock_in for r in rs.values()]),
              ("Deep Decay", [r.deep_decay for r in rs.values()])]
    width = min(0.35, 0.8 / len(names))  # one condition: slim bars rather than two slabs
    fig = _new_figure(figsize=(max(4.2, 2.2 + 1.1 * len(names)), 3.4))
    ax = fig.add_subplot()
    palette = ["#4d4d4d", "#2b8cbe", "#e6550d", "#31a354", "#756bb1", "#636363"]
    for k in range(len(names)):
        xs = [g + (k - (len(names) - 1) / 2) * width for g in range(len(scores))]
        for x, (_, vals) in zip(xs, scores):
            v = vals[k]
            if v is None:  # a score the trace cannot have: say so where its bar would be
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#a33")
                continue
            ax.bar(x, v, width * 0.92, color=palette[k % len(palette)])
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(scores)), [f"{label}\n{band}" for (label, _), band in zip(scores, _band_notes(rs))],
                  fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score (higher = worse flow)", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    if len(names) > 1:  # patches, so that a condition whose scores are all n/a is still in the legend
        from matplotlib.patches import Patch

        handles = [Patch(color=palette[k % len(palette)], label=name) for k, name in enumerate(names)]
        ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.25)
    ax.set_title("Band scores", fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def _band_notes(rs: dict[str, StepSaliency]) -> list[str]:
    bands = {r.bands for r in rs.values()}
    if len(bands) != 1:
        return ["(shallow band per result)", "(deep band per result)"]
    b = next(iter(bands))
    return [f"layers {band_text(b.shallow)}", f"layers {band_text(b.deep)}"]
