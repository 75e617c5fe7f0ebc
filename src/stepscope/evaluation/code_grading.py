"""Code grading: extracted code against a problem's tests, judged by a driver the code cannot reach.

The sandbox runs :mod:`.code_driver` (trusted, standard library only). It forks the candidate into a process
of its own before it reads the tests, runs the tests itself with the candidate behind a data-only proxy,
and writes the verdict to a pipe the candidate never holds. A response is graded correct only when that
verdict says every test passed: how the process exited, what it printed, ``atexit`` hooks or exception
hooks count for nothing. See docs/evaluation.md, "Code grading and its threat model".
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..sandbox import run_python
from .datasets import Problem
from .extract import extract_answer
from .grader_inputs import CodeTask
from .verdict import Grade

__all__ = ["CodeVerdict", "grade_code", "run_tests"]

_DRIVER = Path(__file__).with_name("code_driver.py")


@lru_cache(maxsize=1)
def _driver_source() -> str:
    return _DRIVER.read_text(encoding="utf-8")


def _frame(obj: object) -> bytes:
    data = json.dumps(obj).encode("utf-8")
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class CodeVerdict:
    """What the driver reported (``passed`` is only ever true when the driver itself said so)."""

    passed: bool
    detail: str
    isolation: str
    status: str


def run_tests(code: str, mode: str, tests: dict, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> CodeVerdict:
    """Run ``code`` against ``tests`` (``mode`` ``check``, ``stdio`` or ``functional``) in the sandbox."""
    stdin = _frame({"code": code, "mode": mode}) + _frame(tests)
    result = run_python(_driver_source(), timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, channel=True)
    verdict = None
    try:
        verdict = json.loads(result.channel[4:].decode("utf-8")) if result.channel else None
    except (ValueError, UnicodeDecodeError):
        verdict = None
    if isinstance(verdict, dict) and isinstance(verdict.get("passed"), bool):
        return CodeVerdict(verdict["passed"], str(verdict.get("detail", ""))[:300], result.isolation, result.status)
    # no verdict: the limits ended the run, or the judge itself was killed
    tail = _last_line(result.stderr)
    reason = {"timeout": "timed out", "memory": "ran out of memory", "cpu": "used up its CPU time",
              "file_size": "wrote too large a file", "disk": "filled its disk quota"}.get(result.status)
    detail = f"{reason} (sandbox {result.status})" if reason else \
        f"no verdict (sandbox {result.status}{': ' + tail if tail else ''})"
    return CodeVerdict(False, detail[:300], result.isolation, result.status)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _import_lines(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines() if re.match(r"(?:import |from \S+ import )", line))


def _check_code(problem: Problem, code: str) -> str:
    """HumanEval style: a body-only completion continues the prompt; a full function keeps its imports."""
    entry = _code_task(problem).entry_point
    if entry and not re.search(rf"(?m)^\s*def\s+{re.escape(entry)}\s*\(", code):
        return problem.question + code
    return _import_lines(problem.question) + code


def _code_task(problem: Problem) -> CodeTask:
    return problem.task if isinstance(problem.task, CodeTask) else CodeTask()  # a code Problem always has one


def _lcb_cases(blob: str) -> list:
    """LiveCodeBench test lists: JSON, or zlib + base64 of a pickled JSON string (read without unpickling
    objects: only the string is allowed out)."""
    if not blob:
        return []
    try:
        return json.loads(blob)
    except ValueError:
        import base64
        import io
        import pickle
        import zlib

        class _StringsOnly(pickle.Unpickler):
            def find_class(self, module, name):
                raise pickle.UnpicklingError("only plain data is read")

        text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(blob.encode("utf-8"))))).load()
        return json.loads(text) if isinstance(text, str) else []


def grade_code(problem: Problem, response: str, timeout_s: float) -> Grade:
    """Grade a response by running its code against the problem's tests; right iff the driver says so."""
    code = extract_answer(problem, response)
    if not code:
        return Grade(False, None, "no code found")
    task = _code_task(problem)
    harness = task.harness
    if harness == "check":
        entry = task.entry_point
        if not entry:
            return Grade(False, code, "the problem names no entry point to test")
        tests: dict[str, Any] = {"setup": problem.question, "test": problem.answer, "entry_point": entry}
        verdict = run_tests(_check_code(problem, code), "check", tests, timeout_s=timeout_s)
    else:
        spec = json.loads(problem.answer)
        cases = _lcb_cases(spec.get("public", "")) + _lcb_cases(spec.get("private", ""))
        tests = {"cases": cases, "fn_name": spec.get("fn_name")}
        verdict = run_tests(code, "stdio" if harness == "stdio" else "functional", tests, timeout_s=timeout_s)
    return Grade(verdict.passed, code, f"sandbox: {verdict.detail}")
