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


@pytest.mark.parametrize(
    "content, match",
    [
        (json.dumps([{"format": "stepscope.trace"}]), "it holds a JSON array, not an object"),
        (json.dumps("a trace"), "it holds a JSON string"),
        (json.dumps(3), "it holds a JSON int"),
        (json.dumps({"format": "stepscope.trace", "steps": []}), "the field 'token_ids' is missing"),
        (json.dumps({"format": "stepscope.trace", "steps": {"a": 1}}), "\"steps\" must be a list of objects"),
        (json.dumps({"format": "stepscope.trace", "steps": [[1, 2]]}), "\"steps\" must be a list of objects"),
    ],
)
def test_trace_files_of_the_wrong_shape_are_one_line_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TraceError, match=match) as err:
        Trace.load(p)
    assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)


def test_a_directory_or_binary_file_as_a_trace_is_a_clear_error(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace file"):
        Trace.load(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(TraceError, match="is not a text file"):
        Trace.load(binary)


def test_wrong_meta_and_prompt_length_are_rejected(trace):
    d = trace.to_dict()
    with pytest.raises(TraceError, match="\"meta\" must be an object"):
        Trace.from_dict({**d, "meta": [1]})
    with pytest.raises(TraceError, match="prompt length 9999 does not fit"):
        Trace.from_dict({**d, "prompt_len": 9999})


def test_token_ids_outside_the_vocabulary_are_named(trace):
    trace.check_vocab(max(trace.token_ids) + 1)  # in range: nothing to say
    d = trace.to_dict()
    d["token_ids"][3] = 10**6
    d["model"] = "other-model"
    odd = Trace.from_dict(d)  # loading does not know the model's vocabulary yet
    with pytest.raises(TraceError, match=r"1 token id\(s\) outside the vocabulary of tiny \(0\.\.399\), first 1000000 "
                                         r"at position 3 \(it was made with other-model\)"):
        odd.check_vocab(400, "tiny")
    d["token_ids"][4] = -1
    with pytest.raises(TraceError, match="2 token id"):
        Trace.from_dict(d).check_vocab(400)
