"""StepFlow on real model forwards: identity when off, exact SMI deltas, decode = full pass, batching, restore."""

import itertools

import numpy as np
import pytest
import torch

import stepscope
from stepscope import StepFlowConfig, Trace
from stepscope.attention import install
from stepscope.generation import cache_kwarg, new_cache, new_static_cache
from stepscope.stepflow.fullpass import teacher_forced_logits
from stepscope.testing import FAMILIES, tiny_model

RESPONSES = [
    "First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
    "Final answer: 10<|im_end|>",
    "We think hard about the sum. It is seven, clearly so. And we check it once more!</think>7<|im_end|>",
]
QUESTIONS = ["What is (2+3)*2?", "Hi, what is 7?"]
STRONG = StepFlowConfig(tau_max=0.6, alpha=1.5)


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


@pytest.fixture(scope="module")
def traces(tokenizers):
    tok = tokenizers["think"]
    return [Trace.from_text(tok, q, r) for q, r in zip(QUESTIONS, RESPONSES)]


class Recorder:
    """Outermost attention handler: keeps each layer's output (after StepFlow) and value tensor."""

    def __init__(self):
        self.out, self.value = {}, {}

    def __call__(self, call, proceed):
        out, w = proceed(call)
        self.out[call.layer_idx] = out.detach().clone()
        self.value[call.layer_idx] = call.value.detach().clone()
        return out, w


def record(model, tok, traces, cfg):
    rec = Recorder()
    with install(model, rec, outermost=True):
        teacher_forced_logits(model, tok, traces, cfg)
    return rec


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_and_disabled_are_identical(tokenizers, family):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    qs = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?"]
    base = stepscope.generate(model, tok, qs, max_new_tokens=30, progress=False)
    for cfg in (StepFlowConfig(tau_max=0.0, alpha=0.0), StepFlowConfig(oeb=False, smi=False)):
        same = stepscope.generate(model, tok, qs, max_new_tokens=30, progress=False, stepflow=cfg)
        assert [t.token_ids for t in same] == [t.token_ids for t in base]
    ts = [Trace.from_text(tok, q, r) for q, r in zip(QUESTIONS, RESPONSES)]
    plain = teacher_forced_logits(model, tok, ts)
    zero = teacher_forced_logits(model, tok, ts, StepFlowConfig(tau_max=0.0, alpha=0.0))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("family", [*FAMILIES, "mistral"])
@pytest.mark.parametrize("window", [None, 2])
def test_smi_adds_exactly_alpha_times_step_mean_at_step_starts(tokenizers, traces, family, window):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    last = model.config.num_hidden_layers - 1
    cfg = StepFlowConfig(oeb=False, smi_layers=(last,), alpha=0.7, smi_window=window)
    off = record(model, tok, traces, None)
    on = record(model, tok, traces, cfg)
    for layer in range(last):
        assert torch.equal(on.out[layer], off.out[layer])
    width = max(len(t) for t in traces)
    for b, t in enumerate(traces):
        shift = width - len(t)
        thinking = t.steps_of("thinking")
        fire = {s.start + shift: prev for prev, s in itertools.pairwise(thinking)}
        diff = on.out[last][b] - off.out[last][b]  # (T, H, D)
        changed = {int(i) for i in torch.nonzero(diff.abs().amax(dim=(1, 2)) > 0).flatten()}
        assert changed == set(fire)
        H = diff.shape[1]
        v = off.value[last][b]  # (H_kv, T, D)
        for pos, prev in fire.items():
            toks = list(range(prev.start + shift, prev.end + shift))
            if window is not None:
                toks = toks[-window:]
            if family == "mistral" or (family == "gpt_oss" and model.config.layer_types[last] == "sliding_attention"):
                toks = [k for k in toks if k > pos - model.config.sliding_window]
            m = v[:, toks].mean(1).repeat_interleave(H // v.shape[0], dim=0)  # (H, D)
            torch.testing.assert_close(diff[pos], 0.7 * m, rtol=1e-9, atol=1e-12)


def test_only_band_layers_change(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=8)
    cfg = StepFlowConfig(oeb=False, alpha=0.5)  # SMI on the top quarter: layers 6, 7
    off, on = record(model, tok, traces, None), record(model, tok, traces, cfg)
    changed = [layer for layer in range(8) if not torch.equal(on.out[layer], off.out[layer])]
    assert changed == [6, 7]
    cfg = StepFlowConfig(smi=False, tau_max=0.9)  # OEB on the bottom quarter: layers 0, 1 (and all after)
    on = record(model, tok, traces, cfg)
    assert not torch.equal(on.out[0], off.out[0])


def _decode_logits(model, tok, traces, cfg, static=False):
    """Teacher-forced *decoding* (KV cache, one token per step, left-padded batch) under stepscope.enabled;
    ``static``: a preallocated cache longer than the sequences (its empty slots must read as ``other``)."""
    from stepscope.batch import left_pad, positions

    P = max(t.prompt_len for t in traces)
    prompts = [t.token_ids[: t.prompt_len] for t in traces]
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    steps = max(len(t) - t.prompt_len for t in traces)
    cache = new_static_cache(model, ids.shape[1] + steps + 7) if static else new_cache(model)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    outs = []
    with stepscope.enabled(model, tok, cfg), torch.no_grad():
        pos = positions(mask)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]
        outs.append(logits)
        for j in range(steps - 1):
            col = torch.tensor([[t.response_ids[j] if j < len(t.response_ids) else tok.pad_token_id]
                                for t in traces])
            mask = torch.cat([mask, torch.ones(len(traces), 1, dtype=mask.dtype)], 1)
            pos = pos[:, -1:] + 1
            outs.append(model(input_ids=col, attention_mask=mask, position_ids=pos, **kw).logits[:, -1])
    return torch.stack(outs, 1), P


@pytest.mark.parametrize("family", [*FAMILIES, "mistral"])
@pytest.mark.parametrize("static", [False, True])
def test_decode_form_equals_full_pass_form(tokenizers, family, static):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    # same prompt length, different step boundaries per row
    ts = [Trace.from_text(tok, "What is (2+3)*2?", r) for r in RESPONSES]
    dec, _ = _decode_logits(model, tok, ts, STRONG, static)
    full = teacher_forced_logits(model, tok, ts, STRONG)
    plain = teacher_forced_logits(model, tok, ts)
    width = full.shape[1]
    for b, t in enumerate(ts):
        n = len(t) - t.prompt_len
        shift = width - len(t)
        f = full[b, shift + t.prompt_len - 1 : shift + len(t) - 1]
        torch.testing.assert_close(dec[b, :n], f, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(f, plain[b, shift + t.prompt_len - 1 : shift + len(t) - 1])  # it did something
        single = teacher_forced_logits(model, tok, [t], STRONG)[0, t.prompt_len - 1 : len(t) - 1]
        torch.testing.assert_close(single, f, rtol=1e-9, atol=1e-9)  # batched row == alone


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
@pytest.mark.parametrize("static", [False, True])
def test_decoding_without_stepflow_prefill_starts_smi_sums_from_the_keys(tokenizers, family, static):
    """StepFlow switched on after a plain prefill (a cached prompt): the first decoding step finds no running sums,
    averages by a pass over the keys and starts the sums there; logits still equal the full pass."""
    from stepscope.batch import left_pad, positions
    from stepscope.labels import RowLabeler
    from stepscope.profiles import get_profile
    from stepscope.stepflow.handle import session as stepflow_session

    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    ts = [Trace.from_text(tok, "What is (2+3)*2?", r) for r in RESPONSES]
    prompts = [t.token_ids[: t.prompt_len] for t in ts]
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    steps = max(len(t.response_ids) for t in ts)
    cache = new_static_cache(model, ids.shape[1] + steps + 3) if static else new_cache(model)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    labeler = RowLabeler(tok, get_profile(None, tok), prompts, "cpu")
    with torch.no_grad():
        pos = positions(mask)
        outs = [model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]]  # plain
    with stepflow_session(model, tok, STRONG, labeler), torch.no_grad():
        for j in range(steps - 1):
            toks = [t.response_ids[j] if j < len(t.response_ids) else None for t in ts]
            labeler.push(toks)
            col = torch.tensor([[tok.pad_token_id if x is None else x] for x in toks])
            mask = torch.cat([mask, torch.ones(len(ts), 1, dtype=mask.dtype)], 1)
            pos = pos[:, -1:] + 1
            outs.append(model(input_ids=col, attention_mask=mask, position_ids=pos, **kw).logits[:, -1])
    dec = torch.stack(outs, 1)
    full = teacher_forced_logits(model, tok, ts, STRONG)
    width = full.shape[1]
    for b, t in enumerate(ts):
        n, shift = len(t.response_ids), width - len(t)
        torch.testing.assert_close(dec[b, :n], full[b, shift + t.prompt_len - 1 : shift + len(t) - 1],
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_with_stepflow_equals_single(tokenizers, family):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    qs = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?"]
    batch = stepscope.generate(model, tok, qs, max_new_tokens=30, progress=False, stepflow=STRONG, batch_size=2)
    for q, t in zip(qs, batch):
        alone = stepscope.generate(model, tok, q, max_new_tokens=30, progress=False, stepflow=STRONG)[0]
        assert alone.token_ids == t.token_ids
        assert alone.meta["stepflow"]["oeb_edits_per_layer"] == t.meta["stepflow"]["oeb_edits_per_layer"]


@pytest.mark.parametrize("cache", [None, "static"])
def test_transformers_generate_inside_enabled(tokenizers, cache):
    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok, layers=4)
    ours = stepscope.generate(model, tok, "What is 2+3?", max_new_tokens=25, progress=False, stepflow=STRONG)[0]
    prompt = torch.tensor([ours.token_ids[: ours.prompt_len]])
    with stepscope.enabled(model, tok, STRONG):
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, cache_implementation=cache)
    assert hf[0].tolist()[: len(ours)] == ours.token_ids


@pytest.mark.parametrize("family", ["gpt_oss", "mistral"])
def test_transformers_generate_static_cache_left_padded_batch(tokenizers, family):
    """model.generate with a static cache hands StepFlow prepared 4D masks, no 2D one: the padding is read from
    the position ids. Sliding-window layers (window 5-6) are outgrown, so the cache rolls."""
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    qs = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?"]
    ours = stepscope.generate(model, tok, qs, max_new_tokens=20, progress=False, stepflow=STRONG, batch_size=2)
    from stepscope.batch import left_pad

    ids, mask = left_pad([t.token_ids[: t.prompt_len] for t in ours], tok.pad_token_id, "cpu")
    with stepscope.enabled(model, tok, STRONG) as handle:
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache_implementation="static",
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert handle.labels.capacity >= ids.shape[1] + 19  # sized to the cache up front
    for b, t in enumerate(ours):
        got = hf[b, ids.shape[1] - t.prompt_len :].tolist()
        assert got[: len(t)] == t.token_ids


def _snapshot(model):
    from stepscope.attention.dispatch import _CHAINS

    return (model.config._attn_implementation, len(model._forward_pre_hooks),
            sum(1 for m in model.modules() if m in _CHAINS))


def test_restored_after_context_and_after_exception(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("gpt_oss", tok)
    before = _snapshot(model)
    ref = teacher_forced_logits(model, tok, traces)
    with stepscope.enabled(model, tok, STRONG):
        assert _snapshot(model) != before
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"), stepscope.enabled(model, tok, STRONG):
        raise RuntimeError("boom")
    assert _snapshot(model) == before
    handle = stepscope.apply(model, tok, STRONG)
    handle.remove()
    handle.remove()  # idempotent
    assert _snapshot(model) == before
    assert torch.equal(teacher_forced_logits(model, tok, traces), ref)


def test_output_attentions_are_the_edited_weights(tokenizers, traces):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=4)
    model.set_attn_implementation("eager")
    cfg = StepFlowConfig(tau_max=0.5, smi=False)
    from stepscope.stepflow.fullpass import teacher_forced

    t = traces[0]
    with teacher_forced(model, tok, cfg, [t]) as sf, torch.no_grad():
        att = model(input_ids=torch.tensor([t.token_ids]), output_attentions=True, use_cache=False).attentions
    seg = t.segment_ids()
    a = att[0][0]  # layer 0 (OEB band), (H, T, T)
    think_rows = np.nonzero(seg == 2)[0]
    bridge = a[:, think_rows][:, :, seg == 1].sum(-1)  # question mass of thinking queries
    assert (bridge >= 0.5 - 1e-9).all()
    assert torch.isclose(bridge, torch.tensor(0.5, dtype=bridge.dtype), atol=1e-9).any()
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    stats = sf.row_stats()[0]
    assert stats["oeb_edits_per_layer"][0] > 0 and stats["bridge_mass_after"] > stats["bridge_mass_before"]


def test_default_model_zero_strength_identical_and_decode_equals_full(default_model):
    model, tok = default_model
    q = "What is 12 + 30? Think step by step."
    base = stepscope.generate(model, tok, q, max_new_tokens=24, progress=False)[0]
    zero = stepscope.generate(model, tok, q, max_new_tokens=24, progress=False,
                              stepflow=StepFlowConfig(tau_max=0.0, alpha=0.0))[0]
    assert zero.token_ids == base.token_ids
    t = Trace.from_text(tok, q, "First, take 12. Then add 30 to get 42. So the total is 42.\nFinal answer: 42")
    cfg = StepFlowConfig()
    dec, _ = _decode_logits(model, tok, [t], cfg)
    full = teacher_forced_logits(model, tok, [t], cfg)[0, t.prompt_len - 1 : len(t) - 1]
    torch.testing.assert_close(dec[0], full, rtol=1e-3, atol=2e-3)


def _tiny_falcon(tok):
    from transformers import AutoModelForCausalLM, FalconConfig

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_model_bypassing_the_attention_interface_is_refused_as_step_saliency_refuses_it(tokenizers, traces):
    # Falcon computes attention itself: StepFlow's handler would never run (zero edits, no error) without the check
    from stepscope.errors import UnsupportedModelError

    tok = tokenizers["think"]
    model = _tiny_falcon(tok)
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError) as flow:
        stepscope.enabled(model, tok, STRONG)
    with pytest.raises(UnsupportedModelError) as saliency:
        stepscope.step_saliency(model, tok, traces[0], progress=False)
    assert "FalconForCausalLM" in str(flow.value) and "AttentionInterface" in str(flow.value)
    assert str(flow.value) == str(saliency.value)
    assert _snapshot(model) == before  # the probe left nothing behind
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        stepscope.generate(model, tok, QUESTIONS[0], max_new_tokens=2, stepflow=STRONG, progress=False)


@pytest.mark.parametrize("same", [True, False], ids=["same-config", "other-config"])
def test_generate_with_stepflow_inside_enabled(tokenizers, same):
    """The innermost StepFlow acts while it is installed; leaving it hands back to the outer one, intact."""
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=4)
    inner = STRONG if same else StepFlowConfig(tau_max=0.3, alpha=0.5, smi_at_summary=True)
    kw = dict(max_new_tokens=12, progress=False)
    alone = stepscope.generate(model, tok, QUESTIONS, stepflow=inner, **kw)
    plain = stepscope.generate(model, tok, QUESTIONS, **kw)
    before = _snapshot(model)
    ids = tok(QUESTIONS[0], return_tensors="pt").input_ids
    with stepscope.enabled(model, tok, STRONG) as outer:
        hf_outer = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        nested = stepscope.generate(model, tok, QUESTIONS, stepflow=inner, **kw)
        # the outer handle works again once the inner one is gone
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id),
                           hf_outer)
        assert outer.row_stats()[0]["oeb_edit_rate"] is not None
    assert _snapshot(model) == before
    assert [t.token_ids for t in nested] == [t.token_ids for t in alone]
    assert [t.meta["stepflow"] for t in nested] == [t.meta["stepflow"] for t in alone]
    assert [t.token_ids for t in stepscope.generate(model, tok, QUESTIONS, **kw)] == [t.token_ids for t in plain]
