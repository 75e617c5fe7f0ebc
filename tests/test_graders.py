"""Answer extraction and grading, organised by behaviour; the batch survives bad samples."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import threading
import zlib
from pathlib import Path

import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluation import graders
from stepscope.evaluation.datasets import Problem, load_problems
from stepscope.evaluation.graders import (
    Grade,
    GradingConfig,
    extract_answer,
    grade,
    grade_many,
)

DATA_DIR = Path(os.environ.get("STEPSCOPE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA_DIR / "humaneval" / "test.jsonl").is_file(), reason="offline data not here")


def math_problem(answer: str, **meta) -> Problem:
    return Problem("m/0", "q", answer, "math", meta)


def choice_problem(answer: str = "B") -> Problem:
    return Problem("c/0", "q", answer, "choice", {})


ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ADD = Problem("h/0", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", ADD_TESTS, "code", {"entry_point": "add"})
GOOD_ADD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"


# --- math extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{3}, then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{7} and a broken \\boxed{8", "7"),
        ("Step 1. Add.\nFinal answer: $42$.", "42"),
        ("Thus the answer is 3/4.", "3/4"),
        ("We get 12 apples and then 1,250 pears", "1250"),
        ("<think>maybe \\boxed{1}</think> The result is \\boxed{2}.", "2"),
        ("<think>so \\boxed{5}</think> I am not sure.", "5"),
        ("no digits here", None),
    ],
)
def test_math_extraction(response, expected):
    assert extract_answer(math_problem("0"), response) == expected


# --- math grading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold,response",
    [
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("0.5", "\\boxed{\\frac{1}{2}}"),
        ("27.0", "Final answer: 27"),
        ("27", "\\boxed{27.0}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}"),
        ("2\\sqrt{5}", "\\boxed{\\sqrt{20}}"),
    ],
)
def test_equivalent_math_answers_are_right(gold, response):
    result = grade(math_problem(gold), response)
    assert result.correct, result


@pytest.mark.parametrize(
    "gold,response",
    [("\\frac{1}{2}", "\\boxed{0.25}"), ("27", "\\boxed{28}"), ("27", "Final answer: 270"), ("5", "no answer")],
)
def test_wrong_math_answers_are_wrong(gold, response):
    assert not grade(math_problem(gold), response).correct


@pytest.mark.parametrize(
    "gold,response",
    [
        ("18", "Final answer: $18 dollars"),
        ("9 (apples)", "\\boxed{9}"),
        ("$12", "Final answer: 12"),
        ("12 dollars", "The answer is $12$."),
        ("1,000", "\\boxed{1000 \\text{ m}}"),
        ("25", "\\boxed{25\\%}"),
    ],
)
def test_every_numeric_gold_compares_numbers_units_on_either_side(gold, response):
    # Math-Verify reads '9 (apples)' or '18 dollars' as a product of symbols; a number is a number with or without
    # its unit, whether or not the set is marked numeric
    result = grade(math_problem(gold), response)
    assert result.correct, result


def test_numeric_comparison_is_what_rescues_a_unit():
    assert grade(math_problem("9 (apples)"), "\\boxed{9}").detail == "numeric"
    wrong = grade(math_problem("9 (apples)"), "\\boxed{10 apples}")
    assert not wrong.correct and wrong.detail == "numeric: not equal"
    assert not grade(math_problem("18"), "Final answer: 19 dollars").correct
    assert not grade(math_problem("2"), "\\boxed{2x}").correct  # algebra, not a unit


def test_gold_goes_first_into_math_verify(monkeypatch):
    import math_verify

    seen = []
    real_verify = math_verify.verify

    def spy(gold, target, **kwargs):
        seen.append((gold[-1], target[-1]))
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", spy)
    grade(math_problem("2\\sqrt{5}"), "\\boxed{\\sqrt{20}}")  # not a plain number: Math-Verify decides
    assert seen == [("2\\sqrt{5}", "\\sqrt{20}")]


def test_math_grading_works_off_the_main_thread():
    # Math-Verify's signal-based timeout raises off the main thread; grade() must still work there, in both modes.
    out: list[Grade] = []

    def work():
        for config in (None, GradingConfig("lighteval")):
            out.append(grade(math_problem("2\\sqrt{5}"), "\\boxed{\\sqrt{20}}", config=config))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert len(out) == 2 and all(g.correct for g in out), out
    assert out[0].detail == "math-verify" and out[1].detail.startswith("lighteval")


# --- grading modes -------------------------------------------------------------------------------------------


def test_an_explicit_default_mode_grades_as_before():
    cases = [("18", "Final answer: 18 dollars"), ("\\frac{1}{2}", "\\boxed{0.25}"),
             ("7", "The answer is 7. Check: 3+4.")]
    for gold, response in cases:
        default = grade(math_problem(gold), response)
        assert grade(math_problem(gold), response, config=GradingConfig()) == default
        assert grade(math_problem(gold), response, config=GradingConfig("stepscope")) == default


def test_grading_config_is_a_checked_frozen_value():
    with pytest.raises(StepscopeError, match="unknown grading mode 'strict'"):
        GradingConfig("strict")
    with pytest.raises(dataclasses.FrozenInstanceError):
        GradingConfig().mode = "lighteval"  # type: ignore[misc]
    assert GradingConfig.from_dict(GradingConfig("lighteval").to_dict()) == GradingConfig("lighteval")
    assert GradingConfig.from_dict(None) == GradingConfig()


@pytest.mark.parametrize(
    "problem_id,gold,response,ours,lighteval",
    [
        # lighteval reads Math-Verify's last match, the check; we read the first expression after the marker
        ("gsm8k/0", "7", "The answer is 7. Check: 7 - 3 = 4.", True, False),
        # a gold with a unit: Math-Verify reads "9 (apples)" as a product of symbols
        ("math500/0", "9 (apples)", "\\boxed{9}", True, False),
        # lighteval drops the thinking; nothing is left to read. We read the answer inside it.
        ("math500/0", "5", "<think>so it is 5</think>", True, False),
        ("gsm8k/0", "12", "She earns 12 dollars.\nFinal answer: 12 dollars", True, True),
        ("aime24/0", "204", "The sum is \\boxed{204}.", True, True),
        ("math500/0", "\\frac{1}{2}", "The answer is $\\frac{1}{2}$.", True, True),
        ("math500/0", "\\frac{1}{2}", "The answer is $\\frac{1}{3}$.", False, False),
    ],
)
def test_lighteval_mode_scores_as_lighteval_does(problem_id, gold, response, ours, lighteval):
    problem = Problem(problem_id, "q", gold, "math", {})
    assert grade(problem, response).correct is ours
    result = grade(problem, response, config=GradingConfig("lighteval"))
    assert result.correct is lighteval, result
    assert result.detail.startswith("lighteval")


def test_lighteval_mode_uses_each_sets_metric():
    # GSM8K's lighteval metric rounds to 5 decimals, the MATH-500 / AIME one to 6
    light = GradingConfig("lighteval")
    response = "The answer is \\boxed{1.23457}"
    assert grade(Problem("gsm8k/0", "q", "1.234567", "math", {}), response, config=light).correct
    assert not grade(Problem("math500/0", "q", "1.234567", "math", {}), response, config=light).correct


def test_lighteval_mode_leaves_other_graders_alone():
    light = GradingConfig("lighteval")
    response = "The answer is (C)."
    assert grade(choice_problem("C"), response, config=light) == grade(choice_problem("C"), response)


def test_grade_many_passes_the_mode_to_every_worker():
    problems = [Problem("gsm8k/0", "q", "7", "math", {}), math_problem("12"), choice_problem("A")]
    responses = ["The answer is 7. Check: 7 - 3 = 4.", "Final answer: 12 dollars", "Final answer: A"]
    light = GradingConfig("lighteval")
    expected = [grade(p, r, config=light) for p, r in zip(problems, responses)]
    assert grade_many(problems, responses, workers=0, config=light) == expected
    assert grade_many(problems, responses, workers=2, config=light) == expected
    assert [g.correct for g in expected] == [False, True, True]


def test_the_grading_mode_is_part_of_the_run_config():
    from stepscope.evaluation.runner import Condition, RunConfig, Sampling

    base = RunConfig("m", {"name": "x"}, "sha", 1, Sampling(), (Condition("baseline"),))
    assert "grading" not in base.to_dict()
    assert dataclasses.replace(base, grading=GradingConfig()).fingerprint() == base.fingerprint()  # old runs resume
    light = dataclasses.replace(base, grading=GradingConfig("lighteval"))
    assert light.to_dict()["grading"] == {"mode": "lighteval"}
    assert RunConfig.from_dict(light.to_dict()).grading == GradingConfig("lighteval")
    assert ("grading.mode", "<absent>", "lighteval") in light.differences(base.to_dict())  # a resume is refused


def test_eval_takes_a_grading_flag():
    from stepscope.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--dataset", "gsm8k"]).grading == "stepscope"
    assert parser.parse_args(["eval", "--dataset", "gsm8k", "--grading", "lighteval"]).grading == "lighteval"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--dataset", "gsm8k", "--grading", "strict"])


# --- choices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,letter",
    [
        ("I pick (B) since it fits.", "B"),
        ("answer: b", "B"),
        ("The correct one is **B**.", "B"),
        ("Therefore \\boxed{C}", "C"),
        ("so \\boxed{\\text{(D)}}", "D"),
        ("Final answer: D", "D"),
        ("The answer is a bit subtle.\nFinal answer: (A)", "A"),
        ("Options (A) and (C) fail, so the answer is B.", "B"),
        ("<think>maybe (A)</think>\n**C**", "C"),
        ("C", "C"),
        ("I cannot decide.", None),
    ],
)
def test_choice_extraction(response, letter):
    assert extract_answer(choice_problem(), response) == letter


def test_choice_grading_compares_letters():
    assert grade(choice_problem("B"), "Final answer: b").correct
    assert not grade(choice_problem("B"), "Final answer: C").correct
    assert grade(choice_problem("B"), "nothing").detail == "no option letter found"


@needs_data
def test_always_answering_a_scores_the_share_of_a_on_gpqa():
    problems = load_problems("gpqa_diamond", data_dir=DATA_DIR)
    grades = [grade(p, "Final answer: A") for p in problems]
    assert sum(g.correct for g in grades) == 53  # README: answers A-D are 53/42/52/51


# --- code ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,expected",
    [
        ("```python\ndef f():\n    return 1\n```\ntext\n```python\ndef f():\n    return 2\n```", "def f():\n    return 2"),
        ("```\ndef g():\n    pass\n```", "def g():\n    pass"),
        ("```python\ndef cut_off():\n    return", "def cut_off():\n    return"),
        ("def bare(x):\n    return x", "def bare(x):\n    return x"),
        ("I would use a loop.", None),
    ],
)
def test_code_extraction(response, expected):
    assert extract_answer(ADD, response) == expected


def test_code_is_run_against_its_tests():
    assert grade(ADD, GOOD_ADD, timeout_s=5).correct
    wrong = grade(ADD, "```python\ndef add(a, b):\n    return a - b\n```", timeout_s=5)
    assert not wrong.correct and "test failed (test line" in wrong.detail
    body_only = grade(ADD, "```python\n    return a + b\n```", timeout_s=5)  # completes the prompt
    assert body_only.correct
    assert grade(ADD, "no code", timeout_s=5) == Grade(False, None, "no code found")


@needs_data
def test_humaneval_canonical_solutions_pass_and_the_prompt_alone_fails():
    problems = load_problems("humaneval", data_dir=DATA_DIR, indices=[0, 1, 32])
    for problem in problems:
        solution = problem.question + problem.meta["canonical_solution"]
        assert grade(problem, f"```python\n{solution}\n```", timeout_s=10).correct, problem.id
        assert not grade(problem, f"```python\n{problem.question}    pass\n```", timeout_s=10).correct


def _lcb_problem(cases_public, cases_private, harness, fn_name=None) -> Problem:
    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases_private)))).decode()
    tests = {"public": json.dumps(cases_public), "private": private, "fn_name": fn_name}
    return Problem("lcb/0", "q", json.dumps(tests), "code", {"harness": harness})


def test_livecodebench_stdio_and_functional_harnesses():
    stdio = _lcb_problem([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}],
                         [{"input": "10 20\n", "output": "30", "testtype": "stdin"}], "stdio")
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    only_public = "```python\na, b = map(int, input().split())\nprint(3)\n```"
    assert grade(stdio, good, timeout_s=5).correct
    assert not grade(stdio, only_public, timeout_s=5).correct  # the compressed private case catches it
    functional = _lcb_problem([{"input": "[1, 2]\n3", "output": "true", "testtype": "functional"}],
                              [{"input": "[5]\n6", "output": "false", "testtype": "functional"}],
                              "functional", fn_name="hasPair")
    solution = ("```python\nclass Solution:\n    def hasPair(self, nums, target):\n"
                "        return any(a + b == target for i, a in enumerate(nums) for b in nums[i + 1:])\n```")
    assert grade(functional, solution, timeout_s=5).correct
    always_true = "```python\nclass Solution:\n    def hasPair(self, nums, target):\n        return True\n```"
    assert not grade(functional, always_true, timeout_s=5).correct


# --- exact and reasoning-gym ---------------------------------------------------------------------------------


def test_exact_grading_normalises_case_space_and_full_stop():
    problem = Problem("e/0", "q", "New York", "exact", {})
    assert extract_answer(problem, "It is big.\nFinal answer: new  york.") == "new  york"
    assert grade(problem, "It is big.\nFinal answer: new  york.").correct
    assert grade(problem, "thinking...\nNEW YORK").correct  # last line without a Final answer line
    assert not grade(problem, "Final answer: Boston").correct


def test_reasoning_gym_uses_the_tasks_own_scorer():
    problem = load_problems("rg:basic_arithmetic", size=3, seed=0)[0]
    gold = problem.answer
    right = grade(problem, f"Let me compute.\n\\boxed{{{gold}}}")
    assert right.correct and right.extracted == gold and right.detail.startswith("reasoning-gym score 1")
    assert not grade(problem, f"\\boxed{{{gold}1}}").correct
    letters = load_problems("rg:letter_counting", size=2, seed=0)[0]
    assert grade(letters, f"I counted.\n<answer>{letters.answer}</answer>").correct


# --- errors and the batch ------------------------------------------------------------------------------------


def test_unknown_grader_and_mismatched_lengths_are_user_errors():
    with pytest.raises(StepscopeError, match="unknown grader"):
        grade(Problem("x/0", "q", "a", "fuzzy", {}), "a")
    with pytest.raises(StepscopeError, match="one response per problem"):
        grade_many([math_problem("1")], [])


def test_a_failing_grader_becomes_a_wrong_grade(monkeypatch):
    def explode(problem, response, timeout_s):
        raise RuntimeError("parser exploded")

    monkeypatch.setitem(graders._GRADE_FUNCS, "math", explode)
    result = grade(math_problem("1"), "\\boxed{1}")
    assert not result.correct and "parser exploded" in result.detail


def test_grade_many_grades_the_others_around_bad_samples():
    # 100 children that sleep (linear, never exponential), then wait for them: contained by the sandbox.
    bomb = ("```python\nimport os, time\ndef add(a, b):\n    for _ in range(100):\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n    while True:\n        os.wait()\n```")
    problems = [math_problem("\\frac{1}{2}"), ADD, ADD, ADD, ADD, choice_problem("C"), math_problem("7"), ADD]
    responses = [
        "\\boxed{0.5}",
        GOOD_ADD,
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",  # hangs
        "```python\ndef add(a, b):\n    x = bytearray(50 * 1024**3)\n    return a + b\n```",  # 50 GB
        bomb,
        "Final answer: (C)",
        "\\boxed{8}",
        GOOD_ADD,
    ]
    grades = grade_many(problems, responses, workers=2, timeout_s=2)
    assert [g.correct for g in grades] == [True, True, False, False, False, True, False, True]
    assert "timeout" in grades[2].detail or "cpu" in grades[2].detail
    assert "memory" in grades[3].detail
    assert grades[6].extracted == "8"


def test_grade_many_in_process_matches_the_pool():
    problems = [math_problem("3"), choice_problem("A"), ADD]
    responses = ["\\boxed{3}", "answer: a", GOOD_ADD]
    assert grade_many(problems, responses, workers=0, timeout_s=5) == grade_many(problems, responses, workers=2, timeout_s=5)


@pytest.mark.parametrize("response, expected", [
    ("The final answer to the arithmetic problem is 1.<|im_end|>", "1"),  # not 'to the arithmetic problem is 1'
    ("Final answer: 4 - 1 = 3'.<|im_end|>", "3"),  # the result after '=', quotes and special tokens dropped
    ("The final answer is 6 + 0 = 6.<|im_end|>", "6"),
    ("1 + 5 = 6<｜end▁of▁sentence｜>", "6"),
])
def test_small_model_answer_lines(response, expected):
    from stepscope.evaluation.datasets import Problem

    p = Problem("t/0", "q", expected, "math", {"numeric": True})
    assert extract_answer(p, response) == expected
    assert grade(p, response).correct


# --- a grader registered by a user ----------------------------------------------------------------------------


def grade_parity(problem: Problem, response: str, timeout_s: float) -> Grade:
    """A test plug-in grader: right when the response's last integer has the gold answer's parity."""
    import re

    numbers = re.findall(r"-?\d+", response)
    if not numbers:
        return Grade(False, None, "no integer")
    return Grade(int(numbers[-1]) % 2 == int(problem.answer) % 2, numbers[-1], f"worker {os.getpid()}")


@pytest.fixture
def parity():
    from stepscope.evaluation import datasets

    graders.register_grader("parity", grade_parity, instructions={"plain": "End with an integer of that parity."})
    yield "parity"
    graders._GRADE_FUNCS.pop("parity", None)
    datasets._PLUGIN_GRADERS.remove("parity")
    for table in datasets.INSTRUCTIONS.values():
        table.pop("parity", None)


def test_a_registered_grader_grades_in_workers_and_in_process(parity, tmp_path):
    from stepscope.evaluation.datasets import INSTRUCTIONS, build_user_message, grader_names, load_problems_from_file

    assert "parity" in grader_names()
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "Name an even number.", "answer": "2"}) + "\n"
                    + json.dumps({"question": "Name an odd number.", "answer": "1"}) + "\n")
    problems = load_problems_from_file(data, answer_field="answer", grader="parity")
    responses = ["I say 14", "I say 8"]
    here = grade_many(problems, responses, workers=0)
    there = grade_many(problems, responses, workers=2)
    assert [g.correct for g in here] == [g.correct for g in there] == [True, False]
    assert all(g.detail != f"worker {os.getpid()}" for g in there)  # graded in the worker processes
    assert build_user_message(problems[0], "plain").endswith("End with an integer of that parity.")
    assert build_user_message(problems[0], "think").endswith(INSTRUCTIONS["think"]["exact"])  # the default


def test_grader_registration_refuses_clashes_and_unimportable_functions(parity):
    with pytest.raises(StepscopeError, match="exists already"):
        graders.register_grader("math", grade_parity)
    with pytest.raises(StepscopeError, match="lower-case"):
        graders.register_grader("Bad Name", grade_parity)
    with pytest.raises(StepscopeError, match="unknown prompt styles"):
        graders.register_grader("parity2", grade_parity, instructions={"chatty": "x"})

    def local(problem, response, timeout_s):
        return Grade(True, None, "")

    graders.register_grader("local_one", local)
    try:
        problem = Problem("x/0", "q", "1", "local_one", {})
        assert grade_many([problem], ["r"], workers=0)[0].correct
        with pytest.raises(StepscopeError, match="not importable by the grading workers"):
            grade_many([problem], ["r"], workers=1)
    finally:
        from stepscope.evaluation import datasets

        graders._GRADE_FUNCS.pop("local_one", None)
        datasets._PLUGIN_GRADERS.remove("local_one")
        for table in datasets.INSTRUCTIONS.values():
            table.pop("local_one", None)
