"""``stepscope.analyze``: correct vs wrong flow analysis of graded traces, as a library call.

In the style of :func:`stepscope.evaluation.runner.run_eval`: settings in a frozen :class:`AnalysisConfig`, the
model and tokenizer passed in, a frozen :class:`AnalysisResult` back (``to_dict``, ``save``, ``report``). The
command line (``stepscope analyze``) is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress as progress_
from ..defaults import BAND_FRACTION, CHUNK_MB
from ..errors import StepscopeError
from ..stepflow import StepFlowConfig
from ..trace import Trace
from .compare import AnalysedTrace, GroupComparison, compare_groups
from .defaults import (  # re-exported; one home in defaults.py
    PAIRED_SAMPLES,
    PAIRED_TEMPERATURE,
)
from .failing import failing_step_analysis, locate, organism_problem
from .measure import Arm, Measured, cached_measure
from .mechanism import MechanismResult, activation_effects, components, mechanism_check
from .worked import gsm8k_steps, locate_worked

__all__ = ["PAIRED_SAMPLES", "PAIRED_TEMPERATURE", "AnalysisConfig", "AnalysisResult", "GradedTrace", "ModelAnalysis",
           "analyze", "graded_from_run"]

FORMAT = "stepscope.analysis"


@dataclass(frozen=True)
class GradedTrace:
    """One sample: its problem, sample index, whether it was graded correct, and its trace."""

    problem_id: str
    sample: int
    correct: bool
    trace: Trace


@dataclass(frozen=True)
class AnalysisConfig:
    """How the analysis is run.

    ``condition``: the eval condition whose traces are analysed (traces generated with StepFlow are measured with
    ``measure_with`` on, what the model computed). ``shuffles``: shuffled-boundary draws per trace (39 allow a
    control p below 0.05). ``mechanism``: also measure the selected traces (``mechanism_traces``: the wrong ones or
    all, at most ``mechanism_limit``) with each StepFlow component of ``stepflow`` and, with ``controls``, their
    random controls; ``activations`` adds hidden-state and next-token effects at SMI's sites (at most
    ``activation_limit`` traces).
    """

    condition: str = "baseline"
    target: str = "all"
    chunk_mb: float = CHUNK_MB
    band_fraction: float = BAND_FRACTION
    n_boot: int = 2000
    n_perm: int = 4999
    shuffles: int = 39
    seed: int = 0
    mechanism: bool = False
    mechanism_traces: str = "wrong"
    mechanism_limit: int | None = 200
    controls: bool = True
    activations: bool = True
    activation_limit: int = 100
    stepflow: StepFlowConfig = field(default_factory=StepFlowConfig)
    measure_with: StepFlowConfig | None = None
    failing_step: bool = True

    def __post_init__(self):
        if self.mechanism_traces not in ("wrong", "all"):
            raise StepscopeError("mechanism_traces must be 'wrong' or 'all'")
        if self.shuffles < 0 or self.n_boot < 100 or self.n_perm < 99:
            raise StepscopeError("use shuffles >= 0, n_boot >= 100 and n_perm >= 99")
        if self.mechanism_limit is not None and self.mechanism_limit < 1:
            raise StepscopeError("mechanism_limit must be at least 1 (or None for no limit)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stepflow"] = self.stepflow.to_dict()
        d["measure_with"] = None if self.measure_with is None else self.measure_with.to_dict()
        return d

    def measure_options(self) -> dict:
        return {"target": self.target, "chunk_mb": self.chunk_mb, "band_fraction": self.band_fraction,
                "shuffles": self.shuffles, "seed": self.seed}


@dataclass(frozen=True, eq=False)
class ModelAnalysis:
    """One model's analysis: the comparison, the mechanism check, the failing-step analysis."""

    model: str
    comparison: GroupComparison
    mechanism: MechanismResult | None
    failing_step: dict | None
    seconds: float

    def to_dict(self) -> dict:
        d = self.comparison.to_dict()
        d["mechanism"] = None if self.mechanism is None else self.mechanism.to_dict()
        d["failing_step"] = self.failing_step
        d["seconds"] = round(self.seconds, 1)
        return d


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """What :func:`analyze` returns; ``save`` writes ``analysis.json``, ``report`` the HTML page and figures."""

    config: AnalysisConfig
    models: tuple[ModelAnalysis, ...]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 2, "config": self.config.to_dict(), "settings": self.settings,
                "models": [m.to_dict() for m in self.models]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON form to ``path`` (a directory gets ``analysis.json``)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "analysis.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_clean(self.to_dict()), indent=1, allow_nan=False))
        return path

    def report(self, out_dir: str | os.PathLike, formats=("png",)) -> Path:
        from .report import write_analysis_report

        return write_analysis_report(self, Path(out_dir), formats=formats)

    @classmethod
    def merge(cls, results: Sequence[AnalysisResult]) -> AnalysisResult:
        if not results:
            raise StepscopeError("nothing to merge")
        return cls(results[0].config, tuple(m for r in results for m in r.models), dict(results[0].settings))


def _clean(o):
    """JSON-ready: numpy scalars and arrays to Python, NaN and infinities to None (strict JSON has neither)."""
    import math

    import numpy as np

    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def graded_from_run(run_dir: str | os.PathLike, condition: str, limit: int | None = None) -> list[GradedTrace]:
    """The graded traces of ``condition`` in an eval run directory (``limit``: first problems, all samples)."""
    from .collect import first_problems, graded_traces

    rows = graded_traces(Path(run_dir), condition)
    if limit is not None:
        rows = first_problems(rows, limit)
    return [GradedTrace(str(r["problem_id"]), int(r["sample"]), bool(r["correct"]), t) for r, t in rows]


def _gold(g: GradedTrace, data_dir) -> dict | None:
    """The trace's failing-step location against its problem's gold steps, where the problem has them."""
    problem = organism_problem(g.problem_id)
    if problem is not None:
        return locate(problem, g.trace).to_dict() if problem.question in g.trace.question else None
    worked = gsm8k_steps(g.problem_id, data_dir)
    return locate_worked(worked, g.trace).to_dict() if worked else None


def analyze(model, tokenizer, traces: str | os.PathLike | Sequence[str | os.PathLike | GradedTrace],
            config: AnalysisConfig | None = None,
            *, model_name: str | None = None, cache: str | os.PathLike | None = None, limit: int | None = None,
            progress: bool = True, data_dir: str | os.PathLike | None = None) -> AnalysisResult:
    """Compare the Step-Saliency of correct and wrong traces of one model (and, optionally, run the mechanism check).

    ``traces``: an eval run directory saved with traces, several (their problems pooled; ``limit`` applies to each),
    or a list of :class:`GradedTrace`. ``cache``: a directory for per-trace measurements (re-runs reuse them).
    ``data_dir``: offline benchmark copies (default ``$STEPSCOPE_DATA_DIR``), read for GSM8K's worked solutions
    (the failing-step analysis; organism problems carry their own gold steps). Returns an :class:`AnalysisResult`.
    """
    config = config or AnalysisConfig()
    t0 = time.perf_counter()
    if isinstance(traces, (str, os.PathLike)):
        traces = [traces]
    graded = []
    for item in traces:  # run directories (several: their problems are pooled) or graded traces
        graded += graded_from_run(item, config.condition, limit) if isinstance(item, (str, os.PathLike)) else [item]
    keys = [(g.problem_id, g.sample) for g in graded]
    if len(set(keys)) != len(keys):
        raise StepscopeError("the same (problem, sample) appears twice; give run directories with disjoint problems")
    if not graded:
        raise StepscopeError("no graded traces to analyse")
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or "model"
    opts = config.measure_options()
    cache_dir = None if cache is None else Path(cache)
    main = Arm("baseline") if config.measure_with is None else Arm("stepflow", config.measure_with)

    def run(items: list[GradedTrace], iv: Arm, desc: str) -> list[Measured]:
        out = []
        bar = progress_.bar(len(items), desc, "trace", enabled=bool(progress))  # stderr; plain lines in a log
        try:
            for g in items:
                out.append(cached_measure(model, tokenizer, name, g.trace, iv, cache_dir, **opts))
                bar.update(1)
        finally:
            bar.close()
        return out

    usable = [g for g in graded if len(g.trace.steps) >= 2]
    measured = run(usable, main, f"saliency [{name}]")
    analysed = []
    for g, m in zip(usable, measured):
        gold = None
        if config.failing_step:
            gold = _gold(g, data_dir)
        analysed.append(AnalysedTrace(g.problem_id, g.sample, g.correct, m.saliency, config.condition, m.shuffled,
                                      gold))
    comparison = compare_groups(analysed, model=name, n_boot=config.n_boot, n_perm=config.n_perm, seed=config.seed)
    mech, with_oeb = None, None
    if config.mechanism:
        pick = [i for i, g in enumerate(usable) if config.mechanism_traces == "all" or not g.correct]
        if config.mechanism_limit is not None:
            pick = pick[: config.mechanism_limit]
        if pick:
            sel = [usable[i] for i in pick]
            base = ([measured[i] for i in pick] if main.stepflow is None
                    else run(sel, Arm("baseline"), f"baseline [{name}]"))
            conds = {iv.name: run(sel, iv, f"{iv.name} [{name}]")
                     for iv in components(config.stepflow, config.seed, config.controls)}
            acts = None
            if config.activations:
                ivs = [iv for iv in components(config.stepflow, config.seed, config.controls)
                       if iv.name in ("smi", "smi_random", "both")]
                sub = sel[: config.activation_limit]
                acts = activation_effects(model, tokenizer, [g.trace for g in sub], ivs, [g.problem_id for g in sub],
                                          n_boot=max(200, config.n_boot // 2), seed=config.seed)
            what = "wrong" if config.mechanism_traces == "wrong" else "all"
            mech = mechanism_check(base, conds, [g.problem_id for g in sel],
                                   selection=f"{len(sel)} {what} traces (first in run order)", n_boot=config.n_boot,
                                   seed=config.seed, activations=acts)
            with_oeb = {(g.problem_id, g.sample): m.saliency for g, m in zip(sel, conds["oeb"])}
    failing = failing_step_analysis(analysed, with_oeb=with_oeb, n_boot=config.n_boot, seed=config.seed) \
        if config.failing_step else None
    skipped = len(graded) - len(usable)
    settings = {"traces": len(graded), "skipped_without_response_steps": skipped}
    return AnalysisResult(config, (ModelAnalysis(name, comparison, mech, failing, time.perf_counter() - t0),), settings)
