"""The length adjustment keeps its level when correct and wrong traces differ only in length.

Simulated band scores depend on thinking length (smoothly, not linearly) and step count, never on correctness; wrong
traces are longer. The raw tests then fire; the adjusted ones (the designs and tests ``compare`` uses) should reject
about 5% of the time, and still detect a real difference of moderate size.
"""

import numpy as np
import pytest

from stepscope.analysis import compare
from stepscope.evaluation import stats


def _lengths(rng, n, wrong):
    tokens = np.exp(rng.normal(3.0 + 0.45 * wrong, 0.4)).astype(int) + 2
    steps = np.clip(np.round(tokens / 12 + rng.normal(0, 0.7, n)), 1, 8).astype(int)
    summary = rng.integers(5, 15, n)
    rows = [{"question_tokens": 40, "thinking_tokens": int(t), "thinking_steps": int(k), "summary_tokens": int(s),
             "summary_steps": 1, "response_tokens": int(t + s)} for t, k, s in zip(tokens, steps, summary)]
    return rows, np.log(tokens), steps


def _score(rng, lt, steps, effect, wrong, problem=0.0):
    # a share that falls with length (curved) and with the number of steps; correctness enters only via effect
    return 0.9 - 0.25 * lt + 0.02 * lt**2 - 0.02 * steps + effect * wrong + problem + rng.normal(0, 0.02, lt.size)


def _pooled(sims, effect, seed, n=120, n_perm=199):
    rng = np.random.default_rng(seed)
    raw = adj = 0
    for s in range(sims):
        wrong = rng.random(n) < 0.5
        rows, lt, steps = _lengths(rng, n, wrong)
        y = _score(rng, lt, steps, effect, wrong)
        raw += stats.permutation_test(y[wrong], y[~wrong], n_resamples=n_perm, seed=s).p_value < 0.05
        fl = stats.freedman_lane(y, wrong, compare._design(rows, intercept=True), n_resamples=n_perm, seed=s)
        adj += fl.p_value < 0.05
    return raw / sims, adj / sims


def _paired(sims, effect, seed, problems=30, samples=6, n_perm=199):
    rng = np.random.default_rng(seed)
    raw = adj = 0
    cl = np.repeat(np.arange(problems), samples).astype(str)
    for s in range(sims):
        difficulty = rng.random(problems)
        wrong = rng.random(problems * samples) < np.repeat(0.2 + 0.6 * difficulty, samples)
        rows, lt, steps = _lengths(rng, problems * samples, wrong)
        y = _score(rng, lt, steps, effect, wrong, problem=np.repeat(rng.normal(0, 0.05, problems), samples))
        raw += compare.paired_raw(y, wrong, cl, n_boot=100, n_perm=n_perm, seed=s).p_value < 0.05
        keep = np.isin(cl, compare._problem_differences(y, wrong, cl)[1])
        Z = compare._design([r for r, k in zip(rows, keep) if k], intercept=False)
        fl = stats.freedman_lane(y[keep], wrong[keep], Z, absorb=cl[keep], n_resamples=n_perm, seed=s)
        adj += fl.p_value < 0.05
    return raw / sims, adj / sims


def test_pooled_adjusted_test_keeps_its_level_when_groups_differ_only_in_length():
    raw, adj = _pooled(200, 0.0, seed=0)
    assert raw > 0.9  # length alone makes the raw test fire
    assert 0.015 <= adj <= 0.095  # about 5% (binomial sd 1.5% at 200 data sets)


def test_pooled_adjusted_test_still_detects_a_real_difference():
    _, adj = _pooled(60, 0.015, seed=1)
    assert adj > 0.6


def test_paired_adjusted_test_keeps_its_level_when_wrong_samples_are_longer():
    raw, adj = _paired(200, 0.0, seed=2)
    assert raw > 0.8
    assert 0.015 <= adj <= 0.095


@pytest.mark.slow
def test_adjusted_tests_level_over_many_data_sets():
    _, pooled = _pooled(1000, 0.0, seed=10, n_perm=499)
    _, paired = _paired(1000, 0.0, seed=11, n_perm=499)
    assert 0.035 <= pooled <= 0.065 and 0.035 <= paired <= 0.065
