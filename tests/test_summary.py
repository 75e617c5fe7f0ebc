"""Evaluation summaries on hand-made results against hand-computed values; Markdown, JSON, plot, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluation import stats
from stepscope.evaluation.summary import load_summary, pass_at_k_values, report, settings_from_records, summarize

SETTINGS = {"model": "tiny-model", "dataset": "toy", "n": 1, "temperature": 0.6, "top_p": 0.95,
            "max_new_tokens": 32768, "seed": 7,
            "conditions": {"baseline": None, "stepflow": {"oeb": True, "oeb_layers": None, "tau_max": 0.15,
                                                          "smi": True, "smi_layers": None, "alpha": 0.06,
                                                          "smi_window": None, "smi_at_summary": False,
                                                          "band_fraction": 0.25}},
            "layers": {"stepflow": {"oeb": [0, 1, 2, 3], "smi": [24, 25, 26, 27]}}}

# n = 1, six problems. Baseline right on 0 and 3; StepFlow right on 0, 1, 2 and 5.
BASE_1 = [1, 0, 0, 1, 0, 0]
FLOW_1 = [1, 1, 1, 0, 0, 1]


def records(outcomes: dict[str, list[list[int]]], tokens: int = 10) -> list[dict]:
    """One line per (condition, problem, sample) from per-problem lists of 0/1 outcomes."""
    out = []
    for condition, per_problem in outcomes.items():
        for p, samples in enumerate(per_problem):
            for k, ok in enumerate(samples):
                out.append({"problem_id": f"toy/{p}", "sample": k, "condition": condition, "correct": bool(ok),
                            "new_tokens": tokens + p, "stop": "length" if p == 0 else "eos",
                            "config": {"model": "tiny-model", "dataset": "toy", "n": len(samples),
                                       "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 7,
                                       "stepflow": SETTINGS["conditions"][condition]}})
    return out


def single(values):
    return [[v] for v in values]


def test_pass_at_k_values():
    assert pass_at_k_values(1) == [1]
    assert pass_at_k_values(3) == [1, 2, 3]
    assert pass_at_k_values(16) == [1, 2, 4, 8, 16]
    assert pass_at_k_values(20) == [1, 2, 4, 8, 16, 20]


def test_single_sample_comparison_against_hand_values():
    s = summarize(records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)}), SETTINGS, n_boot=1000, seed=3)
    base, flow = s.conditions
    assert (base.name, flow.name) == ("baseline", "stepflow")
    assert base.pass1.estimate == pytest.approx(2 / 6) and flow.pass1.estimate == pytest.approx(4 / 6)
    assert base.pass_at_k == {1: pytest.approx(2 / 6)}
    assert base.mean_new_tokens == pytest.approx(12.5)  # tokens 10..15
    assert base.truncated_share == pytest.approx(1 / 6)
    (c,) = s.comparisons
    # fixed: problems 1, 2, 5 (wrong -> right); broken: problem 3
    assert (c.fixed, c.broken) == (3, 1)
    # exact McNemar on 3 vs 1 discordant pairs: 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16
    assert c.test.p_value == pytest.approx(0.625) and c.test.method == "exact binomial"
    assert c.difference.estimate == pytest.approx(2 / 6)
    assert c.discordance == pytest.approx(4 / 6)
    # the paired bootstrap, recomputed by hand: resample the 6 per-problem differences with the same seed
    d = np.array(FLOW_1, float) - np.array(BASE_1, float)
    idx = np.random.default_rng(3).integers(0, 6, size=(1000, 6))
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert (c.difference.low, c.difference.high) == (pytest.approx(low), pytest.approx(high))
    assert c.difference.low < 0 < c.difference.high and c.verdict == "within noise"
    assert c.power_note == stats.paired_power_explanation(4 / 6, 0.05)
    # pass@1 interval: the library's bootstrap over per-problem scores with the same seed
    ref = stats.bootstrap_ci(FLOW_1, n_boot=1000, seed=3)
    assert (flow.pass1.low, flow.pass1.high) == (ref.low, ref.high)


def test_multi_sample_pass_at_k_sign_test_and_majority_counts():
    # n = 4; baseline right 4, 2, 0 times; StepFlow 4, 3, 1 times
    base = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]
    flow = [[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 0, 0]]
    s = summarize(records({"baseline": base, "stepflow": flow}), {**SETTINGS, "n": 4}, n_boot=500)
    b = s.conditions[0]
    # pass@1 = (1 + 1/2 + 0) / 3; pass@2 = (1 + (1 - C(2,2)/C(4,2)) + 0) / 3 = (1 + 5/6) / 3; pass@4 = 2/3
    assert b.pass_at_k == {1: pytest.approx(0.5), 2: pytest.approx(11 / 18), 4: pytest.approx(2 / 3)}
    assert b.samples == 12 and b.problems == 3
    (c,) = s.comparisons
    # per-problem differences 0, +1/4, +1/4: two positive, no negative -> sign test p = 2 * (1/2)^2
    assert c.test.p_value == pytest.approx(0.5) and c.test.n == 2 and c.test.method == "exact sign test"
    assert c.difference.estimate == pytest.approx(1 / 6)
    # by majority (more than half right): baseline T, F, F; StepFlow T, T, F -> one fixed, none broken
    assert (c.fixed, c.broken) == (1, 0)
    assert c.discordance == pytest.approx(1 / 3)  # one problem changes its majority outcome


def test_a_clear_gain_is_not_called_noise():
    s = summarize(records({"baseline": single([0] * 10), "stepflow": single([1] * 10)}), SETTINGS, n_boot=200)
    (c,) = s.comparisons
    assert c.difference.low == pytest.approx(1.0) and c.verdict == "better than baseline"
    assert c.test.p_value == pytest.approx(2 / 2**10)


def test_identical_runs_explain_why_no_sample_size_is_given():
    s = summarize(records({"baseline": single(BASE_1), "stepflow": single(BASE_1)}), SETTINGS, n_boot=100)
    (c,) = s.comparisons
    assert c.discordance == 0 and c.test.p_value == 1.0 and c.verdict == "within noise"
    assert "no sample size" in c.power_note


def test_problems_missing_a_sample_are_left_out_of_every_condition():
    rows = records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)})
    rows = [r for r in rows if not (r["problem_id"] == "toy/5" and r["condition"] == "stepflow")]
    s = summarize(rows, SETTINGS, n_boot=100)
    assert s.problems == 5 and s.problems_seen == 6 and s.incomplete == ["toy/5"]
    assert s.comparisons[0].fixed == 2
    with pytest.raises(StepscopeError, match="no problem has all 2 samples"):
        summarize(records({"baseline": single(BASE_1)}), {**SETTINGS, "n": 2})
    with pytest.raises(StepscopeError, match="no results"):
        summarize([], SETTINGS)


def test_markdown_table_holds_settings_numbers_and_tests():
    s = summarize(records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)}), SETTINGS, n_boot=200)
    md = s.to_markdown()
    for text in ("| model | tiny-model |", "| dataset | toy |", "| samples per problem (n) | 1 |",
                 "| temperature | 0.6 |", "| top-p | 0.95 |", "| max new tokens | 32768 |", "| seed | 7 |",
                 "OEB on layers 0-3, tau_max=0.15", "SMI on layers 24-27, alpha=0.06",
                 "| `baseline` | 6 | 6 | 33.3 [", "| `stepflow` | 6 | 6 | 66.7 [", "| 0.625 | McNemar exact | 3 | 1 |",
                 "within noise", "+33.3 ["):
        assert text in md, text
    data = s.to_dict()
    assert data["comparisons"]["stepflow"]["fixed"] == 3
    assert data["conditions"]["baseline"]["pass@k"] == {"1": pytest.approx(2 / 6)}
    json.dumps(data)  # JSON-able throughout


def test_settings_are_read_back_from_result_lines():
    settings = settings_from_records(records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)}))
    assert settings["model"] == "tiny-model" and settings["temperature"] == 0.6 and settings["n"] == 1
    assert settings["conditions"]["baseline"] is None and settings["conditions"]["stepflow"]["alpha"] == 0.06


def test_report_on_a_file_and_on_a_directory_with_shards(tmp_path):
    rows = records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)})
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, paths = report(path, n_boot=100)
    assert [p.name for p in paths] == ["mine.summary.json", "mine.summary.md", "mine.summary.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths[0].read_text())["comparisons"]["stepflow"]["broken"] == 1
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    half = len(rows) // 2
    (run_dir / "results.shard-0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:half + 1]))
    (run_dir / "results.shard-1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[half:]))
    merged = load_summary(run_dir, n_boot=100)
    assert merged.duplicates == 1 and merged.problems == 6
    assert merged.comparisons[0].test.p_value == summary.comparisons[0].test.p_value
    _, written = report(run_dir, n_boot=100, plot=False)
    assert [p.name for p in written] == ["summary.json", "summary.md"]


def test_report_writes_the_figure_in_each_format(tmp_path):
    rows = records({"baseline": single(BASE_1), "stepflow": single(FLOW_1)})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, paths = report(tmp_path, n_boot=100, formats=("pdf", "svg"))
    assert [p.name for p in paths] == ["summary.json", "summary.md", "summary.pdf", "summary.svg"]
    assert paths[2].read_bytes()[:4] == b"%PDF" and b"<svg" in paths[3].read_bytes()[:2000]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary files were renamed into place


def test_save_plot_keeps_the_backend_and_writes_by_extension(tmp_path):
    # A notebook's inline backend must survive save_plot; run where the backend is not Agg.
    code = (
        "import json, matplotlib; matplotlib.use('svg')\n"
        "from stepscope.evaluation.summary import summarize\n"
        f"s = summarize(json.loads({json.dumps(json.dumps(records({'baseline': single(BASE_1)})))}), n_boot=50)\n"
        f"s.save_plot({str(tmp_path / 'p.png')!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg"]
    from matplotlib.image import imread

    assert imread(tmp_path / "p.png").shape[0] == 3.6 * 200  # 3.6 in tall at 200 dpi


def test_a_missing_matplotlib_skips_the_figure_with_a_warning(tmp_path, monkeypatch):
    import sys

    s = summarize(records({"baseline": single(BASE_1)}), n_boot=50)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    with pytest.warns(UserWarning, match=r"pip install 'stepscope\[report\]'; the summary figure was skipped"):
        paths = s.write(tmp_path)
    assert [p.name for p in paths] == ["summary.json", "summary.md"]
