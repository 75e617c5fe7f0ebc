"""Atom-resolution measurement: pooling reproduces the real pass, shuffled boundaries, SMI sites, null shares."""

import itertools
import warnings

import numpy as np
import pytest

import stepscope
from stepscope.analysis.compare import AnalysedTrace, compare_groups
from stepscope.analysis.measure import (
    Arm,
    atom_trace,
    cached_measure,
    derive,
    measure,
    shuffled_steps,
    site_metrics,
)
from stepscope.analysis.scores import SCORE_NAMES
from stepscope.saliency.metrics import net_shares, uniform_null_shares
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.stepflow import StepFlowConfig
from stepscope.testing import tiny_model
from stepscope.trace import Step, Trace

RESPONSE = ("First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
            "Final answer: 10<|im_end|>")


@pytest.fixture(scope="module")
def tiny(tokenizers):
    tok = tokenizers["think"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = stepscope.Trace.from_text(tok, "Question 1?", RESPONSE)
    return tiny_model("llama", tok, layers=4), tok, trace


@pytest.mark.parametrize("stepflow", [None, StepFlowConfig(tau_max=0.3, alpha=0.5)])
def test_pooled_atoms_equal_a_pass_over_the_real_steps(tiny, stepflow):
    model, tok, trace = tiny
    iv = Arm() if stepflow is None else Arm("both", stepflow)
    m = measure(model, tok, trace, iv, shuffles=3)
    ref = stepscope.step_saliency(model, tok, trace, stepflow=stepflow, progress=False)
    np.testing.assert_allclose(m.saliency.sums, ref.sums, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(m.saliency.other, ref.other, rtol=1e-9, atol=1e-15)
    assert m.shuffled.shape == (3, len(SCORE_NAMES))
    assert m.saliency.shallow_lock_in == pytest.approx(ref.shallow_lock_in)


def test_atoms_and_cache(tiny, tmp_path):
    model, tok, trace = tiny
    atoms = atom_trace(trace)
    response = len(trace) - trace.prompt_len
    assert len(atoms.steps) == 1 + response and atoms.steps[0] == trace.steps[0]
    assert [a.kind for a in atoms.steps[1:]] == [(trace.segment_ids()[t] == 2 and "thinking") or "summary"
                                                 for t in range(trace.prompt_len, len(trace))]
    first = cached_measure(model, tok, "m", trace, Arm(), tmp_path, shuffles=2)
    files = sorted(tmp_path.iterdir())
    again = cached_measure(model, tok, "m", trace, Arm(), tmp_path, shuffles=2)
    assert sorted(tmp_path.iterdir()) == files and len(files) == 2
    np.testing.assert_array_equal(first.saliency.sums, again.saliency.sums)
    np.testing.assert_array_equal(first.shuffled, again.shuffled)


def test_shuffled_steps_keep_counts_and_tokens():
    steps = [Step("question", 1, 5, "q", 0), Step("thinking", 5, 9, "a", 1), Step("thinking", 9, 20, "b", 2),
             Step("thinking", 20, 22, "c", 3), Step("summary", 22, 30, "s", 1), Step("summary", 30, 33, "t", 2)]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        sh = shuffled_steps(steps, rng)
        assert [s.kind for s in sh] == [s.kind for s in steps]
        assert sh[0] == steps[0] and all(a.end == b.start for a, b in itertools.pairwise(sh))
        assert sh[-1].end == 33 and all(len(s) >= 1 for s in sh)
        assert sh[3].end == 22  # thinking and summary are cut separately
        seen.add(tuple(s.start for s in sh))
    assert len(seen) > 10


# -- synthetic atom maps: saliency that follows the steps, or only token distance ----------------------------------
L = 4


def synthetic(thinking: list[int], mode: str, strength: float, q: int = 6, summary: int = 4):
    """A trace and an atom map where each response token's saliency to a key token is 1, raised by ``strength``
    for keys in the real step before its own (``mode="step"``: flow carried across the boundary) or for keys within
    2 tokens of it (``mode="window"``: locality that ignores where steps end)."""
    steps = [Step("question", 1, 1 + q, "q", 0)]
    pos = 1 + q
    for i, n in enumerate(thinking):
        steps.append(Step("thinking", pos, pos + n, "t", i + 1))
        pos += n
    steps.append(Step("summary", pos, pos + summary, "s", 1))
    T = pos + summary
    trace = Trace(list(range(T)), 1 + q, steps, ["x"] * T, profile="think")
    atoms = atom_trace(trace).steps
    step_of = np.zeros(T, dtype=int)
    for i, s in enumerate(steps):
        step_of[s.start:s.end] = i
    A = len(atoms)
    F = np.zeros((A, A))
    F[0, 0] = q * (q + 1) / 2
    for a in range(1, A):
        t = atoms[a].start
        F[a, 0] = q
        for b in range(1, a + 1):
            k = atoms[b].start
            near = step_of[k] == step_of[t] - 1 if mode == "step" else t - k <= 2
            F[a, b] = 1 + strength * near
    sums = np.repeat(F[None], L, axis=0)
    return trace, atoms, sums, np.zeros((L, A))


def test_real_boundaries_show_step_structure_that_shuffled_ones_do_not():
    trace, atoms, sums, other = synthetic([5, 6, 4, 7], "step", 4.0)
    m = derive(sums, other, trace, atoms, shuffles=20, seed=0, band_fraction=0.25)
    k = SCORE_NAMES.index("shallow_lock_in")
    assert m.saliency.shallow_lock_in > np.nanmax(m.shuffled[:, k])
    # locality alone reads the same through any boundaries (Lock-in measures nearness, not steps)
    trace, atoms, sums, other = synthetic([5, 6, 4, 7], "window", 4.0)
    m = derive(sums, other, trace, atoms, shuffles=20, seed=0, band_fraction=0.25)
    assert np.nanmin(m.shuffled[:, k]) < m.saliency.shallow_lock_in < np.nanmax(m.shuffled[:, k])


def _groups(mode):
    rng = np.random.default_rng(1)
    out = []
    for p in range(16):
        for s in range(4):
            wrong = s % 2 == 1
            lengths = list(rng.integers(4, 8, size=4))
            trace, atoms, sums, other = synthetic(lengths, mode, 3.0 if wrong else 1.0)
            m = derive(sums, other, trace, atoms, shuffles=39, seed=p * 10 + s, band_fraction=0.25)
            out.append(AnalysedTrace(f"p{p}", s, not wrong, m.saliency, shuffled=m.shuffled))
    return compare_groups(out, n_boot=200, n_perm=199)


def test_shuffled_boundary_control_separates_step_effects_from_token_effects():
    step = _groups("step").score("shallow_lock_in")
    ctl = step.control["paired_raw"]
    assert step.tests["paired_raw"].estimate > 0 and ctl["exceeds"]
    assert ctl["shuffled_high"] < ctl["real"] and ctl["p_control"] == pytest.approx(1 / 40)
    # more saliency on the nearest tokens raises Lock-in through any boundaries: the control catches it
    window = _groups("window").score("shallow_lock_in")
    assert window.tests["paired_raw"].estimate > 0 and window.tests["paired_raw"].p_value < 0.01
    assert not window.control["paired_raw"]["exceeds"]


def test_site_metrics_read_the_boundary_token_row():
    trace, atoms, sums, other = synthetic([3, 3], "step", 0.0, q=2, summary=1)
    pooled = derive(sums, other, trace, atoms, shuffles=0, seed=0, band_fraction=0.25).saliency.sums
    sites = site_metrics(sums, atoms, trace.steps, pooled)
    # the first token of T2 sees the question (sum 2), the three tokens of T1 (1 each) and itself (1): 3 / 6
    np.testing.assert_allclose(sites["boundary_prev_share"], 3 / 6)
    # T2's rows together: question 3 x 2, T1 3 x 3, T2 itself 6 -> 9 / 21
    np.testing.assert_allclose(sites["after_prev_share"], 9 / 21)


def test_uniform_null_shares():
    steps = [Step("question", 1, 5, "q", 0), Step("thinking", 5, 8, "a", 1), Step("thinking", 8, 13, "b", 2),
             Step("summary", 13, 15, "s", 1)]
    N = causal_counts(steps)
    null = uniform_null_shares(N, steps)
    # T1: 4*3 from Q vs 6 inside -> 2/3; T2: 20 from Q, 15 from T1, 15 inside -> 0.4
    assert null["question_reach"] == pytest.approx((2 / 3 + 0.4) / 2)
    r = StepSaliency(np.repeat(N[None].astype(float), 3, 0), N, np.zeros((3, 4)), steps)
    for v in net_shares(r.metrics, N, steps).values():
        np.testing.assert_allclose(v, 0, atol=1e-12)  # uniform saliency is exactly the null
