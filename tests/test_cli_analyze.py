"""``stepscope analyze`` end to end on a tiny model and synthetic traces with known labels."""

import json
import warnings

import numpy as np
import pytest

import stepscope
from stepscope.analysis.compare import score_value
from stepscope.cli.main import main
from stepscope.testing import tiny_model

RESPONSES = [
    "First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\nFinal answer: 10<|im_end|>",
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
    code = main(["analyze", "--model", str(model_dir), "--traces", str(run), "--out", str(out), "--mechanism",
                 "--n-boot", "200"])
    assert code == 0
    doc = json.loads((out / "analysis.json").read_text())
    m = doc["models"][0]
    assert (m["n_correct"], m["n_wrong"]) == (3, 3) and m["num_layers"] == 4
    assert m["mechanism"]["n"] == 3
    html = (out / "report.html").read_text()
    assert "Mann-Whitney" in html and "Mechanism check" in html and "<script src" not in html
    # the reported group means equal scores recomputed directly from fresh Step-Saliency runs
    model, tok = stepscope.load_model(str(model_dir))
    traces = [stepscope.Trace.load(p) for p in sorted((run / "traces" / "baseline").glob("*.json"))]
    by_name = {p.stem: p for p in (run / "traces" / "baseline").glob("*.json")}
    vals = {True: [], False: []}
    for i, correct in enumerate(labels):
        t = stepscope.Trace.load(by_name[f"p{i // 2}__{i % 2}"])
        r = stepscope.step_saliency(model, tok, t, progress=False)
        vals[correct].append(score_value(r, "local_share", "shallow"))
    lock = next(s for s in m["scores"] if s["name"] == "shallow_lock_in")
    assert lock["correct"]["mean"] == pytest.approx(np.mean(vals[True]))
    assert lock["wrong"]["mean"] == pytest.approx(np.mean(vals[False]))
    assert lock["paired"] is not None and lock["paired"]["problems"] == 3
    assert len(traces) == 6
    # a re-run reads the saliency cache
    cached = list((out / "saliency").rglob("*.npz"))
    assert len(cached) == 6 + 3
    assert main(["analyze", "--model", str(model_dir), "--traces", str(run), "--out", str(out), "--n-boot",
                 "200"]) == 0


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
                 "--n-boot", "100"]) == 0
    m = json.loads((out / "analysis.json").read_text())["models"][0]
    assert (m["n_correct"], m["n_wrong"]) == (2, 2)  # problems p0 and p1, both samples each
    assert main(["analyze", "--model", str(model_dir), "--traces", str(run), "--limit", "0", "--out", str(out)]) == 2
