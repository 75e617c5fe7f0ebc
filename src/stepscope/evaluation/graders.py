"""Grading: Math-Verify for math, letters for choices, sandboxed tests for code, reasoning-gym's scorers.

Answer extraction lives in :mod:`.extract`, code execution in :mod:`.code_grading`, and the worker pool that
isolates each grading call in :mod:`.pool`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from typing import Callable, Sequence

from ..errors import StepscopeError
from .code_grading import grade_code
from .datasets import Problem
from .extract import clean_answer, extract_answer
from .pool import map_isolated
from .verdict import Grade

__all__ = ["Grade", "extract_answer", "grade", "grade_many", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 10.0

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _as_number(text: str) -> float | None:
    """The single number written in ``text`` (commas, $ and units ignored), else None."""
    cleaned = re.sub(r"\\text\{[^}]*\}|\\[,!;: ]|\\\$|\$", " ", text)
    numbers = _NUMBER.findall(cleaned)
    if len(numbers) != 1:
        return None
    token = numbers[0].replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den)
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _numeric_equal(gold: str, pred: str) -> bool:
    a, b = _as_number(gold), _as_number(pred)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _grade_math(problem: Problem, response: str, timeout_s: float) -> Grade:
    """Math-Verify with the gold answer first (its argument order is not symmetric)."""
    from math_verify import parse, verify  # noqa: PLC0415 - sympy import is slow; only when grading math

    pred = extract_answer(problem, response)
    if pred is None:
        return Grade(False, None, "no answer found")
    on_main = threading.current_thread() is threading.main_thread()
    seconds = max(1, math.ceil(timeout_s)) if on_main else None  # signal.alarm only works on the main thread
    gold_parsed = parse(f"\\boxed{{{problem.answer}}}", parsing_timeout=seconds)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=seconds)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=seconds):
        return Grade(True, pred, "math-verify")
    if problem.meta.get("numeric") and _numeric_equal(problem.answer, pred):
        return Grade(True, pred, "numeric")
    if not gold_parsed:
        same = clean_answer(problem.answer) == clean_answer(pred)
        return Grade(same, pred, "gold not parseable; compared as text")
    return Grade(False, pred, "math-verify: not equal" if pred_parsed else "answer not parseable")


def _grade_choice(problem: Problem, response: str, timeout_s: float) -> Grade:
    pred = extract_answer(problem, response)
    if pred is None:
        return Grade(False, None, "no option letter found")
    return Grade(pred == problem.answer.strip().upper(), pred, "letter")


def _normalise_text(text: str) -> str:
    return " ".join(clean_answer(text).casefold().split())


def _grade_exact(problem: Problem, response: str, timeout_s: float) -> Grade:
    pred = extract_answer(problem, response)
    if pred is None:
        return Grade(False, None, "no answer found")
    return Grade(_normalise_text(pred) == _normalise_text(problem.answer), pred, "exact match")


@functools.lru_cache(maxsize=32)
def _rg_scorer(task: str, params_json: str, seed: int, size: int) -> Callable[[str | None, dict], float]:
    """The task's own ``score_answer``, from a dataset built with the same settings (config can matter)."""
    import reasoning_gym  # noqa: PLC0415

    try:
        return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(params_json)).score_answer
    except Exception:  # fall back to the default config's scorer
        return reasoning_gym.get_score_answer_fn(task)


def _grade_rg(problem: Problem, response: str, timeout_s: float) -> Grade:
    meta = problem.meta
    if "entry" not in meta or "task" not in meta:
        raise StepscopeError(f"problem {problem.id} has no reasoning-gym entry; load it with load_problems('rg:...')")
    pred = extract_answer(problem, response)
    params = json.dumps(meta.get("rg_params", {}), sort_keys=True, default=repr)
    scorer = _rg_scorer(meta["task"], params, int(meta.get("seed", 0)), int(meta.get("size", 100)))
    score = float(scorer(pred, meta["entry"]))
    return Grade(score >= 1.0, pred, f"reasoning-gym score {score:.3g}")


_GRADE_FUNCS: dict[str, Callable[[Problem, str, float], Grade]] = {
    "math": _grade_math,
    "choice": _grade_choice,
    "exact": _grade_exact,
    "code": grade_code,
    "rg": _grade_rg,
}


def grade(problem: Problem, response: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade one response; a failure inside a grader becomes a wrong Grade with the reason in ``detail``."""
    func = _GRADE_FUNCS.get(problem.grader)
    if func is None:
        raise StepscopeError(f"unknown grader {problem.grader!r}; choose one of {', '.join(_GRADE_FUNCS)}")
    try:
        return func(problem, response or "", timeout_s)
    except StepscopeError:
        raise
    except Exception as exc:  # model output must never crash the evaluation
        return Grade(False, None, f"grader error: {type(exc).__name__}: {exc}"[:300])



# --- isolated parallel map ----------------------------------------------------------------------------


def _grade_item(item: tuple[Problem, str, float]) -> Grade:
    problem, response, timeout_s = item
    return grade(problem, response, timeout_s=timeout_s)


def grade_many(
    problems: Sequence[Problem],
    responses: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Grade]:
    """Grade many responses in worker processes; ``workers=0`` grades in this process (no isolation)."""
    if len(problems) != len(responses):
        raise StepscopeError(f"got {len(problems)} problems but {len(responses)} responses; pass one response per problem")
    for problem in problems:
        if problem.grader not in _GRADE_FUNCS:
            raise StepscopeError(f"unknown grader {problem.grader!r} in {problem.id}; choose one of {', '.join(_GRADE_FUNCS)}")
    items = [(p, r or "", float(timeout_s)) for p, r in zip(problems, responses)]
    if workers <= 0 or not items:
        return [_grade_item(item) for item in items]
    outcomes = map_isolated(_grade_item, items, workers=workers, deadline_s=3 * timeout_s + 10)
    return [value if ok and isinstance(value, Grade) else Grade(False, None, str(value)) for ok, value in outcomes]
