"""Graded traces from an evaluation run, and their Step-Saliency, cached on disk so re-runs are fast."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import StepscopeError
from ..saliency import StepSaliency, step_saliency
from ..trace import Trace
from .compare import AnalysedTrace


def graded_traces(run_dir: Path, condition: str) -> list[tuple[dict, Trace]]:
    """(result line, trace) for every sample of ``condition`` in an eval run that saved its traces."""
    from ..evaluation.runner import merge_results

    records, _ = merge_results(run_dir)
    rows = [r for r in records if r.get("condition") == condition]
    if not rows:
        conds = sorted({r.get("condition") for r in records})
        raise StepscopeError(f"{run_dir} has no samples of condition {condition!r} (it has: {', '.join(conds) or 'none'})")
    out = []
    for r in rows:
        if not r.get("trace"):
            raise StepscopeError(f"{run_dir} was run without --save-traces; analyze needs the traces")
        out.append((r, Trace.load(Path(run_dir) / r["trace"])))
    return out


def first_problems(rows: list[tuple[dict, Trace]], limit: int) -> list[tuple[dict, Trace]]:
    """The rows of the first ``limit`` problems in run order, all their samples: ``--limit`` on ``--traces``."""
    if limit < 1:
        raise StepscopeError("--limit must be at least 1")
    keep: dict[str, None] = {}
    for r, _ in rows:
        if len(keep) == limit:
            break
        keep.setdefault(str(r.get("problem_id")), None)
    return [(r, t) for r, t in rows if str(r.get("problem_id")) in keep]


def cache_key(model_name: str, trace: Trace, options: dict) -> str:
    doc = json.dumps({"model": model_name, "ids": trace.token_ids, "prompt_len": trace.prompt_len,
                      "steps": [(s.kind, s.start, s.end) for s in trace.steps], "options": options}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def cached_saliency(model, tokenizer, model_name: str, traces: list[Trace], cache: Path, *, stepflow=None,
                    progress: bool = True, desc: str = "saliency", **options) -> list[StepSaliency]:
    """Step-Saliency of each trace, reusing ``cache/<key>.npz/.json`` when present."""
    opts = dict(options, stepflow=None if stepflow is None else stepflow.to_dict())
    out = []
    for trace in tqdm(traces, desc=desc, unit="trace", disable=not progress or None, leave=False):
        path = cache / cache_key(model_name, trace, opts)
        if path.with_suffix(".json").exists() and path.with_suffix(".npz").exists():
            out.append(StepSaliency.load(path))
            continue
        r = step_saliency(model, tokenizer, trace, stepflow=stepflow, progress=False, **options)
        r.save(path)
        out.append(r)
    return out


def analysed(rows: list[tuple[dict, Trace]], results: list[StepSaliency], condition: str) -> list[AnalysedTrace]:
    return [AnalysedTrace(r["problem_id"], int(r["sample"]), bool(r["correct"]), s, condition)
            for (r, _), s in zip(rows, results)]
