"""The labelled grading set: our graders against hand labels, beside Math-Verify used directly and lighteval mode.

Each line of ``data/grading_set.jsonl`` is a response, its gold answer, its grader and the verdict a person gave
after reading it (``source`` says whether the response is a real model output or a crafted case). Run this file
as a script for the agreement table: ``python tests/test_grading_set.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.graders import GradingConfig, grade_many

SET_PATH = Path(__file__).resolve().parent / "data" / "grading_set.jsonl"


def load_cases() -> list[dict]:
    with SET_PATH.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def as_problem(case: dict, index: int) -> Problem:
    meta = {"choices": case["choices"]} if "choices" in case else {}
    return Problem(case.get("problem_id") or f"crafted/{index}", "q", case["gold"], case["grader"], meta)


def math_verify_direct(case: dict) -> bool:
    """Math-Verify as used directly: its own extraction on the whole response, gold first."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{case['gold']}}}")
    pred = parse(case["response"])
    return bool(gold and pred and verify(gold, pred))


def agreement(cases: list[dict], verdicts: list[bool]) -> float:
    return sum(bool(v) == c["correct"] for c, v in zip(cases, verdicts)) / len(cases)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return load_cases()


@pytest.fixture(scope="module")
def ours(cases) -> list[bool]:
    problems = [as_problem(c, i) for i, c in enumerate(cases)]
    return [g.correct for g in grade_many(problems, [c["response"] for c in cases], workers=0)]


def test_the_set_is_large_labelled_and_mixed(cases):
    assert len(cases) >= 200
    assert all(isinstance(c["correct"], bool) and c["grader"] in ("math", "choice") for c in cases)
    sources = Counter("crafted" if c["source"] == "crafted" else "model" for c in cases)
    assert sources["model"] >= 60 and sources["crafted"] >= 60, sources
    for grader in ("math", "choice"):  # both verdicts for both graders, so agreement cannot be had by one answer
        assert {c["correct"] for c in cases if c["grader"] == grader} == {True, False}
    assert len({(c["response"], c["gold"]) for c in cases}) == len(cases), "duplicate cases"


def test_our_grading_agrees_with_the_labels(cases, ours):
    misses = [(c["gold"], c["response"][-120:], c["correct"]) for c, v in zip(cases, ours) if v != c["correct"]]
    rate = agreement(cases, ours)
    print(f"\nstepscope grading: {rate:.1%} agreement on {len(cases)} labelled cases ({len(misses)} misgraded)")
    assert rate >= 0.99, misses


def test_we_agree_more_than_math_verify_used_directly(cases, ours):
    math_cases = [(c, v) for c, v in zip(cases, ours) if c["grader"] == "math"]
    direct = [math_verify_direct(c) for c, _ in math_cases]
    ours_rate = agreement([c for c, _ in math_cases], [v for _, v in math_cases])
    direct_rate = agreement([c for c, _ in math_cases], direct)
    print(f"\nmath cases: stepscope {ours_rate:.1%}, Math-Verify direct {direct_rate:.1%} (n={len(math_cases)})")
    assert ours_rate > direct_rate


def test_lighteval_mode_scores_below_ours_on_the_set(cases, ours):
    math_cases = [(i, c) for i, c in enumerate(cases) if c["grader"] == "math"]
    problems = [as_problem(c, i) for i, c in math_cases]
    lighteval = grade_many(problems, [c["response"] for _, c in math_cases], workers=0,
                           config=GradingConfig("lighteval"))
    rate = agreement([c for _, c in math_cases], [g.correct for g in lighteval])
    ours_rate = agreement([c for _, c in math_cases], [ours[i] for i, _ in math_cases])
    print(f"\nmath cases: lighteval mode {rate:.1%}, stepscope {ours_rate:.1%} (n={len(math_cases)})")
    assert all(g.detail.startswith("lighteval") for g in lighteval)
    # lighteval's scoring, not ours: Math-Verify's extraction misreads the cases our extraction exists for
    assert rate < ours_rate


def main() -> None:
    all_cases = load_cases()
    problems = [as_problem(c, i) for i, c in enumerate(all_cases)]
    responses = [c["response"] for c in all_cases]
    mine = [g.correct for g in grade_many(problems, responses, workers=0)]
    light = [g.correct for g in grade_many(problems, responses, workers=0, config=GradingConfig("lighteval"))]
    print("| cases | n | stepscope | lighteval mode | Math-Verify direct |")
    print("| --- | --- | --- | --- | --- |")
    groups = {"all": lambda c: True, "math": lambda c: c["grader"] == "math",
              "math, model outputs": lambda c: c["grader"] == "math" and c["source"] != "crafted",
              "math, crafted": lambda c: c["grader"] == "math" and c["source"] == "crafted",
              "choice": lambda c: c["grader"] == "choice"}
    for name, keep in groups.items():
        idx = [i for i, c in enumerate(all_cases) if keep(c)]
        sub = [all_cases[i] for i in idx]
        is_math = all(c["grader"] == "math" for c in sub)
        direct = f"{agreement(sub, [math_verify_direct(c) for c in sub]):.1%}" if is_math else "-"
        light_rate = f"{agreement(sub, [light[i] for i in idx]):.1%}" if is_math else "-"
        print(f"| {name} | {len(sub)} | {agreement(sub, [mine[i] for i in idx]):.1%} | {light_rate} | {direct} |")


if __name__ == "__main__":
    main()
