"""The online tracker must reproduce offline segmentation exactly (property tests)."""

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscope import Trace
from stepscope.profiles import PROFILES
from stepscope.tracker import StepTracker

FRAGMENTS = [
    "We add", " the numbers", " 3.14", " 12", ".", ". ", "? ", "! ", "!", "\n", "\n\n", " \n \n", "\t", " ",
    "1.", " 2.", "π", " 東京", "🙂", "\u00a0", "é", "Final answer:", " Final answer: 7", "The answer is",
    " the answer is 9", "\\boxed{5}", "</think>", "<think>", "<|channel|>final<|message|>", "<|end|>",
    "<|start|>assistant", "<|channel|>analysis<|message|>", "x", " so", " carry the 1", "...", "e.g. this",
]

texts = st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=40).map("".join)


def spans(trace):
    return [(s.kind, s.start, s.end) for s in trace.steps]


def both(tok, profile, ids, prompt_len):
    prof = PROFILES[profile]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offline = Trace.from_ids(tok, ids, prompt_len, profile=prof)
        tracker = StepTracker(tok, prof, ids[:prompt_len])
        live = [tracker.push(t) for t in ids[prompt_len:]]
        labels, note = tracker.finish()
        online = Trace.from_ids(tok, ids, prompt_len, profile=prof, labels=labels, note=note)
    return offline, online, live, labels


def prompt(tok):
    return tok(tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("profile", ["think", "harmony", "plain"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_online_equals_offline_on_text(tokenizers, profile, text):
    tok = tokenizers[profile]
    p = prompt(tok)
    ids = p + tok(text, add_special_tokens=False)["input_ids"]
    offline, online, _, _ = both(tok, profile, ids, len(p))
    assert spans(online) == spans(offline)
    assert online.warnings == offline.warnings


@pytest.mark.parametrize("profile", ["think", "harmony", "plain"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_online_equals_offline_on_random_token_ids(tokenizers, profile, data):
    """Arbitrary ids include partial UTF-8 byte tokens, special tokens and whitespace runs."""
    tok = tokenizers[profile]
    p = prompt(tok)
    resp = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=60))
    offline, online, _, _ = both(tok, profile, p + resp, len(p))
    assert spans(online) == spans(offline)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_live_labels_are_final_for_single_token_markers(tokenizers, text):
    """With </think> a single token, what StepFlow sees while generating is the final segmentation."""
    tok = tokenizers["think"]
    p = prompt(tok)
    ids = p + tok(text, add_special_tokens=False)["input_ids"]
    _, _, live, labels = both(tok, "think", ids, len(p))
    assert [(x.segment, x.step) for x in live] == [(x.segment, x.step) for x in labels]


@pytest.mark.parametrize("profile", ["think", "harmony", "plain"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(FRAGMENTS + ["</", "think", ">", "Final", " answer", ":", "<|channel|>"]),
                       max_size=40))
def test_live_labels_once_certain_are_final(tokenizers, profile, pieces):
    """Markers split over tokens: a token's label is final once it is not pending (its own push or a later
    correction), so StepFlow never acts on a label that changes (the plain last-paragraph fallback aside)."""
    tok = tokenizers[profile]
    p = prompt(tok)
    ids = p + [i for piece in pieces for i in tok(piece, add_special_tokens=False)["input_ids"]]
    prof = PROFILES[profile]
    tracker = StepTracker(tok, prof, ids[:len(p)])
    seen = []
    for t in ids[len(p):]:
        lab = tracker.push(t)
        for j, fixed in tracker.resolved:
            assert seen[j] is None  # only pending tokens are corrected, once
            seen[j] = (fixed.segment, fixed.step)
        seen.append(None if lab.pending else (lab.segment, lab.step))
    final, _ = tracker.finish()
    fallback = prof.answer_line and tracker._final_summary is None
    for got, want in zip(seen, final):
        if got is not None and not fallback:
            assert got == (want.segment, want.step)


def test_new_step_flags_mark_first_tokens(tokenizers):
    tok = tokenizers["think"]
    p = prompt(tok)
    text = "First we add the two numbers. Then we check the sum twice.</think>Done"
    ids = p + tok(text, add_special_tokens=False)["input_ids"]
    _, online, live, _ = both(tok, "think", ids, len(p))
    starts = [len(p) + i for i, lab in enumerate(live) if lab.new_step]
    assert starts == [s.start for s in online.steps if not (s.kind == "thinking" and s.index == 1)
                      and s.kind != "question"]
