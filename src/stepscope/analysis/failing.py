"""The failing step: where a trace first leaves its gold solution, and the flow into that step.

For traces with gold step solutions (the organism's problems), :func:`locate` finds the first wrong thinking step
(the organism's own step check) and the trace steps that hold each gold step and the premise it needs (the value
it reads from furthest back: a premise in the question, or an earlier step's result). :func:`failing_step_analysis`
compares the flow into the failing step of each wrong sample with the flow into the *same gold step* of the correct
samples of the same problem (so step position, the relation to compute and the distance to its premise are the
same on both sides), without and, where measured, with OEB.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..evaluation import stats
from ..saliency.result import StepSaliency
from ..trace import Trace

ORGANISM_ID = re.compile(r"^organism-(?P<key>.+)-(?P<difficulty>easy|medium|hard)-(?P<index>\d+)$")


def organism_problem(problem_id: str):
    """The organism problem behind an ``organism:<difficulty>`` problem id, or None for other ids."""
    m = ORGANISM_ID.match(str(problem_id))
    if m is None:
        return None
    from ..organism.tasks import make_problem

    return make_problem(m["difficulty"], m["key"], int(m["index"]))


@dataclass(frozen=True)
class FailingStep:
    """Where a response first leaves the gold solution, mapped onto the trace's steps.

    ``gold_step``: 1-based index of the first wrong gold step (None: every step right). ``step_of_gold[k-1]``: index
    into ``trace.steps`` of the step holding gold step k (None when the response has no such line);
    ``premise_of_gold[k-1]``: index of the step holding the value gold step k reads from furthest back (the question
    step for a premise stated in the question).
    """

    gold_step: int | None
    kind: str
    long_range: bool | None
    step_of_gold: tuple[int | None, ...]
    premise_of_gold: tuple[int | None, ...]
    premise_distance: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FailingStep:
        return cls(d["gold_step"], d["kind"], d["long_range"], tuple(d["step_of_gold"]), tuple(d["premise_of_gold"]),
                   tuple(d["premise_distance"]))


def _line_starts(thinking: str) -> list[int]:
    """Character offset of the first non-blank character of each non-empty line."""
    out = []
    for m in re.finditer(r"[^\n]+", thinking):
        text = m.group()
        if text.strip():
            out.append(m.start() + len(text) - len(text.lstrip()))
    return out


def locate(problem, trace: Trace) -> FailingStep:
    """Locate ``trace``'s first wrong thinking step against ``problem``'s gold steps (organism format: one step per
    line of the thinking segment)."""
    from ..organism.tasks import check_response

    texts = trace.token_texts[trace.prompt_len:]
    response = "".join(texts)
    check = check_response(problem, response)
    thinking = response.split("</think>", 1)[0]
    ends = np.cumsum([len(t) for t in texts])
    step_of_token: dict[int, int] = {}
    for i, s in enumerate(trace.steps):
        for t in range(s.start, s.end):
            step_of_token[t] = i
    line_steps: list[int | None] = []
    for c in _line_starts(thinking):
        tok = trace.prompt_len + int(np.searchsorted(ends, c, side="right"))
        at = step_of_token.get(tok)
        line_steps.append(at if at is not None and trace.steps[at].kind == "thinking" else None)
    gold = list(problem.steps)
    step_of_gold = tuple(line_steps[k] if k < len(line_steps) else None for k in range(len(gold)))
    q = next((i for i, s in enumerate(trace.steps) if s.kind == "question"), None)
    premises, distances = [], []
    for g in gold:
        far = max(g.refs, key=lambda r: r.distance)
        premises.append(q if far.step == 0 else step_of_gold[far.step - 1])
        distances.append(int(far.distance))
    return FailingStep(check.first_error, check.kind, check.long_range, step_of_gold, tuple(premises),
                       tuple(distances))


def step_shares(r: StepSaliency, step: int, key: int | None, layers) -> float | None:
    """Band-mean share of step ``step``'s incoming saliency (keys j <= step) that comes from step ``key``."""
    if key is None or key > step:
        return None
    inc = r.sums[list(layers), step, : step + 1].sum(-1)
    part = r.sums[list(layers), step, key]
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(inc > 0, part / inc, np.nan)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _values(r: StepSaliency, fs: FailingStep, k: int, band: str) -> dict[str, float | None]:
    """Flow into gold step k of this trace: from the question and from the step holding its premise."""
    i = fs.step_of_gold[k - 1]
    layers = r.bands.shallow if band == "shallow" else r.bands.deep
    if i is None:
        return {"question": None, "premise": None}
    q = next((j for j, s in enumerate(r.steps) if s.kind == "question"), None)
    return {"question": step_shares(r, i, q, layers), "premise": step_shares(r, i, fs.premise_of_gold[k - 1], layers)}


def _paired(rows: list[tuple[str, float, float]], n_boot: int, seed: int) -> dict:
    """rows: (problem, wrong value, mean correct value) per wrong sample -> per-problem mean differences, tested."""
    by: dict[str, list[float]] = {}
    for pid, w, c in rows:
        by.setdefault(pid, []).append(w - c)
    d = np.array([np.mean(v) for v in by.values()])
    out: dict[str, Any] = {"problems": int(d.size), "wrong_samples": len(rows)}
    if d.size >= 2:
        t = stats.sign_flip_test(d, seed=seed)
        ci = stats.bootstrap_ci(d, n_boot=n_boot, seed=seed)
        out.update(mean_wrong_minus_correct=t.statistic, ci=[ci.low, ci.high], p_value=t.p_value, method=t.method,
                   mde=stats.mde(t.null_sd),
                   mean_wrong=float(np.mean([w for _, w, _ in rows])),
                   mean_correct=float(np.mean([c for *_, c in rows])))
    elif d.size:
        out.update(mean_wrong_minus_correct=float(d.mean()))
    return out


def failing_step_analysis(traces, *, with_oeb: dict | None = None, band: str = "shallow", n_boot: int = 2000,
                          seed: int = 0) -> dict | None:
    """Flow into the first wrong step of wrong samples vs the same gold step of correct samples of the same problem.

    ``traces``: :class:`~stepscope.analysis.compare.AnalysedTrace` with ``gold`` set (a :class:`FailingStep` dict).
    ``with_oeb``: (problem_id, sample) -> the wrong trace's Step-Saliency measured with OEB on.
    """
    located = [t for t in traces if t.gold is not None]
    if not located:
        return None
    fs = {(t.problem_id, t.sample): FailingStep.from_dict(t.gold) for t in located if t.gold is not None}
    wrong = [t for t in located if not t.correct and fs[(t.problem_id, t.sample)].gold_step is not None]
    correct_by: dict[str, list] = {}
    for t in located:
        if t.correct:
            correct_by.setdefault(str(t.problem_id), []).append(t)
    positions: dict[int, int] = {}
    kinds: dict[str, int] = {}
    for t in wrong:
        f = fs[(t.problem_id, t.sample)]
        assert f.gold_step is not None  # `wrong` holds located failures only
        positions[f.gold_step] = positions.get(f.gold_step, 0) + 1
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    out: dict = {"band": band, "wrong_located": len(wrong), "first_wrong_step": dict(sorted(positions.items())),
                 "first_error_kinds": kinds,
                 "what": "share of the failing step's incoming saliency (band mean) from the question and from the "
                         "step holding the premise it needs; wrong sample vs the same gold step in the correct "
                         "samples of the same problem"}
    for what in ("question", "premise"):
        rows: list[tuple[str, float, float]] = []
        rows_oeb: list[tuple[str, float, float]] = []
        change: list[tuple[str, float]] = []
        for t in wrong:
            f = fs[(t.problem_id, t.sample)]
            k = f.gold_step
            assert k is not None
            mates = correct_by.get(str(t.problem_id), [])
            v = _values(t.saliency, f, k, band)[what]
            found = [_values(c.saliency, fs[(c.problem_id, c.sample)], k, band)[what] for c in mates]
            cs = [c for c in found if c is not None]
            if v is None:
                continue
            o = None
            if with_oeb is not None and (t.problem_id, t.sample) in with_oeb:
                o = _values(with_oeb[(t.problem_id, t.sample)], f, k, band)[what]
                if o is not None:
                    change.append((str(t.problem_id), o - v))
            if cs:
                rows.append((str(t.problem_id), v, float(np.mean(cs))))
                if o is not None:
                    rows_oeb.append((str(t.problem_id), o, float(np.mean(cs))))
        entry = {"without_oeb": _paired(rows, n_boot, seed)}
        if with_oeb is not None:
            entry["with_oeb"] = _paired(rows_oeb, n_boot, seed)
            if len(change) >= 2:
                d = np.array([c for _, c in change])
                ci = stats.cluster_bootstrap_ci(d, [p for p, _ in change], n_boot=n_boot, seed=seed)
                entry["oeb_change_at_failing_step"] = {"n": int(d.size), "mean_change": float(d.mean()),
                                                       "ci": [ci.low, ci.high],
                                                       "share_positive": float((d > 0).mean())}
        out[what] = entry
    # Holm over the failing-step tests of one condition: {question, premise} without OEB, and again with OEB
    for cond in ("without_oeb", "with_oeb"):
        tests = [out[w][cond] for w in ("question", "premise") if cond in out[w]]
        for t, adjusted in zip(tests, stats.holm([t.get("p_value") for t in tests])):
            if adjusted is not None:
                t["p_holm"] = adjusted
    out["holm_family"] = ("Holm over the two failing-step tests (question share, premise share) of each condition "
                          "(without OEB; with OEB)")
    return out
