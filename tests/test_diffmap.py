"""Difference maps of two results on one trace: shares of each step's incoming saliency, after minus before."""

import numpy as np
import pytest

from stepscope.saliency import diffmap
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.trace import Step


def synthetic(layers: int = 4, thinking: int = 3, seed: int = 0) -> StepSaliency:
    steps = [Step("question", 1, 6, "q", 0)]
    pos = 6
    for i in range(1, thinking + 1):
        steps.append(Step("thinking", pos, pos + 4, f"t{i}", i))
        pos += 4
    steps.append(Step("summary", pos, pos + 3, "s", 1))
    S = len(steps)
    rng = np.random.default_rng(seed)
    sums = rng.uniform(0.5, 1.5, (layers, S, S)) * np.tril(np.ones((S, S)))
    return StepSaliency(sums, causal_counts(steps), np.zeros((layers, S)), steps, {"model": "m"})


def with_question_boost(r: StepSaliency, factor: float = 2.0) -> StepSaliency:
    sums = r.sums.copy()
    sums[:, 1:, 0] *= factor
    return StepSaliency(sums, r.counts, r.other, r.steps, dict(r.meta))


def test_share_maps_are_row_shares_of_the_sum_map():
    r = synthetic()
    shares = diffmap.share_maps(r)
    S = len(r.steps)
    assert np.allclose(np.nansum(shares, axis=-1), 1.0)
    assert np.isnan(shares[:, np.triu_indices(S, 1)[0], np.triu_indices(S, 1)[1]]).all()
    i, j = 3, 1
    assert shares[2, i, j] == pytest.approx(r.sums[2, i, j] / r.sums[2, i, : i + 1].sum())


def test_the_difference_shows_where_saliency_moved():
    before = synthetic()
    after = with_question_boost(before)
    diff = diffmap.share_difference(before, after)
    assert np.allclose(np.nansum(diff, axis=-1), 0.0)  # shares move within a row
    assert (diff[:, 1:, 0] > 0).all()  # every later step draws more on the question
    others = diff[:, 1:, 1:]
    assert (others[np.isfinite(others)] < 0).all()  # ... and less on everything else
    assert np.allclose(diffmap.share_difference(before, before)[np.isfinite(diff)], 0.0)


def test_largest_shifts_name_the_cells_that_moved_most():
    before = synthetic()
    after = with_question_boost(before)
    diff = diffmap.share_difference(before, after)
    shifts = diffmap.largest_shifts(before, after, n=2)
    layer, q, k, v = shifts[0]
    i, j = before.labels.index(q), before.labels.index(k)
    assert v == pytest.approx(diff[layer, i, j])
    assert abs(v) == pytest.approx(np.nanmax(np.abs(diff)))
    assert abs(shifts[1][3]) <= abs(v)


def test_results_on_different_steps_are_refused():
    with pytest.raises(ValueError, match="same steps"):
        diffmap.share_difference(synthetic(thinking=3), synthetic(thinking=4))
    with pytest.raises(ValueError, match="same layers"):
        diffmap.share_difference(synthetic(layers=4), synthetic(layers=6))


def test_the_scale_is_symmetric_and_robust():
    diff = np.zeros((2, 3, 3))
    assert diffmap.diff_scale(diff) == 1.0  # nothing moved: a valid scale all the same
    diff[0, 1, 0], diff[1, 2, 1] = 0.02, -0.03
    assert 0 < diffmap.diff_scale(diff) <= 3.0


def test_the_figure_has_a_panel_per_layer_on_one_diverging_scale(tmp_path):
    pytest.importorskip("matplotlib")
    before = synthetic(layers=6)
    after = with_question_boost(before)
    fig = diffmap.plot_difference_maps(before, after, path=tmp_path / "d.svg")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 6
    norm = images[0].norm
    assert norm.vmin == pytest.approx(-norm.vmax) and all(im.norm is norm for im in images)
    assert images[0].get_cmap().name.startswith(diffmap.DIFF_CMAP)
    assert b"<svg" in (tmp_path / "d.svg").read_bytes()[:2000]
