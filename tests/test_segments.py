"""The one segment enum: trace arrays and live label tensors store the same codes."""

import numpy as np

from stepscope import labels
from stepscope.segments import SEGMENTS, Segment
from stepscope.trace import Trace


def test_codes_and_kinds():
    assert [int(s) for s in Segment] == [0, 1, 2, 3]
    assert SEGMENTS == ("other", "question", "thinking", "summary")
    assert all(Segment.of(s.kind) is s for s in Segment)
    assert tuple(Segment) == (labels.OTHER, labels.QUESTION, labels.THINKING, labels.SUMMARY)
    assert all(type(c) is int for c in (labels.OTHER, labels.QUESTION, labels.THINKING, labels.SUMMARY))


def test_trace_segment_ids_use_the_enum(tokenizers):
    tok = tokenizers["think"]
    t = Trace.from_text(tok, "What is 2+3?", "We add 2 and 3 to get five.</think>\n\nFinal answer: 5<|im_end|>")
    seg = t.segment_ids()
    for step in t.steps:
        assert np.all(seg[step.start : step.end] == Segment.of(step.kind))
