"""Correct-vs-wrong comparison on hand-built saliency maps whose scores are known."""

import numpy as np
import pytest

from stepscope import StepscopeError
from stepscope.analysis import AnalysedTrace, compare_groups, mechanism_check
from stepscope.analysis.compare import coarse_assignment, score_value
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.trace import Step

STEPS = [Step("question", 1, 5, "q", 0), Step("thinking", 5, 8, "a.", 1), Step("thinking", 8, 11, "b.", 2),
         Step("thinking", 11, 14, "c.", 3), Step("summary", 14, 16, "s", 1)]
L = 4  # bands: shallow = layer 0, deep = layer 3


def result(local: float, recency: float) -> StepSaliency:
    """Maps where every thinking step i >= 2 takes ``local`` of its incoming saliency from itself and i-1 and the
    summary takes ``recency`` from itself and the last two thinking steps, in every layer."""
    F = np.zeros((5, 5))
    F[0, 0] = 1.0
    F[1, 0], F[1, 1] = 0.5, 0.5
    for i in (2, 3):
        F[i, i], F[i, i - 1] = local / 2, local / 2
        F[i, 0] = 1 - local
    F[4, 4], F[4, 3], F[4, 2] = recency / 3, recency / 3, recency / 3
    F[4, 0], F[4, 1] = (1 - recency) / 2, (1 - recency) / 2
    sums = np.repeat(F[None], L, axis=0)
    return StepSaliency(sums, causal_counts(STEPS), np.zeros((L, 5)), STEPS)


def test_scores_are_read_off_the_maps():
    r = result(0.7, 0.4)
    assert score_value(r, "local_share", "shallow") == pytest.approx(0.7)
    assert r.shallow_lock_in == pytest.approx(0.7) and r.deep_decay == pytest.approx(0.4)
    # question reach: T1 0.5, T2 0.3, T3 0.3 -> mean 11/30
    assert score_value(r, "question_reach", "shallow") == pytest.approx((0.5 + 0.3 + 0.3) / 3)


def test_group_statistics_match_hand_computation():
    wrong = [AnalysedTrace(f"p{i}", 0, False, result(x, 0.5)) for i, x in enumerate([0.6, 0.7, 0.8])]
    right = [AnalysedTrace(f"q{i}", 0, True, result(x, 0.5)) for i, x in enumerate([0.1, 0.2])]
    cmp = compare_groups(wrong + right, model="m", n_boot=200)
    lock = next(s for s in cmp.scores if s.name == "shallow_lock_in")
    assert lock.wrong.estimate == pytest.approx(0.7) and lock.correct.estimate == pytest.approx(0.15)
    # every wrong value exceeds every correct one: U = 3 * 2 = 6, rank-biserial 1, exact p = 2 / C(5, 2) = 0.2
    assert lock.test.u == 6 and lock.test.rank_biserial == pytest.approx(1.0)
    assert lock.test.p_value == pytest.approx(0.2)
    assert lock.paired is None and lock.paired_problems == 0
    band = cmp.curves["local_share"]["wrong"]
    np.testing.assert_allclose(band.mean, 0.7)  # per-layer curve of the group mean
    assert band.low.shape == (L,) and np.all(band.low <= band.mean + 1e-12)
    assert cmp.n_correct == 2 and cmp.n_wrong == 3


def test_paired_version_uses_problems_with_both_outcomes():
    traces = []
    for i, (w, c) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.7, 0.65), (0.6, 0.2)]):
        traces += [AnalysedTrace(f"p{i}", 0, False, result(w, 0.5)), AnalysedTrace(f"p{i}", 1, True, result(c, 0.5))]
    traces.append(AnalysedTrace("only-wrong", 0, False, result(0.99, 0.5)))
    lock = next(s for s in compare_groups(traces, n_boot=100).scores if s.name == "shallow_lock_in")
    assert lock.paired_problems == 4
    assert lock.paired_diff == pytest.approx(np.mean([0.4, 0.2, 0.05, 0.4]))
    # all four differences positive, no ties: exact Wilcoxon p = 2 / 2**4 = 0.125
    assert lock.paired.p_value == pytest.approx(0.125)


def test_all_correct_is_a_clear_message():
    with pytest.raises(StepscopeError, match="all 2 traces of m are correct"):
        compare_groups([AnalysedTrace("a", 0, True, result(0.5, 0.5)), AnalysedTrace("b", 0, True, result(0.4, 0.5))],
                       model="m")


def test_coarse_bins_and_maps():
    r = result(0.5, 0.5)
    assert coarse_assignment(r).tolist() == [0, 1, 2, 3, 5]  # 3 thinking steps over 4 bins, summary last
    cmp = compare_groups([AnalysedTrace("a", 0, True, r), AnalysedTrace("b", 0, False, result(0.9, 0.1))],
                         n_boot=50)
    m = cmp.coarse["correct"]["shallow"]
    assert m.shape == (6, 6) and np.isnan(m[4]).all()  # no thinking step falls in bin 4
    assert m[0, 0] == pytest.approx(1.0 / r.counts[0, 0])


def test_mechanism_check_paired_changes():
    before = [result(0.8, 0.6), result(0.7, 0.5), result(0.9, 0.7)]
    after = [result(0.6, 0.5), result(0.6, 0.45), result(0.5, 0.4)]
    m = mechanism_check(before, after)
    lock = m.scores["shallow_lock_in"]
    assert lock["before"] == pytest.approx(0.8) and lock["after"] == pytest.approx(17 / 30)
    assert lock["mean_change"] == pytest.approx(np.mean([-0.2, -0.1, -0.4]))
    assert lock["wilcoxon_p"] == pytest.approx(0.25)  # 3 negative differences: exact p = 2 / 2**3
