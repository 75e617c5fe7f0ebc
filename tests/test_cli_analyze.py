"""``stepscope analyze`` end to end on a tiny model and synthetic traces with known labels."""

import json
import warnings

import numpy as np
import pytest

import stepscope
from stepscope.analysis.scores import score_values
from stepscope.cli.main import main
from stepscope.testing import tiny_model

RESPONSES = [
    "First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now."
    "</think>\n\nFinal answer: 10<|im_end|>",
    "We think hard about the sum. It is seven, clearly so. And we check it once more!</think>7<|im_end|>",
    "Start with twelve apples here. Take away five of them now. Seven apples remain in all.</think>7<|im_end|>",
    "Consider the product of four and six. It equals twenty four exactly. Done with it.</think>24<|im_end|>",
]


@pytest.fixture
def run_dir(tmp_path, tokenizers):
    tok = tokenizers["think"]
    model = tiny_model("llama", tok, layers=4)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = tmp_path / "run"
    (run / "traces" / "baseline").mkdir(parents=True)
    lines = []
    labels = [True, False, True, False, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, correct in enumerate(labels):
            t = stepscope.Trace.from_text(tok, f"Question {i // 2}?", RESPONSES[i % 4])
            rel = f"traces/baseline/p{i // 2}__{i % 2}.json"
            t.save(run / rel)
            lines.append({"problem_id": f"p{i // 2}", "sample": i % 2, "condition": "baseline", "correct": correct,
                          "trace": rel})
    (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return model_dir, run, labels


def test_analyze_end_to_end(run_dir, tmp_path, tokenizers):
    model_dir, run, labels = run_dir
    out = tmp_path / "out"
    args = ["analyze", "--model", str(model_dir), "--traces", str(run), "--out", str(out), "--mechanism",
            "--n-boot", "200", "--n-perm", "199", "--shuffles", "5"]
    assert main(args) == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["format"] == "stepscope.analysis"
    m = doc["models"][0]
    assert (m["n_correct"], m["n_wrong"]) == (3, 3) and m["num_layers"] == 4
    # six traces cannot carry the length covariates: the headline is the raw within-problem test
    assert m["pairing"]["problems_with_both_outcomes"] == 3 and m["headline_test"] == "paired_raw"
    assert m["lengths"]["thinking_steps"]["wrong"]["n"] == 3
    # the reported group means equal scores recomputed directly from fresh Step-Saliency runs
    model, tok = stepscope.load_model(str(model_dir))
    by_name = {p.stem: p for p in (run / "traces" / "baseline").glob("*.json")}
    vals = {True: [], False: []}
    for i, correct in enumerate(labels):
        t = stepscope.Trace.load(by_name[f"p{i // 2}__{i % 2}"])
        r = stepscope.step_saliency(model, tok, t, progress=False)
        vals[correct].append(score_values(r)["shallow_lock_in"])
    lock = next(s for s in m["scores"] if s["name"] == "shallow_lock_in")
    assert lock["correct"]["mean"] == pytest.approx(np.mean(vals[True]))
    assert lock["wrong"]["mean"] == pytest.approx(np.mean(vals[False]))
    paired = lock["tests"]["paired_raw"]
    assert paired["n"] == 3 and paired["method"].startswith("exact sign-flip")
    # three problems: the exact two-sided sign-flip p is a multiple of 1/8
    assert paired["p_value"] * 8 == pytest.approx(round(paired["p_value"] * 8))
    assert lock["shuffled_boundary_control"]["shuffles"] == 5
    mech = m["mechanism"]
    assert mech["n"] == 3 and set(mech["components"]) == {"oeb", "smi", "both", "oeb_random", "smi_random"}
    assert "oeb_vs_oeb_random" in mech["controls"] and "p_value" not in json.dumps(mech["components"])
    html = (out / "report.html").read_text()
    assert "length-adjusted" in html and "Mechanism check" in html and "<script src" not in html
    # a re-run reads the cache: 6 baseline measurements + 5 conditions x 3 wrong traces
    cached = sorted((out / "saliency").rglob("*.npz"))
    assert len(cached) == 6 + 5 * 3
    assert main(args) == 0
    assert sorted((out / "saliency").rglob("*.npz")) == cached
    assert json.loads((out / "analysis.json").read_text())["models"][0]["scores"] == m["scores"]


def test_all_correct_gives_a_clear_message(run_dir, tmp_path, capsys):
    model_dir, run, _ = run_dir
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    (run / "results.jsonl").write_text("".join(json.dumps(dict(x, correct=True)) + "\n" for x in lines))
    code = main(["analyze", "--model", str(model_dir), "--traces", str(run), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "are correct: correct vs wrong cannot be compared" in capsys.readouterr().err


def test_limit_takes_the_first_problems_of_a_trace_run(run_dir, tmp_path):
    model_dir, run, _ = run_dir
    out = tmp_path / "o"
    assert main(["analyze", "--model", str(model_dir), "--traces", str(run), "--limit", "2", "--out", str(out),
                 "--n-boot", "100", "--n-perm", "99", "--shuffles", "0"]) == 0
    m = json.loads((out / "analysis.json").read_text())["models"][0]
    assert (m["n_correct"], m["n_wrong"]) == (2, 2)  # problems p0 and p1, both samples each
    assert main(["analyze", "--model", str(model_dir), "--traces", str(run), "--limit", "0", "--out", str(out)]) == 2


def test_several_run_directories_pool_their_problems(run_dir, tmp_path, capsys):
    model_dir, run, _ = run_dir
    # split the run into two directories with disjoint problems (p0 | p1, p2)
    other = tmp_path / "run2"
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    (other / "traces" / "baseline").mkdir(parents=True)
    for x in lines[:2]:
        (other / x["trace"]).write_text((run / x["trace"]).read_text())
    (other / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[2:]))
    out = tmp_path / "o"
    base = ["analyze", "--model", str(model_dir), "--out", str(out), "--n-boot", "100", "--n-perm", "99",
            "--shuffles", "0"]
    assert main([*base, "--traces", f"{run},{other}"]) == 0
    m = json.loads((out / "analysis.json").read_text())["models"][0]
    assert (m["n_correct"], m["n_wrong"], m["pairing"]["problems"]) == (3, 3, 3)
    assert main([*base, "--traces", f"{run},{run}"]) == 2
    assert "appears twice" in capsys.readouterr().err
