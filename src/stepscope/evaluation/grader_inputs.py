"""What a grader needs beyond a problem's question and gold answer, as typed values (``Problem.task``).

One small frozen dataclass per kind of input: :class:`CodeTask` for the code grader, :class:`RgTask` for
reasoning-gym's scorer, :class:`ChoiceTask` for multiple choice; math and exact answers need nothing more.
They are built where problems are made (``datasets.py``, ``importing.py``) and read by the graders
(``graders.py``, ``code_grading.py``, ``extract.py``). ``Problem.meta`` keeps the provenance shown to people
(dataset, index, source id, the rows' own fields); a problem made from meta keys alone (a user's JSONL, code
written before these types) gets its input read from those keys by :func:`task_from_meta`.

None of this enters the problem-set hash or the results files, which depend on the problems' ids, questions,
answers and graders only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChoiceTask", "CodeTask", "GraderInput", "RgTask", "task_from_meta"]


@dataclass(frozen=True)
class CodeTask:
    """The code grader's input. ``harness``: ``"check"`` runs HumanEval's ``check(entry_point)`` (the tests are the
    gold answer); ``"stdio"`` or ``"functional"`` run LiveCodeBench's cases (encoded in the gold answer).
    ``entry_point``: the function a ``check`` harness tests."""

    harness: str = "check"
    entry_point: str | None = None


@dataclass(frozen=True)
class RgTask:
    """Reasoning-gym's input: the task, the generated ``entry`` its ``score_answer`` compares with, and the dataset
    settings (parameters, seed, size) the scorer is rebuilt with, since a task's config can change its scoring."""

    task: str
    entry: dict[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    size: int = 100


@dataclass(frozen=True)
class ChoiceTask:
    """Multiple choice: the option letters an answer may name."""

    letters: str = "ABCD"


GraderInput = CodeTask | RgTask | ChoiceTask  # what Problem.task holds (None: the grader needs nothing)


def task_from_meta(grader: str, meta: Mapping[str, Any]) -> GraderInput | None:
    """The grader input held in the meta keys of a problem's row (``harness`` and ``entry_point``; ``task``,
    ``entry``, ``rg_params``, ``seed`` and ``size``; ``choices``), or None when the grader needs none or its
    keys are missing. Values are kept as they are, so a grader sees exactly what the keys held."""
    if grader == "code":
        return CodeTask(meta.get("harness", "check"), meta.get("entry_point"))
    if grader == "rg":
        if "entry" not in meta or "task" not in meta:
            return None
        return RgTask(meta["task"], meta["entry"], meta.get("rg_params", {}), meta.get("seed", 0),
                      meta.get("size", 100))
    if grader == "choice" and "choices" in meta:
        return ChoiceTask(meta["choices"])
    return None
