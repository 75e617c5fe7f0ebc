"""The streaming Step-Saliency engine against the brute-force reference (eager attention, retained gradients)."""


import numpy as np
import pytest
import torch

import stepscope
from stepscope import StepscopeError, Trace
from stepscope.errors import UnsupportedModelError
from stepscope.saliency.reference import reference_sums
from stepscope.testing import FAMILIES, tiny_model

RESPONSES = [
    "First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now."
    "</think>\n\nFinal answer: 10<|im_end|>",
    "We think hard about it. It is seven, clearly.</think>7<|im_end|>",
]


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


@pytest.fixture(scope="module")
def traces(tokenizers):
    tok = tokenizers["think"]
    return [Trace.from_text(tok, "What is (2+3)*2?", RESPONSES[0]),
            Trace.from_text(tok, "Hi, what is 7?", RESPONSES[1])]


def rel_err(a, b):
    """Largest elementwise relative error, ignoring entries below 1e-9 of the map's scale."""
    scale = np.abs(b).max()
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-9 * scale)).max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_mb", [0.004, 0.03, 64])  # 1, ~8 and all rows per chunk
@pytest.mark.parametrize("method, keep_mb", [("layerwise", 0), ("layerwise", 1e6), ("layerwise", 0.2),
                                            ("whole", 0)])
def test_matches_brute_force_float32(tokenizers, traces, family, chunk_mb, method, keep_mb):
    """keep_mb: recompute every layer / keep every graph but the probe's / keep the top one (0.2 MB)."""
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=3, dtype=torch.float32)
    results = stepscope.step_saliency(model, tok, traces, batch_size=2, chunk_mb=chunk_mb, method=method,
                                      keep_mb=keep_mb, progress=False)
    for t, r in zip(traces, results):
        ref, ref_other = reference_sums(model, t)
        assert r.sums.shape == (3, len(t.steps), len(t.steps))
        assert rel_err(r.sums, ref) <= 1e-4
        assert rel_err(r.other, ref_other) <= 1e-4


def test_batch_equals_single(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok, layers=2)
    batched = stepscope.step_saliency(model, tok, traces, batch_size=2, progress=False)
    for t, r in zip(traces, batched):
        alone = stepscope.step_saliency(model, tok, t, progress=False)
        np.testing.assert_allclose(r.sums, alone.sums, rtol=1e-9, atol=0)


@pytest.mark.parametrize("target", ["generated", "summary"])
def test_loss_targets(tokenizers, traces, target):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=2, dtype=torch.float32)
    r = stepscope.step_saliency(model, tok, traces[0], target=target, progress=False)
    ref, _ = reference_sums(model, traces[0], target=target)
    assert rel_err(r.sums, ref) <= 1e-4
    full = stepscope.step_saliency(model, tok, traces[0], progress=False)
    assert not np.allclose(r.sums, full.sums)  # the target set really changes L


def test_counts_and_order(tokenizers, traces):
    tok = tokenizers["think"]
    t = traces[0]
    r = stepscope.step_saliency(tiny_model("llama", tok), tok, t, progress=False)
    ids = t.step_ids()
    pos = np.arange(len(t))
    for i in range(len(t.steps)):
        for j in range(len(t.steps)):
            brute = sum(int((pos[ids == j] <= q).sum()) for q in pos[ids == i])
            assert r.counts[i, j] == brute
    assert r.labels == [s.label for s in t.steps]
    assert np.all(np.triu(r.sums[0], 1) == 0)  # no saliency from a step to a later one


def test_default_model_short_trace(default_model):
    model, tok = default_model
    t = Trace.from_text(tok, "What is 3 + 4?", "First, take 3. Then add 4 to it. So the sum is 7.\nFinal answer: 7")
    r = stepscope.step_saliency(model, tok, t, progress=False)
    ref, ref_other = reference_sums(model, t)
    assert r.num_layers == 30
    assert rel_err(r.sums, ref) <= 1e-4 and rel_err(r.other, ref_other) <= 1e-4


def _state(model):
    return (model.config._attn_implementation, model.training,
            [p.grad for p in model.parameters()], [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def test_model_unchanged_after_call_and_after_error(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("gpt_oss", tok)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    before = _state(model)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    stepscope.step_saliency(model, tok, traces[0], progress=False)
    assert _state(model) == before
    with pytest.raises(StepscopeError):
        stepscope.step_saliency(model, tok, traces[0], chunk_mb=1e-9, progress=False)
    assert _state(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert all(p.grad is None for p in model.parameters())


def test_one_step_trace_is_a_clear_error(tokenizers):
    tok = tokenizers["think"]
    t = Trace.from_text(tok, "What?", "")
    with pytest.raises(StepscopeError, match="needs a question and at least one response step"):
        stepscope.step_saliency(tiny_model("llama", tok), tok, t, progress=False)


def test_chunk_budget_too_small(tokenizers, traces):
    tok = tokenizers["think"]
    with pytest.raises(StepscopeError, match="cannot hold one query row"):
        stepscope.step_saliency(tiny_model("llama", tok), tok, traces[0], chunk_mb=1e-6, progress=False)


def test_trace_longer_than_context(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok)
    model.config.max_position_embeddings = 16
    with pytest.raises(StepscopeError, match="longer than the model's context"):
        stepscope.step_saliency(model, tok, traces[0], progress=False)


def test_non_finite_gradients_are_reported(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    with pytest.raises(StepscopeError, match="non-finite"):
        stepscope.step_saliency(model, tok, traces[0], progress=False)


def test_non_softmax_model_names_its_class(tokenizers, traces):
    from transformers import MambaConfig, MambaForCausalLM

    tok = tokenizers["think"]
    model = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16, state_size=4, num_hidden_layers=2,
                                         expand=2, conv_kernel=2)).eval()
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        stepscope.step_saliency(model, tok, traces[0], progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_stepflow_matches_a_literal_reference(tokenizers, traces, family):
    """Saliency measured with StepFlow on (the mechanism check) against the SPEC's OEB/SMI written out plainly."""
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    cfg = stepscope.StepFlowConfig(tau_max=0.5, alpha=1.5, smi_at_summary=True)
    on = stepscope.step_saliency(model, tok, traces[0], stepflow=cfg, progress=False)
    ref, ref_other = reference_sums(model, traces[0], stepflow=cfg)
    assert rel_err(on.sums, ref) <= 1e-6 and rel_err(on.other, ref_other) <= 1e-6
    off = stepscope.step_saliency(model, tok, traces[0], progress=False)
    assert np.abs(off.sums - ref).max() > 1e-3 * np.abs(ref).max()  # the edits change the map
    assert on.meta["stepflow"]["tau_max"] == 0.5


def _hooks_left(model):
    """Saved-tensor hooks on autograd's stack, module hooks and stepscope attention handlers: all should be gone."""
    from stepscope.attention.dispatch import _CHAINS

    return (torch._C._autograd._top_saved_tensors_default_hooks(True) is not None,
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()),
            sum(1 for m in model.modules() if m in _CHAINS), model.config._attn_implementation, torch.is_grad_enabled())


@pytest.mark.parametrize("where", ["layer 0 forward", "layer 0 backward", "whole-model backward"])
def test_a_failure_inside_leaves_the_model_and_autograd_as_they_were(tokenizers, traces, monkeypatch, where):
    """An error (e.g. out of memory) in the middle of the computation: no hook stays installed."""
    from stepscope.saliency import engine

    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=3)
    ids = torch.tensor([traces[0].token_ids])
    ref = model(ids).logits
    before = _hooks_left(model)
    assert before[:3] == (False, 0, 0)
    method = "layerwise"
    if where == "layer 0 forward":  # layer 0 runs the first pass's memory probe under saved-tensor hooks
        def boom(module, args):
            raise RuntimeError("boom")

        hook = model.model.layers[0].mlp.register_forward_pre_hook(boom)
    else:
        hook = None
        real = engine.layer_step_sums

        def failing(call, *a, **k):
            if call.layer_idx == 0:
                raise RuntimeError("boom")
            return real(call, *a, **k)

        monkeypatch.setattr(engine, "layer_step_sums", failing)
        method = "whole" if where.startswith("whole") else "layerwise"
    with pytest.raises(RuntimeError, match="boom"):
        stepscope.step_saliency(model, tok, traces[0], method=method, progress=False)
    if hook is not None:
        hook.remove()
    assert _hooks_left(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    monkeypatch.undo()
    stepscope.step_saliency(model, tok, traces[0], progress=False)  # and it still works


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])
def test_layerwise_outside_the_family_table_is_a_clear_error(tokenizers, traces, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizers["think"]
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(StepscopeError, match=f"method='layerwise'.*'{family}'.*method='whole'"):
        stepscope.step_saliency(model, tok, traces[0], method="layerwise", progress=False)
    auto = stepscope.step_saliency(model, tok, traces[0], progress=False)  # auto picks the whole-model pass
    assert auto.sums.shape[0] == 2 and np.isfinite(auto.sums).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_non_finite_error_names_the_model_dtype(tokenizers, traces, dtype):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(StepscopeError, match=f"non-finite.* in {name} ") as info:
        stepscope.step_saliency(model, tok, traces[0], progress=False)
    assert ("float32" in str(info.value)) == (dtype == torch.bfloat16)  # the hint to upcast, only where it helps
