"""Code grading: run extracted code against a problem's tests in the sandbox."""

from __future__ import annotations

import re
from typing import Callable

from ..sandbox import run_python
from .datasets import Problem
from .extract import extract_answer
from .verdict import Grade

__all__ = ["grade_code"]


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


def grade_code(problem: Problem, response: str, timeout_s: float) -> Grade:
    """Run the extracted code against the problem's tests in the sandbox; right iff it exits cleanly."""
    code = extract_answer(problem, response)
    if not code:
        return Grade(False, None, "no code found")
    program = _HARNESSES[problem.meta.get("harness", "check")](problem, code)
    result = run_python(program, timeout_s=timeout_s)
    tail = result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else ""
    return Grade(result.ok, code, f"sandbox {result.status}" + (f": {tail}" if tail and not result.ok else ""))


