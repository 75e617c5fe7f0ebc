"""Where two results on the same trace differ: per-layer maps of "with minus without" (e.g. StepFlow - baseline).

The maps of two conditions on one trace often look the same on the shared log scale, because an edit moves a
few percent of a step's saliency while the scale spans decades. So the difference is taken of the *shares*
that the band scores are made of: cell (i, j) of layer l is the share of query step i's incoming saliency that
comes from key step j (row-normalised sum map, keys j <= i), and the map shows ``after - before`` in percentage
points on a diverging scale centred on zero. Red: the second condition sends more of step i's saliency to step
j; blue: less. Each row of a map sums to zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .result import StepSaliency

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

DIFF_CMAP = "RdBu_r"  # red = more saliency with the second condition, blue = less
INVALID_COLOR = "#d9d9d9"
BOUNDARY_COLOR = "#555555"  # the pink of the step maps would read as part of the red half of the scale


def share_maps(result: StepSaliency) -> np.ndarray:
    """(layers, S, S): share of query step i's incoming saliency from key step j (NaN above the diagonal and
    for rows that receive nothing)."""
    sums = np.tril(np.asarray(result.sums, dtype=np.float64))
    total = sums.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total > 0, sums / total, np.nan)
    S = sums.shape[-1]
    shares[:, ~np.tril(np.ones((S, S), dtype=bool))] = np.nan
    return shares


def _same_trace(before: StepSaliency, after: StepSaliency) -> None:
    spans = [(s.kind, s.start, s.end) for s in before.steps]
    if spans != [(s.kind, s.start, s.end) for s in after.steps]:
        raise ValueError("a difference map needs two results on the same steps of the same trace "
                         f"({len(before.steps)} vs {len(after.steps)} steps, or other token spans)")
    if before.num_layers != after.num_layers:
        raise ValueError(f"a difference map needs the same layers ({before.num_layers} vs {after.num_layers})")


def share_difference(before: StepSaliency, after: StepSaliency) -> np.ndarray:
    """(layers, S, S): ``share_maps(after) - share_maps(before)`` as fractions (0.05 = 5 points)."""
    _same_trace(before, after)
    return share_maps(after) - share_maps(before)


def largest_shifts(before: StepSaliency, after: StepSaliency, n: int = 3,
                   layers: Sequence[int] | None = None) -> list[tuple[int, str, str, float]]:
    """The ``n`` cells that moved most, as ``(layer, query label, key label, change)`` (change as a fraction),
    over ``layers`` (default all); cells of a step with itself count too."""
    diff = share_difference(before, after)
    layers = list(range(diff.shape[0]) if layers is None else layers)
    cells = []
    labels = before.labels
    for layer in layers:
        d = diff[layer]
        for i, j in zip(*np.nonzero(np.isfinite(d))):
            cells.append((abs(float(d[i, j])), layer, labels[i], labels[j], float(d[i, j])))
    cells.sort(key=lambda c: -c[0])
    return [(layer, qi, kj, v) for _, layer, qi, kj, v in cells[:n]]


def diff_scale(diff: np.ndarray, percentile: float = 99.0) -> float:
    """Half-width of the symmetric colour scale, in points: a high percentile of the changes, so that one
    extreme cell does not wash out the rest (values beyond it saturate)."""
    vals = np.abs(diff[np.isfinite(diff)]) * 100.0
    if vals.size == 0 or not vals.max() > 0:
        return 1.0
    return float(max(np.percentile(vals, percentile), 1e-6))


def plot_difference_maps(before: StepSaliency, after: StepSaliency, layers: Sequence[int] | None = None,
                         path=None, *, names: tuple[str, str] = ("baseline", "StepFlow"),
                         max_panels: int = 36) -> Figure:
    """A grid of per-layer difference maps (``names[1]`` minus ``names[0]``, share points) on one diverging scale.

    ``layers``: default all layers up to ``max_panels``, else evenly spaced ones with the band edges.
    ``path``: also write the figure (PNG, PDF or SVG by the extension).
    """
    import matplotlib
    from matplotlib.colors import Normalize

    from ..figures import new_figure, save_figure
    from .plots import _boundaries, _tick_positions, layer_band, select_layers

    diff = share_difference(before, after)
    layers = list(select_layers(before.num_layers, before.bands, max_panels) if layers is None else layers)
    if not layers:
        raise ValueError("no layers to plot")
    half = diff_scale(diff[layers])
    norm = Normalize(vmin=-half, vmax=half)
    cmap = matplotlib.colormaps[DIFF_CMAP].with_extremes(bad=INVALID_COLOR)
    n = len(layers)
    ncols = min(n, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    panel = 2.3 if n > 16 else 3.0
    fig = new_figure(figsize=(panel * ncols + 1.0, panel * nrows + 0.7))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fontsize = 8.0
    ticks = _tick_positions(before.steps, max(4, int(panel * 72 / (fontsize * 1.7))))
    tick_labels = [before.steps[i].label for i in ticks]
    im: AxesImage | None = None
    for k, (ax, layer) in enumerate(zip(axes, layers)):
        col = k % ncols
        last_in_col = k + ncols >= n
        im = ax.imshow(diff[layer] * 100.0, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
        for b in _boundaries(before.steps):
            ax.axhline(b, color=BOUNDARY_COLOR, lw=0.7)
            ax.axvline(b, color=BOUNDARY_COLOR, lw=0.7)
        ax.set_xticks(ticks, tick_labels if last_in_col else [], rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, tick_labels if col == 0 else [], fontsize=fontsize)
        ax.tick_params(length=2, pad=1)
        band = layer_band(before.bands, layer)
        ax.set_title(f"layer {layer}" + (f" · {band}" if band else ""), fontsize=fontsize + 1.5, pad=3,
                     fontweight="bold" if band else "normal")
    for ax in axes[n:]:
        ax.set_axis_off()
    assert im is not None  # layers is not empty
    cbar = fig.colorbar(im, ax=axes[:n].tolist(), shrink=0.6, extend="both", pad=0.01, aspect=40)
    cbar.ax.tick_params(labelsize=fontsize)
    cbar.set_label("change in the share of the row's incoming saliency (points)", fontsize=fontsize + 1)
    shown = "all layers" if n == before.num_layers else f"{n} of {before.num_layers} layers"
    fig.suptitle(f"{names[1]} − {names[0]}, {shown}\nred: a query step (row) draws more on a key step (column); "
                 "blue: less", fontsize=fontsize + 3)
    if path is not None:
        save_figure(fig, path)
    return fig
