"""Gold steps from worked solutions with calculator annotations (GSM8K's ``<<48/2=24>>``), and a locator.

A worked solution's annotations are its gold steps, in order: each has a value (after ``=``) and operands (the
numbers of its expression). An operand equal to an earlier step's value reads that step (the latest such step);
otherwise, if the question states it, it is a premise from the question; otherwise it is a constant ("half", "a
dozen") and reads nothing.

:func:`locate_worked` walks a trace's thinking steps in order and reads each step's *results* (the numbers right
after an ``=``; a step without ``=`` offers all its numbers). A result equal to a gold value not yet reached marks
that gold step as reached in this trace step. The first result that is neither a gold value nor a number of the
question is taken as an attempt at the first gold step not yet reached; the first such attempt whose gold step the
trace never reaches is the first wrong step (a detour that still arrives at the gold value is no error). A valid
alternative route that never passes a gold value counts as leaving the gold solution: the locator is meant for
wrong traces, compared with the correct samples of the same problem.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..trace import Trace
from .failing import FailingStep

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass(frozen=True)
class WorkedRef:
    """An operand a gold step reads: ``step`` 0 for a premise in the question, else the gold step it comes from."""

    step: int
    distance: int


@dataclass(frozen=True)
class WorkedStep:
    index: int  # from 1
    expression: str
    value: float
    refs: tuple[WorkedRef, ...]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def _numbers(text: str) -> list[float]:
    return [v for v in (_number(m) for m in _NUMBER.findall(text)) if v is not None]


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def worked_steps(solution: str, question: str) -> tuple[WorkedStep, ...]:
    """The gold steps of a worked solution (one per calculator annotation, in order)."""
    question_numbers = _numbers(question)
    out: list[WorkedStep] = []
    for m in _ANNOTATION.finditer(solution):
        value = _number(m.group(2).strip())
        if value is None:
            continue
        k = len(out) + 1
        refs = []
        for operand in _numbers(m.group(1)):
            earlier = [s for s in out if _same(s.value, operand)]
            if earlier:
                refs.append(WorkedRef(earlier[-1].index, k - earlier[-1].index))
            elif any(_same(q, operand) for q in question_numbers):
                refs.append(WorkedRef(0, k))
        out.append(WorkedStep(k, m.group(1).strip(), value, tuple(refs)))
    return tuple(out)


_GSM8K_ID = re.compile(r"^gsm8k/(\d+)$")


def gsm8k_steps(problem_id: str, data_dir=None) -> tuple[WorkedStep, ...] | None:
    """The worked-solution gold steps of a ``gsm8k/<index>`` problem, from the offline copy in ``data_dir`` (default
    ``$STEPSCOPE_DATA_DIR``); None for other ids, or without a copy (the hub is not tried: an analysis must not
    wait on the network)."""
    m = _GSM8K_ID.match(str(problem_id))
    if m is None:
        return None
    from ..evaluation.datasets import DATA_DIR_ENV

    directory = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not directory:
        return None
    found = _gsm8k_problems(str(Path(directory).expanduser())).get(int(m[1]))
    return None if found is None else worked_steps(*found)


@functools.lru_cache(maxsize=4)
def _gsm8k_problems(directory: str) -> dict[int, tuple[str, str]]:
    """index -> (worked solution, question) of the offline GSM8K copy (read once per directory)."""
    from ..errors import StepscopeError
    from ..evaluation.datasets import load_problems

    try:
        problems = load_problems("gsm8k", data_dir=directory)
    except StepscopeError:
        return {}
    return {int(p.meta["index"]): (str(p.meta.get("worked_solution", "")), p.question) for p in problems}


def _results(text: str) -> list[float]:
    found = [v for v in (_number(m) for m in _RESULT.findall(text)) if v is not None]
    return found if found else _numbers(text)


def locate_worked(steps: tuple[WorkedStep, ...], trace: Trace) -> FailingStep:
    """Where ``trace`` first leaves the worked solution ``steps`` (see the module docstring for the rule)."""
    question_numbers = _numbers(trace.question)
    step_of_gold: list[int | None] = [None] * len(steps)
    tries: list[tuple[int, int]] = []  # (gold step attempted, trace step) for each result off the gold path
    for i, s in enumerate(trace.steps):
        if s.kind != "thinking":
            continue
        for r in _results(s.text):
            hit = next((g for g in steps if step_of_gold[g.index - 1] is None and _same(g.value, r)), None)
            if hit is not None:
                step_of_gold[hit.index - 1] = i
            elif not any(_same(g.value, r) for g in steps) and not any(_same(q, r) for q in question_numbers):
                nxt = next((g for g in steps if step_of_gold[g.index - 1] is None), None)
                if nxt is not None:
                    tries.append((nxt.index, i))
    # a detour through other values that still reaches the gold step is not an error
    wrong = next(((k, i) for k, i in tries if step_of_gold[k - 1] is None), None)
    first_wrong: int | None = None
    kind = "none"
    if wrong is not None:
        first_wrong, kind = wrong[0], "value"
        step_of_gold[first_wrong - 1] = wrong[1]  # the step that tried it, not a later one that reached it
    else:
        first_wrong = next((g.index for g in steps if step_of_gold[g.index - 1] is None), None)
        kind = "none" if first_wrong is None else "missing"
    q = next((i for i, s in enumerate(trace.steps) if s.kind == "question"), None)
    premises: list[int | None] = []
    distances: list[int] = []
    for g in steps:
        if not g.refs:
            premises.append(None)
            distances.append(0)
            continue
        far = max(g.refs, key=lambda r: r.distance)
        premises.append(q if far.step == 0 else step_of_gold[far.step - 1])
        distances.append(int(far.distance))
    long_range = None if first_wrong is None else distances[first_wrong - 1] >= 2
    return FailingStep(first_wrong, kind, long_range, tuple(step_of_gold), tuple(premises), tuple(distances))
