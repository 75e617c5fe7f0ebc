"""The organism's problem generator: correct gold solutions, references as designed, reproducible seeds."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepscope.errors import StepscopeError
from stepscope.organism.tasks import (
    DIFFICULTIES,
    Difficulty,
    check_response,
    evaluate_gold,
    extract_answer,
    get_difficulty,
    make_problem,
    organism_problems,
    problem_stream,
)

_ARITH = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_READ = re.compile(r"and (\w+) has (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

difficulties = st.sampled_from(sorted(DIFFICULTIES))
indices = st.integers(min_value=0, max_value=10**6)


@settings(max_examples=150, deadline=None)
@given(difficulties, indices)
def test_gold_arithmetic_is_right_and_answer_follows_from_the_question(difficulty, index):
    p = make_problem(difficulty, "t", index)
    assert evaluate_gold(p) == p.answer  # recomputed from the question's numbers through the references
    lines = p.thinking.split("\n")
    assert len(lines) == len(p.steps)
    for line, step in zip(lines, p.steps):
        a, sym, b, v = _ARITH.search(line).groups()
        assert _OPS[sym](int(a), int(b)) == int(v) == step.value
        assert line.endswith(f"so {step.name} has {step.value}.")
    assert extract_answer(p.response) == str(p.answer)
    assert p.question.endswith(f"Find how many {p.item} {p.steps[-1].name} has.")


@settings(max_examples=150, deadline=None)
@given(difficulties, indices)
def test_every_value_a_step_reads_is_the_latest_one_stated_for_that_name(difficulty, index):
    p = make_problem(difficulty, "t", index)
    text = p.question + "\n" + p.thinking
    for step in p.steps:
        line_start = text.index(step.text)
        before = text[:line_start]
        for name, value in _READ.findall(step.text):
            stated = re.findall(rf"\b{name} has (\d+)", before)
            assert stated and int(stated[-1]) == int(value), (name, value, stated)


@settings(max_examples=150, deadline=None)
@given(difficulties, indices)
def test_steps_reference_earlier_values_as_designed(difficulty, index):
    d = DIFFICULTIES[difficulty]
    p = make_problem(difficulty, "t", index)
    assert d.min_steps <= len(p.steps) <= d.max_steps
    premise_names = {n for n, _ in p.premises}
    step_index = {s.name: s.index for s in p.steps}
    n_long = 0
    for s in p.steps:
        # Every step reads the previous result (or, at step 1, a premise): the chain has no gaps.
        near = s.refs[0] if not s.long_range or s.op == "sum" else None
        if near is not None:
            assert near.distance == 1 and near.step == s.index - 1
        for r in s.refs:
            assert r.step < s.index
            assert r.distance == s.index - r.step
            if r.step == 0:
                assert r.name in premise_names
            else:
                assert step_index[r.name] == r.step
        if s.long_range:
            n_long += 1
            assert len(s.refs) == 2
            far = [r for r in s.refs if r.distance != 1]
            assert len(far) == 1 and far[0].distance >= d.reach
        else:
            assert len(s.refs) == 1 and s.refs[0].distance == 1
    eligible = len(p.steps) - d.reach + 1
    assert n_long == min(d.long_steps, max(eligible, 0))
    used = {r.name for s in p.steps for r in s.refs if r.step == 0}
    assert len(premise_names - used) == d.distractors


def test_long_range_references_reach_both_the_question_and_earlier_steps():
    steps = [s for p in problem_stream("hard", "mix", 200) for s in p.steps if s.long_range]
    far = [r for s in steps for r in s.refs if r.distance != 1]
    premise = sum(r.step == 0 for r in far)
    assert 0.3 < premise / len(far) < 0.8  # premise forgetting and carry-forward sites both occur


def test_seeds_reproduce_and_differ():
    a = organism_problems("medium", 5, seed=3)
    assert a == organism_problems("medium", 5, seed=3)
    assert json.loads(json.dumps(a)) == a  # plain JSON
    b = organism_problems("medium", 5, seed=4)
    assert [r["question"] for r in a] != [r["question"] for r in b]
    assert len({r["id"] for r in a + b}) == 10


def test_records_carry_answer_and_design():
    rec = organism_problems("easy", 1, seed=0)[0]
    assert set(rec) == {"id", "question", "answer", "meta"}
    assert rec["answer"].isdigit()
    meta = rec["meta"]
    assert meta["difficulty"] == "easy"
    assert meta["knobs"]["reach"] == DIFFICULTIES["easy"].reach
    assert meta["long_range_steps"] == [s["index"] for s in meta["gold_steps"] if s["long_range"]]
    assert meta["gold_response"].endswith(f"\\boxed{{{rec['answer']}}}.")
    assert "</think>" in meta["gold_response"]


def test_check_response_finds_the_first_wrong_step():
    p = next(p for p in problem_stream("medium", "chk", 50) if p.steps[2].long_range)
    assert check_response(p, p.response).correct
    assert check_response(p, p.response).kind == "none"
    lines = p.thinking.split("\n")
    s = p.steps[2]
    a, b = s.operands
    wrong_read = lines[2].replace(f"{a} {s.symbol} {b} =", f"{a + 1} {s.symbol} {b} =")
    c = check_response(p, "\n".join(lines[:2] + [wrong_read] + lines[3:]) + "\n</think>\n\nx")
    assert (c.first_error, c.kind, c.long_range, c.correct) == (3, "operand", True, False)
    wrong_sum = lines[2].replace(f"= {s.value},", f"= {s.value + 1},")
    c = check_response(p, "\n".join(lines[:2] + [wrong_sum] + lines[3:]))
    assert (c.first_error, c.kind) == (3, "arithmetic")
    c = check_response(p, "\n".join(lines[:1]) + "\n</think>\n\nThe answer is \\boxed{1}.")
    assert (c.first_error, c.kind) == (2, "missing")
    c = check_response(p.to_record(), "gibberish")
    assert (c.first_error, c.kind, c.correct) == (1, "format", False)


def test_difficulty_validation_and_lookup():
    with pytest.raises(StepscopeError, match="choose one of"):
        get_difficulty("impossible")
    with pytest.raises(StepscopeError, match="reach"):
        Difficulty("x", 3, 4, long_steps=1, reach=1, max_value=30, max_addend=9)
    custom = Difficulty("custom", 4, 4, long_steps=2, reach=2, max_value=20, max_addend=5)
    p = make_problem(custom, "c", 0)
    assert len(p.steps) == 4 and sum(s.long_range for s in p.steps) == 2
    assert all(v <= 20 for _, v in p.premises) and all(1 <= s.value <= 20 for s in p.steps)
    with pytest.raises(StepscopeError):
        organism_problems("medium", -1)
