"""The self-contained HTML report and the plain-language reading (describe)."""

import html
import re
import warnings

import numpy as np
import pytest

import stepscope
from stepscope.saliency import describe
from stepscope.saliency.report import write_report
from stepscope.saliency.result import StepSaliency
from stepscope.testing import tiny_model

QUESTION = "What is (2+3)*2?"
RESPONSES = {
    "full": ("First we add 2 and 3 to get <script>alert('x')</script> 5. Then we double it to get 10. "
             "So we have ten now.</think>\n\nFinal answer: 10<|im_end|>"),
    "no_summary": "We think hard about it. It is seven, clearly. Then we are done here.",
    "one_step": "It is seven, clearly so.</think>7<|im_end|>",
}


@pytest.fixture(scope="module")
def computed(tokenizers):
    """kind -> (trace, result) from a tiny 4-layer Llama."""
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=4)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, response in RESPONSES.items():
            trace = stepscope.Trace.from_text(tok, QUESTION, response)
            out[name] = (trace, stepscope.step_saliency(model, tok, trace, progress=False))
    return out


@pytest.fixture(scope="module")
def report_html(computed, tmp_path_factory):
    trace, result = computed["full"]
    out = tmp_path_factory.mktemp("report")
    path = write_report({"baseline": result}, trace, out)
    return path, path.read_text(encoding="utf-8")


def boosted_question(r: StepSaliency, factor: float = 1.6) -> StepSaliency:
    """The same trace with more saliency into the question column (as a working bridge would give)."""
    sums = r.sums.copy()
    sums[:, :, 0] *= factor
    return StepSaliency(sums, r.counts, r.other, r.steps, {**r.meta, "stepflow": {"tau_max": 0.15}})


# -- the HTML ------------------------------------------------------------------------------------------------
def test_report_is_one_self_contained_file(report_html):
    path, doc = report_html
    assert path.name == "report.html"
    for external in ('src="http', "<link", "@import", "url(http", "http://", "https://", 'src="//'):
        assert external not in doc
    sources = re.findall(r'src="([^"]*)"', doc)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert doc.count("<script") == 2  # the slider data (JSON) and the slider code, both inline
    assert "<script src" not in doc


def test_report_embeds_every_layer(report_html, computed):
    _, doc = report_html
    _, result = computed["full"]
    layers = re.findall(r'<img class="layer-map"[^>]*data-layer="(\d+)"', doc)
    assert sorted(map(int, layers)) == list(range(result.num_layers))
    assert 'max="3"' in doc  # the slider spans all four layers


def test_report_shows_scores_steps_and_escapes_text(report_html, computed):
    _, doc = report_html
    trace, result = computed["full"]
    assert f"{result.shallow_lock_in:.3f}" in doc and f"{result.deep_decay:.3f}" in doc
    assert "shallow = layers 0 (bottom 25% of 4), deep = layers 3 (top 25%)" in doc
    assert "<script>alert(" not in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    for step in trace.steps[1:]:
        assert html.escape(trace.display_text(step)) in doc  # control tokens hidden (tested below)
        assert f'<span class="tag">{step.label}</span>' in doc
    for sentence in describe.reading(result):
        assert html.escape(sentence) in doc
    assert "How to read this" in doc and "causally valid pairs" in doc


def test_report_writes_the_pngs(report_html):
    path, _ = report_html
    for name in ("layer_maps.png", "metric_curves.png", "band_scores.png"):
        assert (path.parent / name).read_bytes()[:4] == b"\x89PNG"


def test_report_writes_the_figures_in_the_formats_asked(computed, tmp_path):
    trace, result = computed["full"]
    doc = write_report(result, trace, tmp_path, formats=("pdf", "svg")).read_text(encoding="utf-8")
    for stem in ("layer_maps", "metric_curves", "band_scores"):
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        assert b"<svg" in (tmp_path / f"{stem}.svg").read_bytes()[:2000]
        assert not (tmp_path / f"{stem}.png").exists()
    assert 'src="data:image/png;base64,' in doc  # the page embeds PNGs whatever files were asked for


def test_two_conditions_are_compared(computed, tmp_path):
    trace, r0 = computed["full"]
    r1 = boosted_question(r0)
    path = write_report({"baseline": r0, "StepFlow": r1}, trace, tmp_path, title="A <b> title")
    doc = path.read_text(encoding="utf-8")
    for name in ("layer_maps_baseline.png", "layer_maps_stepflow.png", "metric_curves.png", "band_scores.png"):
        assert (tmp_path / name).exists()
    for k in (0, 1):  # every layer of every condition
        assert len(re.findall(rf'class="layer-map"[^>]*data-cond="{k}"', doc)) == r0.num_layers
    for sentence in describe.compare(r0, r1, ("baseline", "StepFlow")):
        assert html.escape(sentence) in doc
    assert "A &lt;b&gt; title" in doc and "<b> title" not in doc


@pytest.mark.parametrize("kind,reason", [("no_summary", "the trace has no summary"),
                                         ("one_step", "needs at least two thinking steps")])
def test_report_for_traces_missing_a_segment(computed, tmp_path, kind, reason):
    trace, result = computed[kind]
    doc = write_report({"baseline": result}, trace, tmp_path).read_text(encoding="utf-8")
    assert f"n/a ({reason})" in doc
    assert len(re.findall(r'class="layer-map"', doc)) == result.num_layers


def test_control_tokens_are_hidden_in_the_report_and_kept_in_the_trace(report_html, computed, tmp_path):
    _, doc = report_html
    trace, _ = computed["full"]
    shown = re.sub(r"<details>.*?</details>", "", doc, flags=re.DOTALL)  # the prompt as tokenised shows them
    assert "&lt;|im_end|&gt;" not in shown and "&lt;/think&gt;" not in shown
    assert "Final answer: 10" in shown and "So we have ten now." in shown
    saved = stepscope.Trace.load(trace.save(tmp_path / "t.json"))
    assert "<|im_end|>" in saved.token_texts and saved.token_ids == trace.token_ids


# -- with and without StepFlow on the same trace -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stepflow_pair(tokenizers):
    """(trace, baseline, with-StepFlow result carrying the teacher-forced activity, model, tokenizer)."""
    from stepscope.cli.diagnose import _teacher_forced_activity

    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=4)
    cfg = stepscope.StepFlowConfig(tau_max=0.9)  # high enough that this random model's heads get edited
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = stepscope.Trace.from_text(tok, QUESTION, RESPONSES["full"])
    r0 = stepscope.step_saliency(model, tok, trace, progress=False)
    r1 = stepscope.step_saliency(model, tok, trace, stepflow=cfg, progress=False)
    r1.meta["stepflow_activity"] = _teacher_forced_activity(model, tok, cfg, trace)
    return trace, r0, r1, model, tok


def test_the_teacher_forced_activity_counts_real_edits(stepflow_pair):
    from stepscope.cli.diagnose import _teacher_forced_activity

    trace, _, r1, model, tok = stepflow_pair
    act = r1.meta["stepflow_activity"]
    assert set(act["oeb_edits_per_layer"]) == {0} and act["oeb_edits_per_layer"][0] > 0
    assert act["bridge_mass_after"] > act["bridge_mass_before"]
    assert act["smi_injections"] == len(trace.steps_of("thinking")) - 1  # at each start of a later step
    off = _teacher_forced_activity(model, tok, stepscope.StepFlowConfig(tau_max=0.0, alpha=0.0), trace)
    assert off["oeb_edits_per_layer"][0] == 0 and off["bridge_mass_after"] == off["bridge_mass_before"]


@pytest.fixture(scope="module")
def stepflow_report(stepflow_pair, tmp_path_factory):
    trace, r0, r1, _, tok = stepflow_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = stepscope.Trace.from_ids(tok, trace.token_ids[:-3] + tok("Final answer: 11")["input_ids"],
                                         trace.prompt_len, question=trace.question, profile="think",
                                         meta={"stepflow": r1.meta["stepflow_activity"]})
    out = tmp_path_factory.mktemp("sf-report")
    path = write_report({"baseline": r0, "StepFlow": r1}, trace, out, stepflow_trace=other)
    return path, path.read_text(encoding="utf-8"), other


def test_a_stepflow_report_says_how_it_was_measured_and_what_the_edits_did(stepflow_pair, stepflow_report):
    trace, _, r1, _, _ = stepflow_pair
    _, doc, _ = stepflow_report
    assert "How this was measured" in doc
    assert html.escape(describe.measurement(trace, r1)) in doc
    assert "teacher-forced on that same trace twice" in doc
    assert "OEB on layers 0 (tau_max=0.9); SMI on layers 3" in doc
    assert "&quot;oeb_layers&quot;: [0]" in doc and "&quot;smi_layers&quot;: [3]" in doc  # resolved, not null
    assert "&quot;oeb_layers&quot;: null" not in doc
    edits = r1.meta["stepflow_activity"]["oeb_edits_per_layer"][0]
    assert f"OEB edited {edits:,} head-queries" in doc and f'<td class="num">{edits:,}</td>' in doc


def test_a_stepflow_report_has_one_side_by_side_table_and_a_difference_map(stepflow_pair, stepflow_report):
    _, r0, r1, _, _ = stepflow_pair
    path, doc, _ = stepflow_report
    assert "<th>baseline</th><th>StepFlow</th><th>change</th>" in doc
    assert doc.count("<th>Shallow Lock-in</th>") == 1 and doc.count("<th>Deep Decay</th>") == 1
    change = r1.shallow_lock_in - r0.shallow_lock_in
    assert f"{r0.shallow_lock_in:.3f}" in doc and f"{r1.shallow_lock_in:.3f}" in doc
    assert (f"{change:+.3f}" if abs(change) >= 0.0005 else "0.000") in doc
    assert "What changed: StepFlow &minus; baseline" in doc and 'alt="difference maps StepFlow minus baseline"' in doc
    assert html.escape(describe.largest_shifts_text(r0, r1, ("baseline", "StepFlow"))) in doc
    assert (path.parent / "difference_maps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stepflow_report_shows_the_trace_generated_with_stepflow(stepflow_pair, stepflow_report):
    trace, *_ = stepflow_pair
    _, doc, other = stepflow_report
    assert "<h2>The trace generated with StepFlow</h2>" in doc
    k = describe.first_difference(trace, other)
    assert k is not None and k < len(other.response_ids)
    assert html.escape(describe.divergence(trace, other)) in doc
    assert f"follows the baseline for its first {k} response tokens" in doc
    assert "Final answer: 11" in doc


def test_one_condition_gets_no_stepflow_sections(report_html):
    _, doc = report_html
    assert "How this was measured" not in doc and "What changed" not in doc


# -- describe ------------------------------------------------------------------------------------------------
def test_the_terminal_block_for_two_conditions_has_one_table(stepflow_pair):
    trace, r0, r1, _, _ = stepflow_pair
    text = describe.comparison_summary(r0, r1, trace)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert sum(line.startswith("Shallow Lock-in") for line in lines) == 1
    assert sum(line.startswith("Deep Decay") for line in lines) == 1
    header = next(line for line in lines if "baseline" in line and "StepFlow" in line and "change" in line)
    assert header.split() == ["baseline", "StepFlow", "change"]
    row = next(line for line in lines if line.startswith("Shallow Lock-in"))
    assert f"{r0.shallow_lock_in:.3f}" in row and f"{r1.shallow_lock_in:.3f}" in row
    assert text.count("Step-Saliency:") == 1 and text.count("Bands:") == 1  # one header, not one per condition
    assert "How this was measured: the trace was not generated by stepscope" in " ".join(text.split())
    edits = r1.meta["stepflow_activity"]["oeb_edits_per_layer"][0]
    assert f"OEB edited {edits:,} head-queries" in " ".join(text.split())


def test_activity_lines_read_the_statistics():
    stats = {"oeb_edits_per_layer": {"0": 120, "1": 30}, "oeb_edit_rate": 0.25, "bridge_mass_before": 0.031,
             "bridge_mass_after": 0.15, "smi_injections": 6, "smi_mean_norm": 0.0123}
    resolved = stepscope.StepFlowConfig().resolve(8)
    oeb, smi = describe.activity_lines(stats, resolved)
    assert oeb.startswith("OEB edited 150 head-queries (25% of the head-queries it could edit), per layer 0: 120, "
                          "1: 30")
    assert "3.1% before -> 15% after" in oeb
    assert smi == ("SMI injected at 6 step starts, each in layers 6-7; mean norm of the added alpha*m (all heads "
                   "of a layer) 0.0123.")
    assert describe.activity_lines(None) == ["no StepFlow statistics recorded"]
    quiet = describe.activity_lines({**stats, "smi_injections": 0}, resolved)[1]
    assert quiet.startswith("SMI injected nothing")


def shallow_numbers(r: StepSaliency) -> tuple[float, float]:
    """Question reach and Shallow Lock-in over the shallow band, recomputed from the sum map."""
    th = [i for i, s in enumerate(r.steps) if s.kind == "thinking"]
    layers = r.bands.shallow
    reach, local = [], []
    for layer in layers:
        incoming = {i: r.sums[layer, i, : i + 1].sum() for i in th}
        reach.append(np.mean([r.sums[layer, i, 0] / incoming[i] for i in th]))
        local.append(np.mean([(r.sums[layer, i, i] + r.sums[layer, i, i - 1]) / incoming[i] for i in th[1:]]))
    return float(np.mean(reach)), float(np.mean(local))


def deep_decay(r: StepSaliency) -> float:
    th = [i for i, s in enumerate(r.steps) if s.kind == "thinking"]
    su = [i for i, s in enumerate(r.steps) if s.kind == "summary"]
    shares = []
    for layer in r.bands.deep:
        total = sum(r.sums[layer, i, : i + 1].sum() for i in su)
        recent = sum(r.sums[layer, i, [j for j in su if j <= i] + th[-2:]].sum() for i in su)
        shares.append(recent / total)
    return float(np.mean(shares))


def as_pct(x: float) -> str:
    return f"{100 * x:.0f}%" if 100 * x >= 10 else f"{100 * x:.1f}%"


def test_reading_states_the_numbers(computed):
    _, r = computed["full"]
    reach, lock = shallow_numbers(r)
    decay = deep_decay(r)
    shallow, deep, *rest = describe.reading(r)
    assert shallow.startswith("In the shallow layers (0)")
    assert f"the question receives {as_pct(reach)} of the saliency" in shallow
    assert f"{as_pct(lock)} of its incoming saliency" in shallow and f"(Shallow Lock-in = {lock:.2f})" in shallow
    assert f"the summary draws {as_pct(decay)} of its saliency from itself and the last two thinking steps" in deep
    assert f"(Deep Decay = {decay:.2f})" in deep
    weakest = rest[0]
    per_step = describe.question_share_per_step(r, r.bands.shallow)
    assert min(per_step, key=per_step.get) in weakest
    assert f"layer {int(np.nanargmin(r.metrics['question_reach']))}" in weakest


@pytest.mark.parametrize("kind,reason", [("no_summary", "Deep Decay is n/a (the trace has no summary)"),
                                         ("one_step", "Shallow Lock-in is n/a (needs at least two thinking steps)")])
def test_reading_names_missing_scores_with_the_reason(computed, kind, reason):
    _, r = computed[kind]
    text = " ".join(describe.reading(r))
    assert reason in text
    assert "= 0.00" not in text


def test_terminal_summary_is_compact(computed):
    trace, r = computed["full"]
    long_named = StepSaliency(r.sums, r.counts, r.other, r.steps, {**r.meta, "model": "org/" + "x" * 120})
    for result in (r, long_named, computed["no_summary"][1], computed["one_step"][1]):
        text = describe.terminal_summary(result, trace)
        lines = text.splitlines()
        assert len(lines) <= 15
        assert max(map(len, lines)) <= 100
    text = describe.terminal_summary(r, trace)
    assert "Steps: 1 question, 3 thinking, 1 summary" in text
    assert f"Shallow Lock-in  {r.shallow_lock_in:.2f}" in text and f"Deep Decay       {r.deep_decay:.2f}" in text
    assert "shallow = layers 0 (bottom 25% of 4)" in text


def test_compare_reports_direction_and_values(computed):
    _, r0 = computed["full"]
    r1 = boosted_question(r0)
    reach0, lock0 = shallow_numbers(r0)
    reach1, lock1 = shallow_numbers(r1)
    sentences = describe.compare(r0, r1, ("baseline", "StepFlow"))
    assert sentences[0] == (f"Shallow question reach (layers 0): {as_pct(reach0)} (baseline) -> {as_pct(reach1)} "
                            f"(StepFlow), {100 * (reach1 - reach0):+.1f} points.")
    lock_line = next(s for s in sentences if s.startswith("Shallow Lock-in"))
    assert f"{lock0:.2f} (baseline) -> {lock1:.2f} (StepFlow)" in lock_line
    assert lock1 < lock0 and "lower: shallow layers less locked" in lock_line
    missing = describe.compare(r0, computed["no_summary"][1])
    assert any("Deep Decay: n/a (the trace has no summary)" in s for s in missing)
    assert any(s.startswith("Note: the two results have different steps") for s in missing)


def test_a_trace_with_a_flow_record_gets_its_table(computed, tmp_path):
    from dataclasses import replace

    from stepscope.stepflow.monitor import FlowRecord, FlowStep

    trace, result = computed["full"]
    steps = [FlowStep(s.index, s.start, s.end, 0.05 * s.index, 0.15, 0.02, 0.02) for s in trace.steps_of("thinking")]
    flowed = replace(trace, meta={**trace.meta, "flow": FlowRecord([0], [3], steps).to_dict()})
    doc = write_report({"baseline": result}, flowed, tmp_path).read_text(encoding="utf-8")
    assert "Flow while it was written" in doc and "OEB band: layers 0; SMI band: layers 3" in doc
    assert doc.count("<tr><td>T") == len(steps) and "5.0%" in doc and "15.0%" in doc
    plain = write_report({"baseline": result}, trace, tmp_path / "plain").read_text(encoding="utf-8")
    assert "Flow while it was written" not in plain
