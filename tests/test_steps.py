"""Segmentation of hand-written traces, one test per behaviour of the step rule and of each format."""

import pytest

from stepscope import Trace
from stepscope.steps import THINKING_RULE, is_number_only, piece_boundaries


def seg(tok, response, profile=None, question="What is the answer?"):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = Trace.from_text(tok, question, response, profile=profile)
    trace.validate()
    return trace, [str(w.message) for w in caught]


def texts(trace, kind):
    """Step texts, stripped: where a lone whitespace token goes depends on the tokenizer's merges."""
    return [s.text.strip() for s in trace.steps_of(kind)]


def raw_texts(trace, kind):
    return [s.text for s in trace.steps_of(kind)]


def test_think_profile_spans(tokenizers):
    tok = tokenizers["think"]
    r = "First, add 3 and 4 to get 7. Then multiply 7 by 2 to get 14.\n</think>\n\nThe answer is 14.<|im_end|>"
    trace, warns = seg(tok, r)
    assert trace.profile == "think"
    # whitespace stays with the step before; the marker is glued to the last thinking step
    assert raw_texts(trace, "thinking") == ["First, add 3 and 4 to get 7.",
                                            " Then multiply 7 by 2 to get 14.\n</think>"]
    assert raw_texts(trace, "summary") == ["\n\nThe answer is 14.<|im_end|>"]
    assert not warns
    # spans: the question is tokens 1..prompt_len, everything after is covered in order
    q = trace.steps[0]
    assert (q.kind, q.start, q.end) == ("question", 1, trace.prompt_len)
    assert trace.steps[-1].end == len(trace.token_ids)
    assert "".join(s.text for s in trace.steps) == "".join(trace.token_texts[1:])


def test_decimals_never_split(tokenizers):
    r = "Pi is about 3.14 and we round it. Next we compute the area of the circle.</think>ok"
    trace, _ = seg(tokenizers["think"], r)
    assert texts(trace, "thinking") == ["Pi is about 3.14 and we round it.",
                                        "Next we compute the area of the circle.</think>"]


def test_short_fragments_merge_into_next(tokenizers):
    r = "1. First we add the numbers together. 2. Then we subtract the rest.</think>5"
    trace, _ = seg(tokenizers["think"], r)
    assert texts(trace, "thinking") == ["1. First we add the numbers together.",
                                        "2. Then we subtract the rest.</think>"]


def test_question_mark_exclamation_and_blank_line(tokenizers):
    r = "Is the total really 42 here? Yes, it is indeed 42!\n\nWe should double check it\n\nanyway, carefully.</think>"
    trace, _ = seg(tokenizers["think"], r)
    assert texts(trace, "thinking") == [
        "Is the total really 42 here?",
        "Yes, it is indeed 42!",
        "We should double check it",
        "anyway, carefully.</think>",
    ]


def test_number_only_piece_merges_even_when_long():
    text = "123456789012345678. This sentence is long enough to stand alone. End"
    bounds = piece_boundaries(text, 0, len(text), THINKING_RULE)
    assert [text[b:b + 4] for b in bounds] == ["End"[:4]]
    assert is_number_only("123,456.7") and not is_number_only("12 apples")


def test_no_sentence_end_is_one_step_and_no_close_tag_warns(tokenizers):
    r = "we add three and four and get seven and then we keep going without any stop"
    trace, warns = seg(tokenizers["think"], r)
    assert texts(trace, "thinking") == [r]
    assert texts(trace, "summary") == []
    assert any("no summary" in w for w in warns)
    assert trace.warnings


def test_unicode(tokenizers):
    r = "π ≈ 3.14159 is the value we use here. 東京 has many people in it today! Done with 🙂 emoji.</think>é"
    trace, _ = seg(tokenizers["think"], r)
    assert texts(trace, "thinking") == [
        "π ≈ 3.14159 is the value we use here.",
        "東京 has many people in it today!",
        "Done with 🙂 emoji.</think>",
    ]
    assert texts(trace, "summary") == ["é"]


def test_summary_splits_on_blank_lines_only(tokenizers):
    r = "We add the two numbers now.</think>The sum is 5. It is odd.\n\nFinal answer: 5<|im_end|>"
    trace, _ = seg(tokenizers["think"], r)
    assert texts(trace, "summary") == ["The sum is 5. It is odd.", "Final answer: 5<|im_end|>"]


def test_harmony_channels(tokenizers):
    r = ("<|channel|>analysis<|message|>We need to add 2 and 3 here. That gives 5 in total.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>The answer is 5.<|return|>")
    trace, warns = seg(tokenizers["harmony"], r)
    assert trace.profile == "harmony"
    assert texts(trace, "thinking") == [
        "<|channel|>analysis<|message|>We need to add 2 and 3 here.",
        "That gives 5 in total.<|end|><|start|>assistant<|channel|>final<|message|>",
    ]
    assert texts(trace, "summary") == ["The answer is 5.<|return|>"]
    assert not warns


def test_plain_answer_line_starts_summary_at_its_line(tokenizers):
    r = "There are 3 pens with 4 sheep each. So there are 12 sheep\nFinal answer: 12<|im_end|>"
    trace, _ = seg(tokenizers["plain"], r)
    assert trace.profile == "plain"
    assert texts(trace, "thinking") == ["There are 3 pens with 4 sheep each.", "So there are 12 sheep"]
    assert texts(trace, "summary") == ["Final answer: 12<|im_end|>"]


def test_plain_last_paragraph_without_marker(tokenizers):
    r = "We multiply 3 by 4 to get 12.\n\nSo we have twelve sheep in all."
    trace, _ = seg(tokenizers["plain"], r)
    assert texts(trace, "thinking") == ["We multiply 3 by 4 to get 12."]
    assert texts(trace, "summary") == ["So we have twelve sheep in all."]


def test_plain_single_paragraph_has_no_summary_with_warning(tokenizers):
    trace, warns = seg(tokenizers["plain"], "Twelve sheep are in the pens.")
    assert texts(trace, "summary") == [] and texts(trace, "thinking") == ["Twelve sheep are in the pens."]
    assert any("single paragraph" in w for w in warns)


def test_profile_override(tokenizers):
    r = "Some text that ends here. Final answer: 3"
    trace, _ = seg(tokenizers["think"], r, profile="plain")
    assert trace.profile == "plain"
    assert texts(trace, "summary") == ["Final answer: 3"]


def test_unknown_profile_is_a_clear_error(tokenizers):
    from stepscope import StepscopeError

    with pytest.raises(StepscopeError, match="unknown trace format"):
        Trace.from_text(tokenizers["think"], "q", "r", profile="nope")
