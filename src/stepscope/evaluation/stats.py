"""Statistics for benchmark results and flow analysis: pass@k, bootstrap intervals (also clustered by problem),
paired tests, rank and permutation tests (exact when small), Holm, length-adjusted permutation tests, power.

Pure numpy and the standard library, so results pages need no scipy; the tests check every function
against scipy where scipy has the same test, and against hand-computed values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import StepscopeError

__all__ = [
    "AdjustedResult",
    "Band",
    "ConfidenceInterval",
    "MannWhitneyResult",
    "PermutationResult",
    "TestResult",
    "bootstrap_band",
    "bootstrap_ci",
    "bootstrap_p_value",
    "cluster_bootstrap_band",
    "cluster_bootstrap_ci",
    "cluster_bootstrap_coef",
    "cluster_bootstrap_diff",
    "cluster_codes",
    "cluster_weights",
    "demean_within",
    "freedman_lane",
    "holm",
    "mann_whitney_u",
    "mcnemar_exact",
    "mde",
    "mde_mcnemar",
    "mean_pass_at_k",
    "normal_ppf",
    "paired_bootstrap_ci",
    "paired_power_explanation",
    "paired_power_mcnemar",
    "pass_at_k",
    "permutation_test",
    "sign_flip_test",
    "sign_test",
    "simultaneous_band",
    "wilcoxon_signed_rank",
]


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with a percentile bootstrap interval at level ``1 - alpha``."""

    estimate: float
    low: float
    high: float
    level: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of zero (a paired gain outside the noise)."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class TestResult:
    """A test statistic, its two-sided p-value and the number of informative observations."""

    statistic: float
    p_value: float
    n: int
    method: str = ""

    def __float__(self) -> float:
        return float(self.p_value)


@dataclass(frozen=True)
class MannWhitneyResult:
    """U for the first sample, two-sided p, and two effect sizes (equal up to rounding: both are P(x>y)-P(x<y))."""

    u: float
    p_value: float
    rank_biserial: float
    cliffs_delta: float
    method: str
    n_x: int
    n_y: int


@dataclass(frozen=True)
class Band:
    """Pointwise percentile band of the mean curve over rows (e.g. per-layer saliency over traces)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    n: int
    resampled: np.ndarray | None = field(default=None, repr=False, compare=False)  # (B, points): for simultaneous_band


# --- helpers ----------------------------------------------------------------------------------------------


def _vector(values: Iterable[float], what: str) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if array.size == 0:
        raise StepscopeError(f"{what} is empty; there is nothing to summarise")
    if not np.all(np.isfinite(array)):
        raise StepscopeError(f"{what} holds NaN or infinite values; drop or fix them first")
    return array


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise StepscopeError(f"alpha must lie between 0 and 1, got {alpha}")


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_ppf(p: float) -> float:
    """Standard normal quantile (Acklam's rational approximation, refined by one Halley step)."""
    if not 0 < p < 1:
        raise StepscopeError(f"a normal quantile needs 0 < p < 1, got {p}")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    elif p > 1 - low:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    else:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    error = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    u = error * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
    return x - u / (1 + x * u / 2)


def _rankdata(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ranks (1-based, ties share their mean rank) and the sizes of the tie groups."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [values.size]))
    ranks = np.empty(values.size, dtype=float)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
    return ranks, (ends - starts)


def _binomial_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials: 2 * P(X <= min(k, n-k)), at most 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


# --- pass@k -------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not (0 <= c <= n) or n < 1:
        raise StepscopeError(f"pass@k needs 0 <= correct <= samples and samples >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise StepscopeError(f"pass@{k} needs 1 <= k <= samples per problem ({n}); lower k or draw more samples")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def mean_pass_at_k(per_problem_counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of per-problem pass@k over ``(samples, correct)`` pairs: the benchmark's pass@k."""
    values = [pass_at_k(int(n), int(c), k) for n, c in per_problem_counts]
    if not values:
        raise StepscopeError("no problems to average pass@k over")
    return float(np.mean(values))


# --- bootstrap ------------------------------------------------------------------------------------------------


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int, chunk: int = 2048) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the rows of ``values``, in bounded memory."""
    if n_boot < 1:
        raise StepscopeError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = np.empty((n_boot,) + values.shape[1:], dtype=float)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> ConfidenceInterval:
    """Percentile bootstrap interval of the mean (for accuracy: per-problem scores)."""
    _check_alpha(alpha)
    array = _vector(values, "values")
    means = _bootstrap_means(array, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(float(array.mean()), float(low), float(high), 1 - alpha, int(array.size))


def paired_bootstrap_ci(
    a: Iterable[float], b: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> ConfidenceInterval:
    """Interval of the mean per-problem difference ``b - a``, resampling problems (keeps the pairing)."""
    x, y = _vector(a, "baseline scores"), _vector(b, "comparison scores")
    if x.size != y.size:
        raise StepscopeError(f"paired scores differ in length ({x.size} vs {y.size}); "
                             "use the same problems in both runs")
    return bootstrap_ci(y - x, n_boot=n_boot, alpha=alpha, seed=seed)


def bootstrap_band(
    matrix: Sequence[Sequence[float]] | np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Band:
    """Pointwise percentile band of the column-wise mean, resampling rows (one row per trace)."""
    _check_alpha(alpha)
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise StepscopeError(f"bootstrap_band needs a non-empty rows x points matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise StepscopeError("the curve matrix holds NaN or infinite values; drop or fix those rows")
    means = _bootstrap_means(array, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return Band(array.mean(axis=0), low, high, 1 - alpha, int(array.shape[0]), means)


def simultaneous_band(observed: np.ndarray, resampled: np.ndarray, *, alpha: float = 0.05,
                      centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A band that covers the whole curve at once with probability ``1 - alpha`` (family-wise over the points).

    The max-|t| bootstrap band: each resample's largest standardised deviation from ``centre`` (default: the
    resamples' mean) over the points; its ``1 - alpha`` quantile ``c`` gives ``observed -/+ c * sd``. Where a
    pointwise band would flag about ``alpha * L`` of ``L`` null layers, this one flags any layer with probability
    about ``alpha``. Points whose resamples do not vary get a zero-width band.
    """
    _check_alpha(alpha)
    obs = np.asarray(observed, dtype=float)
    boot = np.asarray(resampled, dtype=float).reshape(-1, *obs.shape)
    if boot.shape[0] < 2:
        raise StepscopeError("simultaneous_band needs at least two resamples")
    sd = boot.std(axis=0, ddof=1)
    mid = boot.mean(axis=0) if centre is None else np.asarray(centre, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, np.abs(boot - mid) / sd, 0.0)
    c = float(np.quantile(z.reshape(z.shape[0], -1).max(axis=1), 1 - alpha))
    return obs - c * sd, obs + c * sd


# --- paired tests -----------------------------------------------------------------------------------------------


def mcnemar_exact(b01: int, b10: int) -> TestResult:
    """Exact two-sided McNemar test: a fair-coin binomial test on the discordant pairs.

    ``b01``: problems wrong in the first run and right in the second; ``b10``: the reverse. The same as the
    exact sign test on per-problem differences.
    """
    if b01 < 0 or b10 < 0:
        raise StepscopeError("discordant counts must not be negative")
    n = int(b01) + int(b10)
    return TestResult(float(min(b01, b10)), _binomial_two_sided_half(int(b01), n), n, "exact binomial")


def sign_test(diffs: Iterable[float]) -> TestResult:
    """Exact two-sided sign test on per-problem differences; zero differences (ties) are dropped."""
    array = _vector(diffs, "differences")
    positive, negative = int(np.sum(array > 0)), int(np.sum(array < 0))
    n = positive + negative
    return TestResult(float(positive), _binomial_two_sided_half(positive, n), n, "exact sign test")


# --- rank tests -------------------------------------------------------------------------------------------------


def _poly_mul_one_minus(poly: list[int], shift: int) -> list[int]:
    """poly * (1 - q^shift), truncated to the same length."""
    return [c - (poly[i - shift] if i >= shift else 0) for i, c in enumerate(poly)]


def _poly_div_one_minus(poly: list[int], step: int) -> list[int]:
    """poly / (1 - q^step) as a power series truncated to the same length (strided running sums)."""
    out = list(poly)
    for i in range(step, len(out)):
        out[i] += out[i - step]
    return out


def _mwu_null_counts(m: int, n: int) -> list[int]:
    """How many of the C(m+n, m) orderings give each U = 0..m*n (the Gaussian binomial coefficient)."""
    size = m * n + 1
    poly = [1] + [0] * (size - 1)
    for i in range(1, min(m, n) + 1):  # prod_{i=1}^{k} (1 - q^{m+n-k+i}) / (1 - q^i), k = min(m, n)
        poly = _poly_div_one_minus(poly, i)
        poly = _poly_mul_one_minus(poly, max(m, n) + i)
    return poly


def _wilcoxon_null_counts(n: int) -> list[int]:
    """How many of the 2^n sign patterns give each W+ = 0..n(n+1)/2: coefficients of prod (1 + q^i)."""
    size = n * (n + 1) // 2 + 1
    poly = [1] + [0] * (size - 1)
    for i in range(1, n + 1):
        poly = [c + (poly[j - i] if j >= i else 0) for j, c in enumerate(poly)]
    return poly


def _two_sided_from_counts(counts: list[int], observed: float) -> float:
    """2 * min(P(T <= t), P(T >= t)) under a symmetric null given as integer counts, at most 1."""
    total = sum(counts)
    t = round(observed)
    lower = sum(counts[: t + 1])
    upper = sum(counts[t:])
    return min(1.0, 2 * min(lower, upper) / total)


def _cliffs_delta(x: np.ndarray, y: np.ndarray) -> float:
    """P(x > y) - P(x < y) over all pairs, counted with sorted search (n log n)."""
    ys = np.sort(y)
    greater = np.searchsorted(ys, x, side="left").sum()  # y values strictly below each x
    less = (y.size - np.searchsorted(ys, x, side="right")).sum()  # y values strictly above each x
    return float((greater - less) / (x.size * y.size))


def mann_whitney_u(x: Iterable[float], y: Iterable[float], *, method: str = "auto") -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test for two independent samples, with effect sizes.

    ``method``: "exact" (no ties allowed), "asymptotic" (normal with tie correction and continuity
    correction), or "auto": exact when there are no ties and both samples have at most 50 values.
    """
    xs, ys = _vector(x, "first sample"), _vector(y, "second sample")
    m, n = xs.size, ys.size
    ranks, ties = _rankdata(np.concatenate([xs, ys]))
    u1 = float(ranks[:m].sum() - m * (m + 1) / 2)
    has_ties = bool(np.any(ties > 1))
    if method == "auto":
        method = "exact" if not has_ties and max(m, n) <= 50 else "asymptotic"
    if method == "exact":
        if has_ties:
            raise StepscopeError("the exact Mann-Whitney test needs samples without ties; use method='asymptotic'")
        p = _two_sided_from_counts(_mwu_null_counts(m, n), u1)
    elif method == "asymptotic":
        total = m + n
        tie_term = float(np.sum(ties.astype(float) ** 3 - ties)) / (total * (total - 1)) if total > 1 else 0.0
        sigma = math.sqrt(m * n / 12.0 * ((total + 1) - tie_term))
        u_big = max(u1, m * n - u1)
        p = 1.0 if sigma == 0 else min(1.0, 2 * _normal_sf((u_big - m * n / 2.0 - 0.5) / sigma))
    else:
        raise StepscopeError(f"unknown method {method!r}; use 'auto', 'exact' or 'asymptotic'")
    rank_biserial = 2 * u1 / (m * n) - 1
    return MannWhitneyResult(u1, float(p), float(rank_biserial), _cliffs_delta(xs, ys), method, m, n)


def wilcoxon_signed_rank(d: Iterable[float], *, method: str = "auto", correction: bool = False) -> TestResult:
    """Two-sided Wilcoxon signed-rank test on paired differences (zeros dropped).

    The statistic is min(W+, W-). ``method``: "exact" (no ties among |d|), "asymptotic" (normal with tie
    correction; ``correction`` adds a continuity correction), or "auto": exact when no ties and n <= 50.
    """
    array = _vector(d, "differences")
    nonzero = array[array != 0]
    n = int(nonzero.size)
    if n == 0:
        return TestResult(0.0, 1.0, 0, "no non-zero differences")
    ranks, ties = _rankdata(np.abs(nonzero))
    w_plus = float(ranks[nonzero > 0].sum())
    w_minus = n * (n + 1) / 2 - w_plus
    statistic = min(w_plus, w_minus)
    has_ties = bool(np.any(ties > 1))
    if method == "auto":
        method = "exact" if not has_ties and n <= 50 else "asymptotic"
    if method == "exact":
        if has_ties:
            raise StepscopeError("the exact Wilcoxon test needs |differences| without ties; use method='asymptotic'")
        p = _two_sided_from_counts(_wilcoxon_null_counts(n), w_plus)
    elif method == "asymptotic":
        mean = n * (n + 1) / 4.0
        var = n * (n + 1) * (2 * n + 1) / 24.0 - float(np.sum(ties.astype(float) ** 3 - ties)) / 48.0
        shift = 0.5 if correction else 0.0
        z = (abs(w_plus - mean) - shift) / math.sqrt(var) if var > 0 else 0.0
        p = min(1.0, 2 * _normal_sf(max(z, 0.0)))
    else:
        raise StepscopeError(f"unknown method {method!r}; use 'auto', 'exact' or 'asymptotic'")
    return TestResult(statistic, float(p), n, method)


# --- power ------------------------------------------------------------------------------------------------------


def _check_power_args(p_discordant: float, delta: float, alpha: float, power: float) -> None:
    _check_alpha(alpha)
    if not 0 < power < 1:
        raise StepscopeError(f"power must lie between 0 and 1, got {power}")
    if not 0 < abs(delta) <= 1:
        raise StepscopeError(f"the accuracy change to detect must be non-zero and at most 1, got {delta}")
    if not abs(delta) <= p_discordant <= 1:
        raise StepscopeError(
            f"a change of {abs(delta):.3g} needs at least that share of discordant problems (got "
            f"{p_discordant:.3g}); discordance must lie between |delta| and 1"
        )


def paired_power_mcnemar(p_discordant: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Problems needed for a two-sided McNemar test to detect a paired accuracy change ``delta``.

    Connor's (1987) normal-approximation sample size, with psi the share of discordant problems (right in
    one run, wrong in the other) and delta = p10 - p01 the change in accuracy:

        n = ( z_{1-alpha/2} * sqrt(psi) + z_{power} * sqrt(psi - delta^2) )^2 / delta^2,

    rounded up. Use :func:`paired_power_explanation` for a sentence to print beside it.
    """
    _check_power_args(p_discordant, delta, alpha, power)
    z_alpha, z_beta = normal_ppf(1 - alpha / 2), normal_ppf(power)
    root = z_alpha * math.sqrt(p_discordant) + z_beta * math.sqrt(max(p_discordant - delta**2, 0.0))
    return math.ceil(root**2 / delta**2 - 1e-9)


def paired_power_explanation(p_discordant: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> str:
    """One plain sentence explaining :func:`paired_power_mcnemar`'s number, for a results page."""
    n = paired_power_mcnemar(p_discordant, delta, alpha, power)
    return (
        f"To detect a paired accuracy change of {abs(delta) * 100:.1f} points with {power:.0%} power "
        f"(two-sided McNemar test, alpha = {alpha:g}), given that {p_discordant:.1%} of problems flip between "
        f"the two runs, about {n} problems are needed (Connor 1987 sample-size formula)."
    )


def mde_mcnemar(n: int, p_discordant: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest paired accuracy change that ``n`` problems detect at this discordance (inverse of Connor's formula).

    None when even a change equal to the whole discordance needs more than ``n`` problems (nothing detectable).
    """
    if n < 1 or not 0 < p_discordant <= 1:
        return None
    if paired_power_mcnemar(p_discordant, p_discordant, alpha, power) > n:
        return None
    lo, hi = 1e-6, p_discordant  # the required n falls as delta grows, so bisect on delta
    for _ in range(60):
        mid = (lo + hi) / 2
        if paired_power_mcnemar(p_discordant, mid, alpha, power) <= n:
            hi = mid
        else:
            lo = mid
    return float(hi)


# --- permutation tests, multiple testing, detectable effects -----------------------------------------------------
#
# Two-sided p-values count resampled statistics at least as extreme as the observed one in absolute value, with
# a small relative tolerance so that ties (equal values in the data give equal permuted statistics) are counted as
# extreme, as an exact test must. Small samples are enumerated completely; beyond ``exact_limit`` arrangements a
# Monte Carlo p-value (1 + hits) / (1 + resamples) is used, which is itself a valid p-value.


@dataclass(frozen=True)
class PermutationResult:
    """A resampling test: the observed statistic, its two-sided p-value and the null's standard deviation.

    ``null_sd`` is the spread of the statistic under the null: the standard error used for the minimum
    detectable effect (:func:`mde`).
    """

    statistic: float
    p_value: float
    n: int
    method: str
    null_sd: float
    resamples: int


def _at_least_as_extreme(null: np.ndarray, observed: float) -> np.ndarray:
    tol = 1e-9 * max(1.0, abs(observed))
    return np.abs(null) >= abs(observed) - tol


def permutation_test(x: Iterable[float], y: Iterable[float], *, n_resamples: int = 9999, exact_limit: int = 50000,
                     seed: int = 0) -> PermutationResult:
    """Two-sample permutation test of the difference in means ``mean(x) - mean(y)`` (two-sided).

    Exact (every split of the pooled values into groups of the observed sizes) when there are at most
    ``exact_limit`` splits; otherwise Monte Carlo with the +1 correction.
    """
    xs, ys = _vector(x, "first sample"), _vector(y, "second sample")
    z = np.concatenate([xs, ys])
    m, n = xs.size, z.size
    total = z.sum()
    observed = float(xs.mean() - ys.mean())
    if n - m == 0:
        raise StepscopeError("the second sample is empty")
    splits = math.comb(n, m)
    if splits <= exact_limit:
        idx = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), m)), dtype=np.int64,
                          count=splits * m).reshape(splits, m)
        sx = z[idx].sum(axis=1)
        null = sx / m - (total - sx) / (n - m)
        hits = int(_at_least_as_extreme(null, observed).sum())
        return PermutationResult(observed, hits / splits, n, f"exact permutation ({splits} splits)",
                                 float(null.std()), splits)
    rng = np.random.default_rng(seed)
    hits, sq, count = 0, 0.0, 0
    for start in range(0, n_resamples, 2048):
        b = min(2048, n_resamples - start)
        perm = np.argsort(rng.random((b, n)), axis=1)[:, :m]
        sx = z[perm].sum(axis=1)
        null = sx / m - (total - sx) / (n - m)
        hits += int(_at_least_as_extreme(null, observed).sum())
        sq += float((null**2).sum())
        count += b
    return PermutationResult(observed, (1 + hits) / (1 + count), n,
                             f"Monte Carlo permutation ({count} resamples, +1 correction)",
                             math.sqrt(sq / count), count)


def sign_flip_test(d: Iterable[float], *, n_resamples: int = 9999, exact_max_n: int = 20,
                   seed: int = 0) -> PermutationResult:
    """Paired (one-sample) sign-flip permutation test of ``mean(d) = 0``, two-sided.

    Exact over all 2^n sign patterns when n <= ``exact_max_n``; otherwise Monte Carlo with the +1 correction. Zero
    differences stay in (flipping them changes nothing), so n counts every pair.
    """
    array = _vector(d, "differences")
    n = array.size
    observed = float(array.mean())
    if n <= exact_max_n:
        bits = np.arange(n, dtype=np.int64)
        hits, sq, total = 0, 0.0, 2**n
        for start in range(0, total, 2**16):
            codes = np.arange(start, min(start + 2**16, total), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            null = signs @ array / n
            hits += int(_at_least_as_extreme(null, observed).sum())
            sq += float((null**2).sum())
        return PermutationResult(observed, hits / total, n, f"exact sign-flip ({total} patterns)",
                                 math.sqrt(sq / total), total)
    rng = np.random.default_rng(seed)
    hits, sq, count = 0, 0.0, 0
    for start in range(0, n_resamples, 4096):
        b = min(4096, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(b, n))
        null = signs @ array / n
        hits += int(_at_least_as_extreme(null, observed).sum())
        sq += float((null**2).sum())
        count += b
    return PermutationResult(observed, (1 + hits) / (1 + count), n,
                             f"Monte Carlo sign-flip ({count} resamples, +1 correction)", math.sqrt(sq / count), count)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) in the input order; None entries are not tests."""
    tested = [(i, float(p)) for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (i, p) in enumerate(sorted(tested, key=lambda ip: ip[1])):  # stable: ties keep the input order
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def mde(standard_error: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided test: (z_{1-alpha/2} + z_power) x the statistic's standard error."""
    _check_alpha(alpha)
    return float((normal_ppf(1 - alpha / 2) + normal_ppf(power)) * standard_error)


# --- clustered resampling -------------------------------------------------------------------------------------------


def cluster_codes(clusters: Sequence | np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes 0..k-1 of cluster labels (compared as strings) and the number of clusters k."""
    _, codes = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1 if len(codes) else 0


def cluster_weights(clusters: Sequence | np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) observation weights of a cluster bootstrap: each resample draws clusters with replacement and an
    observation weighs as often as its cluster was drawn."""
    if n_boot < 1:
        raise StepscopeError(f"n_boot must be at least 1, got {n_boot}")
    codes, c = cluster_codes(clusters)
    if c == 0:
        raise StepscopeError("no observations to resample")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, c, size=(n_boot, c)) + (np.arange(n_boot) * c)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_boot * c).reshape(n_boot, c)  # times each cluster was drawn
    return counts[:, codes].astype(float)


def cluster_bootstrap_ci(values: Iterable[float], clusters: Sequence | np.ndarray, *, n_boot: int = 2000,
                         alpha: float = 0.05, seed: int = 0) -> ConfidenceInterval:
    """Percentile interval of the mean, resampling whole clusters (problems): samples of one problem move together."""
    _check_alpha(alpha)
    array = _vector(values, "values")
    if len(clusters) != array.size:
        raise StepscopeError("one cluster label per value is needed")
    w = cluster_weights(clusters, n_boot, seed)
    means = (w @ array) / w.sum(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(float(array.mean()), float(low), float(high), 1 - alpha, int(array.size))


def cluster_bootstrap_band(matrix: np.ndarray, clusters: Sequence | np.ndarray, *, n_boot: int = 2000,
                           alpha: float = 0.05, seed: int = 0) -> Band:
    """Pointwise band of the column-wise mean (one row per trace), resampling whole clusters."""
    _check_alpha(alpha)
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape[0] == 0 or not np.all(np.isfinite(array)):
        raise StepscopeError("cluster_bootstrap_band needs a finite, non-empty rows x points matrix")
    w = cluster_weights(clusters, n_boot, seed)
    means = (w @ array) / w.sum(axis=1, keepdims=True)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return Band(array.mean(axis=0), low, high, 1 - alpha, int(array.shape[0]), means)


def cluster_bootstrap_diff(values: np.ndarray, in_first: np.ndarray, clusters: Sequence | np.ndarray, *,
                           n_boot: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Difference of group means (first - second), observed and per cluster-bootstrap resample.

    ``values``: (n,) or (n, L). Resamples in which a group draws no observation are dropped (returned as NaN rows
    removed). Returns (observed, resampled) with shapes (...) and (B', ...).
    """
    v = np.asarray(values, dtype=float)
    v2 = v.reshape(v.shape[0], -1)
    g = np.asarray(in_first, dtype=bool)
    w = cluster_weights(clusters, n_boot, seed)
    wa, wb = w * g, w * ~g
    na, nb = wa.sum(1, keepdims=True), wb.sum(1, keepdims=True)
    ok = (na[:, 0] > 0) & (nb[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (wa @ v2) / na - (wb @ v2) / nb
    observed = v2[g].mean(0) - v2[~g].mean(0)
    shape = v.shape[1:]
    return observed.reshape(shape), diff[ok].reshape((-1,) + shape)


def bootstrap_p_value(observed: float, resampled: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``estimate = 0`` from the resampled estimates, by the null-centred
    distribution (Hall and Wilson 1991): share of |resampled - observed| >= |observed|, with the +1 correction."""
    r = np.asarray(resampled, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return 1.0
    hits = int(_at_least_as_extreme(r - observed, observed).sum())
    return (1 + hits) / (1 + r.size)


# --- length-adjusted comparisons: regression with covariates, permutation p -------------------------------------------


@dataclass(frozen=True)
class AdjustedResult:
    """The group coefficient of ``y ~ group + covariates`` with a resampling p-value and interval.

    ``estimate``: the covariate-adjusted difference (first group minus second). ``null_sd``: its spread under the
    null (the standard error for the minimum detectable effect); ``low``/``high``: 95% interval when computed.
    """

    estimate: float
    p_value: float
    n: int
    method: str
    null_sd: float
    covariates: int
    low: float | None = None
    high: float | None = None


def demean_within(a: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """``a`` minus its mean within each cluster (the fixed-effects transformation)."""
    sums = np.zeros((k,) + a.shape[1:])
    np.add.at(sums, codes, a)
    counts = np.bincount(codes, minlength=k).astype(float)
    return a - (sums / counts.reshape((-1,) + (1,) * (a.ndim - 1)))[codes]


def _rank(a: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(a)) if a.size else 0


def freedman_lane(y: Iterable[float], group: Iterable[bool], covariates: np.ndarray, *, absorb: Sequence | None = None,
                  n_resamples: int = 4999, seed: int = 0) -> AdjustedResult | None:
    """Permutation test of the group coefficient in ``y ~ group + covariates`` (Freedman and Lane 1983).

    The covariates' fit (the model without the group) is removed; its residuals are permuted and added back, and
    the group coefficient is refitted; the design, and so the link between group and covariates (wrong traces are
    longer), stays fixed, which keeps the test's level where permuting group labels would not. ``absorb``: cluster
    labels (problems) whose means are removed first (fixed effects) and within which residuals are permuted; this
    is the within-problem version. ``covariates`` should hold an intercept column when ``absorb`` is None.
    Returns None when the group is not identifiable beside the covariates (collinear, or too few observations).
    Monte Carlo p with the +1 correction.
    """
    yv = _vector(y, "scores")
    g = np.asarray(list(group) if not isinstance(group, np.ndarray) else group, dtype=float).ravel()
    Z = np.asarray(covariates, dtype=float).reshape(yv.size, -1)
    if g.size != yv.size:
        raise StepscopeError("one group label per score is needed")
    if absorb is not None:
        codes, k = cluster_codes(absorb)
        yv, g, Z = demean_within(yv, codes, k), demean_within(g, codes, k), demean_within(Z, codes, k)
    else:
        codes, k = np.zeros(yv.size, dtype=np.int64), 1
    X = np.column_stack([g, Z])
    rank_z = _rank(Z)
    # at least a few residual degrees of freedom, or the permutation distribution is degenerate
    if _rank(X) != rank_z + 1 or yv.size - (rank_z + 1) - (k - 1 if absorb is not None else 0) < 3:
        return None
    h = np.linalg.pinv(X)[0]
    fitted = Z @ (np.linalg.pinv(Z) @ yv) if Z.shape[1] else np.zeros_like(yv)
    r = yv - fitted
    observed = float(h @ yv)
    rng = np.random.default_rng(seed)
    base = np.argsort(codes, kind="stable")
    hits, sq, count = 0, 0.0, 0
    for start in range(0, n_resamples, 1024):
        b = min(1024, n_resamples - start)
        # rows sorted by cluster, random order inside each cluster: a within-cluster permutation per row
        order = np.argsort(codes[None, :] + rng.random((b, yv.size)), axis=1)
        perm = np.empty_like(order)
        perm[:, base] = order
        null = r[perm] @ h
        hits += int(_at_least_as_extreme(null, observed).sum())
        sq += float((null**2).sum())
        count += b
    where = "within clusters" if absorb is not None else "across observations"
    return AdjustedResult(observed, (1 + hits) / (1 + count), int(yv.size),
                          f"Freedman-Lane permutation {where} ({count} resamples, +1 correction)",
                          math.sqrt(sq / count), int(rank_z))


def cluster_bootstrap_coef(y: np.ndarray, X: np.ndarray, clusters: Sequence | np.ndarray, *, column: int = 0,
                           n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient ``column`` of least squares ``y ~ X``, observed and per cluster-bootstrap resample.

    ``y``: (n,) or (n, L) (several outcomes share the design: per-layer curves). Weighted least squares with the
    cluster-bootstrap weights; a tiny ridge keeps resamples that lose a covariate level usable, and resamples in
    which the coefficient itself is not identified are dropped (so fewer than ``n_boot`` may come back).
    """
    yv = np.asarray(y, dtype=float)
    y2 = yv.reshape(yv.shape[0], -1)
    Xv = np.asarray(X, dtype=float)
    observed = (np.linalg.pinv(Xv) @ y2)[column]
    w = cluster_weights(clusters, n_boot, seed)  # (B, n)
    n, p = Xv.shape
    xtwx = (w @ (Xv[:, :, None] * Xv[:, None, :]).reshape(n, p * p)).reshape(n_boot, p, p)
    xtwy = (w @ (Xv[:, :, None] * y2[:, None, :]).reshape(n, -1)).reshape(n_boot, p, y2.shape[1])
    # a tiny ridge keeps resamples that lost a covariate level solvable (that column's coefficient goes to 0)
    ridge = 1e-9 * np.trace(xtwx, axis1=1, axis2=2)[:, None, None] / p * np.eye(p)
    coef = np.linalg.solve(xtwx + ridge, xtwy)  # (B, p, L)
    # Drop resamples in which the coefficient is not identified (its column is, up to rounding, a combination of the
    # others there, e.g. only one outcome drawn within the problems that remain): the ridge would set it arbitrarily.
    inv_diag = np.linalg.inv(xtwx + ridge)[:, column, column]
    partial = 1.0 / np.maximum(inv_diag, 1e-300)  # weighted variance of the column left after the others
    keep = partial > 1e-6 * np.maximum(xtwx[:, column, column], 1e-300)
    shape = yv.shape[1:]
    return observed.reshape(shape), coef[keep][:, column, :].reshape((-1,) + shape)
