"""Batched generation: left padding must not change any row; sampling is per row and reproducible."""


import pytest

import stepscope
from stepscope import StepscopeError
from stepscope.testing import FAMILIES, tiny_model

QUESTIONS = ["What is 2+3?", "The farmer has 12 sheep and buys 7 more. How many sheep now?", "Why?"]


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_equal_single_generation(tokenizers, family):
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=2)
    batch = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=24, batch_size=3, progress=False)
    for q, t in zip(QUESTIONS, batch):
        alone = stepscope.generate(model, tok, q, max_new_tokens=24, progress=False)[0]
        assert t.token_ids == alone.token_ids
        assert t.steps == alone.steps
        t.validate()


def test_matches_transformers_generate_greedy(tokenizers):
    import torch

    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    trace = stepscope.generate(model, tok, QUESTIONS[1], max_new_tokens=20, progress=False)[0]
    prompt = torch.tensor([trace.token_ids[: trace.prompt_len]])
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert trace.token_ids == ref[0].tolist()[: len(trace.token_ids)]


def test_sampling_is_per_row_and_reproducible(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("qwen2", tok)
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, progress=False)
    a = stepscope.generate(model, tok, QUESTIONS, seeds=[5, 6, 7], batch_size=3, **kw)
    b = stepscope.generate(model, tok, QUESTIONS[1], seeds=[6], **kw)
    c = stepscope.generate(model, tok, QUESTIONS, seeds=[5, 6, 7], batch_size=1, **kw)
    assert a[1].token_ids == b[0].token_ids
    assert [t.token_ids for t in a] == [t.token_ids for t in c]
    d = stepscope.generate(model, tok, QUESTIONS[1], seeds=[99], **kw)
    assert d[0].token_ids != b[0].token_ids
    assert a[0].meta["temperature"] == 0.9 and a[0].meta["seed"] == 5


def test_stops_at_eos_and_records_why(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    free = stepscope.generate(model, tok, "hi", max_new_tokens=10, progress=False)[0]
    assert free.meta["stop"] == "length" and free.meta["new_tokens"] == 10
    stop = free.response_ids[3]  # declare a token the model emits to be an end-of-sequence token
    model.generation_config.eos_token_id = stop
    t = stepscope.generate(model, tok, "hi", max_new_tokens=10, progress=False)[0]
    first = free.response_ids.index(stop)
    assert t.meta["stop"] == "eos" and t.response_ids == free.response_ids[: first + 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=""), "question is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts="q", max_new_tokens=0), "max_new_tokens"),
        (dict(prompts="q", temperature=-1), "temperature"),
        (dict(prompts="q", top_p=0), "top_p"),
        (dict(prompts="q" * 4000), "does not fit the model's context"),
        (dict(prompts="q", cache_implementation="paged"), "cache_implementation"),
        (dict(prompts="q", cache_implementation="dynamic", compile=True), "needs cache_implementation='static'"),
        (dict(prompts="q", compile="fastest"), "compile must be"),
    ],
)
def test_bad_input_is_a_clear_error(tokenizers, kwargs, match):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok)
    with pytest.raises(StepscopeError, match=match):
        stepscope.generate(model, tok, progress=False, **kwargs)


def test_unknown_keyword_is_rejected(tokenizers):
    tok = tokenizers["plain"]
    with pytest.raises(TypeError):
        stepscope.generate(tiny_model("llama", tok), tok, "q", do_sample=True)


@pytest.mark.parametrize("family", [*FAMILIES, "mistral"])
def test_static_cache_gives_the_dynamic_cache_tokens(tokenizers, family):
    """A preallocated cache (sliding-window layers outgrown: windows of 5-6 tokens) changes nothing, with StepFlow
    on or off; batched rows still equal rows generated alone."""
    tok = tokenizers["think"]
    model = tiny_model(family, tok, layers=4)
    strong = stepscope.StepFlowConfig(tau_max=0.6, alpha=1.5)
    for cfg in (None, strong):
        kw = {"max_new_tokens": 24, "batch_size": 3, "progress": False, "stepflow": cfg}
        dyn = stepscope.generate(model, tok, QUESTIONS, **kw)
        sta = stepscope.generate(model, tok, QUESTIONS, cache_implementation="static", **kw)
        assert [t.token_ids for t in sta] == [t.token_ids for t in dyn]
        assert sta[0].meta["decoding"] == {"cache": "static", "compile": None} and "decoding" not in dyn[0].meta
        if cfg is not None:
            for a, b in zip(sta, dyn):
                assert a.meta["stepflow"]["oeb_edits_per_layer"] == b.meta["stepflow"]["oeb_edits_per_layer"]
            assert sum(t.meta["stepflow"]["oeb_edits_per_layer"][0] for t in sta) > 0  # StepFlow did edit
    alone = stepscope.generate(model, tok, QUESTIONS[1], max_new_tokens=24, progress=False, stepflow=strong,
                               cache_implementation="static")[0]
    assert alone.token_ids == sta[1].token_ids


def test_static_cache_zero_strength_is_plain(tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("gpt_oss", tok, layers=4)
    plain = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=24, batch_size=3, progress=False)
    zero = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=24, batch_size=3, progress=False,
                              cache_implementation="static", stepflow=stepscope.StepFlowConfig(tau_max=0, alpha=0))
    assert [t.token_ids for t in zero] == [t.token_ids for t in plain]
