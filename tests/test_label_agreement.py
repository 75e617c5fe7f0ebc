"""One truth for labels: what StepFlow decides while generating (live labels) equals what the finished trace's
final step spans say (offline), position by position, on plain, think and harmony traces, markers split included;
and StepFlow's logits along a fixed token sequence with live labels equal the full pass driven by the spans."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepscope
from stepscope import StepFlowConfig, Trace
from stepscope.generation import cache_kwarg, new_cache
from stepscope.labels import OTHER, SUMMARY, THINKING, RowLabeler, labels_from_spans, replay_labels
from stepscope.profiles import PROFILES
from stepscope.stepflow.fullpass import teacher_forced_logits
from stepscope.stepflow.oeb import groups
from stepscope.steps import pending_tokens
from stepscope.testing import tiny_model
from stepscope.textmap import offsets_from_texts

# marker pieces as separate fragments, so that markers arrive split over several tokens
FRAGMENTS = [
    "We add", " the numbers", " 12", ".", ". ", "? ", "\n", "\n\n", " ", "x", " so", " carry the 1", "3.14",
    "Final", " answer", ":", " 7", "Final answer: 7", "The", " answer is", " the", " answer", " is", " 9", "**",
    "- ", "\\box", "ed{5}", "</", "think", ">", "</think>", "<|channel|>", "final", "<|message|>", "analysis",
    "<|end|>", "<|start|>assistant", " final", " step",
]
texts = st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=40)


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


def prompt(tok):
    return tok(tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def split_ids(tok, pieces):
    """Token ids of ``pieces`` tokenised one by one (a marker given in pieces arrives as several tokens)."""
    return [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]


def decisions(table, smi_at_summary):
    """StepFlow's decisions read off a label table row: SMI positions (with the step averaged), OEB-editable
    queries, and the bridge keys of every query."""
    seg, _, fire, fsum, role, _ = table[:, 0]
    f = torch.where(fire >= 0, fire, fsum) if smi_at_summary else fire
    smi = {int(i): int(f[i]) for i in torch.nonzero(f >= 0)[:, 0]}
    bridge, _, editable = groups(role[None], seg[None])
    return smi, torch.nonzero(editable[0, 0])[:, 0].tolist(), bridge[0, 0].clone()


def both(tok, profile, ids, p):
    prof = PROFILES[profile]
    live = replay_labels(tok, [(ids, p, prof)])
    spans = labels_from_spans(tok, [(ids, p, prof)])
    return live, spans


def check_agreement(tok, profile, ids, p):
    live, spans = both(tok, profile, ids, p)
    assert torch.equal(live.table, spans.table)
    for at in (False, True):
        a, b = decisions(live.table, at), decisions(spans.table, at)
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    # the key labels are the trace's final spans (the plain fallback summary aside, which no generation knows)
    trace = Trace.from_ids(tok, ids, p, profile=PROFILES[profile])
    seg = trace.segment_ids()
    fallback = profile == "plain" and trace.steps_of("summary") and not _has_marker(trace, profile)
    if not fallback:
        for s in trace.steps:
            code = {"question": None, "thinking": THINKING, "summary": SUMMARY}[s.kind]
            if code is not None:
                assert (live.segment[0, s.start : s.end] == code).all()
                assert (live.step[0, s.start : s.end] == s.index - 1).all()
    return live, trace, seg


def _has_marker(trace, profile):
    import re

    return re.search(PROFILES[profile].answer_line, trace.response) is not None


@pytest.mark.parametrize("profile", ["plain", "think", "harmony"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=texts)
def test_live_labels_equal_offline_labels_with_split_markers(tokenizers, profile, pieces):
    tok = tokenizers[profile]
    p = prompt(tok)
    check_agreement(tok, profile, p + split_ids(tok, pieces), len(p))


@pytest.mark.parametrize("profile", ["plain", "think", "harmony"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_live_labels_equal_offline_labels_on_random_token_ids(tokenizers, profile, data):
    tok = tokenizers[profile]
    p = prompt(tok)
    resp = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=50))
    check_agreement(tok, profile, p + resp, len(p))


def _fires(live, smi_at_summary):
    return decisions(live.table, smi_at_summary)[0]


def test_plain_answer_line_split_over_tokens_fires_once_and_never_as_a_thinking_step(tokenizers):
    tok = tokenizers["plain"]
    p = prompt(tok)
    pieces = ["We add the numbers 12 and 7 together.", " So the sum is 19.", "\n", "Final", " answer", ":", " 19"]
    ids = p + split_ids(tok, pieces)
    live, trace, _ = check_agreement(tok, "plain", ids, len(p))
    summary = trace.steps_of("summary")[0]
    assert trace.display_text(summary).startswith("Final answer")
    # without smi_at_summary: SMI fires only at the start of the second thinking step
    t2 = trace.steps_of("thinking")[1].start
    assert _fires(live, False) == {t2: 0}
    # with it: exactly one more injection, at the first token whose label is certain (the ':'), averaging T2
    fires = _fires(live, True)
    assert len(fires) == 2 and fires[t2] == 0
    (pos, step), = [(k, v) for k, v in fires.items() if k != t2]
    assert step == 1 and summary.start < pos < summary.end and tok.decode([ids[pos]]) == ":"
    # the marker's first tokens were pending with an open segment: OEB left them alone, and they are summary keys
    role, seg = live.role[0], live.segment[0]
    assert (role[summary.start : pos] == OTHER).all() and (seg[summary.start : summary.end] == SUMMARY).all()
    assert (role[pos : summary.end] == SUMMARY).all()


def test_plain_marker_inside_a_sentence_is_glued_to_thinking(tokenizers):
    tok = tokenizers["plain"]
    p = prompt(tok)
    ids = p + split_ids(tok, ["We add the numbers 12 and 7 together.", " So", " the", " answer", " is", " 19"])
    live, trace, _ = check_agreement(tok, "plain", ids, len(p))
    assert trace.display_text(trace.steps_of("summary")[0]) == " 19"
    assert trace.display_text(trace.steps_of("thinking")[-1]).endswith("So the answer is")
    assert (live.role[0, trace.steps_of("thinking")[-1].start:] != OTHER).all()  # segment never open here


@pytest.mark.parametrize("profile,pieces", [
    ("think", ["We add the two numbers here.", " ", "</", "think", ">", "\n\nThe sum is 5."]),
    ("harmony", ["We add the two numbers here.", " ", "<|channel|>", "final", "<|message|>", "The sum is 5."]),
])
def test_split_closing_marker_starts_no_thinking_step(tokenizers, profile, pieces):
    tok = tokenizers[profile]
    p = prompt(tok)
    ids = p + split_ids(tok, pieces)
    live, trace, _ = check_agreement(tok, profile, ids, len(p))
    assert len(trace.steps_of("thinking")) == 1
    assert _fires(live, False) == {}
    fires = _fires(live, True)
    assert list(fires.values()) == [0] and list(fires) == [trace.steps_of("summary")[0].start]


def test_split_marker_prefix_that_is_not_a_marker_defers_the_step_start(tokenizers):
    tok = tokenizers["think"]
    p = prompt(tok)
    ids = p + split_ids(tok, ["We add the two numbers here.", " ", "</", "b", "> and then we stop."])
    live, trace, _ = check_agreement(tok, "think", ids, len(p))
    t2 = trace.steps_of("thinking")[1]
    pend = [pp for pp, _ in pending_tokens(*_text_offsets(tok, ids), len(p), PROFILES["think"])]
    first_certain = next(i for i in range(t2.start, len(ids)) if not pend[i - len(p)])
    assert first_certain > t2.start  # "</" was pending
    assert _fires(live, False) == {first_certain: 0}
    assert live.resolve[0, first_certain] == 1


def _text_offsets(tok, ids):
    from stepscope.textmap import token_texts

    texts = token_texts(tok, ids)
    return "".join(texts), offsets_from_texts(texts)


def test_row_labeler_corrects_pending_keys_as_generation_goes(tokenizers):
    """The labeler (what generation runs) writes the same table as the replay, columns past the prompt width."""
    tok = tokenizers["plain"]
    a = prompt(tok)
    b = tok("<|im_start|>user\nA longer question?<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False)["input_ids"]
    ra = split_ids(tok, ["We add the numbers 12 and 7 together.", "\n", "Final", " answer", ":", " 19"])
    rb = split_ids(tok, ["The", " numbers", " are 12 and 7 in all.", " The", " answer", " is", " 19"])
    lab = RowLabeler(tok, PROFILES["plain"], [a, b])
    n = max(len(ra), len(rb))
    for j in range(n):
        lab.push([ra[j] if j < len(ra) else None, rb[j] if j < len(rb) else None])
    ref = labels_from_spans(tok, [(a + ra, len(a), PROFILES["plain"]), (b + rb, len(b), PROFILES["plain"])])
    width = max(len(a), len(b))
    for row, (p, r) in enumerate([(a, ra), (b, rb)]):
        got = lab.labels.table[:, row, width : width + len(r)]
        want = ref.table[:, row, ref.length - len(p) - len(r) + len(p) : ref.length - len(p) - len(r) + len(p) + len(r)]
        assert torch.equal(got, want)


def _decode_logits(model, tok, trace, cfg):
    """Teacher-forced decoding (KV cache, one token per step) under stepscope.enabled: live labels."""
    ids = torch.tensor([trace.token_ids[: trace.prompt_len]])
    kw = {cache_kwarg(model): new_cache(model), "use_cache": True}
    outs = []
    with stepscope.enabled(model, tok, cfg), torch.no_grad():
        outs.append(model(input_ids=ids, **kw).logits[:, -1])
        for t in trace.response_ids[:-1]:
            outs.append(model(input_ids=torch.tensor([[t]]), **kw).logits[:, -1])
    return torch.cat(outs)


CASES = [
    ("plain", "llama", ["We add the numbers 12 and 7 together.", " So the sum is 19.", "\n", "Final", " answer", ":",
                        " 19", "\n\nThe", " end."]),
    ("plain", "qwen2", ["The", " numbers are 12 and 7 in all.", " The", " sum", " is 19.", " So", " the", " answer",
                        " is", " 19."]),
    ("think", "qwen3", ["We add the two numbers here.", " ", "</", "b", "> and then we stop.", " ", "</", "think", ">",
                        "\n\nThe sum is 5."]),
    ("harmony", "gpt_oss", ["We add the two numbers here.", " Then we check it twice.", " ", "<|channel|>", "final",
                            "<|message|>", "The sum is 5."]),
]


@pytest.mark.parametrize("profile,family,pieces", CASES)
@pytest.mark.parametrize("at_summary", [False, True])
def test_decode_logits_with_live_labels_equal_full_pass_driven_by_spans(tokenizers, profile, family, pieces,
                                                                        at_summary):
    tok = tokenizers[profile]
    model = tiny_model(family, tok, layers=4)
    p = prompt(tok)
    trace = Trace.from_ids(tok, p + split_ids(tok, pieces), len(p), profile=PROFILES[profile])
    cfg = StepFlowConfig(tau_max=0.6, alpha=1.5, oeb_layers=(0, 1), smi_layers=(2, 3), smi_at_summary=at_summary)
    dec = _decode_logits(model, tok, trace, cfg)
    full = teacher_forced_logits(model, tok, [trace], cfg, labels="spans")[0, len(p) - 1 : -1]
    plain = teacher_forced_logits(model, tok, [trace])[0, len(p) - 1 : -1]
    torch.testing.assert_close(dec, full, rtol=1e-9, atol=1e-9)  # at every position
    assert not torch.allclose(full, plain)
