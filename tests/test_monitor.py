"""The live flow monitor: a per-step record of the bridge mass with every StepFlow generation, streamed lines,
plain-JSON round trip, and ``stepscope generate --monitor``."""

import json
import warnings

import pytest

import stepscope
from stepscope import StepFlowConfig, Trace
from stepscope.stepflow.monitor import FlowRecord, FlowStep, format_step, stream, thinking_spans
from stepscope.testing import tiny_model

QUESTIONS = ["What is 3 + 4? Tell me the sum of the two numbers.", "Hi, what is 7 times 2?"]
CFG = StepFlowConfig(tau_max=0.6, alpha=0.3, oeb_layers=(0, 1), smi_layers=(2, 3))


pytestmark = pytest.mark.usefixtures("quiet")  # warnings are not what these tests check


@pytest.fixture(scope="module")
def generated(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok, layers=4)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with stream(lambda row, step: lines.append((row, step))):
            traces = stepscope.generate(model, tok, QUESTIONS, max_new_tokens=40, stepflow=CFG, progress=False,
                                        ignore_eos=True)
    return traces, lines


def test_every_stepflow_generation_carries_a_record_per_thinking_step(generated):
    traces, _ = generated
    for t in traces:
        rec = FlowRecord.of(t)
        assert rec is not None and rec.oeb_layers == [0, 1] and rec.smi_layers == [2, 3]
        thinking = t.steps_of("thinking")
        assert [(s.index, s.start, s.end) for s in rec.steps] == [(s.index, s.start, s.end) for s in thinking]
        for s in rec.steps:
            assert 0 <= s.oeb_before <= s.oeb_after + 1e-12 <= 1 + 1e-9  # OEB only lifts the bridge
            assert s.smi_before == s.smi_after and 0 <= s.smi_before <= 1
        # the bridge was below tau_max somewhere, and lifted
        assert any(s.oeb_after > s.oeb_before + 1e-6 for s in rec.steps)


def test_record_is_plain_json_and_round_trips(generated):
    traces, _ = generated
    t = traces[0]
    d = t.meta["flow"]
    again = FlowRecord.from_dict(json.loads(json.dumps(d)))
    assert again == FlowRecord.of(t)
    back = Trace.from_json(t.to_json())
    assert FlowRecord.of(back) == FlowRecord.of(t)


def test_streamed_lines_match_the_final_record(generated):
    """Streaming reports every thinking step once, as it ends, with the values the final record holds (rows are
    batch rows; the batch holds both questions)."""
    traces, lines = generated
    by_row = {}
    for row, step in lines:
        by_row.setdefault(row, []).append(step)
    def key(steps):
        return [(s.index, s.tokens, round(s.oeb_before, 9)) for s in steps]

    records = sorted((FlowRecord.of(t).steps for t in traces), key=key)
    streamed = sorted(by_row.values(), key=key)
    assert [len(r) for r in records] == [len(s) for s in streamed]
    for rec, got in zip(records, streamed):
        for a, b in zip(rec, got):
            assert a.index == b.index and a.tokens == b.tokens
            assert a.oeb_before == pytest.approx(b.oeb_before) and a.smi_before == pytest.approx(b.smi_before)


def test_no_stepflow_no_record(tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok, layers=2)
    t = stepscope.generate(model, tok, QUESTIONS[:1], max_new_tokens=5, progress=False)[0]
    assert "flow" not in t.meta and FlowRecord.of(t) is None


def test_format_and_spans():
    step = FlowStep(3, 10, 24, 0.032, 0.15, 0.011, 0.011)
    line = format_step(step, 0)
    assert line.startswith("[0] T3") and "14 tok" in line and "3.2% ->  15.0%" in line and "1.1%" in line
    assert "n/a" in format_step(FlowStep(1, 0, 1, None, None, None, None))
    from stepscope.steps import TokenLabel

    labels = [TokenLabel("thinking", 0)] * 3 + [TokenLabel("thinking", 1)] * 2 + [TokenLabel("summary", 0)]
    assert thinking_spans(labels, 5) == [(1, 5, 8), (2, 8, 10)]


def test_cli_generate_monitor_prints_a_line_per_step(tmp_path, capsys, tokenizers):
    from stepscope.cli.main import main

    d = tmp_path / "model"
    tok = tokenizers["plain"]
    tiny_model("llama", tok, layers=4).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(d), "--question", QUESTIONS[0], "--stepflow", "--tau-max", "0.6",
               "--monitor", "--max-new-tokens", "30", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    flow = [x for x in err.splitlines() if x.startswith("flow [0] T")]
    trace = Trace.load(next((out / "traces").glob("*.json")))
    assert len(flow) == len(trace.steps_of("thinking")) >= 1
    assert all("OEB bridge" in x and "SMI bridge" in x for x in flow)
    assert main(["generate", "--model", str(d), "--question", "Hi?", "--monitor", "--out", str(out)]) == 2
