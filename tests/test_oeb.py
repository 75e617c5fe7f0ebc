"""OEB against a brute-force per-(head, query) implementation of the SPEC rule."""

import math

import numpy as np
import pytest
import torch

from stepscope.labels import OTHER, QUESTION, SUMMARY, THINKING
from stepscope.stepflow.oeb import groups, odds_equal_bridge


def brute(z, sink, q_seg, k_seg, tau_max, eps):
    """SPEC section 3, written out for one head and one query."""
    keys = [k for k in range(len(z)) if np.isfinite(z[k])]
    if q_seg == THINKING:
        B = [k for k in keys if k_seg[k] == QUESTION]
        S = [k for k in keys if k_seg[k] == THINKING]
    elif q_seg == SUMMARY:
        B = [k for k in keys if k_seg[k] == THINKING]
        S = [k for k in keys if k_seg[k] == SUMMARY]
    else:
        B, S = [], []
    denom = sum(math.exp(z[k]) for k in keys) + (math.exp(sink) if sink is not None else 0.0)
    p = {k: math.exp(z[k]) / denom for k in keys}
    pB, pS = sum(p[k] for k in B), sum(p[k] for k in S)
    pO = 1 - pB - pS
    out = np.array([p.get(k, 0.0) for k in range(len(z))])
    if not B:
        return out, False
    tau_B = min(math.sqrt(len(B) / (len(B) + len(S))), tau_max)
    tau_B = min(tau_B, 1 - pO - eps)
    if pB < tau_B and pS > eps:
        tau_S = 1 - pO - tau_B
        for k in B:
            out[k] = p[k] * tau_B / pB
        for k in S:
            out[k] = p[k] * tau_S / pS
        return out, True
    return out, False


def run(z, sink, q_seg, k_seg, tau_max=0.15, eps=1e-6):
    logits = torch.tensor(z, dtype=torch.float64)[None, None, None, :]  # (1, 1, 1, k)
    log_norm = torch.logsumexp(logits, -1)
    if sink is not None:
        log_norm = torch.logaddexp(log_norm, torch.tensor(sink, dtype=torch.float64))
    bridge, current, editable = groups(torch.tensor([[q_seg]]), torch.tensor([k_seg]))
    return odds_equal_bridge(logits, log_norm, bridge, current, editable, tau_max, eps)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("sink", [None, 0.5])
def test_matches_brute_force(seed, sink):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(4, 30))
    z = rng.normal(0, 3, size=k)
    z[rng.random(k) < 0.1] = -np.inf  # masked keys
    k_seg = [OTHER] + list(rng.choice([QUESTION, THINKING, SUMMARY], size=k - 1, p=[0.3, 0.5, 0.2]))
    q_seg = int(rng.choice([QUESTION, THINKING, SUMMARY]))
    res = run(z, sink, q_seg, k_seg)
    expect, edited = brute(z, sink, q_seg, k_seg, 0.15, 1e-6)
    np.testing.assert_allclose(res.probs[0, 0, 0].numpy(), expect, rtol=1e-9, atol=1e-12)
    assert bool(res.edited[0, 0, 0]) == edited


def test_masses_after_edit_and_proportions():
    z = [3.0, 0.1, -0.5, 2.0, 2.5, 1.0, 0.3]  # sink, two question keys, four thinking keys
    k_seg = [OTHER, QUESTION, QUESTION, THINKING, THINKING, THINKING, THINKING]
    res = run(z, None, THINKING, k_seg, tau_max=0.15)
    p = torch.softmax(torch.tensor(z, dtype=torch.float64), 0).numpy()
    q = res.probs[0, 0, 0].numpy()
    assert bool(res.edited[0, 0, 0])
    pO = p[0]
    assert abs(q[1:3].sum() - 0.15) < 1e-5  # bridge mass = tau_B
    assert abs(q[3:].sum() - (1 - pO - 0.15)) < 1e-5  # current segment = tau_S
    assert abs(q[0] - pO) < 1e-12  # O unchanged
    np.testing.assert_allclose(q[1] / q[2], p[1] / p[2], rtol=1e-12)  # within-group ratios kept
    np.testing.assert_allclose(q[3:] / q[3], p[3:] / p[3], rtol=1e-12)


def test_untouched_when_bridge_already_large():
    z = [0.0, 3.0, 3.0, 0.0]
    k_seg = [OTHER, QUESTION, QUESTION, THINKING]
    res = run(z, None, THINKING, k_seg)
    assert not bool(res.edited[0, 0, 0])
    np.testing.assert_allclose(res.probs[0, 0, 0].numpy(), torch.softmax(torch.tensor(z, dtype=torch.float64), 0))


def test_infeasible_clamp_no_nan():
    # nearly all mass on the sink token: tau_B is clamped to 1 - p(O) - eps (or below zero: no edit)
    z = [40.0, -5.0, -5.0, -4.0]
    k_seg = [OTHER, QUESTION, THINKING, THINKING]
    res = run(z, 10.0, THINKING, k_seg)
    assert torch.isfinite(res.probs).all() and not bool(res.edited[0, 0, 0])
    # p(O) large but feasible: the bridge gets exactly the clamped mass
    z = [2.0, -3.0, 0.0, 0.0]
    res = run(z, None, THINKING, k_seg, tau_max=0.99, eps=1e-3)
    q = res.probs[0, 0, 0].numpy()
    pO = float(torch.softmax(torch.tensor(z, dtype=torch.float64), 0)[0])
    assert bool(res.edited[0, 0, 0]) and torch.isfinite(res.probs).all()
    assert abs(q[1] - min(math.sqrt(1 / 3), 1 - pO - 1e-3)) < 1e-9


def test_question_queries_never_edited():
    res = run([0.0, -9.0, 1.0], None, QUESTION, [OTHER, QUESTION, QUESTION])
    assert not bool(res.edited.any())


def test_summary_query_bridges_to_thinking():
    z = [1.0, 2.0, -4.0, -4.0, 2.0]
    k_seg = [OTHER, QUESTION, THINKING, THINKING, SUMMARY]
    res = run(z, None, SUMMARY, k_seg)
    q = res.probs[0, 0, 0].numpy()
    assert bool(res.edited[0, 0, 0]) and abs(q[2:4].sum() - 0.15) < 1e-9
    p = torch.softmax(torch.tensor(z, dtype=torch.float64), 0).numpy()
    assert abs(q[1] - p[1]) < 1e-12  # the question is O for summary queries: unchanged
