"""Typed per-grader inputs on Problem.task: built where problems are made, read by the graders, outside the hash."""

from __future__ import annotations

import json
import pickle

import pytest

from stepscope.evaluation.datasets import Problem, load_problems, load_problems_from_file
from stepscope.evaluation.extract import extract_answer
from stepscope.evaluation.grader_inputs import ChoiceTask, CodeTask, RgTask, task_from_meta
from stepscope.evaluation.graders import grade
from stepscope.evaluation.run_config import problems_fingerprint

ADD_PROMPT = "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def test_the_input_is_read_from_the_meta_keys_when_not_given():
    assert Problem("c/0", "q", "t", "code", {"entry_point": "f"}).task == CodeTask("check", "f")
    assert Problem("c/1", "q", "t", "code", {"harness": "stdio"}).task == CodeTask("stdio", None)
    assert Problem("x/0", "q", "B", "choice", {"choices": "ABCDE"}).task == ChoiceTask("ABCDE")
    assert Problem("x/1", "q", "B", "choice", {}).task is None
    assert Problem("m/0", "q", "1", "math", {"entry_point": "f"}).task is None
    assert Problem("r/0", "q", "1", "rg", {"task": "t"}).task is None  # no entry: nothing to score against
    entry = {"question": "q", "answer": "1"}
    meta = {"task": "t", "entry": entry, "rg_params": {"a": 1}, "seed": 3, "size": 7}
    assert task_from_meta("rg", meta) == RgTask("t", entry, {"a": 1}, 3, 7)


def test_an_explicit_input_wins_and_neither_it_nor_meta_moves_the_problems_hash():
    plain = Problem("c/0", "q", ADD_TESTS, "code", {})
    typed = Problem("c/0", "q", ADD_TESTS, "code", {"shown": "only"}, CodeTask("check", "add"))
    assert typed.task == CodeTask("check", "add") and plain.task == CodeTask()
    assert plain == typed and problems_fingerprint([plain]) == problems_fingerprint([typed])
    again = pickle.loads(pickle.dumps(typed))  # problems travel to the grading processes
    assert again.task == typed.task


def test_graders_read_the_typed_input_not_meta():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    problem = Problem("h/0", ADD_PROMPT, ADD_TESTS, "code", {}, CodeTask("check", "add"))
    assert grade(problem, good).correct
    assert not grade(Problem("h/0", ADD_PROMPT, ADD_TESTS, "code", {}), good).correct  # no entry point named
    five = Problem("x/0", "q", "E", "choice", {}, ChoiceTask("ABCDE"))
    assert extract_answer(five, "The answer is E.") == "E"
    assert extract_answer(Problem("x/0", "q", "E", "choice", {}), "The answer is E.") is None


def test_a_users_file_carries_its_grader_keys_into_the_input(tmp_path):
    path = tmp_path / "mine.jsonl"
    row = {"question": ADD_PROMPT, "answer": ADD_TESTS, "entry_point": "add", "note": "shown"}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (problem,) = load_problems_from_file(path, answer_field="answer", grader="code")
    assert problem.task == CodeTask("check", "add") and problem.meta["note"] == "shown"


def test_reasoning_gym_problems_carry_an_rg_task():
    pytest.importorskip("reasoning_gym")
    (problem,) = load_problems("rg:basic_arithmetic", size=5, seed=3, limit=1, rg_params={"min_terms": 2})
    task = problem.task
    assert isinstance(task, RgTask)
    assert (task.task, task.seed, task.size, dict(task.params)) == ("basic_arithmetic", 3, 5, {"min_terms": 2})
    assert task.entry is problem.meta["entry"]
    assert grade(problem, f"\\boxed{{{problem.answer}}}").correct
