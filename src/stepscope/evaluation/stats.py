"""Statistics for benchmark results: pass@k, bootstrap intervals, paired tests, rank tests, power.

Pure numpy and the standard library, so results pages need no scipy; the tests check every function
against scipy where scipy has the same test, and against hand-computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import StepscopeError

__all__ = [
    "Band",
    "ConfidenceInterval",
    "MannWhitneyResult",
    "TestResult",
    "bootstrap_band",
    "bootstrap_ci",
    "mann_whitney_u",
    "mcnemar_exact",
    "mean_pass_at_k",
    "normal_ppf",
    "paired_bootstrap_ci",
    "paired_power_explanation",
    "paired_power_mcnemar",
    "pass_at_k",
    "sign_test",
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


def bootstrap_ci(values: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0) -> ConfidenceInterval:
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
        raise StepscopeError(f"paired scores differ in length ({x.size} vs {y.size}); use the same problems in both runs")
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
    return Band(array.mean(axis=0), low, high, 1 - alpha, int(array.shape[0]))


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
    t = int(round(observed))
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
    return int(math.ceil(root**2 / delta**2 - 1e-9))


def paired_power_explanation(p_discordant: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> str:
    """One plain sentence explaining :func:`paired_power_mcnemar`'s number, for a results page."""
    n = paired_power_mcnemar(p_discordant, delta, alpha, power)
    return (
        f"To detect a paired accuracy change of {abs(delta) * 100:.1f} points with {power:.0%} power "
        f"(two-sided McNemar test, alpha = {alpha:g}), given that {p_discordant:.1%} of problems flip between "
        f"the two runs, about {n} problems are needed (Connor 1987 sample-size formula)."
    )
