"""Compiled decoding (static cache + torch.compile): StepFlow's per-token work traces into the model's graph with no
extra graph break, and compiled tokens and logits equal eager ones (CPU inductor)."""

import warnings
from contextlib import nullcontext

import pytest
import torch
from test_stepflow import RESPONSES, STRONG

import stepscope
from stepscope import StepFlowConfig, Trace
from stepscope.batch import left_pad, positions
from stepscope.generation import (
    _forward_last,
    cache_kwarg,
    compiled_forward,
    new_static_cache,
)
from stepscope.labels import RowLabeler
from stepscope.profiles import get_profile
from stepscope.stepflow.fullpass import teacher_forced_logits
from stepscope.stepflow.handle import session as stepflow_session
from stepscope.testing import tiny_model

QUESTIONS = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?"]


@pytest.fixture(autouse=True)
def _fresh_compiler():
    # every test compiles its own graphs: dynamo's per-function cache holds only a few variants
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _static_decoding(model, tok, prompts, cfg, responses=None, steps=8, step_fn=_forward_last):
    """Prefill eagerly, then decode ``steps`` tokens with ``step_fn`` over a static cache, the way our generation
    loop does (labels pushed by the host before each step). ``responses``: teacher-force these tokens (None for a
    row that has ended) instead of the greedy ones. Returns the logits (B, steps + 1, V) and StepFlow's stats."""
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    width = ids.shape[1]
    span = width + steps + 3
    mask = torch.cat([mask, mask.new_ones((len(prompts), span - width))], dim=1)
    pos = positions(mask[:, :width])
    labeler = RowLabeler(tok, get_profile(None, tok), prompts, "cpu", capacity=span)
    fwd = {cache_kwarg(model): new_static_cache(model, span), "use_cache": True, "logits_to_keep": 1}
    session = stepflow_session(model, tok, cfg, labeler) if cfg is not None else nullcontext()
    with session as sf, torch.inference_mode():
        out = [_forward_last(model, ids, mask, pos, fwd)]
        for j in range(steps):
            if responses is None:
                toks = out[-1].argmax(-1).tolist()
            else:
                toks = [r[j] if j < len(r) else None for r in responses]
            labeler.push(toks)
            feed = torch.tensor([tok.pad_token_id if t is None else t for t in toks])[:, None]
            pos = pos[:, -1:] + 1
            out.append(step_fn(model, feed, mask, pos, fwd))
        stats = sf.row_stats() if sf is not None else None
    return torch.stack(out, 1), stats


def _explain_one_step(model, tok, cfg):
    from stepscope.prompting import prompt_ids

    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    seen = {}

    def explain(m, ids, mask, pos, fwd):
        seen["e"] = torch._dynamo.explain(_forward_last)(m, ids, mask, pos, fwd)
        return _forward_last(m, ids, mask, pos, fwd)

    _static_decoding(model, tok, prompts, cfg, steps=1, step_fn=explain)
    return seen["e"]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_decode_step_has_no_more_graph_breaks_than_the_plain_model(tokenizers, family):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    plain = _explain_one_step(model, tok, None)
    assert plain.graph_break_count == 0  # the reference: these models trace whole
    for cfg in (StepFlowConfig(), StepFlowConfig(smi_window=3, smi_at_summary=True)):
        torch._dynamo.reset()
        ours = _explain_one_step(model, tok, cfg)
        assert (ours.graph_count, ours.graph_break_count) == (plain.graph_count, plain.graph_break_count), [
            str(b.reason)[:300] for b in ours.break_reasons
        ]
        assert ours.op_count > plain.op_count  # StepFlow's work is in the graph, not skipped


@pytest.mark.slow  # inductor compiles take 1-2 minutes each on 2 CPU cores: make test-slow
def test_compiled_step_logits_equal_the_full_pass(tokenizers):
    """Teacher-forced compiled decoding with strong StepFlow (OEB edits, SMI firing at step starts, rows with
    different boundaries, one row ending early) against the eager teacher-forced full pass.

    The bar is the compiler's own error on the plain model: its RMSNorms round to float32 in eager mode, which
    inductor does not copy, so even plain float64 logits move by ~1e-8. StepFlow must add nothing to that."""
    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok, layers=2)
    traces = [Trace.from_text(tok, "What is (2+3)*2?", r) for r in RESPONSES]
    prompts, responses = [t.token_ids[: t.prompt_len] for t in traces], [t.response_ids for t in traces]
    steps = max(len(r) for r in responses) - 1
    step = compiled_forward("default")
    plain_eager, _ = _static_decoding(model, tok, prompts, None, responses=responses, steps=steps)
    plain_compiled, _ = _static_decoding(model, tok, prompts, None, responses=responses, steps=steps, step_fn=step)
    ours, stats = _static_decoding(model, tok, prompts, STRONG, responses=responses, steps=steps, step_fn=step)
    full = teacher_forced_logits(model, tok, traces, STRONG)
    width = full.shape[1]
    compiler_err = ours_err = effect = 0.0
    for b, t in enumerate(traces):
        n, shift = len(t.response_ids), width - len(t)
        ref = full[b, shift + t.prompt_len - 1 : shift + len(t) - 1]
        compiler_err = max(compiler_err, float((plain_compiled[b, :n] - plain_eager[b, :n]).abs().max()))
        ours_err = max(ours_err, float((ours[b, :n] - ref).abs().max()))
        effect = max(effect, float((ref - plain_eager[b, :n]).abs().max()))
    assert compiler_err < 1e-6
    assert ours_err <= 4 * compiler_err + 1e-12
    assert effect > 1e3 * max(ours_err, 1e-12)  # StepFlow's edits are far above that noise
    assert all(s["smi_injections"] >= 2 for s in stats)  # SMI fired inside the compiled step


@pytest.mark.slow  # inductor compiles take 1-2 minutes each on 2 CPU cores: make test-slow
def test_compiled_generate_tokens_equal_eager(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=2, scale=2.0)
    kw = {"max_new_tokens": 20, "batch_size": 2, "progress": False}
    eager = stepscope.generate(model, tok, QUESTIONS, **kw)
    compiled = stepscope.generate(model, tok, QUESTIONS, compile=True, **kw)
    zero = stepscope.generate(model, tok, QUESTIONS, compile=True, stepflow=StepFlowConfig(tau_max=0, alpha=0), **kw)
    assert [t.token_ids for t in compiled] == [t.token_ids for t in eager] == [t.token_ids for t in zero]
    assert compiled[0].meta["decoding"] == {"cache": "static", "compile": "default"}
    cfg = StepFlowConfig()
    sf_eager = stepscope.generate(model, tok, QUESTIONS, stepflow=cfg, **kw)
    sf_compiled = stepscope.generate(model, tok, QUESTIONS, stepflow=cfg, compile=True, **kw)
    assert [t.token_ids for t in sf_compiled] == [t.token_ids for t in sf_eager]
    for a, b in zip(sf_compiled, sf_eager):
        sa, sb = a.meta["stepflow"], b.meta["stepflow"]
        assert sa["oeb_edits_per_layer"] == sb["oeb_edits_per_layer"]
        assert sa["bridge_mass_after"] == pytest.approx(sb["bridge_mass_after"], rel=1e-9)
    assert sum(t.meta["stepflow"]["oeb_edits_per_layer"][0] for t in sf_compiled) > 0


def test_transformers_compiled_generate_inside_enabled(tokenizers):
    """``model.generate`` compiling its own decoding step (static cache) with StepFlow on: same tokens as ours; the
    host-side tracker hook is left out of the graph (one break at the start of the step, by design)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok, layers=2)
    ours = stepscope.generate(model, tok, QUESTIONS[0], max_new_tokens=16, progress=False, stepflow=STRONG)[0]
    prompt = torch.tensor([ours.token_ids[: ours.prompt_len]])
    cc = CompileConfig(mode="default", backend="aot_eager")  # tracing is what matters here, not code generation
    if not hasattr(cc, "_compile_all_devices"):
        pytest.skip("this transformers version compiles generate() on GPUs only")
    cc._compile_all_devices = True
    counters.clear()
    with stepscope.enabled(model, tok, STRONG):
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                            cache_implementation="static", compile_config=cc, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    assert hf[0].tolist()[: len(ours)] == ours.token_ids
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    breaks = list(counters["graph_break"])
    assert len(breaks) == 1 and "_track" in breaks[0]
