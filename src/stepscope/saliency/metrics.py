"""Failure-pattern metrics read off per-layer step maps (definitions in docs/saliency.md).

All shares are of the *sum* map F, with each query step's incoming saliency restricted to step keys j <= i
(tokens in no step, such as the attention-sink first token, are left out; their share is ``sink_share``).
Per-step shares are averaged over the steps they are defined for, each step weighing the same.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable

import numpy as np

from ..trace import Step

METRICS = (
    "question_reach",
    "local_share",
    "summary_thinking_share",
    "summary_recency_share",
    "thinking_block",
    "summary_block",
    "sink_share",
)


def _kind_index(steps: list[Step], kind: str) -> list[int]:
    return [i for i, s in enumerate(steps) if s.kind == kind]


def _incoming(sums: np.ndarray, i: int) -> np.ndarray:
    """(L,) total saliency from step i into steps j <= i."""
    return sums[:, i, : i + 1].sum(-1)


def _total(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """``sum(arrays)`` of a non-empty iterable, added in the same order (typed as an array, not ``array | 0``)."""
    return functools.reduce(operator.add, arrays)


def _share(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def compute_metrics(
    sums: np.ndarray, counts: np.ndarray, other: np.ndarray, steps: list[Step]
) -> tuple[dict[str, np.ndarray | None], dict[str, str]]:
    """Per-layer metrics and, for those that cannot be computed, the reason."""
    q = _kind_index(steps, "question")
    th = _kind_index(steps, "thinking")
    su = _kind_index(steps, "summary")
    out: dict[str, np.ndarray | None] = {}
    why: dict[str, str] = {}

    def missing(name, reason):
        out[name] = None
        why[name] = reason

    if not th:
        missing("question_reach", "the trace has no thinking steps")
    elif not q:
        missing("question_reach", "the trace has no question step")
    else:
        shares = [_share(sums[:, i, q[0]], _incoming(sums, i)) for i in th]
        out["question_reach"] = np.nanmean(np.stack(shares), axis=0)

    if len(th) < 2:
        missing("local_share", "needs at least two thinking steps")
    else:
        shares = [_share(sums[:, i, i] + sums[:, i, i - 1], _incoming(sums, i)) for i in th[1:]]
        out["local_share"] = np.nanmean(np.stack(shares), axis=0)

    if not su:
        for name in ("summary_thinking_share", "summary_recency_share", "summary_block"):
            missing(name, "the trace has no summary")
    else:
        total = _total(_incoming(sums, i) for i in su)
        if not th:
            missing("summary_thinking_share", "the trace has no thinking steps")
        else:
            from_thinking = _total(sums[:, i, th].sum(-1) for i in su)
            out["summary_thinking_share"] = _share(from_thinking, total)
        recent = th[-2:]
        from_recent = _total(sums[:, i, [j for j in su if j <= i] + recent].sum(-1) for i in su)
        out["summary_recency_share"] = _share(from_recent, total)
        out["summary_block"] = _block_mean(sums, counts, su)
    if not th:
        missing("thinking_block", "the trace has no thinking steps")
    else:
        out["thinking_block"] = _block_mean(sums, counts, th)

    all_in = sums.sum(axis=(1, 2)) + other.sum(-1)
    out["sink_share"] = _share(other.sum(-1), all_in)
    return out, why


def _block_mean(sums: np.ndarray, counts: np.ndarray, idx: list[int]) -> np.ndarray:
    """Mean of the mean map F/N over the block idx x idx, causally valid entries only."""
    block_s = sums[:, idx][:, :, idx]
    block_n = counts[np.ix_(idx, idx)]
    valid = block_n > 0
    means = block_s[:, valid] / block_n[valid]
    return means.mean(-1)


def band_mean(values: np.ndarray | None, band: range) -> float | None:
    if values is None:
        return None
    v = values[band.start : band.stop]
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


SHARE_METRICS = ("question_reach", "local_share", "summary_thinking_share", "summary_recency_share")


def uniform_null_shares(counts: np.ndarray, steps: list[Step]) -> dict[str, float | None]:
    """Each share metric as uniform saliency over the causally valid pairs would give it (``F = N``).

    A share of a sum map grows with the number of token pairs it covers, so longer steps or segments take larger
    shares with no change in flow at all; this is that mechanical part, from the token counts alone.
    """
    sums = np.asarray(counts, dtype=float)[None]
    values, _ = compute_metrics(sums, np.asarray(counts), np.zeros((1, len(steps))), steps)
    return {k: None if (v := values.get(k)) is None else float(v[0]) for k in SHARE_METRICS}


def net_shares(metrics: dict[str, np.ndarray | None], counts: np.ndarray, steps: list[Step]
               ) -> dict[str, np.ndarray | None]:
    """Per-layer shares minus their uniform-null value (:func:`uniform_null_shares`): zero when a share only
    tracks token counts, positive when the flow favours those keys beyond their size."""
    null = uniform_null_shares(counts, steps)
    out: dict[str, np.ndarray | None] = {}
    for k in SHARE_METRICS:
        m, n = metrics.get(k), null[k]
        out[k] = None if m is None or n is None else m - n
    return out
