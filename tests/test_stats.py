"""Statistics: hand-computed values, brute force, and scipy as a reference where it has the same test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from stepscope.errors import StepscopeError
from stepscope.evaluation import stats

# --- pass@k ------------------------------------------------------------------------------------------------


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert stats.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values():
    # pass@1 is the share correct: 2 of 5 -> 0.4
    assert stats.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert stats.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.916666...
    assert stats.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert stats.pass_at_k(10, 0, 5) == 0.0
    assert stats.pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples: every k-subset has a right one


def test_pass_at_k_is_stable_for_large_n():
    # 1 - C(n-c, k)/C(n, k) with n=2000 overflows naive float factorials; compare with exact integers.
    n, c, k = 2000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert stats.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_mean_pass_at_k_and_errors():
    # (n, c) = (4, 1), (4, 4), (4, 0) at k=2: (0.5 + 1 + 0) / 3 = 0.5
    assert stats.mean_pass_at_k([(4, 1), (4, 4), (4, 0)], 2) == pytest.approx(0.5)
    with pytest.raises(StepscopeError, match="k <= samples"):
        stats.pass_at_k(3, 1, 4)
    with pytest.raises(StepscopeError):
        stats.pass_at_k(3, 4, 1)
    with pytest.raises(StepscopeError):
        stats.mean_pass_at_k([], 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_a_probability_that_grows_with_correct_samples(args):
    n, c, k = args
    value = stats.pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if c < n:
        assert stats.pass_at_k(n, c + 1, k) >= value - 1e-12


# --- bootstrap ------------------------------------------------------------------------------------------------


def test_bootstrap_ci_of_binary_scores_matches_the_binomial_quantiles():
    # 7 of 10 right: a resampled mean is Binomial(10, 0.7)/10. P(X <= 3) = 0.0106 < 0.025 < P(X <= 4) = 0.0473,
    # so the 2.5% quantile is 0.4; P(X <= 9) = 0.9718 is just under 0.975, so the 97.5% quantile lies in
    # [0.9, 1.0].
    ci = stats.bootstrap_ci([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], n_boot=10000, seed=0)
    assert ci.estimate == pytest.approx(0.7)
    assert ci.low == pytest.approx(0.4)
    assert 0.9 <= ci.high <= 1.0
    assert ci.level == pytest.approx(0.95) and ci.n == 10


def test_bootstrap_ci_is_reproducible_and_degenerate_for_constants():
    values = np.random.default_rng(3).normal(size=50)
    assert stats.bootstrap_ci(values, seed=5) == stats.bootstrap_ci(values, seed=5)
    assert stats.bootstrap_ci(values, seed=5) != stats.bootstrap_ci(values, seed=6)
    ci = stats.bootstrap_ci([0.25] * 20)
    assert (ci.low, ci.estimate, ci.high) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_ci_of_a_large_sample_is_near_the_normal_interval():
    values = np.random.default_rng(0).normal(loc=1.0, size=400)
    ci = stats.bootstrap_ci(values, n_boot=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert ci.low == pytest.approx(values.mean() - half, abs=0.02)
    assert ci.high == pytest.approx(values.mean() + half, abs=0.02)


def test_paired_bootstrap_is_the_bootstrap_of_differences():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=60).astype(float)
    b = rng.integers(0, 2, size=60).astype(float)
    assert stats.paired_bootstrap_ci(a, b, seed=2) == stats.bootstrap_ci(b - a, seed=2)
    # b = a + 0.1 everywhere: every resample's mean difference is exactly 0.1
    shifted = stats.paired_bootstrap_ci(a, a + 0.1)
    assert (shifted.low, shifted.high) == pytest.approx((0.1, 0.1))
    assert shifted.excludes_zero
    with pytest.raises(StepscopeError, match="same problems"):
        stats.paired_bootstrap_ci([1, 0], [1, 0, 1])


def test_bootstrap_rejects_bad_input():
    with pytest.raises(StepscopeError, match="empty"):
        stats.bootstrap_ci([])
    with pytest.raises(StepscopeError, match="NaN"):
        stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(StepscopeError, match="alpha"):
        stats.bootstrap_ci([1.0, 2.0], alpha=1.5)


def test_bootstrap_band_is_the_columnwise_bootstrap():
    matrix = np.random.default_rng(4).normal(size=(30, 5))
    band = stats.bootstrap_band(matrix, n_boot=1000, seed=9)
    assert band.mean == pytest.approx(matrix.mean(axis=0))
    assert np.all(band.low <= band.mean) and np.all(band.mean <= band.high)
    for j in range(5):  # rows are resampled jointly, so each column equals its own bootstrap with that seed
        ci = stats.bootstrap_ci(matrix[:, j], n_boot=1000, seed=9)
        assert (band.low[j], band.high[j]) == pytest.approx((ci.low, ci.high))
    flat = stats.bootstrap_band(np.tile([1.0, 2.0, 3.0], (8, 1)))
    assert flat.low == pytest.approx([1, 2, 3]) and flat.high == pytest.approx([1, 2, 3])
    with pytest.raises(StepscopeError, match="matrix"):
        stats.bootstrap_band([1.0, 2.0])


# --- paired tests ---------------------------------------------------------------------------------------


def test_mcnemar_exact_hand_values():
    # 0 vs 5 discordant: 2 * P(X <= 0 | n=5, 1/2) = 2/32 = 0.0625
    assert stats.mcnemar_exact(0, 5).p_value == pytest.approx(0.0625)
    # 1 vs 9: 2 * (C(10,0) + C(10,1)) / 1024 = 22/1024
    assert stats.mcnemar_exact(1, 9).p_value == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(4, 4).p_value == 1.0
    assert stats.mcnemar_exact(0, 0).p_value == 1.0 and stats.mcnemar_exact(0, 0).n == 0
    assert float(stats.mcnemar_exact(0, 5)) == pytest.approx(0.0625)


@pytest.mark.parametrize("b01,b10", [(3, 12), (10, 11), (0, 1), (25, 60), (140, 170)])
def test_mcnemar_exact_matches_scipy_binomtest(b01, b10):
    expected = scipy.stats.binomtest(b01, b01 + b10, 0.5).pvalue
    assert stats.mcnemar_exact(b01, b10).p_value == pytest.approx(expected, rel=1e-10)


def test_sign_test_drops_ties_and_matches_scipy():
    # five positive differences, two ties: n = 5, p = 2/32
    result = stats.sign_test([0.5, 0.2, 0.0, 1.0, 0.1, 0.0, 0.3])
    assert (result.n, result.statistic, result.p_value) == (5, 5.0, pytest.approx(0.0625))
    diffs = np.random.default_rng(7).integers(-2, 3, size=80)
    positive, negative = int((diffs > 0).sum()), int((diffs < 0).sum())
    expected = scipy.stats.binomtest(positive, positive + negative).pvalue
    assert stats.sign_test(diffs).p_value == pytest.approx(expected, rel=1e-10)


# --- Mann-Whitney -----------------------------------------------------------------------------------------


def test_mann_whitney_hand_values():
    # x all below y: ranks of x are 1, 2, 3 -> R1 = 6, U1 = 6 - 3*4/2 = 0. Exact: only 1 of the C(6,3) = 20
    # orderings gives U = 0, so two-sided p = 2/20 = 0.1. Every pair has x < y: Cliff's delta = -1.
    result = stats.mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert result.u == 0 and result.method == "exact"
    assert result.p_value == pytest.approx(0.1)
    assert result.cliffs_delta == -1.0 and result.rank_biserial == -1.0


def test_mann_whitney_matches_scipy_exact():
    rng = np.random.default_rng(11)
    for m, n in [(9, 7), (4, 12), (20, 25)]:
        x, y = rng.normal(size=m), rng.normal(size=n) + 0.6
        ours = stats.mann_whitney_u(x, y)
        ref = scipy.stats.mannwhitneyu(x, y, method="exact")
        assert ours.method == "exact"
        assert ours.u == pytest.approx(ref.statistic)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_mann_whitney_matches_scipy_asymptotic_with_ties():
    rng = np.random.default_rng(12)
    x, y = rng.integers(0, 6, size=40), rng.integers(1, 7, size=33)
    ours = stats.mann_whitney_u(x, y)
    ref = scipy.stats.mannwhitneyu(x, y, method="asymptotic", use_continuity=True)
    assert ours.method == "asymptotic"
    assert ours.u == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    # with ties, Cliff's delta (#x>y - #x<y)/mn and the rank-biserial 2U/mn - 1 agree
    greater = sum(a > b for a in x for b in y)
    less = sum(a < b for a in x for b in y)
    assert ours.cliffs_delta == pytest.approx((greater - less) / (x.size * y.size))
    assert ours.rank_biserial == pytest.approx(ours.cliffs_delta)
    with pytest.raises(StepscopeError, match="ties"):
        stats.mann_whitney_u(x, y, method="exact")


# --- Wilcoxon ---------------------------------------------------------------------------------------------


def test_wilcoxon_hand_values():
    # all five differences positive: W+ = 1+2+3+4+5 = 15, W- = 0, statistic 0. Exact: only the all-positive
    # sign pattern of 2^5 = 32 reaches W+ = 15, so p = 2/32 = 0.0625.
    result = stats.wilcoxon_signed_rank([1, 2, 3, 4, 5])
    assert (result.statistic, result.n, result.method) == (0.0, 5, "exact")
    assert result.p_value == pytest.approx(0.0625)
    assert stats.wilcoxon_signed_rank([0, 0]).p_value == 1.0


def test_wilcoxon_matches_scipy_exact():
    rng = np.random.default_rng(13)
    for n in (6, 15, 40):
        d = rng.normal(size=n) + 0.4
        ours = stats.wilcoxon_signed_rank(d)
        ref = scipy.stats.wilcoxon(d, method="exact")
        assert ours.statistic == pytest.approx(ref.statistic)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


@pytest.mark.parametrize("correction", [False, True])
def test_wilcoxon_matches_scipy_normal_approximation_with_ties_and_zeros(correction):
    d = np.round(np.random.default_rng(14).normal(size=70) + 0.2, 1)  # rounding makes ties and zeros
    assert (d == 0).any()
    ours = stats.wilcoxon_signed_rank(d, correction=correction)
    ref = scipy.stats.wilcoxon(d, method="asymptotic", correction=correction, zero_method="wilcox")
    assert ours.method == "asymptotic"
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


# --- power ------------------------------------------------------------------------------------------------


def test_normal_ppf_matches_scipy():
    for p in (1e-12, 1e-4, 0.025, 0.2, 0.5, 0.8, 0.975, 1 - 1e-6):
        assert stats.normal_ppf(p) == pytest.approx(scipy.stats.norm.ppf(p), abs=1e-9)


def test_paired_power_mcnemar_hand_value():
    # psi = 0.2, delta = 0.05, alpha = 0.05, power = 0.8: z = 1.959964, 0.841621.
    # 1.959964 * sqrt(0.2) = 0.876523; 0.841621 * sqrt(0.2 - 0.0025) = 0.374025; sum 1.250548;
    # squared 1.563870; / 0.0025 = 625.5 -> 626 problems.
    assert stats.paired_power_mcnemar(0.2, 0.05) == 626
    # psi = 0.1, delta = 0.1 (every discordant pair goes one way): 1.959964 * sqrt(0.1) = 0.619795;
    # 0.841621 * sqrt(0.1 - 0.01) = 0.252486; sum 0.872281; squared 0.760874; / 0.01 = 76.1 -> 77.
    assert stats.paired_power_mcnemar(0.1, 0.1) == 77


def test_paired_power_moves_the_right_way_and_explains_itself():
    base = stats.paired_power_mcnemar(0.3, 0.05)
    assert stats.paired_power_mcnemar(0.3, 0.10) < base  # bigger effects need fewer problems
    assert stats.paired_power_mcnemar(0.4, 0.05) > base  # more flipping means more noise
    assert stats.paired_power_mcnemar(0.3, 0.05, power=0.9) > base
    text = stats.paired_power_explanation(0.3, 0.05)
    assert str(base) in text and "5.0 points" in text and "80%" in text
    with pytest.raises(StepscopeError, match="discordant"):
        stats.paired_power_mcnemar(0.02, 0.05)
    with pytest.raises(StepscopeError, match="power"):
        stats.paired_power_mcnemar(0.2, 0.05, power=1.0)


def test_mcnemar_sample_size_gives_the_promised_power_by_simulation():
    # At the computed n, the exact test should reject about 80% of the time (normal-approximation formula).
    psi, delta = 0.2, 0.1
    n = stats.paired_power_mcnemar(psi, delta)
    rng = np.random.default_rng(0)
    p10, p01 = (psi + delta) / 2, (psi - delta) / 2
    draws = rng.multinomial(n, [p01, p10, 1 - psi], size=400)
    rejections = np.mean([stats.mcnemar_exact(int(a), int(b)).p_value < 0.05 for a, b, _ in draws])
    assert 0.7 <= rejections <= 0.9


# --- permutation tests, Holm, detectable effects, clustered resampling, Freedman-Lane ---------------------------------


def _scipy_two_sample(x, y):
    res = scipy.stats.permutation_test((np.asarray(x, float), np.asarray(y, float)),
                                       lambda a, b, axis: np.abs(a.mean(axis) - b.mean(axis)),
                                       permutation_type="independent", n_resamples=np.inf, alternative="greater",
                                       vectorized=True)
    return res.pvalue


@pytest.mark.parametrize("x, y", [
    ([0.1, 0.5, 0.3], [0.9, 0.7]),
    ([1.0, 2.0, 2.0, 3.0], [2.0, 2.0, 4.0, 5.0, 1.0]),  # ties across groups
    ([1.0, 1.0, 1.0], [1.0, 1.0]),  # all tied: p = 1
    ([0.2, 0.4, 0.1, 0.9, 0.5, 0.3], [0.8, 0.6, 1.2, 0.7, 1.1, 0.95, 1.0]),
])
def test_permutation_test_is_exact_and_matches_scipy(x, y):
    r = stats.permutation_test(x, y)
    assert r.method.startswith("exact")
    assert r.p_value == pytest.approx(_scipy_two_sample(x, y), abs=1e-12)
    assert r.statistic == pytest.approx(np.mean(x) - np.mean(y))


def test_permutation_test_complete_separation_has_the_exact_minimum():
    # 3 vs 2 with every x below every y: of C(5, 2) = 10 splits only the observed one is as extreme
    r = stats.permutation_test([1, 2, 3], [10, 11])
    assert r.p_value == pytest.approx(1 / 10)


def test_permutation_test_monte_carlo_agrees_with_exact_and_never_reaches_zero():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, 12), rng.normal(0.8, 1, 11)
    exact = stats.permutation_test(x, y, exact_limit=10**7).p_value
    mc = stats.permutation_test(x, y, exact_limit=0, n_resamples=20000, seed=1)
    assert mc.method.startswith("Monte Carlo") and abs(mc.p_value - exact) < 0.01
    sep = stats.permutation_test(np.arange(30.0), np.arange(30.0) + 100, n_resamples=999)
    assert sep.p_value == pytest.approx(1 / 1000)  # the +1 correction: no Monte Carlo p is 0


@pytest.mark.parametrize("d", [
    [0.3, -0.1, 0.5, 0.2, 0.4],
    [1.0, 1.0, -1.0, 2.0, 0.0, 1.0],  # ties and a zero
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, -0.25, 0.05],
])
def test_sign_flip_is_exact_and_matches_scipy(d):
    ref = scipy.stats.permutation_test((np.asarray(d, float),), lambda a, axis: np.abs(a.mean(axis)),
                                       permutation_type="samples", n_resamples=np.inf, alternative="greater",
                                       vectorized=True).pvalue
    r = stats.sign_flip_test(d)
    assert r.method.startswith("exact") and r.p_value == pytest.approx(ref, abs=1e-12)


def test_sign_flip_on_five_positive_pairs_is_one_sixteenth_not_a_normal_approximation():
    # the smallest two-sided p five pairs can give is 2 / 2^5
    assert stats.sign_flip_test([0.1, 0.3, 0.2, 0.5, 0.4]).p_value == pytest.approx(0.0625)
    assert stats.sign_flip_test([0.1, 0.1, 0.1, 0.1, 0.1]).p_value == pytest.approx(0.0625)  # ties too


def test_sign_flip_monte_carlo_beyond_the_exact_size():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1, 40)
    mc = stats.sign_flip_test(d, n_resamples=20000, seed=2)
    ref = scipy.stats.ttest_1samp(d, 0).pvalue  # close to the permutation p at n = 40
    assert mc.method.startswith("Monte Carlo") and abs(mc.p_value - ref) < 0.03


def test_holm_matches_its_definition():
    p = [0.01, 0.04, None, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, max(0.09, 0.08) = 0.09, max(0.09, 0.5) = 0.5
    assert stats.holm(p) == pytest.approx([0.04, 0.09, None, 0.09, 0.5])
    rng = np.random.default_rng(1)
    for _ in range(50):
        ps = list(rng.random(6) ** 2)
        adj = stats.holm(ps)
        order = np.argsort(ps)
        brute = np.maximum.accumulate([min(1.0, (6 - k) * ps[i]) for k, i in enumerate(order)])
        assert np.allclose(np.array(adj)[order], brute)


def test_minimum_detectable_effects():
    assert stats.mde(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-5)
    for n, psi in ((300, 0.05), (100, 0.2), (1000, 0.02)):
        delta = stats.mde_mcnemar(n, psi)
        assert stats.paired_power_mcnemar(psi, delta) <= n < stats.paired_power_mcnemar(psi, delta * 0.99)
    assert stats.mde_mcnemar(10, 0.01) is None  # one discordant problem in ten: nothing is detectable


def _clustered(rng, clusters=30, size=8, icc=0.5):
    u = rng.normal(0, np.sqrt(icc), clusters)
    y = np.repeat(u, size) + rng.normal(0, np.sqrt(1 - icc), clusters * size)
    return y, np.repeat(np.arange(clusters), size)


def test_cluster_bootstrap_keeps_its_coverage_where_the_plain_bootstrap_loses_it():
    rng = np.random.default_rng(7)
    hit_cluster = hit_plain = 0
    sims = 200
    for s in range(sims):
        y, cl = _clustered(rng)
        c = stats.cluster_bootstrap_ci(y, cl, n_boot=400, seed=s)
        p = stats.bootstrap_ci(y, n_boot=400, seed=s)
        hit_cluster += c.low <= 0 <= c.high
        hit_plain += p.low <= 0 <= p.high
    assert 0.88 <= hit_cluster / sims <= 0.99
    assert hit_plain / sims < 0.75  # with ICC 0.5 and 8 per cluster the naive interval is far too narrow


def test_cluster_bootstrap_diff_and_coef_observed_values():
    rng = np.random.default_rng(2)
    y = rng.normal(size=40)
    g = np.arange(40) % 3 == 0
    cl = np.arange(40) // 4
    obs, boot = stats.cluster_bootstrap_diff(y, g, cl, n_boot=300, seed=0)
    assert obs == pytest.approx(y[g].mean() - y[~g].mean()) and boot.shape[0] <= 300
    X = np.column_stack([g.astype(float), np.ones(40), rng.normal(size=40)])
    obs, boot = stats.cluster_bootstrap_coef(y, X, cl, n_boot=300, seed=0)
    assert obs == pytest.approx(np.linalg.lstsq(X, y, rcond=None)[0][0])
    assert boot.shape == (300,) and np.isfinite(boot).all()
    assert np.std(boot) > 0


def test_freedman_lane_estimates_the_adjusted_coefficient_and_the_fixed_effects_one():
    rng = np.random.default_rng(4)
    n = 90
    x = rng.normal(size=n)
    g = (x + rng.normal(size=n)) > 0
    y = 0.5 * x + 0.3 * g + rng.normal(0, 0.5, n)
    Z = np.column_stack([np.ones(n), x])
    r = stats.freedman_lane(y, g, Z, n_resamples=999)
    assert r.estimate == pytest.approx(np.linalg.lstsq(np.column_stack([g, Z]), y, rcond=None)[0][0])
    assert r.p_value < 0.05
    cl = np.arange(n) // 6
    fe = stats.freedman_lane(y, g, x[:, None], absorb=cl, n_resamples=999)
    dummies = (cl[:, None] == np.unique(cl)[None]).astype(float)
    ref = np.linalg.lstsq(np.column_stack([g, x, dummies]), y, rcond=None)[0][0]
    assert fe.estimate == pytest.approx(ref)
    assert stats.freedman_lane(y, g, np.column_stack([np.ones(n), g.astype(float)])) is None  # collinear


def test_freedman_lane_is_exchangeable_within_clusters_only():
    # a group that is constant within every cluster carries no within-cluster information
    g = np.repeat([True, False] * 5, 4)
    y = np.random.default_rng(0).normal(size=40)
    assert stats.freedman_lane(y, g, np.zeros((40, 0)), absorb=np.repeat(np.arange(10), 4)) is None


def test_bootstrap_p_value_counts_the_null_centred_resamples():
    # observed 0.5; resamples centred at it: |r - 0.5| >= 0.5 for 0.0, 1.0 and 1.2 of the five -> (1 + 3) / (1 + 5)
    assert stats.bootstrap_p_value(0.5, np.array([0.0, 0.4, 0.6, 1.0, 1.2])) == pytest.approx(4 / 6)
    assert stats.bootstrap_p_value(1.0, np.full(99, 1.0)) == pytest.approx(1 / 100)


def test_simultaneous_band_keeps_the_family_wise_rate_where_pointwise_bands_do_not():
    """200 null data sets of 12 independent layers: the pointwise 95% band excludes zero somewhere in most of them,
    the simultaneous band in about 5%."""
    rng = np.random.default_rng(7)
    any_pointwise = any_simultaneous = 0
    for k in range(200):
        data = rng.normal(size=(40, 12))
        band = stats.bootstrap_band(data, n_boot=400, seed=k)
        lo, hi = stats.simultaneous_band(band.mean, band.resampled)
        any_pointwise += bool(((band.low > 0) | (band.high < 0)).any())
        any_simultaneous += bool(((lo > 0) | (hi < 0)).any())
        assert np.all(lo <= band.low + 1e-12) and np.all(hi >= band.high - 1e-12)  # never narrower
    assert any_pointwise / 200 > 0.25
    assert 0.0 < any_simultaneous / 200 < 0.11


def test_simultaneous_band_matches_a_hand_computed_max_t_band():
    obs = np.array([0.0, 1.0])
    boot = np.array([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]])  # sd 1 and 2; standardised |dev| max per row: 1, 0, 1
    lo, hi = stats.simultaneous_band(obs, boot, alpha=0.5)
    c = np.quantile([1.0, 0.0, 1.0], 0.5)
    assert np.allclose(lo, obs - c * np.array([1.0, 2.0])) and np.allclose(hi, obs + c * np.array([1.0, 2.0]))
    with pytest.raises(StepscopeError):
        stats.simultaneous_band(obs, boot[:1])
