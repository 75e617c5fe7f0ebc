import json
import warnings

import numpy as np
import pytest

from stepscope import StepscopeError, Trace
from stepscope.errors import TraceError


@pytest.fixture
def trace(tokenizers):
    r = "First we add 2 and 3 to get 5. Then we double it to get 10.</think>\n\nFinal answer: 10<|im_end|>"
    return Trace.from_text(tokenizers["think"], "What is (2+3)*2?", r)


def test_json_roundtrip(trace, tmp_path):
    path = trace.save(tmp_path / "t.json")
    back = Trace.load(path)
    assert back.token_ids == trace.token_ids and back.steps == trace.steps
    assert back.text == trace.text and back.question == trace.question and back.profile == "think"
    assert json.loads(path.read_text())["format"] == "stepscope.trace"


def test_views(trace):
    ids = trace.step_ids()
    assert ids[0] == -1 and (ids[1:] >= 0).all()
    assert list(np.unique(ids[1:])) == list(range(len(trace.steps)))
    seg = trace.segment_ids()
    assert seg[0] == 0 and set(seg[1 : trace.prompt_len]) == {1}
    assert trace.labels == ["Q", "T1", "T2", "S1"]
    assert trace.response.startswith("First we add") and trace.prompt_text.endswith("<think>\n")
    out = trace.pretty()
    assert "[T1] First we add 2 and 3 to get 5." in out and "[S1] Final answer: 10" in out


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "not valid JSON"),
        (json.dumps({"a": 1}), "not a stepscope trace"),
        (json.dumps({"format": "stepscope.trace", "steps": []}), "malformed"),
    ],
)
def test_unreadable_trace_files_are_clear_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TraceError, match=match):
        Trace.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace file"):
        Trace.load(tmp_path / "nope.json")


def test_tampered_spans_are_rejected(trace):
    d = trace.to_dict()
    d["steps"][1]["start"] += 1
    with pytest.raises(TraceError, match="not contiguous"):
        Trace.from_dict(d)


def test_empty_question_is_a_clear_error(tokenizers):
    with pytest.raises(StepscopeError, match="question is empty"):
        Trace.from_text(tokenizers["think"], "  ", "x")


def test_empty_response_warns(tokenizers):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = Trace.from_text(tokenizers["think"], "q", "")
    assert [s.kind for s in t.steps] == ["question"]
    assert any("no response tokens" in str(x.message) for x in w)
