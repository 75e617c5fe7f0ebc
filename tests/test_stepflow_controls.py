"""StepFlow's random controls: OEB lifting a random key group of the bridge's size, SMI with a random direction."""

import warnings

import numpy as np
import pytest
import torch

import stepscope
from stepscope.attention.dispatch import install
from stepscope.attention.scores import logits_block, probabilities
from stepscope.labels import OTHER, QUESTION, SUMMARY, THINKING
from stepscope.stepflow import StepFlowConfig
from stepscope.stepflow.controls import ControlledStepFlow, StepFlowControl, random_groups
from stepscope.stepflow.fullpass import teacher_forced
from stepscope.stepflow.oeb import groups
from stepscope.testing import tiny_model

RESPONSE = ("First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
            "Final answer: 10<|im_end|>")


@pytest.fixture(scope="module")
def tiny(tokenizers):
    tok = tokenizers["think"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = stepscope.Trace.from_text(tok, "Question 1?", RESPONSE)
    model = tiny_model("llama", tok, layers=4)
    calls = {}

    def record(call, proceed):
        calls[call.layer_idx] = call
        return proceed(call)

    handle = install(model, record)
    with torch.no_grad():
        model(input_ids=torch.tensor([trace.token_ids]))
    handle.remove()
    return model, tok, trace, calls


def test_random_groups_have_the_bridges_size_inside_the_redistributed_keys():
    seg = torch.tensor([[OTHER, QUESTION, QUESTION, QUESTION, THINKING, THINKING, THINKING, THINKING, SUMMARY,
                         SUMMARY]])
    bridge, current, _editable = groups(seg, seg)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    rb = random_groups(seg, seed=3)
    pool = (bridge | current) & causal
    assert bool((rb <= pool).all())
    np.testing.assert_array_equal(rb.sum(-1)[0, 0].numpy(), (bridge & causal).sum(-1)[0, 0].numpy())
    assert torch.equal(rb, random_groups(seg, seed=3)) and not torch.equal(rb, random_groups(seg, seed=4))
    # a summary query's group has the thinking segment's size (4) and is not the thinking segment itself everywhere
    assert int(rb[0, 0, 9].sum()) == 4 and not torch.equal(rb[0, 0, 8:], bridge[0, 0, 8:] & causal[8:])


def test_random_bridge_lifts_its_group_to_the_bridge_target(tiny):
    model, tok, trace, calls = tiny
    config = StepFlowConfig(tau_max=0.3, smi=False)
    call = calls[0]
    T = len(trace)
    with teacher_forced(model, tok, ControlledStepFlow(config, StepFlowControl("random_bridge", 1)), [trace]) as h:
        logits = logits_block(call, 0, 0, T, 0, T, 0)
        edited = h.saliency_edit(0)(call, 0, 0, T, 0, T, logits)
        rb = h.edits[0]._random[0, 0]
        editable = groups(h.labels.segment[:, :T], h.labels.segment[:, :T])[2][0, 0]
    before = probabilities(call, logits)
    mass_before, mass_after = (before * rb).sum(-1), (edited * rb).sum(-1)  # (H, T)
    lifted = editable & (mass_before < 0.3 - 1e-6)
    assert bool(lifted.any())
    torch.testing.assert_close(mass_after[lifted], torch.full_like(mass_after[lifted], 0.3), atol=1e-6, rtol=0)
    torch.testing.assert_close(edited[:, ~editable], before[:, ~editable])  # question rows untouched
    torch.testing.assert_close(edited[..., 0], before[..., 0])  # the sink token (O) keeps its mass


def test_random_momentum_has_each_heads_norm_and_another_direction(tiny):
    model, tok, trace, calls = tiny
    config = StepFlowConfig(oeb=False, alpha=0.5)
    layer = max(calls)
    call = calls[layer]
    T = len(trace)
    B, H, _, D = call.query.shape
    out = torch.randn(B, T, H, D, dtype=call.query.dtype, generator=torch.Generator().manual_seed(0))
    with teacher_forced(model, tok, config, [trace]) as tf, \
            teacher_forced(model, tok, ControlledStepFlow(config, StepFlowControl("random_momentum", 0)), [trace]) as ctl:
        v = tf.views(T, T)
        real = tf.edits[1].inject_many(call, out, v.fire, v.k_seg, v.k_step) - out
        rand = ctl.edits[1].inject_many(call, out, v.fire, v.k_seg, v.k_step) - out
    fired = real.flatten(2).norm(dim=-1) > 0  # (B, T)
    assert int(fired.sum()) == len(trace.steps_of("thinking")) - 1  # one firing token per new thinking step
    assert torch.equal(fired, rand.flatten(2).norm(dim=-1) > 0)
    torch.testing.assert_close(rand.norm(dim=-1), real.norm(dim=-1), rtol=1e-6, atol=1e-9)
    cos = torch.nn.functional.cosine_similarity(real[fired], rand[fired], dim=-1)
    assert float(cos.abs().max()) < 0.9


def test_unknown_control_is_refused():
    with pytest.raises(stepscope.StepscopeError, match="unknown StepFlow control"):
        StepFlowControl("random_everything")
