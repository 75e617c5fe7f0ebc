"""Sliding-window-aware OEB: the default band skips sliding layers at the decoding steps where their window holds
no bridge key (exactly: the result is unchanged), says so once and counts it; layers given by hand are kept and
warned about; the band printout marks sliding layers."""

import warnings

import pytest
import torch

import stepscope
from stepscope import StepFlowConfig
from stepscope.stepflow.config import ResolvedStepFlow
from stepscope.testing import tiny_model
from stepscope.windows import layer_windows

QUESTIONS = ["What is 3 + 4?", "Hi, what is 7 times 2?"]


def _gemma_configs():
    from transformers import Gemma2Config, Gemma3TextConfig

    small = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 vocab_size=64)
    g2 = Gemma2Config(num_hidden_layers=4, sliding_window=16, **small)  # alternating, sliding first
    g3 = Gemma3TextConfig(num_hidden_layers=12, sliding_window=32, **small)  # five sliding, then one full
    return g2, g3


def test_gemma_style_windows_and_printout():
    g2, g3 = _gemma_configs()
    w2, w3 = layer_windows(g2), layer_windows(g3)
    assert w2 == [16, None, 16, None]
    assert w3 == [32, 32, 32, 32, 32, None] * 2
    text = StepFlowConfig().resolve(12, w3).describe()
    assert "OEB on layers 0-2s (" in text and "SMI on layers 9-10s,11 (" in text
    assert "[s: sliding-window layer, 32 tokens; OEB skips one while its window holds no bridge key]" in text
    # given by hand: marked, no promise of skipping
    hand = StepFlowConfig(oeb_layers=(0, 5)).resolve(12, w3).describe()
    assert "OEB on layers 0s,5 (" in hand and "skips" not in hand


def test_printout_without_windows_is_unchanged():
    assert StepFlowConfig().resolve(8).describe() == StepFlowConfig().resolve(8, [None] * 8).describe()
    assert "[s:" not in StepFlowConfig().resolve(8).describe()


def test_gpt_oss_and_mistral_printouts(tokenizers):
    tok = tokenizers["plain"]
    oss = tiny_model("gpt_oss", tok, layers=8)
    r = StepFlowConfig().resolve(8, layer_windows(oss.config))
    assert isinstance(r, ResolvedStepFlow) and r.sliding(r.oeb_layers) == [0]
    assert "OEB on layers 0s,1 (" in r.describe() and "SMI on layers 6s,7 (" in r.describe()
    mis = tiny_model("mistral", tok, layers=4)
    assert "OEB on layers 0s (" in StepFlowConfig().resolve(4, layer_windows(mis.config)).describe()


def _generate(model, tok, cfg, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traces = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=24, stepflow=cfg, progress=False,
                                    ignore_eos=True, **kw)
    return traces, [str(w.message) for w in caught]


@pytest.mark.parametrize("family", ["mistral", "gpt_oss"])
def test_default_band_skips_blind_sliding_layers_exactly_and_says_so(tokenizers, family):
    tok = tokenizers["plain"]
    model = tiny_model(family, tok, layers=4, scale=3.0)
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, band_fraction=0.5)  # OEB 0-1: layer 0 slides in both families
    traces, msgs = _generate(model, tok, cfg)
    skip = [m for m in msgs if "OEB skips" in m]
    assert len(skip) == 1 and "window" in skip[0]
    for t in traces:
        steps = t.meta["stepflow"]["oeb_skipped_steps"]
        assert set(steps) <= {0, 1} and steps.get(0, 0) > 0
        window = layer_windows(model.config)[0]
        assert steps[0] <= t.meta["new_tokens"] - (window - 1)  # the first tokens still see the question
    # the same layers given by hand are honoured (never skipped), warned about, and give the same tokens
    hand = StepFlowConfig(tau_max=0.6, alpha=0.5, band_fraction=0.5, oeb_layers=(0, 1))
    same, msgs = _generate(model, tok, hand)
    assert any("given by hand" in m and "sliding window" in m for m in msgs)
    assert not any("OEB skips" in m for m in msgs)
    for a, b in zip(traces, same):
        assert a.token_ids == b.token_ids
        assert "oeb_skipped_steps" not in b.meta["stepflow"]
        assert a.meta["stepflow"]["oeb_edits_per_layer"] == b.meta["stepflow"]["oeb_edits_per_layer"]


def test_full_attention_model_never_skips(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok, layers=4)
    traces, msgs = _generate(model, tok, StepFlowConfig(tau_max=0.6, alpha=0.5))
    assert not any("OEB skips" in m or "given by hand" in m for m in msgs)
    assert all("oeb_skipped_steps" not in t.meta["stepflow"] for t in traces)


def test_skipped_layers_leave_the_logits_bit_for_bit(tokenizers):
    """Skipping is only a saving: the decode logits equal those of the full pass (which never skips)."""
    from stepscope import Trace
    from stepscope.generation import cache_kwarg, new_cache
    from stepscope.stepflow.fullpass import teacher_forced_logits

    tok = tokenizers["plain"]
    model = tiny_model("mistral", tok, layers=4, scale=3.0)
    trace = Trace.from_text(tok, "What is 3 + 4?", "We add 3 and 4 to get 7. So the sum is 7.\nFinal answer: 7")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, band_fraction=0.5)
    kw = {cache_kwarg(model): new_cache(model), "use_cache": True}
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with stepscope.enabled(model, tok, cfg) as h, torch.no_grad():
            outs.append(model(input_ids=torch.tensor([trace.token_ids[: trace.prompt_len]]), **kw).logits[:, -1])
            for t in trace.response_ids[:-1]:
                outs.append(model(input_ids=torch.tensor([[t]]), **kw).logits[:, -1])
            assert h.row_stats()[0]["oeb_skipped_steps"][0] > 0
        full = teacher_forced_logits(model, tok, [trace], cfg)[0, trace.prompt_len - 1 : -1]
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-9, atol=1e-9)
