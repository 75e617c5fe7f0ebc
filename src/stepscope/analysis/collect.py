"""Graded traces from an evaluation run (measurements and their cache: :mod:`.measure`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import StepscopeError
from ..trace import Trace


def graded_traces(run_dir: Path, condition: str) -> list[tuple[dict, Trace]]:
    """(result line, trace) for every sample of ``condition`` in an eval run that saved its traces."""
    from ..evaluation.store import merge_results

    records, _ = merge_results(run_dir)
    rows = [r for r in records if r.get("condition") == condition]
    if not rows:
        conds = sorted({str(r.get("condition")) for r in records})
        raise StepscopeError(f"{run_dir} has no samples of condition {condition!r} "
                             f"(it has: {', '.join(conds) or 'none'})")
    ungraded = sum(1 for r in rows if r.get("correct") is None)
    if ungraded:  # imported without grading: there is no correct / wrong split to analyse
        raise StepscopeError(f"{ungraded} of {len(rows)} samples in {run_dir} are not graded; re-import them with "
                             "--grade (gold from --dataset NAME or the file) or --source-metric NAME")
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
