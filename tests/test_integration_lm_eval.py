"""The lm-eval plugin: the ``stepflow`` model generates exactly what stepscope's StepFlow generates, through
lm-eval's own API and command line, on a tiny saved model and a local generate_until task."""

import json
import warnings

import pytest

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install 'stepscope[lm-eval]')")

import torch

import stepscope
from stepscope.errors import StepscopeError
from stepscope.testing import tiny_model

QUESTIONS = ["What is 2 + 3?", "What is 4 * 6?", "Seven minus two is what?"]
PROMPT = "Question: {q}\nLet us think step by step."
STRONG = {"tau_max": 0.9, "alpha": 0.5}  # strong enough that a random model's bridge mass is edited


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok, layers=4, dtype=torch.float32, scale=3.0)  # sharp: StepFlow changes tokens
    root = tmp_path_factory.mktemp("lmeval")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "problems.jsonl").write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in QUESTIONS))
    (tasks / "tiny.yaml").write_text(
        "task: stepscope_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'problems.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nLet us think step by step."\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def _generate(lm, questions, max_gen_toks=12):
    from lm_eval.api.instance import Instance

    reqs = [Instance("generate_until", {}, (PROMPT.format(q=q), {"until": ["<|im_end|>"], "max_gen_toks": max_gen_toks,
                                                                   "do_sample": False}), i)
            for i, q in enumerate(questions)]
    return lm.generate_until(reqs, disable_tqdm=True)


def test_registered_under_the_name_stepflow():
    from lm_eval.api.registry import get_model

    from stepscope.integrations.lm_eval import StepFlowLM

    assert get_model("stepflow") is StepFlowLM


def test_generation_is_stepscopes_stepflow_and_differs_from_plain(saved):
    from stepscope.integrations.lm_eval import StepFlowLM

    args = {"pretrained": str(saved / "model"), "dtype": "float32", "device": "cpu", "batch_size": 2}
    lm = StepFlowLM(**args, **STRONG)
    plain = StepFlowLM(**args, stepflow=False)
    got, base = _generate(lm, QUESTIONS), _generate(plain, QUESTIONS)
    model, tok = stepscope.load_model(str(saved / "model"))
    cfg = stepscope.StepFlowConfig(**STRONG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = stepscope.generate(model, tok, [PROMPT.format(q=q) for q in QUESTIONS], max_new_tokens=12, chat=False,
                                  stepflow=cfg, progress=False)
        ours_plain = stepscope.generate(model, tok, [PROMPT.format(q=q) for q in QUESTIONS], max_new_tokens=12,
                                        chat=False, progress=False)
    def decode(t):
        return tok.decode(t.response_ids, skip_special_tokens=True).split("<|im_end|>")[0]

    assert got == [decode(t) for t in ours]
    assert base == [decode(t) for t in ours_plain]
    assert got != base  # StepFlow changed what was generated
    activity = lm.stepflow_activity()
    assert activity["rows"] == len(QUESTIONS) and activity["oeb_edits"] > 0
    assert activity["bridge_mass_after"] > activity["bridge_mass_before"]
    assert plain.stepflow_activity()["rows"] == 0


def test_model_args_strings_become_the_config(saved):
    from stepscope.integrations.lm_eval import StepFlowLM

    lm = StepFlowLM.create_from_arg_string(
        f"pretrained={saved / 'model'},dtype=float32,tau_max=0.2,alpha=0.1,oeb_layers=0:2,smi_layers=3,smi_window=4",
        {"device": "cpu"})
    c = lm.stepflow_config
    assert (c.tau_max, c.alpha, c.oeb_layers, c.smi_layers, c.smi_window) == (0.2, 0.1, (0, 2), (3,), 4)
    assert lm.stepflow_layers == {"oeb": [0, 2], "smi": [3]}
    with pytest.raises(StepscopeError, match="not a number"):
        StepFlowLM(pretrained=str(saved / "model"), device="cpu", tau_max="high")
    with pytest.raises(StepscopeError, match="not true or false"):
        StepFlowLM(pretrained=str(saved / "model"), device="cpu", stepflow="maybe")
    with pytest.raises(StepscopeError, match="out of range"):
        StepFlowLM(pretrained=str(saved / "model"), device="cpu", oeb_layers="0-9")


def test_lm_eval_command_line_runs_a_task_and_its_samples_import(saved, tmp_path, capsys):
    from stepscope.cli.main import main as stepscope_main
    from stepscope.integrations.lm_eval.__main__ import main

    out = tmp_path / "lm_eval_out"
    code = main(["run", "--model", "stepflow", "--model_args",
                 f"pretrained={saved / 'model'},dtype=float32,tau_max=0.9,alpha=0.5", "--device", "cpu",
                 "--tasks", "stepscope_tiny", "--include_path", str(saved / "tasks"), "--output_path", str(out),
                 "--log_samples", "--batch_size", "2"])
    assert code == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    sf = results["config"]["stepflow"]
    assert sf["config"]["tau_max"] == 0.9 and sf["layers"] == {"oeb": [0], "smi": [3]}
    assert sf["activity"]["rows"] == 3 and sf["activity"]["oeb_edits"] > 0
    samples = next(out.rglob("samples_stepscope_tiny_*.jsonl"))
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [r["doc"]["question"] for r in rows] == QUESTIONS
    # the harness's samples come back as traces of the same model, scored by lm-eval's own metric
    imported = tmp_path / "imported"
    assert stepscope_main(["import", str(samples), "--model", str(saved / "model"), "--out", str(imported),
                           "--source-metric", "exact_match"]) == 0
    lines = [json.loads(x) for x in (imported / "results.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in lines] == ["stepscope_tiny/0", "stepscope_tiny/1", "stepscope_tiny/2"]
    assert [r["correct"] for r in lines] == [bool(r["exact_match"]) for r in rows]
    assert lines[0]["config"]["stepflow"]["tau_max"] == 0.9  # read from lm-eval's results file beside the samples
    trace = stepscope.Trace.load(imported / lines[0]["trace"])
    assert trace.prompt_text.startswith("Question: What is 2 + 3?") and trace.response == rows[0]["resps"][0][0]


def test_command_line_reports_a_bad_option_in_one_line(saved, capsys):
    from stepscope.integrations.lm_eval.__main__ import main

    code = main(["run", "--model", "stepflow", "--model_args", f"pretrained={saved / 'model'},alpha=-1",
                 "--device", "cpu", "--tasks", "stepscope_tiny", "--include_path", str(saved / "tasks")])
    assert code == 2
    assert "alpha must be >= 0" in capsys.readouterr().err
