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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import StepscopeError
from ..extras import require
from ..sandbox.pool import map_isolated
from .code_grading import grade_code
from .datasets import Problem, add_grader_name, grader_names
from .extract import clean_answer, extract_answer, numeric_value, strip_special_tokens
from .grader_inputs import RgTask
from .verdict import Grade

__all__ = ["DEFAULT_TIMEOUT_S", "GRADING_MODES", "Grade", "GradingConfig", "extract_answer", "grade", "grade_many"]

DEFAULT_TIMEOUT_S = 10.0

GRADING_MODES = ("stepscope", "lighteval")


@dataclass(frozen=True)
class GradingConfig:
    """How responses are graded.

    ``mode="stepscope"`` (the default): our extraction (the first complete expression after an answer marker)
    with Math-Verify and numeric comparison. ``mode="lighteval"``: math scored as lighteval scores it
    (Math-Verify's own extraction on the whole response), so a score can be set beside published numbers;
    the other graders do not change.
    """

    mode: str = "stepscope"

    def __post_init__(self) -> None:
        if self.mode not in GRADING_MODES:
            raise StepscopeError(f"unknown grading mode {self.mode!r}; choose one of {', '.join(GRADING_MODES)}")

    def to_dict(self) -> dict:
        return {"mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict | None) -> GradingConfig:
        return cls(**(d or {}))


def _timeout(timeout_s: float) -> int | None:
    # Math-Verify's timeout is a signal.alarm, which only works on the main thread: none elsewhere
    on_main = threading.current_thread() is threading.main_thread()
    return max(1, math.ceil(timeout_s)) if on_main else None


def _text_key(text: str) -> str:
    """A form of an answer for plain comparison: "3:30 p.m." ~ "3:30 pm", "\\text{Friday}" ~ "friday"."""
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", clean_answer(text))
    text = re.sub(r"\\left|\\right|\$|\s+", "", text.casefold())
    return re.sub(r"(?<=[a-z])\.", "", text).rstrip(".")


def _grade_math(problem: Problem, response: str, timeout_s: float) -> Grade:
    """Our extraction, then: the same text, equal numbers (golds with units too), or Math-Verify (gold first)."""
    require("math_verify", "grading math answers")  # missing: one line naming the [eval] extra
    from math_verify import parse, verify

    pred = extract_answer(problem, response)
    if pred is None:
        return Grade(False, None, "no answer found")
    if _text_key(pred) and _text_key(pred) == _text_key(problem.answer):
        return Grade(True, pred, "same text")
    gold_value, pred_value = numeric_value(problem.answer), numeric_value(pred)
    numeric = gold_value is not None and pred_value is not None
    if gold_value is not None and pred_value is not None \
            and math.isclose(gold_value, pred_value, rel_tol=1e-9, abs_tol=1e-9):
        return Grade(True, pred, "numeric")
    seconds = _timeout(timeout_s)
    gold_parsed = parse(f"\\boxed{{{problem.answer}}}", parsing_timeout=seconds)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=seconds)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=seconds):
        return Grade(True, pred, "math-verify")
    if numeric:
        return Grade(False, pred, "numeric: not equal")
    if not gold_parsed:
        return Grade(False, pred, "gold not parseable; compared as text")
    return Grade(False, pred, "math-verify: not equal" if pred_parsed else "answer not parseable")


def _without_reasoning(response: str) -> str:
    """The response as lighteval scores it: special tokens skipped, each <think>...</think> pair removed."""
    text = strip_special_tokens(response)
    while "<think>" in text and "</think>" in text:
        start = text.find("<think>")
        end = text.find("</think>", start)
        if end < 0:
            break
        text = text[:start] + text[end + len("</think>"):]
    return text.strip()


def _grade_math_lighteval(problem: Problem, response: str, timeout_s: float) -> Grade:
    """lighteval's math scoring: Math-Verify extracts from the whole response with lighteval's targets.

    GSM8K is scored by lighteval's ``expr_gold_metric`` (gold: expressions; prediction: expressions and LaTeX
    with \\boxed first; 5 decimals), the other math sets by ``pass_at_k_math`` (gold and prediction: expressions
    and LaTeX; 6 decimals). The gold is the set's answer, boxed where LaTeX is read, which is what lighteval
    extracts from the MATH-500 solution.
    """
    require("math_verify", "grading math answers")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if problem.id.split("/", 1)[0] == "gsm8k":
        gold_targets = [ExprExtractionConfig()]
        pred_targets = [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)]
        precision, gold_text = 5, problem.answer
    else:
        gold_targets = pred_targets = [ExprExtractionConfig(), LatexExtractionConfig()]
        precision, gold_text = 6, f"\\boxed{{{problem.answer}}}"
    seconds = 5 if _timeout(timeout_s) else None  # lighteval's own 5 s, on the main thread only
    gold = parse(gold_text, gold_targets, parsing_timeout=seconds) or [problem.answer]  # unread: the raw string
    pred = parse(_without_reasoning(response), pred_targets, parsing_timeout=seconds)
    extracted = str(pred[-1]) if pred else None
    if not pred:
        return Grade(False, None, "lighteval: no answer found")
    correct = verify(gold, pred, float_rounding=precision, timeout_seconds=seconds)
    return Grade(bool(correct), extracted, "lighteval: " + ("equal" if correct else "not equal"))


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
    reasoning_gym = require("reasoning_gym", "grading reasoning-gym tasks")

    try:
        return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(params_json)).score_answer
    except Exception:  # noqa: BLE001 - any failure: fall back to the default config's scorer
        return reasoning_gym.get_score_answer_fn(task)


def _grade_rg(problem: Problem, response: str, timeout_s: float) -> Grade:
    task = problem.task
    if not isinstance(task, RgTask):
        raise StepscopeError(f"problem {problem.id} has no reasoning-gym entry; load it with load_problems('rg:...')")
    pred = extract_answer(problem, response)
    params = json.dumps(task.params, sort_keys=True, default=repr)
    scorer = _rg_scorer(task.task, params, int(task.seed), int(task.size))
    score = float(scorer(pred, task.entry))
    return Grade(score >= 1.0, pred, f"reasoning-gym score {score:.3g}")


_GRADE_FUNCS: dict[str, Callable[[Problem, str, float], Grade]] = {
    "math": _grade_math,
    "choice": _grade_choice,
    "exact": _grade_exact,
    "code": grade_code,
    "rg": _grade_rg,
}
# graders that a grading mode replaces; the rest grade the same in every mode
_MODE_FUNCS: dict[tuple[str, str], Callable[[Problem, str, float], Grade]] = {
    ("lighteval", "math"): _grade_math_lighteval,
}


GradeFunc = Callable[[Problem, str, float], Grade]


def register_grader(name: str, func: GradeFunc, *, instructions: Mapping[str, str] | None = None) -> GradeFunc:
    """Make ``func(problem, response, timeout_s) -> Grade`` the grader called ``name``.

    ``instructions``: the answer-format instruction its prompts append, per prompt style (``"think"``,
    ``"plain"``); a style left out gets the ``exact`` grader's. Define the function at the top level of an
    importable module: grading runs in fresh worker processes, which import it from there. Problems name it in
    ``Problem.grader`` (``--grader NAME`` for a data file). What it needs beyond question and gold answer belongs in
    ``Problem.task`` (:mod:`.grader_inputs`).
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise StepscopeError(f"grader name {name!r}: use lower-case letters, digits and '_'")
    if not callable(func):
        raise StepscopeError(f"grader {name!r} must be a function (problem, response, timeout_s) -> Grade")
    known = _GRADE_FUNCS.get(name)
    if known is not None and getattr(known, "__qualname__", None) != getattr(func, "__qualname__", None):
        raise StepscopeError(f"a grader named {name!r} exists already; choose another name")
    _GRADE_FUNCS[name] = func
    add_grader_name(name, instructions)
    return func


def _grade_func(problem: Problem, config: GradingConfig | None) -> GradeFunc:
    if problem.grader not in _GRADE_FUNCS:
        grader_names()  # a plug-in may register it
    func = _GRADE_FUNCS.get(problem.grader)
    if func is None:
        raise StepscopeError(f"unknown grader {problem.grader!r} in {problem.id}; choose one of "
                             f"{', '.join(_GRADE_FUNCS)}")
    return _MODE_FUNCS.get(((config or GradingConfig()).mode, problem.grader), func)


def grade(problem: Problem, response: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
          config: GradingConfig | None = None) -> Grade:
    """Grade one response; a failure inside a grader becomes a wrong Grade with the reason in ``detail``."""
    return _run_grader(_grade_func(problem, config), problem, response, timeout_s)


def _run_grader(func: GradeFunc, problem: Problem, response: str, timeout_s: float) -> Grade:
    try:
        return func(problem, response or "", timeout_s)
    except StepscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - model output must never crash the evaluation
        return Grade(False, None, f"grader error: {type(exc).__name__}: {exc}"[:300])



# --- isolated parallel map ----------------------------------------------------------------------------


def _grade_item(item: tuple[Problem, str, float, GradeFunc]) -> Grade:
    problem, response, timeout_s, func = item  # the function travels: a worker need not know its registration
    return _run_grader(func, problem, response, timeout_s)


def grade_many(
    problems: Sequence[Problem],
    responses: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    config: GradingConfig | None = None,
) -> list[Grade]:
    """Grade many responses in worker processes; ``workers=0`` grades in this process (no isolation)."""
    if len(problems) != len(responses):
        raise StepscopeError(f"got {len(problems)} problems but {len(responses)} responses; pass one response per "
                             "problem")
    funcs = [_grade_func(p, config) for p in problems]
    if workers > 0:
        for func in set(funcs):
            where = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
            if getattr(func, "__module__", "__main__") == "__main__" or "<locals>" in where:
                raise StepscopeError(f"grader {where} is not importable by the grading workers: define it at the "
                                     "top level of a module (or grade in this process with workers=0)")
    items = [(p, r or "", float(timeout_s), f) for p, r, f in zip(problems, responses, funcs)]
    if workers <= 0 or not items:
        return [_grade_item(item) for item in items]
    outcomes = map_isolated(_grade_item, items, workers=workers, deadline_s=3 * timeout_s + 10)
    return [value if ok and isinstance(value, Grade) else Grade(False, None, str(value)) for ok, value in outcomes]
