"""Code grading: the verdict comes from the judge only; LiveCodeBench blobs are read without unpickling objects."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from stepscope.evaluation.code_grading import _lcb_cases, run_tests
from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.graders import grade

TEST = "def check(candidate):\n    assert candidate([3, 1, 2]) == (1, 2, 3)\n    assert candidate([]) == ()\n"


def test_a_correct_function_passes_and_types_are_compared_exactly():
    ok = run_tests("def f(xs):\n    return tuple(sorted(xs))\n", "check", {"test": TEST, "entry_point": "f"})
    assert ok.passed and ok.detail == "all tests passed" and ok.isolation
    as_list = run_tests("def f(xs):\n    return sorted(xs)\n", "check", {"test": TEST, "entry_point": "f"})
    assert not as_list.passed  # [1, 2, 3] != (1, 2, 3), as in the test's own process


def test_exceptions_cross_as_their_builtin_type():
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        return\n"
            "    raise AssertionError('no ValueError')\n")
    good = run_tests("def f(x):\n    if x < 0:\n        raise ValueError('neg')\n    return x\n", "check",
                     {"test": test, "entry_point": "f"})
    assert good.passed
    bad = run_tests("def f(x):\n    return x\n", "check", {"test": test, "entry_point": "f"})
    assert not bad.passed and "no ValueError" in bad.detail


def test_a_syntax_error_or_a_missing_function_fails_with_the_reason():
    broken = run_tests("def f(:\n", "check", {"test": TEST, "entry_point": "f"})
    assert not broken.passed and "failed to load" in broken.detail and "SyntaxError" in broken.detail
    missing = run_tests("def g(xs):\n    return ()\n", "check", {"test": TEST, "entry_point": "f"})
    assert not missing.passed and "KeyError" in missing.detail


def test_stdio_programs_are_judged_on_their_output_only():
    cases = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
    right = run_tests("import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(3)\n", "stdio",
                      {"cases": cases})
    assert right.passed  # the exit status of a stdio program is not part of its answer
    wrong = run_tests("print(5)\n", "stdio", {"cases": cases})
    assert not wrong.passed and "test 1" in wrong.detail


def test_state_does_not_leak_between_stdio_cases():
    cases = [{"input": "", "output": "1"}, {"input": "", "output": "1"}]
    program = "import builtins\nbuiltins.counter = getattr(builtins, 'counter', 0) + 1\nprint(builtins.counter)\n"
    assert run_tests(program, "stdio", {"cases": cases}).passed  # every case runs in a fresh process


def test_lcb_blobs_read_json_and_compressed_pickled_strings_but_no_objects():
    cases = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert _lcb_cases(json.dumps(cases)) == cases
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert _lcb_cases(blob) == cases
    hostile = base64.b64encode(zlib.compress(pickle.dumps(Problem("x", "q", "a", "math")))).decode()
    with pytest.raises(pickle.UnpicklingError):
        _lcb_cases(hostile)
    assert _lcb_cases("") == []


def test_a_check_problem_without_an_entry_point_is_a_stated_failure():
    problem = Problem("u/0", "Write f.", TEST, "code", {})
    result = grade(problem, "```python\ndef f(xs):\n    return tuple(sorted(xs))\n```")
    assert not result.correct and "entry point" in result.detail
