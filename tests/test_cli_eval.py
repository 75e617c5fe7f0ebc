"""``stepscope eval`` and ``stepscope report`` end to end on a tiny random model saved to disk."""

from __future__ import annotations

import json

import pytest

from stepscope.cli.main import main


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
    assert main(eval_args(model_dir, data_file, out, "--shard", "5/2")) == 2
    assert "bad shard" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="identical samples"):
        assert main(eval_args(model_dir, data_file, out, "--temperature", "0", "--compare", "--oeb-layers", "5")) == 2
    # the layer list is checked against the checkpoint's config, before the model loads
    assert "OEB layers [5] are out of range for a model with 2 layers" in capsys.readouterr().err


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


# --- checked before the model loads ---------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if eval gets as far as loading the model."""
    from stepscope import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(models, "load_model", refuse)


def test_bad_data_and_arguments_are_refused_before_the_model_loads(model_dir, data_file, tmp_path, capsys,
                                                                   no_model_load):
    out = tmp_path / "never"
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text(json.dumps({"q": "What is 1 plus 1?", "a": 2}) + "\n" + json.dumps({"q": "Why?", "a": None}) + "\n")
    cases = [
        (eval_args(model_dir, nulls, out), f"{nulls}:2: the answer field 'a' is null"),
        (eval_args(model_dir, data_file, out, "--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (eval_args(model_dir, data_file, out, "--workers", "-1"), "--workers must be at least 0"),
        (eval_args(model_dir, data_file, out, "--n-boot", "0"), "--n-boot must be at least 1"),
        (eval_args(model_dir, data_file, out, "--device", "gpu"), "unknown device 'gpu'"),
        (eval_args(model_dir, data_file, out, "--dtype", "float7"), "unknown dtype 'float7'"),
        (["eval", "--model", str(model_dir), "--data-file", str(data_file), "--answer-field", "a",
          "--question-template", "{q} {hint}", "--out", str(out)],
         "has no field 'hint' named in --question-template (fields: q, a)"),
        (["eval", "--model", str(model_dir), "--dataset", "gsm8k", "--question-field", "q", "--out", str(out)],
         "--question-field applies to --data-file only"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing evaluated, nothing written


def test_an_unwritable_out_is_a_one_line_error(model_dir, data_file, capsys, no_model_load):
    assert main(eval_args(model_dir, data_file, "/proc/stepscope-x")) == 2
    err = capsys.readouterr().err
    assert "cannot create the run directory /proc/stepscope-x" in err and "--out" in err and err.count("\n") == 1


def test_a_second_process_is_refused_before_the_model_loads(model_dir, data_file, tmp_path, capsys, no_model_load):
    from stepscope.evaluation import runner

    out = tmp_path / "busy"
    args = eval_args(model_dir, data_file, out)
    # the first process: its config is in run.json and it holds the results file
    from stepscope.cli.eval import build_config, load_eval_problems
    from stepscope.cli.main import build_parser

    ns = build_parser().parse_args(args)
    problems, dataset = load_eval_problems(ns)
    runner.prepare_run_dir(out, build_config(ns, problems, dataset))
    with runner.lock_results(out):
        assert main(args) == 2
    assert "another process is writing" in capsys.readouterr().err


def test_resuming_with_another_dtype_or_changed_model_files_is_refused(model_dir, data_file, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "run"
    base = ["--conditions", "baseline", "--n", "1", "--limit", "1", "--no-save-traces", "--no-plot"]
    assert main(eval_args(model, data_file, out, *base)) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["config"]["dtype"], run["config"]["device"]) == ("float32", "cpu")
    assert run["config"]["model_files"] and run["info"]["model_dtype"] == "float32"
    capsys.readouterr()
    assert main(eval_args(model, data_file, out, *base, "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err
    assert "dtype is 'float32' there, 'bfloat16' now" in err and "pass another --out for a new run" in err
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # another checkpoint
    assert main(eval_args(model, data_file, out, *base)) == 2
    assert "model_files is" in capsys.readouterr().err


def test_question_template_puts_the_premise_in_the_prompt(model_dir, tmp_path, capsys):
    data = tmp_path / "svamp.jsonl"
    data.write_text(json.dumps({"Body": "Tom has 3 apples.", "Question": "He buys 2 more. How many now?",
                                "Answer": 5}) + "\n")
    out = tmp_path / "svamp"
    common = ["eval", "--model", str(model_dir), "--data-file", str(data), "--answer-field", "Answer",
              "--max-new-tokens", "4", "--workers", "0", "--no-progress", "--no-plot", "--n-boot", "50"]
    with pytest.warns(UserWarning, match=r"'Body' beside the question field 'Question' is not in the prompt"):
        assert main([*common, "--question-field", "Question", "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--question-template", "{Body} {Question}", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dataset"]["question_template"] == "{Body} {Question}"
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    trace = json.loads((out / record["trace"]).read_text())
    assert trace["question"].startswith("Tom has 3 apples. He buys 2 more. How many now?")
    assert main([*common, "--question-template", "{Body}", "--question-field", "Question", "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
