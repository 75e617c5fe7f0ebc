"""The failing-step locator on hand-made organism traces, and the flow comparison at the failing step."""

import warnings

import numpy as np
import pytest

import stepscope
from stepscope.analysis.compare import AnalysedTrace
from stepscope.analysis.failing import failing_step_analysis, locate, organism_problem
from stepscope.organism.tasks import make_problem
from stepscope.saliency.result import StepSaliency, causal_counts


def corrupt(problem, k: int) -> str:
    """The gold response with gold step k reading a wrong operand (later steps unchanged)."""
    g = problem.steps[k - 1]
    a, b = g.operands
    right = f"{a} {g.symbol} {b} = {g.value}"
    wrong = f"{a + 1} {g.symbol} {b} = {g.value + 1}"
    lines = problem.response.split("\n")
    assert right in lines[k - 1]
    lines[k - 1] = lines[k - 1].replace(right, wrong)
    return "\n".join(lines)


def trace_of(tok, problem, response):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepscope.Trace.from_text(tok, problem.question, response + "<|im_end|>")


def long_step(problem) -> int:
    return next(s.index for s in problem.steps if s.long_range)


def test_organism_ids_resolve_to_their_problems():
    p = make_problem("medium", "eval0", 17)
    assert organism_problem(p.id) == p
    assert organism_problem("gsm8k-12") is None


@pytest.mark.parametrize("index", range(4))
def test_locator_finds_the_known_first_wrong_step(tokenizers, index):
    tok = tokenizers["think"]
    problem = make_problem("medium", "test", index)
    k = long_step(problem)
    fs = locate(problem, trace_of(tok, problem, corrupt(problem, k)))
    assert (fs.gold_step, fs.kind, fs.long_range) == (k, "operand", True)
    right = locate(problem, trace_of(tok, problem, problem.response))
    assert right.gold_step is None and right.kind == "none"
    trace = trace_of(tok, problem, problem.response)
    thinking = trace.steps_of("thinking")
    for j, g in enumerate(problem.steps):
        step = trace.steps[right.step_of_gold[j]]
        assert step.kind == "thinking" and g.text in step.text  # gold step j+1 sits in the trace step found
    far = max(problem.steps[k - 1].refs, key=lambda r: r.distance)
    expected = 0 if far.step == 0 else right.step_of_gold[far.step - 1]
    assert right.premise_of_gold[k - 1] == expected and right.premise_distance[k - 1] == far.distance
    assert len(thinking) >= len(problem.steps)


def test_missing_steps_are_located(tokenizers):
    tok = tokenizers["think"]
    problem = make_problem("medium", "test", 0)
    lines = problem.thinking.split("\n")
    short = "\n".join(lines[:2]) + "\n</think>\n\n" + problem.summary
    fs = locate(problem, trace_of(tok, problem, short))
    assert fs.gold_step == 3 and fs.kind == "missing" and fs.step_of_gold[2] is None


def test_flow_into_the_failing_step_is_compared_with_the_same_gold_step(tokenizers):
    """Uniform saliency everywhere, except that each wrong sample's failing step takes half as much from its
    premise: the paired difference is negative on every problem."""
    tok = tokenizers["think"]
    traces = []
    for index in range(5):
        problem = make_problem("medium", "test", index)
        k = long_step(problem)
        for sample, response in enumerate([problem.response, corrupt(problem, k), problem.response]):
            t = trace_of(tok, problem, response)
            fs = locate(problem, t)
            N = causal_counts(t.steps).astype(float)
            F = N.copy()
            if fs.gold_step is not None:
                i, p = fs.step_of_gold[k - 1], fs.premise_of_gold[k - 1]
                F[i, p] *= 0.5
            sal = StepSaliency(np.repeat(F[None], 4, 0), causal_counts(t.steps), np.zeros((4, len(t.steps))),
                               t.steps)
            traces.append(AnalysedTrace(problem.id, sample, fs.gold_step is None, sal, gold=fs.to_dict()))
    out = failing_step_analysis(traces, n_boot=200)
    assert out["wrong_located"] == 5 and sum(out["first_wrong_step"].values()) == 5
    prem = out["premise"]["without_oeb"]
    assert prem["problems"] == 5 and prem["mean_wrong_minus_correct"] < 0
    assert prem["p_value"] == pytest.approx(2 / 2**5)  # all five problems negative: the exact minimum
    # same step structure on both sides: the correct samples' value is the uniform share at that gold step
    assert prem["mean_correct"] > prem["mean_wrong"]
    # Holm over the two failing-step tests of the condition: the premise p at least doubles (capped at 1)
    assert prem["p_holm"] >= prem["p_value"] and "Holm" in out["holm_family"]
    q = out["question"]["without_oeb"]
    small, large = sorted([prem, q], key=lambda t: t["p_value"])
    assert small["p_holm"] == pytest.approx(min(1.0, 2 * small["p_value"]))
    assert large["p_holm"] == pytest.approx(max(small["p_holm"], large["p_value"]))
