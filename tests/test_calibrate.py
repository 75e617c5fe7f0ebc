"""Calibrated StepFlow bands: the block choice against brute force, the evidence, the file, the flags."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from stepscope.calibrate import (
    calibrate,
    calibrate_from_saliency,
    choose_block,
    load_bands,
)
from stepscope.errors import StepscopeError
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.stepflow import StepFlowConfig
from stepscope.trace import Step


def _brute_block(scores, size, lowest, eligible):
    best = None
    for start in range(len(scores) - size + 1):
        block = list(range(start, start + size))
        if any(scores[i] is None or not eligible[i] for i in block):
            continue
        mean = sum(scores[i] for i in block) / size
        key = (mean if lowest else -mean, start)
        if best is None or key < best[0]:
            best = (key, start)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(40))
def test_block_choice_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    size = int(rng.integers(1, n + 1))
    scores = [None if rng.random() < 0.15 else float(rng.integers(0, 5)) for _ in range(n)]  # ties on purpose
    eligible = [bool(rng.random() > 0.2) for _ in range(n)]
    for lowest in (True, False):
        start, means = choose_block(scores, size, lowest=lowest, eligible=eligible)
        assert start == _brute_block(scores, size, lowest, eligible)
        assert len(means) == n - size + 1


def test_block_size_must_fit():
    with pytest.raises(StepscopeError, match="does not fit"):
        choose_block([0.1, 0.2], 3, lowest=True)


def _steps(n_thinking: int, tokens_per_step: int = 4) -> list[Step]:
    steps, pos = [Step("question", 1, 1 + tokens_per_step, "q", 0)], 1 + tokens_per_step
    for i in range(n_thinking):
        steps.append(Step("thinking", pos, pos + tokens_per_step, f"t{i}", i + 1))
        pos += tokens_per_step
    steps.append(Step("summary", pos, pos + tokens_per_step, "s", 1))
    return steps


def _saliency(reach: np.ndarray, recency: np.ndarray, n_thinking: int = 3) -> StepSaliency:
    """A synthetic result whose per-layer question reach and summary recency are the given curves."""
    steps = _steps(n_thinking)
    n_layers, n_steps = len(reach), len(steps)
    sums = np.zeros((n_layers, n_steps, n_steps))
    su = n_steps - 1
    for layer in range(n_layers):
        for i in range(1, su):  # thinking step i: reach[l] from the question, the rest from itself
            sums[layer, i, 0] = reach[layer]
            sums[layer, i, i] = 1 - reach[layer]
        sums[layer, su, su] = recency[layer]  # the summary: itself (recent) vs the first thinking step
        sums[layer, su, 1] = 1 - recency[layer]
    meta = {"tokens": steps[-1].end}
    return StepSaliency(sums, causal_counts(steps), np.zeros((n_layers, n_steps)), steps, meta)


def test_bands_follow_the_flow_and_the_evidence_is_kept():
    reach = np.array([0.5, 0.4, 0.1, 0.05, 0.3, 0.4, 0.5, 0.6])  # least reach at layers 2-3
    recency = np.array([0.2, 0.2, 0.2, 0.3, 0.4, 0.9, 0.95, 0.5])  # most decay at layers 5-6
    results = [_saliency(reach + d, recency - d) for d in (0.0, 0.01, -0.01)]
    cal = calibrate_from_saliency(results)
    assert cal.band_size == 2 and cal.oeb_layers == (2, 3) and cal.smi_layers == (5, 6)
    assert np.allclose(cal.curves["question_reach"], reach, atol=1e-12)
    assert all(lo <= m <= hi for (lo, hi), m in zip(cal.curve_ci["question_reach"], cal.curves["question_reach"]))
    assert "lowest mean question reach" in cal.reasons["oeb"] and cal.n_traces == 3
    cfg = cal.to_config(StepFlowConfig(alpha=0.1))
    assert cfg.oeb_layers == (2, 3) and cfg.smi_layers == (5, 6) and cfg.alpha == 0.1


def test_sliding_layers_that_cannot_see_the_question_are_left_out():
    reach = np.array([0.5, 0.01, 0.02, 0.4, 0.3, 0.2])  # the lowest reach sits in sliding layers 1-2
    recency = np.linspace(0.1, 0.9, 6)
    trace_tokens = _saliency(reach, recency).meta["tokens"]
    windows = [None, 8, 8, None, None, None]  # shorter than the traces: the question is out of their view
    assert trace_tokens > 8
    cal = calibrate_from_saliency([_saliency(reach, recency)], windows=windows)
    assert not set(cal.oeb_layers) & {1, 2} and cal.oeb_layers == (4, 5)
    assert "excluded" in cal.reasons["oeb"] and cal.oeb_eligible == [True, False, False, True, True, True]
    wide = calibrate_from_saliency([_saliency(reach, recency)], windows=[None, 4096, 4096, None, None, None])
    assert wide.oeb_layers == (1, 2)  # a window longer than the trace sees everything


def test_missing_segments_keep_the_default_band_and_say_why():
    steps = [Step("question", 1, 5, "q", 0), Step("thinking", 5, 9, "t", 1)]  # no summary
    sums = np.random.default_rng(0).random((4, 2, 2))
    res = StepSaliency(sums, causal_counts(steps), np.zeros((4, 2)), steps, {"tokens": 9})
    cal = calibrate_from_saliency([res])
    assert cal.smi_layers == (3,) and "no trace had a summary" in cal.reasons["smi"]


def test_bands_file_round_trip_and_bad_files(tmp_path):
    cal = calibrate_from_saliency([_saliency(np.linspace(0.6, 0.1, 4), np.linspace(0.1, 0.6, 4))])
    paths = cal.save(tmp_path / "out")
    assert [p.name for p in paths] == ["bands.json", "bands.png"] and paths[1].stat().st_size > 1000
    again = load_bands(tmp_path / "out")
    assert again == cal
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(StepscopeError, match="not a stepscope bands file"):
        load_bands(tmp_path / "bad.json")
    with pytest.raises(StepscopeError, match="no bands file"):
        load_bands(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(StepscopeError, match="cannot read"):
        load_bands(tmp_path / "broken.json")


def _args(**kw):
    base = {"stepflow": True, "oeb_layers": None, "smi_layers": None, "tau_max": None, "alpha": None,
            "smi_window": None, "smi_at_summary": False, "no_oeb": False, "no_smi": False, "bands": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_bands_flag_sets_layers_and_strengths_unless_given_by_hand(tmp_path):
    from stepscope.cli.stepflow_args import stepflow_from_args

    cal = calibrate_from_saliency([_saliency(np.linspace(0.6, 0.1, 8), np.linspace(0.1, 0.6, 8))])
    data = cal.to_dict()
    data.update(tau_max=0.3, alpha=0.09)
    path = tmp_path / "bands.json"
    path.write_text(json.dumps(data))
    cfg = stepflow_from_args(_args(bands=str(path)))
    assert cfg.oeb_layers == cal.oeb_layers and cfg.smi_layers == cal.smi_layers
    assert cfg.tau_max == 0.3 and cfg.alpha == 0.09
    mixed = stepflow_from_args(_args(bands=str(path), oeb_layers="0-1", tau_max=0.2))
    assert mixed.oeb_layers == (0, 1) and mixed.smi_layers == cal.smi_layers and mixed.tau_max == 0.2
    plain = stepflow_from_args(_args())
    assert plain == StepFlowConfig()
    with pytest.raises(StepscopeError, match="without --stepflow"):
        stepflow_from_args(_args(stepflow=False, bands=str(path)))


def test_calibrate_end_to_end_on_a_tiny_model(tmp_path):
    from stepscope.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("plain")
    model = tiny_model("gpt_oss", tok, layers=4)
    questions = ["What is 2 plus 3? Think step by step.", "Add 4 and 5. Explain each step."]
    cal = calibrate(model, tok, questions, max_new_tokens=24, progress=False)
    assert cal.num_layers == 4 and cal.band_size == 1 and len(cal.oeb_layers) == 1 and len(cal.smi_layers) == 1
    assert cal.windows == [6, None, 6, None]
    # the traces are longer than the tiny 6-token window, so the sliding layers cannot carry OEB
    assert cal.oeb_eligible == [False, True, False, True]
    assert cal.oeb_layers[0] in (1, 3)
    assert load_bands(cal.save(tmp_path)[0]) == cal
