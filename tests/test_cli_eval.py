"""``stepscope eval`` and ``stepscope report`` end to end on a tiny random model saved to disk."""

from __future__ import annotations

import json

import pytest

from stepscope.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from stepscope.testing import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer("plain")
    tiny_model("llama", tok, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "two.jsonl"
    path.write_text(json.dumps({"q": "What is 2 plus 3?", "a": 5}) + "\n"
                    + json.dumps({"q": "What is 4 times 4?", "a": "16"}) + "\n")
    return path


def eval_args(model_dir, data_file, out, *extra):
    return ["eval", "--model", str(model_dir), "--data-file", str(data_file), "--question-field", "q",
            "--answer-field", "a", "--n", "2", "--temperature", "0.7", "--max-new-tokens", "6", "--workers", "0",
            "--batch-size", "4", "--no-progress", "--n-boot", "200", "--out", str(out), *extra]


def test_eval_compare_end_to_end_then_resume_and_refuse(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args(model_dir, data_file, out, "--compare", "--tau-max", "0.2")) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 * 2 * 2  # problems x samples x conditions
    assert {r["condition"] for r in records} == {"baseline", "stepflow"}
    assert {r["gold"] for r in records} == {"5", "16"}
    assert all((out / r["trace"]).is_file() for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["conditions"]["stepflow"]["tau_max"] == 0.2
    assert run["info"]["layers"]["stepflow"] == {"oeb": [0], "smi": [1]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"]["complete"] == 2 and set(summary["comparisons"]) == {"stepflow"}
    assert (out / "summary.png").is_file()
    md = (out / "summary.md").read_text()
    assert "| temperature | 0.7 |" in md and "tau_max=0.2" in md and "sign test" in md
    assert "## Paired comparison" in capsys.readouterr().out

    # the same command again resumes: nothing new, nothing rewritten
    assert main(eval_args(model_dir, data_file, out, "--compare", "--tau-max", "0.2")) == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert "wrote 0 new samples, 8 already done" in capsys.readouterr().out

    # a different config into the same directory is refused, naming the field
    assert main(eval_args(model_dir, data_file, out, "--compare")) == 2
    assert "conditions.stepflow.tau_max is 0.2 there, 0.15 now" in capsys.readouterr().err

    # report re-summarises the directory
    assert main(["report", str(out), "--n-boot", "100", "--no-plot"]) == 0
    assert "| `stepflow` | `baseline` |" in capsys.readouterr().out


def test_eval_shard_writes_its_file_and_leaves_the_summary_to_the_last(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(eval_args(model_dir, data_file, out, "--shard", "1/2", "--conditions", "baseline",
                          "--no-save-traces")) == 0
    records = [json.loads(line) for line in (out / "results.shard-1-of-2.jsonl").read_text().splitlines()]
    assert {r["problem_index"] for r in records} == {1} and len(records) == 2
    assert not (out / "summary.json").exists() and not (out / "traces").exists()
    assert "1 of 2 problems still miss samples" in capsys.readouterr().out


def test_eval_argument_mistakes_are_one_line_errors(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(eval_args(model_dir, data_file, out, "--compare", "--conditions", "baseline")) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(eval_args(model_dir, data_file, out, "--conditions", "baseline,oeb")) == 2
    assert "unknown condition 'oeb'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--out", str(out)]) == 2
    assert "no problems" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--dataset", "organism:impossible", "--out", str(out)]) == 2
    assert "difficulty" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="identical samples"):
        assert main(eval_args(model_dir, data_file, out, "--temperature", "0", "--shard", "5/2")) == 2
    assert "bad shard" in capsys.readouterr().err


def test_under_a_launcher_the_shard_comes_from_the_process(monkeypatch, model_dir, data_file, tmp_path, capsys):
    from stepscope.evaluation import runner

    ctx = runner.DistributedContext(1, 2, None)
    monkeypatch.setattr(runner, "distributed_context", lambda: ctx)
    out = tmp_path / "launched"
    assert main(eval_args(model_dir, data_file, out, "--shard", "0/2")) == 2
    assert "--shard is set automatically" in capsys.readouterr().err
    assert main(eval_args(model_dir, data_file, out, "--device-map", "auto")) == 2
    assert "--device-map" in capsys.readouterr().err
    assert main(eval_args(model_dir, data_file, out, "--no-save-traces", "--no-plot")) == 0
    assert [p.name for p in sorted(out.glob("results*.jsonl"))] == ["results.shard-1-of-2.jsonl"]
