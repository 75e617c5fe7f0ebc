"""Correct vs wrong traces, per layer and per band, with the statistics to tell signal from noise."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import StepscopeError
from ..evaluation import stats
from ..saliency.metrics import band_mean
from ..saliency.result import StepSaliency

CURVE_METRICS = ("question_reach", "local_share", "summary_thinking_share", "summary_recency_share")
# band-level scores: (name, metric, band, what higher means)
SCORES = (
    ("shallow_lock_in", "local_share", "shallow", "shallow layers locked into the current step"),
    ("deep_decay", "summary_recency_share", "deep", "summary leans on itself and the last steps"),
    ("shallow_question_reach", "question_reach", "shallow", "thinking steps reach back to the question"),
    ("deep_summary_thinking", "summary_thinking_share", "deep", "summary draws on the thinking segment"),
)
COARSE_BINS = 4  # thinking steps pooled into this many bins by relative position, for maps across traces


@dataclass
class AnalysedTrace:
    """One graded trace and its Step-Saliency."""

    problem_id: str
    sample: int
    correct: bool
    saliency: StepSaliency
    condition: str = "baseline"


@dataclass
class ScoreComparison:
    name: str
    meaning: str
    correct: stats.ConfidenceInterval | None
    wrong: stats.ConfidenceInterval | None
    test: stats.MannWhitneyResult | None
    paired: stats.TestResult | None
    paired_diff: float | None  # mean over problems of (wrong - correct)
    paired_problems: int
    note: str = ""

    def to_dict(self) -> dict:
        def ci(c):
            return None if c is None else {"mean": c.estimate, "low": c.low, "high": c.high, "n": c.n}

        return {
            "name": self.name, "meaning": self.meaning, "correct": ci(self.correct), "wrong": ci(self.wrong),
            "mann_whitney": None if self.test is None else {
                "u": self.test.u, "p": self.test.p_value, "rank_biserial": self.test.rank_biserial,
                "cliffs_delta": self.test.cliffs_delta, "method": self.test.method},
            "paired": None if self.paired is None else {
                "problems": self.paired_problems, "mean_wrong_minus_correct": self.paired_diff,
                "wilcoxon_p": self.paired.p_value, "method": self.paired.method},
            "note": self.note,
        }


@dataclass
class GroupComparison:
    """Everything ``analyze`` reports for one model."""

    model: str
    num_layers: int
    n_correct: int
    n_wrong: int
    curves: dict[str, dict[str, stats.Band | None]]
    scores: list[ScoreComparison]
    coarse: dict[str, dict[str, np.ndarray]]  # group -> band -> (bins x bins) mean map
    coarse_labels: list[str] = field(default_factory=list)
    shallow: list[int] = field(default_factory=list)
    deep: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        def band(b):
            return None if b is None else {"mean": b.mean.tolist(), "low": b.low.tolist(), "high": b.high.tolist(),
                                           "n": b.n}

        return {
            "model": self.model, "num_layers": self.num_layers, "n_correct": self.n_correct, "n_wrong": self.n_wrong,
            "bands": {"shallow": self.shallow, "deep": self.deep},
            "curves": {m: {g: band(b) for g, b in v.items()} for m, v in self.curves.items()},
            "scores": [s.to_dict() for s in self.scores],
            "coarse_labels": self.coarse_labels,
            "coarse_maps": {g: {k: np.where(np.isnan(v), None, v).tolist() for k, v in m.items()}
                            for g, m in self.coarse.items()},
        }


def score_value(r: StepSaliency, metric: str, band: str) -> float | None:
    values = r.metrics.get(metric)
    return band_mean(values, r.bands.shallow if band == "shallow" else r.bands.deep)


def compare_groups(traces: list[AnalysedTrace], model: str = "", n_boot: int = 2000, seed: int = 0) -> GroupComparison:
    """Compare correct and wrong traces of one model (all must share the model's depth)."""
    if not traces:
        raise StepscopeError("no analysed traces to compare")
    depths = {t.saliency.num_layers for t in traces}
    if len(depths) != 1:
        raise StepscopeError(f"traces of one model must share a depth; got {sorted(depths)} layers")
    correct = [t for t in traces if t.correct]
    wrong = [t for t in traces if not t.correct]
    if not correct or not wrong:
        which = "correct" if not wrong else "wrong"
        raise StepscopeError(
            f"all {len(traces)} traces of {model or 'the model'} are {which}: correct vs wrong cannot be compared. "
            "Use more problems (--limit), more samples per problem (--n with --temperature > 0), or a task where "
            "the model sometimes fails and sometimes succeeds"
        )
    first = traces[0].saliency
    curves = {m: {"correct": _band([t.saliency for t in correct], m, n_boot, seed),
                  "wrong": _band([t.saliency for t in wrong], m, n_boot, seed)} for m in CURVE_METRICS}
    scores = [_score(traces, name, metric, band, meaning, n_boot, seed) for name, metric, band, meaning in SCORES]
    coarse = {g: _coarse_maps([t.saliency for t in grp]) for g, grp in (("correct", correct), ("wrong", wrong))}
    return GroupComparison(model, first.num_layers, len(correct), len(wrong), curves, scores, coarse,
                           coarse_labels(), list(first.bands.shallow), list(first.bands.deep))


def _band(results: list[StepSaliency], metric: str, n_boot: int, seed: int) -> stats.Band | None:
    rows = [r.metrics[metric] for r in results if r.metrics.get(metric) is not None]
    rows = [row for row in rows if np.all(np.isfinite(row))]
    if not rows:
        return None
    return stats.bootstrap_band(np.stack(rows), n_boot=n_boot, seed=seed)


def _score(traces, name, metric, band, meaning, n_boot, seed) -> ScoreComparison:
    vals = [(t, score_value(t.saliency, metric, band)) for t in traces]
    vals = [(t, v) for t, v in vals if v is not None]
    c = [v for t, v in vals if t.correct]
    w = [v for t, v in vals if not t.correct]
    note = ""
    ci_c = stats.bootstrap_ci(c, n_boot=n_boot, seed=seed) if c else None
    ci_w = stats.bootstrap_ci(w, n_boot=n_boot, seed=seed) if w else None
    test = None
    if len(c) >= 2 and len(w) >= 2:
        test = stats.mann_whitney_u(w, c)  # U for the wrong group: rank-biserial > 0 means wrong scores higher
    else:
        note = f"too few traces with this score to test ({len(c)} correct, {len(w)} wrong)"
    # paired: problems with both correct and wrong samples
    by_problem: dict[str, dict[bool, list[float]]] = {}
    for t, v in vals:
        by_problem.setdefault(t.problem_id, {True: [], False: []})[t.correct].append(v)
    diffs = [float(np.mean(g[False]) - np.mean(g[True])) for g in by_problem.values() if g[True] and g[False]]
    paired, pdiff = None, None
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        paired, pdiff = stats.wilcoxon_signed_rank(diffs), float(np.mean(diffs))
    elif diffs:
        pdiff = float(np.mean(diffs))
    return ScoreComparison(name, meaning, ci_c, ci_w, test, paired, pdiff, len(diffs), note)


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
            a = coarse_assignment(r, bins)
            onehot = np.eye(bins + 2)[a]  # (S, B)
            s = np.einsum("lij,ia,jb->ab", r.sums[layers], onehot, onehot) / len(layers)
            n = onehot.T @ r.counts @ onehot
            with np.errstate(invalid="ignore", divide="ignore"):
                maps.append(np.where(n > 0, s / np.maximum(n, 1), np.nan))
        with warnings.catch_warnings():  # bins no trace reaches stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[band] = np.nanmean(np.stack(maps), axis=0) if maps else np.full((bins + 2, bins + 2), np.nan)
    return out


@dataclass
class MechanismResult:
    """Band scores of the same traces teacher-forced without and with StepFlow, with paired tests."""

    n: int
    scores: dict[str, dict]

    def to_dict(self) -> dict:
        return {"n": self.n, "scores": self.scores}


def mechanism_check(before: list[StepSaliency], after: list[StepSaliency]) -> MechanismResult:
    """Paired comparison of band scores (same traces; ``after`` measured with StepFlow on)."""
    if len(before) != len(after) or not before:
        raise StepscopeError("the mechanism check needs the same non-empty list of traces with and without StepFlow")
    out = {}
    for name, metric, band, meaning in SCORES:
        pairs = [(score_value(b, metric, band), score_value(a, metric, band)) for b, a in zip(before, after)]
        pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
        entry = {"meaning": meaning, "n": len(pairs)}
        if pairs:
            b, a = np.array(pairs).T
            entry.update(before=float(b.mean()), after=float(a.mean()), mean_change=float((a - b).mean()))
            d = a - b
            if len(d) >= 2 and np.any(d != 0):
                w = stats.wilcoxon_signed_rank(d)
                entry.update(wilcoxon_p=w.p_value, method=w.method)
                ci = stats.bootstrap_ci(d, seed=0)
                entry.update(change_ci=[ci.low, ci.high])
        out[name] = entry
    return MechanismResult(len(before), out)
