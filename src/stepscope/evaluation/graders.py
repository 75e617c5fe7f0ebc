"""Answer extraction and grading: Math-Verify for math, letters for choices, sandboxed tests for code.

Math-Verify's timeouts use ``signal.alarm``, which works only on a process's main thread, and model output
can make a parser or a test program hang or crash; so :func:`grade_many` grades in worker processes, one
item at a time, and turns a crash or a hang into a failed :class:`Grade` instead of a lost batch.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing.connection
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import StepscopeError
from ..sandbox import run_python
from .datasets import Problem

__all__ = ["Grade", "extract_answer", "grade", "grade_many", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Grade:
    """The verdict on one response: whether it is right, what answer was read from it, and why."""

    correct: bool
    extracted: str | None
    detail: str = ""


# --- extraction ---------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "Final answer: X", "final answer is X", "the answer is X" -- but not "the final answer to the problem is X",
# whose X the last-number fallback finds
_FINAL_LINE = re.compile(
    r"(?im)(?:final\s+answer\s*(?:is\b|[:：])|(?:the\s+)?(?:final\s+)?answer\s+is\b)\s*[:：]?\s*(.+?)\s*$"
)
# special tokens such as <|im_end|> or <｜end▁of▁sentence｜> are not part of an answer
_SPECIAL_TOKEN = re.compile(r"<\|[^|>\s]{1,40}\|>|<｜[^｜>]{1,40}｜>")
_ANSWER_TAG = re.compile(r"(?is)<answer>(.*?)</answer>")
_SUMMARY_MARKERS = (re.compile(r"</think>"), re.compile(r"<\|channel\|>final.*?<\|message\|>", re.S))
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)
_CODE_LIKE = re.compile(r"(?m)^\s*(?:def |class |import |from \S+ import )")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces allowed)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
    return None


def _regions(response: str) -> list[str]:
    """The summary after a thinking marker first (where the answer belongs), then the whole response."""
    for marker in _SUMMARY_MARKERS:
        found = list(marker.finditer(response))
        if found:
            return [response[found[-1].end():], response]
    return [response]


def _clean(answer: str) -> str:
    """Strip markdown, quotes, dollar signs and a trailing full stop from an answer written in prose."""
    answer = answer.strip().strip("*'\"`").strip().rstrip(".").strip().strip("'\"`").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def _final_line(text: str) -> str | None:
    matches = [m.group(1) for m in _FINAL_LINE.finditer(text) if _clean(m.group(1))]
    if not matches:
        return None
    answer = _clean(matches[-1])
    # "Final answer: 4 - 1 = 3" states the result after the last "=" (but keep "x = 3"-style text intact)
    if "=" in answer and "\\" not in answer:
        rhs = _clean(answer.rsplit("=", 1)[1])
        if rhs:
            return rhs
    return answer


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _first_found(text: str, *finders: Callable[[str], str | None]) -> str | None:
    for region in _regions(text):
        region = _SPECIAL_TOKEN.sub("", region)
        for finder in finders:
            found = finder(region)
            if found:
                return found
    return None


def _extract_math(problem: Problem, response: str) -> str | None:
    return _first_found(response, last_boxed, _final_line, _last_number)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", text))


def _extract_rg(problem: Problem, response: str) -> str | None:
    def answer_tag(text: str) -> str | None:
        found = _ANSWER_TAG.findall(text)
        return found[-1].strip() if found else None

    fallback = _last_number if _looks_numeric(problem.answer) else _last_line
    return _first_found(response, last_boxed, answer_tag, _final_line, fallback)


def _letters(problem: Problem) -> str:
    return str(problem.meta.get("choices", "ABCD"))


def _extract_choice(problem: Problem, response: str) -> str | None:
    """The chosen option letter, robust to (B), answer: b, **B**, \\boxed{C}, Final answer: D."""
    letters = _letters(problem)
    upper, lower = re.escape(letters.upper()), re.escape(letters.lower())

    def from_boxed(text: str) -> str | None:
        content = last_boxed(text)
        if content is None:
            return None
        content = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", content)
        found = re.match(rf"^[\s(\[*]*([{upper}{lower}])(?:[\s)\].:*]|$)", content)
        return found.group(1) if found else None

    def from_answer_phrase(text: str) -> str | None:
        pattern = re.compile(
            rf"(?i)(?:final\s+answer|answer|option|choice)\s*(?:is|would\s+be|:|：)?\s*[:：]?\s*"
            rf"(?:\*\*|\$)?\s*[(\[]?\s*([{upper}{lower}])\s*[)\]]?(?:\*\*|\$)?(?=\s*(?:$|[.,;:!\n]|\s))"
        )
        hits = []
        for match in pattern.finditer(text):
            letter = match.group(1)
            if letter.islower():  # 'the answer is a bit' must not read as A
                rest = text[match.end():match.end() + 3]
                if rest.strip() and rest.strip()[0].isalpha():
                    continue
            hits.append(letter)
        return hits[-1] if hits else None

    def from_bold(text: str) -> str | None:
        hits = re.findall(rf"\*\*\s*\(?([{upper}])\)?[.:]?\s*\*\*", text)
        return hits[-1] if hits else None

    def from_parens(text: str) -> str | None:
        hits = re.findall(rf"\(([{upper}])\)", text)
        return hits[-1] if hits else None

    def from_lone_line(text: str) -> str | None:
        hits = re.findall(rf"(?m)^\s*([{upper}])[.)]?\s*$", text)
        return hits[-1] if hits else None

    found = _first_found(response, from_boxed, from_answer_phrase, from_bold, from_parens, from_lone_line)
    return found.upper() if found else None


def _extract_code(problem: Problem, response: str) -> str | None:
    """The last ```python block, else the last fenced block, else the response itself if it is code."""
    blocks = _FENCE.findall(response)
    python_blocks = [body for lang, body in blocks if lang.strip().lower() in ("python", "py", "python3")]
    for candidates in (python_blocks, [body for _, body in blocks]):
        nonempty = [body for body in candidates if body.strip()]
        if nonempty:
            return nonempty[-1].strip("\n")
    region = _regions(response)[0]
    return region.strip("\n") if _CODE_LIKE.search(region) else None


def _extract_exact(problem: Problem, response: str) -> str | None:
    return _first_found(response, _final_line, _last_line)


_EXTRACTORS: dict[str, Callable[[Problem, str], str | None]] = {
    "math": _extract_math,
    "choice": _extract_choice,
    "code": _extract_code,
    "exact": _extract_exact,
    "rg": _extract_rg,
}


def extract_answer(problem: Problem, response: str) -> str | None:
    """Read the final answer (or the code) out of a response, the way the problem's grader expects it."""
    try:
        extractor = _EXTRACTORS[problem.grader]
    except KeyError:
        raise StepscopeError(f"unknown grader {problem.grader!r}; choose one of {', '.join(_EXTRACTORS)}") from None
    return extractor(problem, response or "")


# --- grading ----------------------------------------------------------------------------------------


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
        same = _clean(problem.answer) == _clean(pred)
        return Grade(same, pred, "gold not parseable; compared as text")
    return Grade(False, pred, "math-verify: not equal" if pred_parsed else "answer not parseable")


def _grade_choice(problem: Problem, response: str, timeout_s: float) -> Grade:
    pred = extract_answer(problem, response)
    if pred is None:
        return Grade(False, None, "no option letter found")
    return Grade(pred == problem.answer.strip().upper(), pred, "letter")


def _normalise_text(text: str) -> str:
    return " ".join(_clean(text).casefold().split())


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


_LCB_HARNESS = '''\
import base64, io, json, pickle, sys, zlib
TESTS = json.loads({tests!r})
CODE = {code!r}

def decode(blob):
    if not blob:
        return []
    try:
        return json.loads(blob)
    except ValueError:
        return json.loads(pickle.loads(zlib.decompress(base64.b64decode(blob.encode("utf-8")))))

def lines(text):
    return [line.strip() for line in str(text).strip().splitlines()]

cases = decode(TESTS["public"]) + decode(TESTS["private"])
program = compile(CODE, "solution.py", "exec")
for number, case in enumerate(cases):
    if case.get("testtype") == "functional":
        space = {{"__name__": "solution"}}
        exec(program, space)
        name = TESTS["fn_name"]
        target = getattr(space["Solution"](), name) if "Solution" in space else space[name]
        args = [json.loads(line) for line in case["input"].splitlines() if line.strip()]
        if target(*args) != json.loads(case["output"]):
            sys.exit(f"test {{number}} failed")
    else:
        saved = sys.stdin, sys.stdout
        sys.stdin = io.TextIOWrapper(io.BytesIO(case["input"].encode("utf-8")), encoding="utf-8")
        sys.stdout = io.StringIO()
        try:
            exec(program, {{"__name__": "__main__"}})
        except SystemExit:
            pass
        finally:
            got = sys.stdout.getvalue()
            sys.stdin, sys.stdout = saved
        if lines(got) != lines(case["output"]):
            sys.exit(f"test {{number}}: wrong output")
print("all tests passed")
'''


def _import_lines(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines() if re.match(r"(?:import |from \S+ import )", line))


def _check_program(problem: Problem, code: str) -> str:
    """HumanEval style: the function, the test code, then ``check(entry_point)``."""
    entry = problem.meta.get("entry_point")
    if entry and not re.search(rf"(?m)^\s*def\s+{re.escape(entry)}\s*\(", code):
        code = problem.question + code  # a body-only completion of the prompt
    else:
        code = _import_lines(problem.question) + code  # the model may leave out the prompt's imports
    program = code + "\n\n" + problem.answer
    return program + (f"\n\ncheck({entry})\n" if entry else "\n")


def _lcb_program(problem: Problem, code: str) -> str:
    return _LCB_HARNESS.format(tests=problem.answer, code=code)


_HARNESSES: dict[str, Callable[[Problem, str], str]] = {
    "check": _check_program,
    "stdio": _lcb_program,
    "functional": _lcb_program,
}


def _grade_code(problem: Problem, response: str, timeout_s: float) -> Grade:
    """Run the extracted code against the problem's tests in the sandbox; right iff it exits cleanly."""
    code = extract_answer(problem, response)
    if not code:
        return Grade(False, None, "no code found")
    program = _HARNESSES[problem.meta.get("harness", "check")](problem, code)
    result = run_python(program, timeout_s=timeout_s)
    tail = result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else ""
    return Grade(result.ok, code, f"sandbox {result.status}" + (f": {tail}" if tail and not result.ok else ""))


_GRADE_FUNCS: dict[str, Callable[[Problem, str, float], Grade]] = {
    "math": _grade_math,
    "choice": _grade_choice,
    "exact": _grade_exact,
    "code": _grade_code,
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


def _serve(fd: int) -> None:
    """Worker process loop: take (index, item), send back ("ok"|"err", index, value) until told to stop."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        fn = conn.recv()
        conn.send(("ready", -1, None))
        while True:
            message = conn.recv()
            if message is None:
                return
            index, item = message
            try:
                reply = ("ok", index, fn(item))
            except BaseException as exc:  # noqa: BLE001 - report anything, keep serving
                reply = ("err", index, f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    except (EOFError, OSError, KeyboardInterrupt):
        return


# Worker start-up: the parent's sys.path, and the package registered without running its __init__ (which
# imports torch; grading does not need it, and a fresh worker after each crash or hang should start fast).
_WORKER_BOOT = """
import importlib.util, json, sys, types
sys.path[:] = json.loads(sys.argv[2])
spec = importlib.util.find_spec("stepscope")
package = types.ModuleType("stepscope")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["stepscope"] = package
from stepscope.evaluation.graders import _serve
_serve(int(sys.argv[1]))
"""


@dataclass
class _Slot:
    process: subprocess.Popen
    conn: multiprocessing.connection.Connection
    born: float
    ready: bool = False
    index: int | None = None
    started: float = 0.0


def _spawn(fn: Callable[[Any], Any]) -> _Slot:
    """Start a fresh interpreter as a worker (no multiprocessing: no re-import of the caller's __main__)."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()), json.dumps(sys.path)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    conn = multiprocessing.connection.Connection(ours.detach())
    conn.send(fn)
    return _Slot(process, conn, time.monotonic())


def _stop(slot: _Slot) -> None:
    if slot.process.poll() is None:
        slot.process.kill()
    try:
        slot.process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass
    slot.conn.close()


def _map_isolated(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    deadline_s: float,
    startup_s: float = 120.0,
) -> list[tuple[bool, Any]]:
    """Apply ``fn`` to each item in worker processes; a crash or overrun fails that item only.

    Returns ``(True, value)`` or ``(False, reason)`` per item, in order. ``fn`` must be picklable (a
    module-level function). Workers that die are replaced; if workers cannot start at all, the remaining
    items run in this process.
    """
    results: list[tuple[bool, Any] | None] = [None] * len(items)
    pending = deque(range(len(items)))
    slots: list[_Slot] = []
    start_failures = 0
    try:
        slots = [_spawn(fn) for _ in range(min(workers, len(items)))]
        while slots and (pending or any(s.index is not None for s in slots)):
            for slot in slots:
                if slot.ready and slot.index is None and pending:
                    slot.index = pending.popleft()
                    slot.started = time.monotonic()
                    slot.conn.send((slot.index, items[slot.index]))
            limits = [s.started + deadline_s if s.index is not None else s.born + startup_s
                      for s in slots if s.index is not None or not s.ready]
            wait_s = max(0.0, min(limits) - time.monotonic()) if limits else None
            ready = multiprocessing.connection.wait([s.conn for s in slots], timeout=wait_s)
            for slot in list(slots):
                reason = None
                if slot.conn in ready:
                    try:
                        kind, index, value = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.wait(timeout=5)
                        reason = f"the grading process died (exit code {slot.process.returncode})"
                    else:
                        if kind == "ready":
                            slot.ready = True
                        else:
                            results[index] = (kind == "ok", value)
                            slot.index = None
                elif slot.index is not None and time.monotonic() > slot.started + deadline_s:
                    reason = f"grading took longer than {deadline_s:.0f} s and was stopped"
                elif not slot.ready and time.monotonic() > slot.born + startup_s:
                    reason = "a grading process did not start"
                if reason is None:
                    continue
                _stop(slot)
                slots.remove(slot)
                if slot.index is not None:
                    results[slot.index] = (False, reason)
                elif not slot.ready:
                    start_failures += 1
                if pending and start_failures < 3:
                    slots.append(_spawn(fn))
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
            _stop(slot)
    for index in pending:  # workers could not start: run the rest here
        try:
            results[index] = (True, fn(items[index]))
        except Exception as exc:
            results[index] = (False, f"{type(exc).__name__}: {exc}")
    return [r if r is not None else (False, "not graded") for r in results]


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
    outcomes = _map_isolated(_grade_item, items, workers=workers, deadline_s=3 * timeout_s + 10)
    return [value if ok and isinstance(value, Grade) else Grade(False, None, str(value)) for ok, value in outcomes]
