"""Correct-vs-wrong comparison and the mechanism check on hand-built saliency maps whose scores are known."""

import dataclasses
import itertools

import numpy as np
import pytest

from stepscope import StepscopeError
from stepscope.analysis import AnalysedTrace, compare_groups
from stepscope.analysis.compare import coarse_assignment
from stepscope.analysis.measure import Measured
from stepscope.analysis.mechanism import mechanism_check
from stepscope.analysis.scores import SCORE_NAMES, score_values
from stepscope.evaluation import stats
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
    v = score_values(result(0.7, 0.4))
    assert v["shallow_lock_in"] == pytest.approx(0.7) and v["deep_decay"] == pytest.approx(0.4)
    # question reach: T1 0.5, T2 0.3, T3 0.3 -> mean 11/30
    assert v["shallow_question_reach"] == pytest.approx((0.5 + 0.3 + 0.3) / 3)
    # net Lock-in: minus the uniform share of T_i and T_{i-1} (N = 6 + 9 of 12 + 9 + 6 for T2; 6 + 9 of 45 for T3)
    null = np.mean([(6 + 9) / (12 + 9 + 6), (6 + 9) / (12 + 9 + 9 + 6)])
    assert v["shallow_lock_in_net"] == pytest.approx(0.7 - null)


def _brute_two_sided(x, y):
    z = np.array(x + y)
    obs = abs(np.mean(x) - np.mean(y))
    hits = total = 0
    for idx in itertools.combinations(range(len(z)), len(x)):
        m = np.zeros(len(z), bool)
        m[list(idx)] = True
        hits += abs(z[m].mean() - z[~m].mean()) >= obs - 1e-12
        total += 1
    return hits / total


def test_pooled_statistics_match_hand_computation():
    wrong = [AnalysedTrace(f"p{i}", 0, False, result(x, 0.5)) for i, x in enumerate([0.6, 0.7, 0.8])]
    right = [AnalysedTrace(f"q{i}", 0, True, result(x, 0.5)) for i, x in enumerate([0.1, 0.2])]
    cmp = compare_groups(wrong + right, model="m", n_boot=200, n_perm=199)
    lock = cmp.score("shallow_lock_in")
    assert lock.wrong.estimate == pytest.approx(0.7) and lock.correct.estimate == pytest.approx(0.15)
    t = lock.tests["pooled_raw"]
    assert t.method.startswith("exact permutation") and t.estimate == pytest.approx(0.55)
    assert t.p_value == pytest.approx(_brute_two_sided([0.6, 0.7, 0.8], [0.1, 0.2]))
    assert t.effect["rank_biserial"] == pytest.approx(1.0)
    assert not lock.tests["paired_raw"].available and "problem(s) with both" in lock.tests["paired_raw"].note
    # every trace has the same lengths: no covariate varies, so the adjusted estimate is the raw difference
    adj = lock.tests["pooled_adjusted"]
    assert adj.estimate == pytest.approx(0.55) and "0 covariates" in adj.method
    band = cmp.curves["local_share"]["wrong"]
    np.testing.assert_allclose(band["mean"], 0.7)
    assert cmp.n_correct == 2 and cmp.n_wrong == 3 and cmp.headline == "pooled_adjusted"


def _paired_traces():
    traces = []
    for i, (w, c) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.7, 0.65), (0.6, 0.2)]):
        traces += [AnalysedTrace(f"p{i}", 0, False, result(w, 0.5)), AnalysedTrace(f"p{i}", 1, True, result(c, 0.5))]
    traces.append(AnalysedTrace("only-wrong", 0, False, result(0.99, 0.5)))
    return traces


def test_paired_test_uses_problems_with_both_outcomes_and_holm_runs_per_column():
    cmp = compare_groups(_paired_traces(), n_boot=100, n_perm=199)
    lock = cmp.score("shallow_lock_in")
    t = lock.tests["paired_raw"]
    assert t.n == 4 and t.estimate == pytest.approx(np.mean([0.4, 0.2, 0.05, 0.4]))
    assert t.p_value == pytest.approx(2 / 2**4)  # four positive differences: the exact two-sided minimum
    assert cmp.pairing["problems_with_both_outcomes"] == 4 and cmp.pairing["problems_only_wrong"] == 1
    # samples of one problem are pooled: the pooled test resamples problems
    assert "clustered" in lock.tests["pooled_raw"].method
    for col in ("paired_raw", "pooled_raw"):
        ps = [s.tests[col].p_value for s in cmp.scores]
        assert [s.tests[col].p_holm for s in cmp.scores] == pytest.approx(stats.holm(ps), nan_ok=True)
    assert lock.tests["paired_raw"].p_holm >= t.p_value
    # Deep Decay does not differ at all (0.5 everywhere): not detected, with the smallest detectable effect
    decay = cmp.score("deep_decay")
    assert decay.verdict.startswith("not detected") and "smallest detectable effect at the corrected level" in \
        decay.verdict


def test_the_detectable_effect_is_read_at_the_holm_level():
    from stepscope.analysis.compare import family_mde_scale

    assert family_mde_scale(1) == pytest.approx(1.0)
    z = stats.normal_ppf
    assert family_mde_scale(10) == pytest.approx((z(1 - 0.05 / 20) + z(0.8)) / (z(0.975) + z(0.8)))
    cmp = compare_groups(_paired_traces(), n_boot=100, n_perm=199)
    for s in cmp.scores:
        t = s.tests["paired_raw"]
        if t.mde is not None:
            m = sum(x.tests["paired_raw"].available for x in cmp.scores)
            assert t.mde_family == pytest.approx(t.mde * family_mde_scale(m))
            assert t.mde_family >= t.mde


def test_a_rejection_whose_problem_interval_covers_zero_is_not_established():
    from stepscope.analysis.compare import TestColumn, verdict

    base = compare_groups(_paired_traces(), n_boot=100, n_perm=199).score("shallow_lock_in")
    col = TestColumn(0.3, -0.1, 0.6, 0.001, 0.01, 0.2, 40, "m", mde_family=0.3)
    mixed = dataclasses.replace(base, tests={**base.tests, "paired_adjusted": col})
    assert verdict(mixed, "paired_adjusted").startswith("not established")
    clear = dataclasses.replace(base, tests={**base.tests, "paired_adjusted": dataclasses.replace(col, low=0.1)})
    assert verdict(clear, "paired_adjusted").startswith("detected")
    null = dataclasses.replace(base, tests={**base.tests, "paired_adjusted": dataclasses.replace(col, p_holm=0.4)})
    assert verdict(null, "paired_adjusted").endswith("smallest detectable effect at the corrected level: 0.3000)")


def test_all_correct_is_a_clear_message():
    with pytest.raises(StepscopeError, match="all 2 traces of m are correct"):
        compare_groups([AnalysedTrace("a", 0, True, result(0.5, 0.5)), AnalysedTrace("b", 0, True, result(0.4, 0.5))],
                       model="m")


def test_coarse_bins_and_maps():
    r = result(0.5, 0.5)
    assert coarse_assignment(r).tolist() == [0, 1, 2, 3, 5]  # 3 thinking steps over 4 bins, summary last
    cmp = compare_groups([AnalysedTrace("a", 0, True, r), AnalysedTrace("b", 0, False, result(0.9, 0.1))],
                         n_boot=100, n_perm=99)
    m = cmp.coarse["correct"]["shallow"]
    assert m.shape == (6, 6) and np.isnan(m[4]).all()  # no thinking step falls in bin 4
    assert m[0, 0] == pytest.approx(1.0 / r.counts[0, 0])


def _measured(local, recency):
    return Measured(result(local, recency), np.full((2, len(SCORE_NAMES)), np.nan), {})


def test_mechanism_check_reports_effect_sizes_and_controls_without_p_values():
    base = [_measured(0.8, 0.6), _measured(0.7, 0.5), _measured(0.9, 0.7)]
    conds = {"oeb": [_measured(0.6, 0.6), _measured(0.6, 0.5), _measured(0.5, 0.7)],
             "oeb_random": [_measured(0.78, 0.6), _measured(0.71, 0.5), _measured(0.88, 0.7)]}
    m = mechanism_check(base, conds, ["a", "b", "c"], n_boot=200)
    lock = m.components["oeb"]["scores"]["shallow_lock_in"]
    assert lock["before"] == pytest.approx(0.8) and lock["after"] == pytest.approx(17 / 30)
    assert lock["mean_change"] == pytest.approx(np.mean([-0.2, -0.1, -0.4]))
    assert lock["share_in_direction"] == 1.0 and lock["standardised"] == pytest.approx(
        np.mean([-0.2, -0.1, -0.4]) / np.std([-0.2, -0.1, -0.4], ddof=1))
    assert m.components["oeb"]["scores"]["deep_decay"]["mean_change"] == pytest.approx(0.0)
    ctl = m.controls["oeb_vs_oeb_random"]["shallow_lock_in"]
    assert ctl["exceeds"] and ctl["control_change"] == pytest.approx(np.mean([-0.02, 0.01, -0.02]))
    assert not m.controls["oeb_vs_oeb_random"]["deep_decay"]["exceeds"]
    assert "p_value" not in str(m.to_dict()["components"])
