"""Notebook views: short reprs, the HTML of a trace and of a Step-Saliency result, pandas tables."""

from __future__ import annotations

import base64
import html
import json
import re
import sys
import warnings

import numpy as np
import pytest

import stepscope
from stepscope import notebook
from stepscope.evaluation.summary import summarize
from stepscope.extras import MissingExtraError
from stepscope.saliency.metrics import METRICS
from stepscope.saliency.result import StepSaliency, causal_counts
from stepscope.testing import tiny_model
from stepscope.trace import Step

RESPONSE = ("First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\n"
            "Final answer: 10<|im_end|>")


@pytest.fixture(scope="module")
def trace(tokenizers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepscope.Trace.from_text(tokenizers["think"], "What is (2+3)*2? <script>x</script>", RESPONSE)


@pytest.fixture(scope="module")
def result(tokenizers, trace):
    tok = tokenizers["think"]
    return stepscope.step_saliency(tiny_model("llama", tok, layers=4), tok, trace, progress=False)


def no_summary_result(layers: int = 4) -> StepSaliency:
    """A hand-made result of a trace with three thinking steps and no summary."""
    steps = [Step("question", 1, 11, "q", 0)] + [Step("thinking", 11 + 5 * k, 16 + 5 * k, f"t{k}.", k + 1)
                                                 for k in range(3)]
    counts = causal_counts(steps)
    rng = np.random.default_rng(0)
    sums = np.stack([np.where(counts > 0, rng.random(counts.shape) + 0.1, 0.0) for _ in range(layers)])
    return StepSaliency(sums, counts, np.zeros((layers, len(steps))), steps, {"model": "hand-made"})


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# -- Trace -----------------------------------------------------------------------------------------------------
def test_trace_repr_is_one_short_line_without_ids(trace):
    text = repr(trace)
    assert text.startswith("Trace(") and "\n" not in text and len(text) < 250
    assert "steps=[Q, T1-T3, S1]" in text and "profile='think'" in text
    assert f"tokens={len(trace)} (prompt {trace.prompt_len}" in text
    assert str(trace.token_ids[1:6])[1:-1] not in text  # no run of token ids


def test_trace_html_colours_each_step_and_hides_control_tokens(trace):
    page = trace._repr_html_()
    assert "<|im_end|>" in "".join(trace.token_texts)  # the ids and token texts keep them ...
    for marker in ("<|im_end|>", "</think>", "<|im_start|>"):  # ... the display does not
        assert marker not in page and html.escape(marker) not in page
    for label in ("Q", "T1", "T2", "T3", "S1"):
        assert f">{label}</span>" in page
    assert "First we add 2 and 3 to get 5." in page and "Final answer: 10" in page
    # thinking and summary steps have different backgrounds; neighbouring thinking steps alternate shades
    backgrounds = re.findall(r'<span title="(T\d|S\d|Q)[^"]*" style="background:(#[0-9a-f]{6})', page)
    by_label = dict(backgrounds)
    assert len(by_label) == 5
    assert by_label["T1"] != by_label["T2"] and by_label["T1"] == by_label["T3"]
    assert len({by_label["Q"], by_label["T1"], by_label["S1"]}) == 3
    assert all(kind in page for kind in ("question</span>", "thinking</span>", "summary</span>"))  # legend


def test_trace_html_escapes_text(trace):
    page = trace._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


@pytest.mark.parametrize("text, special", [
    ("<|im_end|>", True), ("<|eot_id|>", True), ("<｜end▁of▁sentence｜>", True), ("</s>", True),
    ("<think>", True), ("[INST]", True), ("<b>", False), ("Final answer", False), ("<|not a token|>", False),
    (" <", False), ("", False),
])
def test_control_tokens_are_recognised(text, special):
    assert notebook.is_special_text(text) is special


def test_display_text_drops_only_control_tokens():
    assert notebook.display_text(["The answer", " is 4.", "<|im_end|>", "\n"]) == "The answer is 4.\n"


# -- StepSaliency ----------------------------------------------------------------------------------------------
def test_saliency_repr_is_short_with_the_band_scores(result):
    text = repr(result)
    assert text.startswith("StepSaliency(") and "\n" not in text and len(text) < 300
    assert "array" not in text and "[[" not in text
    assert f"shallow_lock_in={result.shallow_lock_in:.3f} (layers 0)" in text
    assert f"deep_decay={result.deep_decay:.3f} (layers 3)" in text


def test_saliency_repr_names_a_missing_score():
    text = repr(no_summary_result())
    assert "deep_decay=n/a (the trace has no summary)" in text


def test_saliency_html_has_scores_one_map_and_the_curves(result):
    page = result._repr_html_()
    assert "Shallow Lock-in" in page and f"{result.shallow_lock_in:.3f}" in page
    assert "Deep Decay" in page and f"{result.deep_decay:.3f}" in page
    assert "Step map, layer 3 (deep band)" in page  # the default layer: the first of the deep band
    pngs = images(page)
    assert len(pngs) == 2 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "<table" in page and "Shares per layer" in page


def test_saliency_html_without_matplotlib_uses_tables(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    page = notebook.saliency_html(result, layer=1)
    assert "<img" not in page
    assert "pip install 'stepscope[report]'" in page
    S = len(result.steps)
    grey = page.count("background:#d9d9d9")
    assert grey == S * (S - 1) // 2  # one grey cell per key-after-query pair
    # one row per layer in the metric table, values as in the result
    assert f"<td>{result.metrics['local_share'][2]:.3f}</td>" in page


def test_step_map_table_puts_the_brightest_colour_on_the_largest_cell():
    r = no_summary_result()
    table = notebook.step_map_table(r, 0)
    cells = re.findall(r'title="(\w+) &larr; (\w+): ([0-9.e+-]+)" style="[^"]*background:(#[0-9a-f]{6})', table)
    assert len(cells) == int((r.counts > 0).sum())
    values = [float(v) for _, _, v, _ in cells]
    brightest = cells[int(np.argmax(values))]
    darkest = cells[int(np.argmin(values))]
    assert brightest[3] == "#fde725" and darkest[3] == "#440154"


def test_saliency_html_shows_why_a_score_is_missing():
    page = notebook.saliency_html(no_summary_result())
    assert "n/a (the trace has no summary)" in page


# -- pandas ------------------------------------------------------------------------------------------------------
def test_saliency_to_pandas_has_one_row_per_layer(result):
    df = result.to_pandas()
    assert list(df.index) == list(range(result.num_layers)) and df.index.name == "layer"
    assert list(df.columns) == ["band", *METRICS]
    assert list(df["band"]) == ["shallow", "", "", "deep"]
    np.testing.assert_allclose(df["question_reach"].to_numpy(), result.metrics["question_reach"])
    assert df.attrs["band_scores"]["shallow_lock_in"] == result.shallow_lock_in


def test_saliency_to_pandas_marks_missing_metrics_as_nan_with_the_reason():
    df = no_summary_result().to_pandas()
    assert df["summary_recency_share"].isna().all()
    assert df.attrs["metric_reasons"]["summary_recency_share"] == "the trace has no summary"
    assert df["local_share"].notna().all()


def test_to_pandas_without_pandas_names_the_extra(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError) as info:
        result.to_pandas()
    message = str(info.value)
    assert "\n" not in message and "pip install 'stepscope[notebook]'" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, stepscope.StepscopeError)


def eval_records() -> list[dict]:
    """Four problems, one sample each: baseline right on 0; StepFlow right on 0, 1 and 2."""
    out = []
    for condition, right in (("baseline", {0}), ("stepflow", {0, 1, 2})):
        for p in range(4):
            out.append({"problem_id": f"toy/{p}", "sample": 0, "condition": condition, "correct": p in right,
                        "new_tokens": 10 + p, "stop": "eos",
                        "config": {"model": "tiny", "dataset": "toy", "n": 1, "temperature": 0.0}})
    return out


def test_summary_to_pandas_one_row_per_condition():
    s = summarize(eval_records(), {"model": "tiny", "dataset": "toy", "n": 1}, n_boot=200)
    df = s.to_pandas()
    assert list(df.index) == ["baseline", "stepflow"]
    assert df.loc["baseline", "pass@1"] == pytest.approx(0.25) and df.loc["stepflow", "pass@1"] == pytest.approx(0.75)
    assert df[["difference", "verdict"]].loc["baseline"].isna().all()  # the baseline is not compared with itself
    assert df.loc["stepflow", "difference"] == pytest.approx(0.5)
    assert (df.loc["stepflow", "fixed"], df.loc["stepflow", "broken"]) == (2, 0)
    assert df.loc["stepflow", "p_value"] == pytest.approx(s.comparisons[0].test.p_value)
    assert s._repr_markdown_() == s.to_markdown()


def test_results_to_pandas_flattens_every_sample(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_records()))
    df = stepscope.results_to_pandas(tmp_path)
    assert len(df) == 8 and df["correct"].sum() == 4
    assert (df["config.temperature"] == 0.0).all() and set(df["condition"]) == {"baseline", "stepflow"}
    with pytest.raises(stepscope.StepscopeError):
        stepscope.results_to_pandas(tmp_path / "missing")
