"""Step-Saliency at token resolution inside the response, pooled afterwards into real or shuffled steps.

One saliency pass treats the question as one step and every response token as its own step ("atoms"). Because the
map is a sum over token pairs, pooling the atoms into the trace's real steps gives exactly the map a pass over the
real steps gives, and pooling them into *shuffled* steps (the same number of thinking and summary steps, random cut
points) gives the shuffled-boundary control at no extra model cost. The atom map also shows the boundary token on
its own row, which is where Step Momentum Injection acts. Only the pooled results are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import BAND_FRACTION, CHUNK_MB
from ..errors import StepscopeError
from ..saliency.result import StepSaliency, causal_counts
from ..stepflow import StepFlowConfig
from ..stepflow.controls import StepFlowControl
from ..trace import Step, Trace
from .scores import SCORE_NAMES, score_values

CACHE_VERSION = 2
SITE_METRICS = ("boundary_prev_share", "after_prev_share")


@dataclass(frozen=True)
class Arm:
    """One arm of a measurement: what is switched on during the teacher-forced pass (nothing, a StepFlow config,
    or its random control)."""

    name: str = "baseline"
    stepflow: StepFlowConfig | None = None
    control: StepFlowControl | None = None

    def __post_init__(self):
        if self.control is not None and self.stepflow is None:
            raise StepscopeError("a StepFlow control needs the StepFlow config it is the control of")

    @property
    def spec(self):
        """The intervention to install (None: the plain model)."""
        if self.stepflow is None:
            return None
        if self.control is None:
            return self.stepflow
        from ..stepflow.controls import ControlledStepFlow

        return ControlledStepFlow(self.stepflow, self.control)

    def to_dict(self) -> dict:
        return {"name": self.name, "stepflow": None if self.stepflow is None else self.stepflow.to_dict(),
                "control": None if self.control is None else self.control.to_dict()}


@dataclass(frozen=True)
class Measured:
    """One trace measured under one intervention.

    ``saliency``: the map over the trace's real steps. ``shuffled``: (R, K) band scores (``SCORE_NAMES`` order, NaN
    where undefined) with R shuffled step boundaries. ``sites``: per-layer metrics at SMI's firing sites.
    """

    saliency: StepSaliency
    shuffled: np.ndarray
    sites: dict[str, np.ndarray | None] = field(default_factory=dict)


def atom_trace(trace: Trace) -> Trace:
    """The trace with the question as one step and every response token a step of its own (same kinds)."""
    atoms = []
    counters = {"thinking": 0, "summary": 0}
    for s in trace.steps:
        if s.kind == "question":
            atoms.append(s)
            continue
        for t in range(s.start, s.end):
            counters[s.kind] += 1
            atoms.append(Step(s.kind, t, t + 1, trace.token_texts[t], counters[s.kind]))
    return dataclasses.replace(trace, steps=atoms, warnings=[])


def assignment(atoms: list[Step], steps: list[Step]) -> np.ndarray:
    """Index of the step holding each atom (atoms and steps tile the same tokens)."""
    starts = np.array([s.start for s in steps])
    out = np.searchsorted(starts, [a.start for a in atoms], side="right") - 1
    for a, i in zip(atoms, out):
        s = steps[i]
        if not (s.start <= a.start and a.end <= s.end and s.kind == a.kind):
            raise StepscopeError("the steps do not tile the atoms (a step boundary inside a token?)")
    return out


def pool(sums: np.ndarray, other: np.ndarray, assign: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Atom sums (L, A, A) and other (L, A) summed into steps (L, S, S) and (L, S)."""
    onehot = np.eye(n_steps)[assign]  # (A, S)
    return np.einsum("lab,ai,bj->lij", sums, onehot, onehot), other @ onehot


def shuffled_steps(steps: list[Step], rng: np.random.Generator) -> list[Step]:
    """The same number of thinking and summary steps over the same tokens, cut at random token positions."""
    out = [s for s in steps if s.kind == "question"]
    for kind in ("thinking", "summary"):
        mine = [s for s in steps if s.kind == kind]
        if not mine:
            continue
        start, end, k = mine[0].start, mine[-1].end, len(mine)
        cuts = [int(c) for c in np.sort(rng.choice(np.arange(start + 1, end), size=k - 1, replace=False))] \
            if k > 1 else []
        edges = [start, *cuts, end]
        out += [Step(kind, a, b, "", i + 1) for i, (a, b) in enumerate(itertools.pairwise(edges))]
    return out


def _as_result(sums, other, steps, meta, band_fraction) -> StepSaliency:
    return StepSaliency(sums, causal_counts(steps), other, list(steps), meta, band_fraction)


def site_metrics(atom_sums: np.ndarray, atoms: list[Step], steps: list[Step], pooled: np.ndarray
                 ) -> dict[str, np.ndarray | None]:
    """Per-layer shares at SMI's sites: the first token of each thinking step from the second on.

    ``boundary_prev_share``: of that token's incoming saliency (over step keys), the share from the step just
    finished. ``after_prev_share``: of the whole new step's incoming saliency, the share from the previous step.
    """
    th = [i for i, s in enumerate(steps) if s.kind == "thinking"]
    if len(th) < 2:
        return dict.fromkeys(SITE_METRICS)
    assign = assignment(atoms, steps)
    atom_of_token = {a.start: k for k, a in enumerate(atoms)}
    at_boundary, after = [], []
    for i in th[1:]:
        a = atom_of_token[steps[i].start]
        row = atom_sums[:, a, : a + 1]  # (L, a+1) keys up to the boundary token
        by_step = np.zeros((row.shape[0], len(steps)))
        np.add.at(by_step.T, assign[: a + 1], row.T)
        total = by_step.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            at_boundary.append(np.where(total > 0, by_step[:, i - 1] / total, np.nan))
            inc = pooled[:, i, : i + 1].sum(-1)
            after.append(np.where(inc > 0, pooled[:, i, i - 1] / inc, np.nan))
    with warnings.catch_warnings():  # a layer where no boundary row has saliency stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"boundary_prev_share": np.nanmean(np.stack(at_boundary), 0),
                "after_prev_share": np.nanmean(np.stack(after), 0)}


def trace_seed(trace: Trace, seed: int) -> int:
    """A seed fixed by the trace's tokens: every intervention on one trace gets the same shuffled boundaries."""
    digest = hashlib.sha256(json.dumps([seed, trace.token_ids]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derive(atom_sums: np.ndarray, atom_other: np.ndarray, trace: Trace, atoms: list[Step], *, shuffles: int,
           seed: int, band_fraction: float, meta: dict | None = None) -> Measured:
    """Real-step map, shuffled-boundary band scores and SMI-site metrics from one atom-resolution map."""
    steps = list(trace.steps)
    sums, other = pool(atom_sums, atom_other, assignment(atoms, steps), len(steps))
    real = _as_result(sums, other, steps, meta or {}, band_fraction)
    rng = np.random.default_rng(trace_seed(trace, seed))
    shuffled = np.full((shuffles, len(SCORE_NAMES)), np.nan)
    if not any(sum(s.kind == kind for s in steps) > 1 for kind in ("thinking", "summary")):
        # one step per segment: every shuffle is the real segmentation
        values = score_values(real)
        shuffled[:] = [np.nan if values[k] is None else values[k] for k in SCORE_NAMES]
        return Measured(real, shuffled, site_metrics(atom_sums, atoms, steps, sums))
    for r in range(shuffles):
        st = shuffled_steps(steps, rng)
        s2, o2 = pool(atom_sums, atom_other, assignment(atoms, st), len(st))
        values = score_values(_as_result(s2, o2, st, {}, band_fraction))
        shuffled[r] = [np.nan if values[k] is None else values[k] for k in SCORE_NAMES]
    return Measured(real, shuffled, site_metrics(atom_sums, atoms, steps, sums))


def _session(model, tokenizer, trace: Trace, arm: Arm):
    if arm.spec is None:
        return contextlib.nullcontext()
    from ..stepflow.fullpass import teacher_forced

    return teacher_forced(model, tokenizer, arm.spec, [trace])


def measure(model, tokenizer, trace: Trace, intervention: Arm = Arm(), *, target: str = "all",
            chunk_mb: float = CHUNK_MB, band_fraction: float = BAND_FRACTION, shuffles: int = 39,
            seed: int = 0) -> Measured:
    """Measure one trace (teacher-forced) under ``intervention``."""
    from ..saliency.engine import SaliencyOptions, compute_batch

    if len(trace.steps) < 2:
        raise StepscopeError(f"the trace has {len(trace.steps)} step(s); Step-Saliency needs a question and a response")
    atoms = atom_trace(trace)
    opts = SaliencyOptions(target=target, chunk_mb=chunk_mb, progress=False)
    with _session(model, tokenizer, atoms, intervention) as sf:
        res = compute_batch(model, tokenizer, [atoms], opts, None if sf is None else sf.saliency_edit)
    meta = {"model": trace.model, "question": trace.question, "tokens": len(trace), "loss": res.loss[0],
            "target": target, "intervention": intervention.to_dict()}
    return derive(res.sums[0].double().numpy(), res.other[0].double().numpy(), trace, atoms.steps,
                  shuffles=shuffles, seed=seed, band_fraction=band_fraction, meta=meta)


# -- cache ------------------------------------------------------------------------------------------------------------
def cache_key(model_name: str, trace: Trace, intervention: Arm, options: dict) -> str:
    doc = json.dumps({"v": CACHE_VERSION, "model": model_name, "ids": trace.token_ids, "prompt_len": trace.prompt_len,
                      "steps": [(s.kind, s.start, s.end) for s in trace.steps], "intervention": intervention.to_dict(),
                      "options": options}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def save_measured(m: Measured, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"sums": m.saliency.sums, "other": m.saliency.other, "shuffled": m.shuffled}
    arrays.update({f"site_{k}": v for k, v in m.sites.items() if v is not None})
    np.savez_compressed(path.with_suffix(".npz"), **arrays)
    doc = {"format": "stepscope.measured", "version": CACHE_VERSION, "steps": [dataclasses.asdict(s) for s in
                                                                               m.saliency.steps],
           "meta": m.saliency.meta, "band_fraction": m.saliency.band_fraction}
    path.with_suffix(".json").write_text(json.dumps(doc))


def load_measured(path: Path) -> Measured | None:
    try:
        doc = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    if doc.get("format") != "stepscope.measured" or doc.get("version") != CACHE_VERSION:
        return None
    steps = [Step(**s) for s in doc["steps"]]
    r = _as_result(arrays["sums"], arrays["other"], steps, doc.get("meta", {}), doc.get("band_fraction", BAND_FRACTION))
    sites = {k: arrays.get(f"site_{k}") for k in SITE_METRICS}
    return Measured(r, arrays["shuffled"], sites)


def cached_measure(model, tokenizer, model_name: str, trace: Trace, intervention: Arm, cache: Path | None,
                   **options) -> Measured:
    """:func:`measure`, reusing ``cache/<key>.npz/.json`` when present."""
    if cache is None:
        return measure(model, tokenizer, trace, intervention, **options)
    path = Path(cache) / cache_key(model_name, trace, intervention, options)
    hit = load_measured(path)
    if hit is not None:
        return hit
    m = measure(model, tokenizer, trace, intervention, **options)
    save_measured(m, path)
    return m
