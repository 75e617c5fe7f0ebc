"""The band scores every comparison reports, and what each trace's lengths are (the covariates of adjustment)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..saliency.metrics import band_mean, net_shares
from ..saliency.result import StepSaliency


@dataclass(frozen=True)
class Score:
    """A band score: the mean of a per-layer ``metric`` over a band; ``net``: minus its uniform-null share."""

    name: str
    metric: str
    band: str
    meaning: str
    net: bool = False


SCORES: tuple[Score, ...] = (
    Score("shallow_lock_in", "local_share", "shallow", "shallow layers locked into the current step (higher: worse)"),
    Score("deep_decay", "summary_recency_share", "deep", "summary leans on itself and the last steps (higher: worse)"),
    Score("shallow_question_reach", "question_reach", "shallow", "thinking steps reach back to the question"),
    Score("deep_summary_thinking", "summary_thinking_share", "deep", "summary draws on the thinking segment"),
    Score("shallow_thinking_block", "thinking_block", "shallow", "the authors' thinking x thinking block mean"),
    Score("deep_summary_block", "summary_block", "deep", "the authors' summary x summary block mean"),
    Score("shallow_lock_in_net", "local_share", "shallow", "Lock-in minus what token counts alone give", True),
    Score("deep_decay_net", "summary_recency_share", "deep", "Deep Decay minus what token counts alone give", True),
    Score("shallow_question_reach_net", "question_reach", "shallow", "question reach minus its uniform-null share",
          True),
    Score("deep_summary_thinking_net", "summary_thinking_share", "deep",
          "summary-thinking share minus its uniform-null share", True),
)
SCORE_NAMES = tuple(s.name for s in SCORES)
BY_NAME = {s.name: s for s in SCORES}
# per-layer curves drawn and compared (raw shares, net shares and the authors' blocks)
CURVE_METRICS = ("question_reach", "local_share", "summary_thinking_share", "summary_recency_share",
                 "thinking_block", "summary_block")
LENGTHS = ("question_tokens", "thinking_tokens", "thinking_steps", "summary_tokens", "summary_steps",
           "response_tokens")


def layer_values(r: StepSaliency, metric: str, net: bool = False) -> np.ndarray | None:
    """Per-layer values of ``metric`` (net of the uniform null when ``net``), or None when undefined."""
    if net:
        return net_shares(r.metrics, r.counts, r.steps).get(metric)
    return r.metrics.get(metric)


def score_values(r: StepSaliency) -> dict[str, float | None]:
    """Every band score of one trace (None where the trace lacks what the score needs)."""
    out: dict[str, float | None] = {}
    nets = net_shares(r.metrics, r.counts, r.steps)
    for s in SCORES:
        values = nets.get(s.metric) if s.net else r.metrics.get(s.metric)
        band = r.bands.shallow if s.band == "shallow" else r.bands.deep
        out[s.name] = band_mean(values, band)
    return out


def lengths(r: StepSaliency) -> dict[str, int]:
    """Token and step counts of a trace's segments (from its steps)."""
    th = [s for s in r.steps if s.kind == "thinking"]
    su = [s for s in r.steps if s.kind == "summary"]
    q = [s for s in r.steps if s.kind == "question"]
    out = {"question_tokens": sum(len(s) for s in q), "thinking_tokens": sum(len(s) for s in th),
           "thinking_steps": len(th), "summary_tokens": sum(len(s) for s in su), "summary_steps": len(su)}
    out["response_tokens"] = out["thinking_tokens"] + out["summary_tokens"]
    return out


def length_design(rows: list[dict[str, int]], *, intercept: bool = True, minimal: bool = False) -> np.ndarray:
    """Covariates of the length adjustment, one row per trace.

    A cubic in log thinking tokens and a quadratic in log summary tokens (shares of a sum map move smoothly but not
    linearly with token counts), log question tokens, and indicators of the thinking-step count (1..5, 6+) and
    summary-step count (0..2, 3+), because the step structure changes what a share can be (with two steps,
    Lock-in is one minus the question's share). ``minimal``: log thinking and summary tokens and the step counts as
    numbers, for small groups. Columns are standardised; constant columns are dropped.
    """
    lt = np.log1p([r["thinking_tokens"] for r in rows])
    ls = np.log1p([r["summary_tokens"] for r in rows])
    lq = np.log1p([r["question_tokens"] for r in rows])
    ts = np.array([r["thinking_steps"] for r in rows])
    ss = np.array([r["summary_steps"] for r in rows])
    if minimal:
        cols = [lt, ls, ts.astype(float), ss.astype(float)]
    else:
        z = (lt - lt.mean()) / (lt.std() or 1.0)
        w = (ls - ls.mean()) / (ls.std() or 1.0)
        cols = [z, z**2, z**3, w, w**2, lq]
        cols += [(np.minimum(ts, 6) == k).astype(float) for k in range(2, 7)]
        cols += [(np.minimum(ss, 3) == k).astype(float) for k in range(1, 4)]
    keep = [c for c in cols if np.ptp(c) > 0]
    keep = [(c - c.mean()) / c.std() for c in keep]
    if intercept:
        keep.insert(0, np.ones(len(rows)))
    return np.column_stack(keep) if keep else np.zeros((len(rows), 0))
