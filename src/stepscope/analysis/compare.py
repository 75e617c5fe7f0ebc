"""Correct vs wrong traces: band scores and per-layer curves, raw and length-adjusted, pooled and within-problem.

For every band score the comparison reports four tests of ``wrong - correct`` side by side:

* **paired (within-problem), raw**: problems that have both correct and wrong samples; per problem the mean over
  its wrong samples minus the mean over its correct ones; sign-flip permutation test over problems (exact up to
  20 problems), bootstrap interval over problems. The headline: problem difficulty and content cancel.
* **paired, length-adjusted**: the wrong-indicator's coefficient in ``score ~ wrong + length covariates`` with
  problem fixed effects, Freedman-Lane permutation of the covariate model's residuals within problems.
* **pooled, raw**: all traces. One trace per problem: two-sample permutation test (exact when small), rank-biserial
  effect. Several per problem: problem-clustered bootstrap interval and p-value.
* **pooled, length-adjusted**: the same coefficient without fixed effects; Freedman-Lane permutation across
  traces (one per problem) or the problem-clustered bootstrap (several per problem).

Holm's correction runs over the band scores of one report, separately for each of the four columns. Where a test
does not reject, the minimum detectable effect at the observed variance is given instead of a power statement.
The covariates are described in :func:`~stepscope.analysis.scores.length_design`; the choice is documented in
docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StepscopeError
from ..evaluation import stats
from ..saliency.metrics import SHARE_METRICS, uniform_null_shares
from ..saliency.result import StepSaliency
from .scores import (
    BY_NAME,
    CURVE_METRICS,
    LENGTHS,
    SCORE_NAMES,
    SCORES,
    layer_values,
    length_design,
    lengths,
    score_values,
)

COARSE_BINS = 4  # thinking steps pooled into this many bins by relative position, for maps across traces
COLUMNS = ("paired_raw", "paired_adjusted", "pooled_raw", "pooled_adjusted")
# which test reads a score, in order of preference: within problems before pooled, adjusted before raw
PREFERENCE = ("paired_adjusted", "paired_raw", "pooled_adjusted", "pooled_raw")
MAX_POSITIONS = 8
# Fewer problems than this cannot carry the fixed-effects fit and a bootstrap over problems.
MIN_PROBLEMS_ADJUSTED = 5
HOLM_FAMILY = ("Holm's correction over the {k} band scores of this table (raw and net-of-null versions together), "
               "separately for each test column: {cols}.")


@dataclass(frozen=True, eq=False)
class AnalysedTrace:
    """One graded trace and its Step-Saliency; ``shuffled``: (R, K) band scores under shuffled step boundaries."""

    problem_id: str
    sample: int
    correct: bool
    saliency: StepSaliency
    condition: str = "baseline"
    shuffled: np.ndarray | None = None
    gold: dict | None = None  # the failing-step locator's result (organism traces), see .failing


@dataclass(frozen=True)
class TestColumn:
    """One test of ``wrong - correct``: the estimate with its 95% interval, p (and Holm p), the minimum detectable
    effect (80% power, two-sided 5%) of the test alone and at the family-wise level Holm's correction holds it to
    (``mde_family``: two-sided 5% / m for a family of m tests, Holm's strictest step), how many units (traces or
    problems) it used."""

    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    mde: float | None = None
    n: int = 0
    method: str = ""
    effect: dict = field(default_factory=dict)
    note: str = ""
    mde_family: float | None = None

    @property
    def available(self) -> bool:
        return self.p_value is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScoreComparison:
    name: str
    meaning: str
    net: bool
    correct: stats.ConfidenceInterval | None
    wrong: stats.ConfidenceInterval | None
    tests: dict[str, TestColumn]
    control: dict | None = None  # shuffled-boundary control
    verdict: str = ""

    def to_dict(self) -> dict:
        def ci(c):
            return None if c is None else {"mean": c.estimate, "low": c.low, "high": c.high, "n": c.n}

        return {"name": self.name, "meaning": self.meaning, "net_of_uniform_null": self.net,
                "correct": ci(self.correct),
                "wrong": ci(self.wrong), "tests": {k: v.to_dict() for k, v in self.tests.items()},
                "shuffled_boundary_control": self.control, "verdict": self.verdict}


@dataclass(frozen=True, eq=False)
class GroupComparison:
    """Everything the correct-vs-wrong comparison reports for one model."""

    model: str
    condition: str
    num_layers: int
    n_correct: int
    n_wrong: int
    shallow: list[int]
    deep: list[int]
    pairing: dict
    lengths: dict
    scores: list[ScoreComparison]
    curves: dict[str, dict]
    positions: dict
    coarse: dict[str, dict[str, np.ndarray]]
    coarse_labels: list[str]
    headline: str
    holm_family: str
    adjustment: str

    def score(self, name: str) -> ScoreComparison:
        return next(s for s in self.scores if s.name == name)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "condition": self.condition, "num_layers": self.num_layers,
            "n_correct": self.n_correct, "n_wrong": self.n_wrong, "bands": {"shallow": self.shallow, "deep": self.deep},
            "pairing": self.pairing, "lengths": self.lengths, "headline_test": self.headline,
            "holm_family": self.holm_family, "length_adjustment": self.adjustment,
            "scores": [s.to_dict() for s in self.scores], "curves": self.curves, "step_positions": self.positions,
            "coarse_labels": self.coarse_labels,
            "coarse_maps": {g: {k: _nan_none(v) for k, v in m.items()} for g, m in self.coarse.items()},
        }


ADJUSTMENT = ("Length adjustment: least squares of the score on the wrong indicator and covariates (a cubic in log "
              "thinking tokens, a quadratic in log summary tokens, log question tokens, indicators of the thinking-"
              "step count 1..5/6+ and summary-step count 0..2/3+; with fewer than four traces per covariate: log "
              "thinking and summary tokens and both step counts as numbers). p from the Freedman-Lane permutation "
              "(residuals of the covariate-only model permuted, within problems for the paired version) or, where "
              "samples of one problem are pooled, from the problem-clustered bootstrap.")


def _nan_none(a: np.ndarray) -> list:
    """Nested lists (any shape) with None for NaN: JSON has no NaN."""
    arr = np.asarray(a, dtype=float)
    out = arr.astype(object)
    out[np.isnan(arr)] = None
    return out.tolist()


def _ci(values: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> stats.ConfidenceInterval | None:
    if values.size == 0:
        return None
    if len(set(clusters)) == len(clusters):
        return stats.bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return stats.cluster_bootstrap_ci(values, clusters, n_boot=n_boot, seed=seed)


def _quantiles(boot: np.ndarray) -> tuple[float | None, float | None]:
    boot = boot[np.isfinite(boot)]
    if boot.size < 2:
        return None, None
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(lo), float(hi)


def _design(rows: list[dict], intercept: bool, null: np.ndarray | None = None) -> np.ndarray:
    """Length covariates (full, or minimal for small groups) plus, for share scores, the trace's uniform-null share:
    the value its own token counts give, which carries the step structure the counts alone miss."""
    full = length_design(rows, intercept=intercept)
    if len(rows) < 4 * max(full.shape[1] + 1, 1):
        full = length_design(rows, intercept=intercept, minimal=True)
    if null is not None and np.all(np.isfinite(null)) and np.ptp(null) > 0:
        full = np.column_stack([full, (null - null.mean()) / null.std()])
    return full


def pooled_raw(y, wrong, clusters, *, n_boot=2000, n_perm=9999, seed=0) -> TestColumn:
    n_w, n_c = int(wrong.sum()), int((~wrong).sum())
    if n_w < 2 or n_c < 2:
        return TestColumn(n=len(y), note=f"too few traces with this score to test ({n_c} correct, {n_w} wrong)")
    rb = stats.mann_whitney_u(y[wrong], y[~wrong]).rank_biserial
    if len(set(clusters)) == len(clusters):
        t = stats.permutation_test(y[wrong], y[~wrong], n_resamples=n_perm, seed=seed)
        _, boot = stats.cluster_bootstrap_diff(y, wrong, np.arange(len(y)), n_boot=n_boot, seed=seed)
        lo, hi = _quantiles(boot)
        return TestColumn(t.statistic, lo, hi, t.p_value, None, stats.mde(t.null_sd), len(y), t.method,
                          {"rank_biserial": rb})
    obs, boot = stats.cluster_bootstrap_diff(y, wrong, clusters, n_boot=n_boot, seed=seed)
    lo, hi = _quantiles(boot)
    return TestColumn(float(obs), lo, hi, stats.bootstrap_p_value(float(obs), boot), None,
                      stats.mde(float(np.std(boot))), len(y),
                      f"problem-clustered bootstrap ({boot.shape[0]} resamples; null-centred p)", {"rank_biserial": rb})


def pooled_adjusted(y, wrong, rows, clusters, *, null=None, n_boot=1000, n_perm=4999, seed=0) -> TestColumn:
    n_w, n_c = int(wrong.sum()), int((~wrong).sum())
    if n_w < 2 or n_c < 2:
        return TestColumn(n=len(y), note="too few traces with this score to test")
    Z = _design(rows, intercept=True, null=null)
    X = np.column_stack([wrong.astype(float), Z])
    singletons = len(set(clusters)) == len(clusters)
    fl = stats.freedman_lane(y, wrong, Z, n_resamples=n_perm, seed=seed)
    if fl is None:
        return TestColumn(n=len(y), note="the groups cannot be separated from the length covariates (too few traces "
                          "or no overlap in length)")
    obs, boot = stats.cluster_bootstrap_coef(y, X, np.arange(len(y)) if singletons else clusters, n_boot=n_boot,
                                             seed=seed)
    lo, hi = _quantiles(boot)
    covs = f"{Z.shape[1] - 1} covariates"
    if singletons:
        return TestColumn(fl.estimate, lo, hi, fl.p_value, None, stats.mde(fl.null_sd), len(y),
                          f"{fl.method}; {covs}")
    return TestColumn(float(obs), lo, hi, stats.bootstrap_p_value(float(obs), boot), None,
                      stats.mde(float(np.std(boot))), len(y),
                      f"problem-clustered bootstrap of the adjusted coefficient ({n_boot} resamples); {covs}")


def _problem_differences(y, wrong, clusters) -> tuple[np.ndarray, list[str]]:
    """Per problem with both outcomes: mean over its wrong samples minus mean over its correct ones."""
    if len(y) == 0:
        return np.zeros(0), []
    labels, codes = np.unique(clusters, return_inverse=True)
    k = len(labels)
    w = np.asarray(wrong, dtype=bool)
    nw, nc = np.bincount(codes[w], minlength=k), np.bincount(codes[~w], minlength=k)
    sw = np.bincount(codes[w], weights=y[w], minlength=k)
    sc = np.bincount(codes[~w], weights=y[~w], minlength=k)
    both = (nw > 0) & (nc > 0)
    return sw[both] / nw[both] - sc[both] / nc[both], [str(x) for x in labels[both]]


def paired_raw(y, wrong, clusters, *, n_boot=2000, n_perm=9999, seed=0) -> TestColumn:
    d, _ = _problem_differences(y, wrong, clusters)
    if d.size < 2:
        return TestColumn(n=int(d.size), note=f"{d.size} problem(s) with both a correct and a wrong sample: too few "
                          "for a paired test (sample several responses per problem)")
    t = stats.sign_flip_test(d, n_resamples=n_perm, seed=seed)
    ci = stats.bootstrap_ci(d, n_boot=n_boot, seed=seed)
    sd = float(d.std(ddof=1))
    return TestColumn(t.statistic, ci.low, ci.high, t.p_value, None, stats.mde(t.null_sd), int(d.size), t.method,
                      {"dz": t.statistic / sd if sd > 0 else None, "share_positive": float((d > 0).mean())})


def paired_adjusted(y, wrong, rows, clusters, *, null=None, n_boot=1000, n_perm=4999, seed=0) -> TestColumn:
    _, ids = _problem_differences(y, wrong, clusters)
    if len(ids) < MIN_PROBLEMS_ADJUSTED:
        return TestColumn(n=len(ids), note=f"{len(ids)} problem(s) with both outcomes; the adjusted paired test needs "
                          f"at least {MIN_PROBLEMS_ADJUSTED}")
    keep = np.isin(clusters, ids)
    y, wrong, cl = y[keep], wrong[keep], clusters[keep]
    rows = [r for r, k in zip(rows, keep) if k]
    Z = _design(rows, intercept=False, null=None if null is None else null[keep])
    fl = stats.freedman_lane(y, wrong, Z, absorb=cl, n_resamples=n_perm, seed=seed)
    if fl is None:
        return TestColumn(n=len(ids), note="within problems, wrong and correct samples cannot be separated from the "
                          "length covariates (too few samples)")
    codes, k = stats.cluster_codes(cl)
    yw, gw = stats.demean_within(y, codes, k), stats.demean_within(wrong.astype(float), codes, k)
    Zw = stats.demean_within(Z, codes, k)
    _, boot = stats.cluster_bootstrap_coef(yw, np.column_stack([gw, Zw]), cl, n_boot=n_boot, seed=seed)
    lo, hi = _quantiles(boot)
    return TestColumn(fl.estimate, lo, hi, fl.p_value, None, stats.mde(fl.null_sd), len(ids),
                      f"{fl.method}, problem fixed effects; {Z.shape[1]} covariates", {"traces": int(keep.sum())})


def _score_table(traces: list[AnalysedTrace]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(n, K) band scores, (n, K) the uniform-null share of each share score's metric (NaN for block scores), and
    each trace's lengths."""
    table = np.array([[np.nan if v is None else v for v in score_values(t.saliency).values()] for t in traces])
    nulls = []
    for t in traces:
        null = uniform_null_shares(t.saliency.counts, t.saliency.steps)
        nulls.append([np.nan if null.get(s.metric) is None else null[s.metric] for s in SCORES])
    K = len(SCORE_NAMES)
    return table.reshape(len(traces), K), np.array(nulls).reshape(len(traces), K), [lengths(t.saliency) for t in traces]


def compare_groups(traces: list[AnalysedTrace], model: str = "", *, n_boot: int = 2000, n_perm: int = 4999,
                   seed: int = 0) -> GroupComparison:
    """Compare correct and wrong traces of one model (all must share the model's depth)."""
    if not traces:
        raise StepscopeError("no analysed traces to compare")
    depths = {t.saliency.num_layers for t in traces}
    if len(depths) != 1:
        raise StepscopeError(f"traces of one model must share a depth; got {sorted(depths)} layers")
    wrong_all = np.array([not t.correct for t in traces])
    if wrong_all.all() or not wrong_all.any():
        which = "wrong" if wrong_all.all() else "correct"
        raise StepscopeError(
            f"all {len(traces)} traces of {model or 'the model'} are {which}: correct vs wrong cannot be compared. "
            "Use more problems (--limit), more samples per problem (--n with --temperature > 0), or a task where "
            "the model sometimes fails and sometimes succeeds")
    clusters_all = np.array([str(t.problem_id) for t in traces])
    table, nulls, rows_all = _score_table(traces)
    scores = []
    for k, name in enumerate(SCORE_NAMES):
        s = BY_NAME[name]
        ok = np.isfinite(table[:, k])
        y, wrong, cl = table[ok, k], wrong_all[ok], clusters_all[ok]
        null = nulls[ok, k] if np.isfinite(nulls[ok, k]).all() else None
        rows = [r for r, keep in zip(rows_all, ok) if keep]
        nb = max(200, n_boot // 2)
        tests = {
            "paired_raw": paired_raw(y, wrong, cl, n_boot=n_boot, n_perm=n_perm, seed=seed),
            "paired_adjusted": paired_adjusted(y, wrong, rows, cl, null=null, n_boot=nb, n_perm=n_perm, seed=seed),
            "pooled_raw": pooled_raw(y, wrong, cl, n_boot=n_boot, n_perm=n_perm, seed=seed),
            "pooled_adjusted": pooled_adjusted(y, wrong, rows, cl, null=null, n_boot=nb, n_perm=n_perm, seed=seed),
        }
        scores.append(ScoreComparison(name, s.meaning, s.net, _ci(y[~wrong], cl[~wrong], n_boot, seed),
                                      _ci(y[wrong], cl[wrong], n_boot, seed), tests))
    scores = _holm(scores)
    headline = next((c for c in PREFERENCE if any(s.tests[c].available for s in scores)), PREFERENCE[0])
    shuffled = _shuffled_tables(traces)
    scores = [dataclasses.replace(s, control=_control(s, k, table, nulls, shuffled, wrong_all, clusters_all,
                                                      rows_all)) for k, s in enumerate(scores)]
    scores = [dataclasses.replace(s, verdict=verdict(s, headline)) for s in scores]
    first = traces[0].saliency
    correct, wrong = [t for t in traces if t.correct], [t for t in traces if not t.correct]
    return GroupComparison(
        model, traces[0].condition, first.num_layers, len(correct), len(wrong), list(first.bands.shallow),
        list(first.bands.deep), pairing_summary(traces),
        length_summary(rows_all, wrong_all, clusters_all, seed,
                       np.array([t.saliency.meta.get("loss", np.nan) for t in traces], dtype=float)),
        scores, curves(traces, n_boot=n_boot, seed=seed), position_curves(traces, n_boot=n_boot, seed=seed),
        {"correct": _coarse_maps([t.saliency for t in correct]), "wrong": _coarse_maps([t.saliency for t in wrong])},
        coarse_labels(), headline, HOLM_FAMILY.format(k=len(SCORES), cols=", ".join(COLUMNS)), ADJUSTMENT)


def _holm(scores: list[ScoreComparison]) -> list[ScoreComparison]:
    for col in COLUMNS:
        adjusted = stats.holm([s.tests[col].p_value for s in scores])
        m = sum(s.tests[col].available for s in scores)
        # a "not detected" is read against the corrected p, so its detectable effect is that of the strictest level
        scale = family_mde_scale(m)
        scores = [dataclasses.replace(s, tests={**s.tests, col: _with_holm(s.tests[col], a, scale)})
                  for s, a in zip(scores, adjusted)]
    return scores


def _with_holm(t: TestColumn, p_holm: float | None, scale: float) -> TestColumn:
    mde = t.mde
    return dataclasses.replace(t, p_holm=p_holm, mde_family=None if mde is None else mde * scale)


def family_mde_scale(m: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """How much larger the minimum detectable effect is at two-sided ``alpha / m`` than at ``alpha``."""
    z = stats.normal_ppf
    return float((z(1 - alpha / (2 * max(m, 1))) + z(power)) / (z(1 - alpha / 2) + z(power)))


def verdict(s: ScoreComparison, headline: str) -> str:
    """The reading of one score: from the headline test, else the most trustworthy test available for it."""
    col = headline if s.tests[headline].available else next(
        (c for c in PREFERENCE if s.tests[c].available), headline)
    t = s.tests[col]
    label = col.replace("_", ", ")
    if not t.available:
        return f"not testable ({t.note})" if t.note else "not testable"
    if col.endswith("_raw"):
        label += ", not length-adjusted"
    interval = f"[{_f(t.low)}, {_f(t.high)}]" if t.low is not None else ""
    covers_zero = t.low is not None and t.high is not None and t.low <= 0 <= t.high
    if t.p_holm is not None and t.p_holm < 0.05 and covers_zero:
        # the permutation p tests "no difference in any problem"; the interval resamples problems: a difference
        # carried by some problems only passes the first and not the second
        return (f"not established ({label}): wrong - correct = {_f(t.estimate)} {interval}; the test rejects "
                f"(Holm p = {t.p_holm:.2g}) but the problem-resampled interval includes 0, so the difference is "
                "not consistent across problems")
    if t.p_holm is not None and t.p_holm < 0.05:
        text = f"detected ({label}): wrong - correct = {_f(t.estimate)} {interval}, Holm p = {t.p_holm:.2g}"
        ctl = (s.control or {}).get(col)
        if isinstance(ctl, dict):
            text += (f"; on the {ctl['traces']} traces whose boundaries can move, {_f(ctl['real'])} against "
                     f"{_f(ctl['shuffled_mean'])} with shuffled boundaries (p_control = {ctl['p_control']:.2g}): "
                     + ("specific to the real steps" if ctl["exceeds"] else "not specific to the real steps"))
        return text
    mde = t.mde_family if t.mde_family is not None else t.mde
    return (f"not detected ({label}: {_f(t.estimate)} {interval}, Holm p = {t.p_holm:.2g}; smallest detectable "
            f"effect at the corrected level: {_f(mde, sign=False)})")


def _f(x: float | None, sign: bool = True) -> str:
    """Four decimals for shares; significant digits for the block means (of order 1e-5)."""
    if x is None:
        return "n/a"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:+.3g}" if sign else f"{x:.3g}"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def pairing_summary(traces: list[AnalysedTrace]) -> dict:
    by: dict[str, list[bool]] = {}
    for t in traces:
        by.setdefault(str(t.problem_id), []).append(t.correct)
    both = [p for p, v in by.items() if any(v) and not all(v)]
    sizes = np.array([len(v) for v in by.values()])
    return {"problems": len(by), "samples_per_problem": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                                         "max": int(sizes.max())},
            "problems_with_both_outcomes": len(both), "problems_only_correct": sum(all(v) for v in by.values()),
            "problems_only_wrong": sum(not any(v) for v in by.values()),
            "traces_in_paired_problems": int(sum(len(by[p]) for p in both))}


def length_summary(rows: list[dict], wrong: np.ndarray, clusters: np.ndarray, seed: int = 0,
                   loss: np.ndarray | None = None) -> dict:
    """Per group, the distribution of each length (and of the trace's mean next-token loss, which scales the
    unnormalised block means); and the paired and pooled difference (wrong - correct)."""
    out = {}
    columns = {name: np.array([r[name] for r in rows], dtype=float) for name in LENGTHS}
    if loss is not None and np.all(np.isfinite(loss)):
        columns["loss"] = np.asarray(loss, dtype=float)
    for name, v in columns.items():
        entry = {}
        for g, m in (("correct", ~wrong), ("wrong", wrong)):
            x = v[m]
            entry[g] = None if x.size == 0 else {
                "n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
                "q25": float(np.quantile(x, 0.25)), "q75": float(np.quantile(x, 0.75)), "min": float(x.min()),
                "max": float(x.max()), "values": (x.round(4) if name == "loss" else x.astype(int)).tolist()}
        entry["paired_raw"] = paired_raw(v, wrong, clusters, n_boot=1000, seed=seed).to_dict()
        entry["pooled_raw"] = pooled_raw(v, wrong, clusters, n_boot=1000, seed=seed).to_dict()
        out[name] = entry
    return out


# -- the shuffled-boundary control ---------------------------------------------------------------------------------
def _shuffled_tables(traces: list[AnalysedTrace]) -> np.ndarray | None:
    if any(t.shuffled is None for t in traces):
        return None
    tables = [t.shuffled for t in traces if t.shuffled is not None]
    R = min(s.shape[0] for s in tables)
    return None if R == 0 else np.stack([s[:R] for s in tables])  # (n, R, K)


def _paired_mean(y, wrong, clusters) -> float | None:
    d, _ = _problem_differences(y, wrong, clusters)
    return float(d.mean()) if d.size >= 2 else None


def _coef_row(X: np.ndarray, Z: np.ndarray) -> np.ndarray | None:
    """The row of the pseudo-inverse giving the first column's coefficient (None when not identifiable)."""
    if np.linalg.matrix_rank(X) != np.linalg.matrix_rank(Z) + 1:
        return None
    return np.linalg.pinv(X)[0]


def _adjusted_row(wrong, rows, null) -> np.ndarray | None:
    Z = _design(rows, intercept=True, null=null)
    return _coef_row(np.column_stack([wrong.astype(float), Z]), Z)


def _within_row(wrong, clusters, rows, null) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask of traces in problems with both outcomes, coefficient row on the demeaned design)."""
    both = [c for c in dict.fromkeys(clusters) if (wrong[clusters == c]).any() and (~wrong[clusters == c]).any()]
    if len(both) < 2:
        return None
    keep = np.isin(clusters, both)
    codes, k = stats.cluster_codes(clusters[keep])
    Z = stats.demean_within(_design([r for r, m in zip(rows, keep) if m], intercept=False,
                                    null=None if null is None else null[keep]), codes, k)
    X = np.column_stack([stats.demean_within(wrong[keep].astype(float), codes, k), Z])
    row = _coef_row(X, Z)
    return None if row is None else (keep, row)


def _control(s: ScoreComparison, k: int, table, nulls, shuffled, wrong_all, clusters_all, rows_all) -> dict | None:
    """The score's effects recomputed with shuffled step boundaries (same traces, same number of steps).

    Only traces whose boundaries can move (a segment with two or more steps) enter: elsewhere a shuffle is the real
    segmentation and would make any effect look like its own control. On those traces each test column's estimate
    is computed with the real boundaries and on every shuffle (no resampling). ``p_control``: share of shuffles
    whose effect is at least as large in absolute value as the real one (+1 correction); ``exceeds``: p_control <
    0.05. Also the mean score with real and with shuffled boundaries. The covariates (lengths, the null share from
    the *real* steps) are held fixed: only the boundaries the score is read through change.
    """
    if shuffled is None:
        return None
    R = shuffled.shape[1]
    out: dict = {"shuffles": R}
    sh = shuffled[:, :, k]
    ok = np.isfinite(table[:, k]) & np.isfinite(sh).all(axis=1)
    ok &= np.abs(np.where(np.isfinite(sh), sh, 0) - np.where(np.isfinite(table[:, k]), table[:, k], 0)[:, None]
                 ).max(axis=1) > 1e-12
    out["traces_with_movable_boundaries"] = int(ok.sum())
    if ok.sum() < 4:
        out["note"] = (f"{int(ok.sum())} trace(s) have a segment with two or more steps: too few for the control "
                       "(elsewhere shuffled boundaries are the real ones)")
        return out
    out["mean_real"] = float(table[ok, k].mean())
    out["mean_shuffled"] = float(sh[ok].mean())
    y_all = np.column_stack([table[ok, k], sh[ok]])  # (n, 1 + R): column 0 the real boundaries
    wrong, cl = wrong_all[ok], clusters_all[ok]
    rows = [r for r, m in zip(rows_all, ok) if m]
    null = nulls[ok, k] if np.isfinite(nulls[ok, k]).all() else None
    effects: dict[str, np.ndarray | None] = {}
    if wrong.sum() >= 2 and (~wrong).sum() >= 2:
        effects["pooled_raw"] = y_all[wrong].mean(0) - y_all[~wrong].mean(0)
        row = _adjusted_row(wrong, rows, null)
        effects["pooled_adjusted"] = None if row is None else row @ y_all
    pm = [_paired_mean(y_all[:, r], wrong, cl) for r in range(R + 1)]
    effects["paired_raw"] = None if any(v is None for v in pm) else np.array(pm)
    wr = _within_row(wrong, cl, rows, null)
    if wr is not None:
        keep, row = wr
        codes, kk = stats.cluster_codes(cl[keep])
        effects["paired_adjusted"] = row @ stats.demean_within(y_all[keep], codes, kk)
    for col, v in effects.items():
        if v is None:
            continue
        real, shuf = float(v[0]), v[1:]
        p = (1 + int((np.abs(shuf) >= abs(real) - 1e-12).sum())) / (1 + shuf.size)
        out[col] = {"real": real, "shuffled_mean": float(shuf.mean()), "shuffled_low": float(np.quantile(shuf, 0.025)),
                    "shuffled_high": float(np.quantile(shuf, 0.975)), "p_control": p, "exceeds": bool(p < 0.05),
                    "traces": int(ok.sum())}
    return out


# -- per-layer curves -------------------------------------------------------------------------------------------------
def curve_matrix(traces: list[AnalysedTrace], metric: str, net: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, L) per-layer values of the traces where ``metric`` is defined in every layer, and which traces those are."""
    rows, keep = [], []
    for i, t in enumerate(traces):
        v = layer_values(t.saliency, metric, net)
        if v is not None and np.all(np.isfinite(v)):
            rows.append(v)
            keep.append(i)
    L = traces[0].saliency.num_layers
    return (np.stack(rows) if rows else np.zeros((0, L))), np.array(keep, dtype=int)


def _band_dict(mean, low, high, n, resampled=None) -> dict:
    out = {"mean": np.asarray(mean).tolist(), "low": np.asarray(low).tolist(), "high": np.asarray(high).tolist(),
           "n": int(n)}
    if resampled is not None and len(resampled) >= 2:
        # family-wise over the layers: the curve's layers are one family of tests (see docs/analysis.md)
        lo, hi = stats.simultaneous_band(np.asarray(mean), resampled)
        out.update(sim_low=lo.tolist(), sim_high=hi.tolist(),
                   layers_detected=[int(i) for i in np.flatnonzero(((lo > 0) | (hi < 0)) & (hi > lo))])
    return out


def curves(traces: list[AnalysedTrace], *, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per metric and layer: each group's mean with a 95% band, and the difference wrong - correct raw, length-
    adjusted and within problems, each with a pointwise 95% band (problem-clustered resampling) and a simultaneous
    one over all layers (``sim_low`` / ``sim_high``; ``layers_detected``: where it excludes zero, family-wise 5%)."""
    out: dict[str, dict] = {}
    names = [(m, False) for m in CURVE_METRICS] + [(m, True) for m in SHARE_METRICS]
    for metric, net in names:
        mat, idx = curve_matrix(traces, metric, net)
        entry: dict = {}
        if mat.shape[0]:
            sub = [traces[i] for i in idx]
            wrong = np.array([not t.correct for t in sub])
            cl = np.array([str(t.problem_id) for t in sub])
            rows = [lengths(t.saliency) for t in sub]
            null = None
            if metric in SHARE_METRICS:
                null = np.array([uniform_null_shares(t.saliency.counts, t.saliency.steps)[metric] for t in sub],
                                dtype=float)
            for g, m in (("correct", ~wrong), ("wrong", wrong)):
                if m.sum() >= 2:
                    b = stats.cluster_bootstrap_band(mat[m], cl[m], n_boot=n_boot, seed=seed)
                    entry[g] = _band_dict(b.mean, b.low, b.high, b.n)
            if wrong.sum() >= 2 and (~wrong).sum() >= 2:
                obs, boot = stats.cluster_bootstrap_diff(mat, wrong, cl, n_boot=n_boot, seed=seed)
                lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
                entry["diff_raw"] = _band_dict(obs, lo, hi, len(sub), boot)
                Z = _design(rows, intercept=True, null=null)
                X = np.column_stack([wrong.astype(float), Z])
                if np.linalg.matrix_rank(X) == np.linalg.matrix_rank(Z) + 1:
                    obs, boot = stats.cluster_bootstrap_coef(mat, X, cl, n_boot=max(200, n_boot // 4), seed=seed)
                    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
                    entry["diff_adjusted"] = _band_dict(obs, lo, hi, len(sub), boot)
            d = _paired_curve(mat, wrong, cl)
            if d.shape[0] >= 2:
                b = stats.bootstrap_band(d, n_boot=n_boot, seed=seed)
                entry["diff_paired"] = _band_dict(b.mean, b.low, b.high, b.n, b.resampled)
        out[f"{metric}_net" if net else metric] = entry
    return out


def _paired_curve(mat, wrong, cl) -> np.ndarray:
    rows = []
    for c in dict.fromkeys(cl):
        m = cl == c
        if (m & wrong).any() and (m & ~wrong).any():
            rows.append(mat[m & wrong].mean(0) - mat[m & ~wrong].mean(0))
    return np.stack(rows) if rows else np.zeros((0, mat.shape[1]))


# -- per-step-position curves ------------------------------------------------------------------------------------------
def step_question_share(r: StepSaliency, band: str = "shallow") -> np.ndarray:
    """(n_thinking,) the band-mean share of each thinking step's incoming saliency that comes from the question."""
    th = [i for i, s in enumerate(r.steps) if s.kind == "thinking"]
    q = [i for i, s in enumerate(r.steps) if s.kind == "question"]
    layers = list(r.bands.shallow if band == "shallow" else r.bands.deep)
    if not th or not q:
        return np.zeros(0)
    out = []
    for i in th:
        inc = r.sums[layers, i, : i + 1].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(inc > 0, r.sums[layers, i, q[0]] / inc, np.nan)
        out.append(float(np.nanmean(v)) if np.isfinite(v).any() else np.nan)
    return np.array(out)


def position_curves(traces: list[AnalysedTrace], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Shallow-band question share of thinking step k (k = 1..8) by group, and within problems (wrong - correct)."""
    vals = [step_question_share(t.saliency) for t in traces]
    wrong = np.array([not t.correct for t in traces])
    cl = np.array([str(t.problem_id) for t in traces])
    K = min(MAX_POSITIONS, max((v.size for v in vals), default=0))
    out: dict = {"metric": "shallow-band question share of thinking step k", "positions": list(range(1, K + 1))}
    for g, gm in (("correct", ~wrong), ("wrong", wrong)):
        rows: list[dict[str, Any]] = []
        for k in range(K):
            m = np.array([v.size > k and np.isfinite(v[k]) for v in vals]) & gm
            if m.sum() >= 2:
                y = np.array([vals[i][k] for i in np.flatnonzero(m)])
                ci = _ci(y, cl[m], n_boot, seed)
                assert ci is not None  # y has at least two values
                rows.append({"k": k + 1, "mean": ci.estimate, "low": ci.low, "high": ci.high, "n": ci.n})
            else:
                rows.append({"k": k + 1, "mean": None, "low": None, "high": None, "n": int(m.sum())})
        out[g] = rows
    paired: list[dict[str, Any]] = []
    for k in range(K):
        m = np.array([v.size > k and np.isfinite(v[k]) for v in vals])
        y = np.array([vals[i][k] if m[i] else np.nan for i in range(len(vals))])
        d, _ = _problem_differences(y[m], wrong[m], cl[m])
        if d.size >= 2:
            ci = stats.bootstrap_ci(d, n_boot=n_boot, seed=seed)
            paired.append({"k": k + 1, "mean": ci.estimate, "low": ci.low, "high": ci.high, "problems": int(d.size)})
        else:
            paired.append({"k": k + 1, "mean": None, "low": None, "high": None, "problems": int(d.size)})
    out["paired_wrong_minus_correct"] = paired
    return out


# -- coarse maps ------------------------------------------------------------------------------------------------------
def coarse_labels(bins: int = COARSE_BINS) -> list[str]:
    return ["Q"] + [f"T{i + 1}/{bins}" for i in range(bins)] + ["S"]


def coarse_assignment(r: StepSaliency, bins: int = COARSE_BINS) -> np.ndarray:
    """Coarse bin of each step: question 0, thinking steps 1..bins by relative position, summary bins+1."""
    thinking = [i for i, s in enumerate(r.steps) if s.kind == "thinking"]
    out = np.zeros(len(r.steps), dtype=int)
    for i, s in enumerate(r.steps):
        if s.kind == "summary":
            out[i] = bins + 1
    for rank, i in enumerate(thinking):
        out[i] = 1 + min(bins - 1, rank * bins // max(len(thinking), 1))
    return out


def _coarse_maps(results: list[StepSaliency], bins: int = COARSE_BINS) -> dict[str, np.ndarray]:
    """Mean coarse map over traces for the shallow and the deep band (mean of per-trace F/N)."""
    out = {}
    for band in ("shallow", "deep"):
        maps = []
        for r in results:
            layers = list(r.bands.shallow if band == "shallow" else r.bands.deep)
            onehot = np.eye(bins + 2)[coarse_assignment(r, bins)]  # (S, B)
            s = np.einsum("lij,ia,jb->ab", r.sums[layers], onehot, onehot) / len(layers)
            n = onehot.T @ r.counts @ onehot
            with np.errstate(invalid="ignore", divide="ignore"):
                maps.append(np.where(n > 0, s / np.maximum(n, 1), np.nan))
        with warnings.catch_warnings():  # bins no trace reaches stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[band] = np.nanmean(np.stack(maps), axis=0) if maps else np.full((bins + 2, bins + 2), np.nan)
    return out
