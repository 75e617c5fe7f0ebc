"""Pictures of a Step-Saliency result: panels, the shared log colour scale, blank invalid cells, notes, PNGs."""

import warnings

import numpy as np
import pytest

import stepscope
from stepscope.saliency import plots
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.testing import tiny_model
from stepscope.trace import Step

RESPONSE = ("First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
            "Final answer: 10<|im_end|>")


@pytest.fixture(scope="module")
def tiny_result(tokenizers):
    tok = tokenizers["think"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = stepscope.Trace.from_text(tok, "What is (2+3)*2?", RESPONSE)
        return stepscope.step_saliency(tiny_model("llama", tok, layers=4), tok, trace, progress=False)


def synthetic(layers: int, thinking: int, summary: int, seed: int = 0) -> StepSaliency:
    """A hand-made result: saliency decaying with step distance, plus a question column."""
    steps, pos = [Step("question", 1, 21, "the question", 0)], 21
    for kind, n in (("thinking", thinking), ("summary", summary)):
        for k in range(n):
            steps.append(Step(kind, pos, pos + 6, f"{kind} {k + 1}.", k + 1))
            pos += 6
    counts = causal_counts(steps)
    S = len(steps)
    i, j = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    rng = np.random.default_rng(seed)
    per_pair = np.exp(-0.3 * (i - j)) + 0.2 * (j == 0)
    sums = np.stack([per_pair * (1 + rng.random((S, S))) for _ in range(layers)]) * counts * 1e-6
    other = rng.random((layers, S)) * 1e-5
    return StepSaliency(np.where(counts > 0, sums, 0.0), counts, other, steps, {"model": "synthetic"})


def map_images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def test_layer_maps_one_panel_per_layer_on_one_norm(tiny_result):
    fig = plots.plot_layer_maps(tiny_result)
    images = map_images(fig)
    assert len(images) == tiny_result.num_layers == 4
    assert all(im.norm is images[0].norm for im in images)
    assert len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1
    assert type(images[0].norm).__name__ == "LogNorm"
    assert len(fig.axes) == 4 + 1  # four panels and one colourbar
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles[0] == "layer 0 · shallow" and titles[-1] == "layer 3 · deep"


def test_upper_triangle_is_blank_and_lower_is_coloured(tiny_result):
    im = map_images(plots.plot_layer_maps(tiny_result, layers=[2]))[0]
    data = np.ma.masked_invalid(im.get_array())
    S = len(tiny_result.steps)
    above = np.triu(np.ones((S, S), bool), k=1)
    assert data.mask[above].all()
    assert not data.mask[~above].any()  # every causal pair has a colour, zeros included


def test_sum_kind_shows_the_sum_map(tiny_result):
    im = map_images(plots.plot_layer_maps(tiny_result, layers=[1], kind="sum"))[0]
    shown = np.asarray(im.get_array().filled(np.nan))
    valid = tiny_result.counts > 0
    expected = np.maximum(tiny_result.sums[1], im.norm.vmin)
    np.testing.assert_allclose(shown[valid], expected[valid])
    with pytest.raises(ValueError):
        plots.plot_layer_maps(tiny_result, kind="median")


def test_thirty_layers_make_a_six_by_five_grid():
    r = synthetic(30, 8, 1)
    fig = plots.plot_layer_maps(r)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 30
    columns = {round(ax.get_position().x0, 3) for ax in panels}
    rows = {round(ax.get_position().y0, 3) for ax in panels}
    assert (len(columns), len(rows)) == (6, 5)


def test_sixty_four_layers_show_an_even_subset_with_the_band_edges():
    r = synthetic(64, 37, 2)  # 40 steps
    chosen = plots.select_layers(64, r.bands)
    assert len(chosen) <= plots.MAX_PANELS
    assert {0, 63, r.bands.shallow.stop - 1, r.bands.deep.start} <= set(chosen)
    assert max(np.diff(chosen)) <= 3  # evenly spread, no big hole
    fig = plots.plot_layer_maps(r)
    assert len(map_images(fig)) == len(chosen)
    assert "36 of 64 layers" in fig.get_suptitle()
    assert plots.select_layers(30) == list(range(30))


def test_many_steps_thin_the_tick_labels_without_collisions():
    r = synthetic(4, 37, 2)
    fig = plots.plot_layer_maps(r, layers=[0])
    ax = next(ax for ax in fig.axes if ax.get_images())
    ticks = list(ax.get_yticks())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(ticks) < len(r.steps) and len(ticks) <= 24
    assert "Q" in labels and "S1" in labels  # segment starts are always labelled
    assert min(np.diff(ticks)) >= 2


def test_map_norm_ignores_outliers_and_spans_all_conditions(tiny_result):
    plain = synthetic(30, 8, 1)
    spiked = synthetic(30, 8, 1)
    spiked.sums[0, 5, 5] *= 1e6
    robust = plots.map_norm(spiked)
    assert robust.vmax < spiked.means[0, 5, 5] / 1e3  # one extreme cell does not set the scale
    assert robust.vmax == pytest.approx(plots.map_norm(plain).vmax, rel=0.2)
    # Pooled over both conditions, each end of the scale lies between the two conditions' own ends.
    both, a, b = plots.map_norm({"a": tiny_result, "b": plain}), plots.map_norm(tiny_result), plots.map_norm(plain)
    assert min(a.vmin, b.vmin) <= both.vmin <= max(a.vmin, b.vmin)
    assert min(a.vmax, b.vmax) <= both.vmax <= max(a.vmax, b.vmax)


def test_metric_curves_plot_available_shares_and_note_the_missing():
    r = synthetic(6, 1, 0)  # one thinking step, no summary
    fig = plots.plot_metric_curves(r)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == 6]
    assert len(curves) == 2  # question reach and sink share; the rest cannot exist for this trace
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "the trace has no summary" in texts and "needs at least two thinking steps" in texts
    assert "shallow band (layers 0-1)" in " ".join(t.get_text() for t in ax.texts)


def test_metric_curves_overlay_conditions(tiny_result):
    fig = plots.plot_metric_curves({"baseline": tiny_result, "StepFlow": synthetic(4, 3, 1)})
    ax = fig.axes[0]
    styles = {line.get_linestyle() for line in ax.get_lines() if len(line.get_xdata()) == 4}
    assert styles == {"-", "--"}
    legend_texts = {t.get_text() for legend in ax.findobj(lambda a: type(a).__name__ == "Legend")
                    for t in legend.get_texts()}
    assert {"baseline", "StepFlow"} <= legend_texts


def test_band_scores_bars_and_na(tiny_result):
    fig = plots.plot_band_scores({"ok": tiny_result, "no summary": synthetic(4, 3, 0)})
    ax = fig.axes[0]
    assert len(ax.patches) == 3  # 2 scores for "ok", Shallow Lock-in only for "no summary"
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == sorted(
        round(v, 6) for v in (tiny_result.shallow_lock_in, tiny_result.deep_decay, synthetic(4, 3, 0).shallow_lock_in))
    assert "n/a" in [t.get_text() for t in ax.texts]


def test_pngs_are_written(tiny_result, tmp_path):
    from matplotlib.image import imread

    paths = [tmp_path / "maps.png", tmp_path / "sub" / "curves.png", tmp_path / "bands.png"]
    plots.plot_layer_maps(tiny_result, path=paths[0])
    plots.plot_metric_curves(tiny_result, path=paths[1])
    plots.plot_band_scores({"a": tiny_result}, path=paths[2])
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w = imread(p).shape[:2]
        assert h >= 300 and w >= 400  # readable sizes at the default dpi
    layer_pngs = plots.layer_map_pngs(tiny_result, plots.map_norm(tiny_result), dpi=60)
    assert len(layer_pngs) == 4 and all(p[:4] == b"\x89PNG" for p in layer_pngs)


def _texts(fig):
    """Every visible, non-empty text of a drawn figure (tick labels exist only after drawing)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("draw", [
    lambda r: plots.plot_layer_maps(r),
    lambda r: plots.plot_step_map(r, 5),
    lambda r: plots.plot_metric_curves(r),
    lambda r: plots.plot_band_scores({"a": r, "b": r}),
])
def test_no_text_is_smaller_than_8_points(draw):
    # paper size: a figure placed at its natural size must stay readable, tick labels included
    fig = draw(synthetic(30, 8, 0))  # 30 layers (a 6 x 5 grid), no summary (the curves' red note)
    sizes = {t.get_text(): t.get_fontsize() for t in _texts(fig)}
    assert sizes and min(sizes.values()) >= 8, {k: v for k, v in sizes.items() if v < 8}


def test_step_map_shows_one_layer_and_writes_by_extension(tmp_path):
    r = synthetic(8, 4, 1)
    fig = plots.plot_step_map(r, 2, path=tmp_path / "map.svg")
    (im,) = map_images(fig)
    np.testing.assert_allclose(np.asarray(im.get_array().filled(np.nan))[r.counts > 0],
                               np.maximum(r.means[2], im.norm.vmin)[r.counts > 0])
    assert fig.axes[0].get_title() == "layer 2"
    assert b"<svg" in (tmp_path / "map.svg").read_bytes()[:2000]
    assert plots.plot_step_map(r).axes[0].get_title() == "layer 6 · deep"  # default: first deep-band layer
    with pytest.raises(ValueError, match="out of range"):
        plots.plot_step_map(r, 8)


def test_plot_functions_are_exported_at_the_top_level():
    for name in ("plot_step_map", "plot_layer_maps", "plot_metric_curves", "plot_band_scores"):
        assert getattr(stepscope, name) is getattr(plots, name)
