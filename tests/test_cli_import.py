"""``stepscope import`` end to end: the directory it writes is read by report, diagnose --trace and analyze --traces;
an imported baseline pairs with another run per problem."""

import json

import pytest

import stepscope
from stepscope.cli.main import main
from stepscope.testing import tiny_model

GOOD = "First we add 2 and 3 to get 5. Then we double it to get 10. So we have ten now.</think>\n\nFinal answer: {}"
BAD = ("We think hard about the sum here. It is seven, clearly so. And we check it once more!</think>\n\n"
       "Final answer: {}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizers):
    tok = tokenizers["think"]
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", tok, layers=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _vllm_file(path, answers):
    """An OpenAI-style file: three problems, two choices each; ``answers[i][k]`` is choice k's final answer."""
    rows = []
    for i, (q, gold) in enumerate((("What is 2 + 8?", "10"), ("What is 3 + 4?", "7"), ("What is 6 + 4?", "10"))):
        rows.append({"problem_id": f"p{i}", "messages": [{"role": "user", "content": q}], "gold": gold,
                     "choices": [{"message": {"content": (GOOD if a == gold else BAD).format(a)}}
                                 for a in answers[i]]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_then_report_diagnose_and_analyze(tmp_path, model_dir, capsys):
    f = _vllm_file(tmp_path / "vllm.jsonl", [["10", "7"], ["7", "9"], ["3", "10"]])
    out = tmp_path / "imported"
    assert main(["import", str(f), "--model", str(model_dir), "--out", str(out), "--grade"]) == 0
    said = capsys.readouterr().out
    assert "read 6 samples" in said and "wrote 6 traces of 3 problems" in said and "accuracy 50.0%" in said
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"], r["correct"]) for r in lines] == [
        ("p0", 0, True), ("p0", 1, False), ("p1", 0, True), ("p1", 1, False), ("p2", 0, False), ("p2", 1, True)]
    # report: pass@1 over 3 problems with 2 samples each
    assert main(["report", str(out), "--no-plot", "--n-boot", "200"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["conditions"]["baseline"]["pass@1"]["estimate"] == pytest.approx(0.5)
    assert summary["settings"]["model"] == str(model_dir)
    # diagnose one imported trace with the same model
    trace_path = out / lines[0]["trace"]
    assert main(["diagnose", "--model", str(model_dir), "--trace", str(trace_path), "--out", str(tmp_path / "diag"),
                 "--no-report"]) == 0
    diag = json.loads((tmp_path / "diag" / "summary.json").read_text())
    assert diag["baseline"]["labels"] == ["Q", "T1", "T2", "T3", "S1"]
    assert diag["baseline"]["band_scores"]["deep_decay"] is not None
    # analyze correct vs wrong over the imported traces
    assert main(["analyze", "--model", str(model_dir), "--traces", str(out), "--out", str(tmp_path / "an"),
                 "--n-boot", "100"]) == 0
    doc = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert (doc["models"][0]["n_correct"], doc["models"][0]["n_wrong"]) == (3, 3)
    trace = stepscope.Trace.load(trace_path)
    assert trace.response == lines[0]["response"] and trace.steps_of("summary")


def test_an_imported_baseline_pairs_per_problem_with_another_run(tmp_path, model_dir, capsys):
    base = _vllm_file(tmp_path / "base.jsonl", [["7"], ["9"], ["10"]])
    other = _vllm_file(tmp_path / "other.jsonl", [["10"], ["7"], ["10"]])
    a, b = tmp_path / "a", tmp_path / "b"
    for f, out, cond in ((base, a, "baseline"), (other, b, "stepflow")):
        assert main(["import", str(f), "--model", str(model_dir), "--out", str(out), "--grade",
                     "--condition", cond]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--no-plot", "--n-boot", "200", "--out", str(tmp_path / "both")]) == 0
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    cmp = summary["comparisons"]["stepflow"]
    # p0 and p1 fixed, p2 right in both: paired per problem id
    assert (cmp["fixed"], cmp["broken"], cmp["problems"]) == (2, 0, 3)


def test_ungraded_imports_are_refused_by_report_and_analyze_in_one_line(tmp_path, model_dir, capsys):
    f = _vllm_file(tmp_path / "v.jsonl", [["10"], ["7"], ["3"]])
    out = tmp_path / "ungraded"
    assert main(["import", str(f), "--model", str(model_dir), "--out", str(out)]) == 0
    assert "not graded" in capsys.readouterr().out
    assert main(["report", str(out), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "3 of 3 samples" in err and "are not graded" in err and err.count("\n") == 1
    assert main(["analyze", "--model", str(model_dir), "--traces", str(out), "--out", str(tmp_path / "an")]) == 2
    assert "are not graded; re-import them with --grade" in capsys.readouterr().err


def test_bad_file_gives_one_line_with_the_line_number(tmp_path, model_dir, capsys):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"question": "Q?", "response": "A"}\n{"question": \n')
    assert main(["import", str(f), "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepscope: error: ") and "broken.jsonl:2 is not valid JSON" in err and err.count("\n") == 1
