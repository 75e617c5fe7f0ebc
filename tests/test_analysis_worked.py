"""GSM8K-style worked solutions: gold steps from calculator annotations; the first wrong step of hand-made traces."""

import json
import warnings

import pytest

import stepscope
from stepscope.analysis.worked import gsm8k_steps, locate_worked, worked_steps

QUESTION = ("A baker makes 16 loaves a day. He sells 3 in the morning and 4 at noon. Each remaining loaf sells for "
            "$2 in the evening. How much does he make in the evening?")
SOLUTION = ("He has 16 - 3 - 4 = <<16-3-4=9>>9 loaves left.\n"
            "He makes 9 * 2 = $<<9*2=18>>18.\n"
            "Over a week that is 18 * 7 = <<18*7=126>>126, but the question asks for one day.\n"
            "#### 18")


def trace_of(tok, thinking_lines: list[str], answer: str = "18"):
    response = "<think>\n" + "\n\n".join(thinking_lines) + "\n</think>\n\nThe answer is " + answer + "<|im_end|>"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepscope.Trace.from_text(tok, QUESTION, response)


def test_gold_steps_and_their_premises_come_from_the_annotations():
    steps = worked_steps(SOLUTION, QUESTION)
    assert [s.value for s in steps] == [9, 18, 126]
    assert [s.expression for s in steps] == ["16-3-4", "9*2", "18*7"]
    # 16, 3 and 4 are in the question (premises, distance = the step's own index); 9 comes from step 1
    assert {(r.step, r.distance) for r in steps[0].refs} == {(0, 1)}
    assert [(r.step, r.distance) for r in steps[1].refs] == [(1, 1), (0, 2)]  # 9 <- step 1; 2 <- the question
    assert [(r.step, r.distance) for r in steps[2].refs] == [(2, 1)]  # 7 is a constant ("a week"): no ref


def thinking_indices(trace):
    return [i for i, s in enumerate(trace.steps) if s.kind == "thinking"]


def test_a_trace_on_the_gold_path_has_no_wrong_step(tokenizers):
    trace = trace_of(tokenizers["think"], ["16 - 3 - 4 = 9 loaves are left.", "9 * 2 = 18 dollars.",
                                           "And 18 * 7 = 126 a week."])
    fs = locate_worked(worked_steps(SOLUTION, QUESTION), trace)
    t = thinking_indices(trace)
    assert (fs.gold_step, fs.kind, fs.long_range) == (None, "none", None)
    assert fs.step_of_gold == (t[0], t[1], t[2])
    q = next(i for i, s in enumerate(trace.steps) if s.kind == "question")
    assert fs.premise_of_gold == (q, q, t[1])  # step 2 reads 2 from the question, further back than step 1's 9
    assert fs.premise_distance == (1, 2, 1)


def test_the_first_value_off_the_gold_path_is_the_failing_step(tokenizers):
    trace = trace_of(tokenizers["think"], ["16 - 3 - 4 = 9 loaves are left.", "9 * 3 = 27 dollars.",
                                           "So 27."], answer="27")
    fs = locate_worked(worked_steps(SOLUTION, QUESTION), trace)
    t = thinking_indices(trace)
    assert (fs.gold_step, fs.kind, fs.long_range) == (2, "value", True)  # its far premise (2) is 2 steps back
    assert fs.step_of_gold[:2] == (t[0], t[1])


def test_a_detour_that_reaches_the_gold_value_is_no_error(tokenizers):
    trace = trace_of(tokenizers["think"], ["16 - 3 = 13 after the morning.", "13 - 4 = 9 loaves are left.",
                                           "9 * 2 = 18 dollars."])
    fs = locate_worked(worked_steps(SOLUTION, QUESTION), trace)
    t = thinking_indices(trace)
    assert fs.kind == "missing" and fs.gold_step == 3  # never wrote the third annotation's 126
    assert fs.step_of_gold[:2] == (t[1], t[2])


def test_numbers_with_commas_and_dollar_signs_match(tokenizers):
    question = "A house costs $80,000 and repairs cost $50,000. What is the total cost?"
    solution = "80,000+50,000=$<<80000+50000=130000>>130,000\n#### 130000"
    steps = worked_steps(solution, question)
    trace = stepscope.Trace.from_text(tokenizers["think"], question,
                                      "<think>\nThe total is $80,000 + $50,000 = $130,000.\n</think>\n\n"
                                      "The answer is 130000<|im_end|>")
    fs = locate_worked(steps, trace)
    assert fs.kind == "none" and fs.step_of_gold[0] is not None


@pytest.fixture()
def gsm8k_copy(tmp_path):
    rows = [{"question": QUESTION, "answer": SOLUTION, "idx": 0},
            {"question": "Two plus two?", "answer": "2+2=<<2+2=4>>4\n#### 4", "idx": 1}]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_gsm8k_gold_steps_are_read_from_the_offline_copy(gsm8k_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("STEPSCOPE_DATA_DIR", raising=False)
    assert [s.value for s in gsm8k_steps("gsm8k/1", gsm8k_copy)] == [4]
    assert [s.value for s in gsm8k_steps("gsm8k/0", gsm8k_copy)] == [9, 18, 126]
    assert gsm8k_steps("gsm8k/7", gsm8k_copy) is None  # not in the copy
    assert gsm8k_steps("math500/1", gsm8k_copy) is None
    assert gsm8k_steps("gsm8k/0", None) is None  # no copy given: no gold, and no wait on the hub
    monkeypatch.setenv("STEPSCOPE_DATA_DIR", str(gsm8k_copy))
    assert gsm8k_steps("gsm8k/1") is not None
