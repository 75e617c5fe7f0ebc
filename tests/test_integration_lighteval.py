"""The lighteval plugin: StepFlow's Transformers model generates exactly what stepscope's StepFlow generates,
loads through lighteval's custom-model path, and runs a local task through lighteval's command line."""

import json
import types
import warnings

import pytest

pytest.importorskip("lighteval", reason="the lighteval extra is not installed (pip install 'stepscope[lighteval]')")

import torch

import stepscope
from stepscope.errors import StepscopeError
from stepscope.testing import tiny_model

QUESTIONS = ["What is 2 + 3?", "What is 4 * 6?", "Seven minus two is what?"]
PROMPT = "Question: {q}\nLet us think step by step."
STRONG = {"tau_max": 0.9, "alpha": 0.5}  # strong enough that a random model's bridge mass is edited

TASKS_PY = '''
from lighteval.metrics.metrics import Metrics
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc


def prompt(line, task_name=None):
    return Doc(task_name=task_name, query=f"Question: {line['question']}\\nLet us think step by step.",
               choices=[line["answer"]], gold_index=0)


TASKS_TABLE = [LightevalTaskConfig(
    name="stepscope_tiny", prompt_function=prompt, hf_repo=DATA, hf_subset="default", hf_avail_splits=["test"],
    evaluation_splits=["test"], few_shots_split=None, few_shots_select=None, generation_size=12,
    stop_sequence=["<|im_end|>"], metrics=[Metrics.exact_match])]
'''


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizers):
    tok = tokenizers["plain"]
    model = tiny_model("llama", tok, layers=4, dtype=torch.float32, scale=3.0)  # sharp: StepFlow changes tokens
    root = tmp_path_factory.mktemp("lighteval")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n"
                                                      for q in QUESTIONS))
    (root / "tasks.py").write_text(f"DATA = {str(root / 'data')!r}\n" + TASKS_PY)
    return root


def _config(saved, tmp_path, **kw):
    from stepscope.integrations.lighteval import StepFlowModelConfig

    # no chat template: the prompts are the bare queries, as stepscope.generate(chat=False) encodes them
    return StepFlowModelConfig(model_name=str(saved / "model"), dtype="float32", device="cpu", batch_size=3,
                               override_chat_template=False, cache_dir=str(tmp_path / f"cache-{len(kw)}"), **kw)


def test_generation_is_stepscopes_stepflow_and_differs_from_plain(saved, tmp_path):
    from lighteval.tasks.requests import Doc

    from stepscope.integrations.lighteval import StepFlowTransformersModel

    docs = [Doc(query=PROMPT.format(q=q), choices=["5"], gold_index=0, task_name="t|0", id=str(i),
                generation_size=12, stop_sequences=["<|im_end|>"]) for i, q in enumerate(QUESTIONS)]
    lm = StepFlowTransformersModel(_config(saved, tmp_path, **STRONG))
    plain = StepFlowTransformersModel(_config(saved, tmp_path, stepflow=False))
    got = [r.text[0] for r in lm.greedy_until(docs)]
    base = [r.text[0] for r in plain.greedy_until(docs)]
    model, tok = stepscope.load_model(str(saved / "model"))
    prompts = [PROMPT.format(q=q) for q in QUESTIONS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = stepscope.generate(model, tok, prompts, max_new_tokens=12, chat=False, progress=False,
                                  stepflow=stepscope.StepFlowConfig(**STRONG))
        ours_plain = stepscope.generate(model, tok, prompts, max_new_tokens=12, chat=False, progress=False)
    def decode(t):
        return tok.decode(t.response_ids, skip_special_tokens=True)

    assert got == [decode(t) for t in ours]
    assert base == [decode(t) for t in ours_plain]
    assert got != base
    assert len(lm.stepflow_rows) == 3 and sum(sum(r["oeb_edits_per_layer"].values()) for r in lm.stepflow_rows) > 0
    assert lm.stepflow_layers == {"oeb": [0], "smi": [3]} and plain.stepflow_rows == []


def test_lighteval_custom_model_path_builds_it_from_the_model_name(saved):
    from lighteval.models.custom.custom_model import CustomModelConfig
    from lighteval.models.model_loader import load_model

    from stepscope.integrations.lighteval import StepFlowTransformersModel
    from stepscope.integrations.lighteval.__main__ import MODEL_FILE

    cfg = CustomModelConfig(model_name=f"model_name={saved / 'model'},dtype=float32,device=cpu,tau_max=0.2,"
                            "alpha=0.1,oeb_layers=0:2,smi_window=4", model_definition_file_path=str(MODEL_FILE))
    lm = load_model(config=cfg)
    assert isinstance(lm, StepFlowTransformersModel)
    sf = lm.stepflow
    assert (sf.tau_max, sf.alpha, sf.oeb_layers, sf.smi_window) == (0.2, 0.1, (0, 2), 4)
    assert lm.config.tau_max == 0.2  # what lighteval logs as the model config
    with pytest.raises(StepscopeError, match="alpha must be >= 0"):
        load_model(config=CustomModelConfig(model_name=f"model_name={saved / 'model'},alpha=-1",
                                            model_definition_file_path=str(MODEL_FILE)))


def test_command_line_runs_a_task_and_its_details_import(saved, tmp_path, monkeypatch):
    import huggingface_hub
    import requests

    from stepscope.cli.main import main as stepscope_main
    from stepscope.integrations.lighteval.__main__ import main

    # lighteval 0.13 imports all its built-in tasks: one fetches a tinyBenchmarks file (offline: "not found"), one
    # calls HfApi.list_models(model_name=...), an argument huggingface_hub 1.0 removed. Neither is StepFlow's.
    monkeypatch.setattr(requests, "get", lambda *a, **k: types.SimpleNamespace(status_code=404))
    if int(huggingface_hub.__version__.split(".")[0]) >= 1:
        monkeypatch.setattr(huggingface_hub.HfApi, "list_models", lambda self, *a, **k: [object()])
    out = tmp_path / "out"
    code = main([f"model_name={saved / 'model'},dtype=float32,device=cpu,batch_size=3,tau_max=0.9,alpha=0.5",
                 "stepscope_tiny|0", "--custom-tasks", str(saved / "tasks.py"), "--output-dir", str(out),
                 "--save-details"])
    assert code == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config_general"]["model_config"]["tau_max"] == 0.9
    details = next(out.rglob("details_*.parquet"))
    imported = tmp_path / "imported"
    assert stepscope_main(["import", str(details), "--model", str(saved / "model"), "--out", str(imported),
                           "--source-metric", "em"]) == 0
    lines = [json.loads(x) for x in (imported / "results.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in lines) == [f"stepscope_tiny|0/{i}" for i in range(3)]
    import pyarrow.parquet as pq

    rows = {r["doc"]["id"]: r for r in pq.read_table(details).to_pylist()}
    for line in lines:
        row = rows[line["problem_id"].split("/")[1]]
        trace = stepscope.Trace.load(imported / line["trace"])
        # the traces are the token ids lighteval recorded, prompt and generation
        assert trace.token_ids == row["model_response"]["input_tokens"] + row["model_response"]["output_tokens"][0]
        assert line["correct"] == bool(row["metric"]["em"])
        assert line["config"]["stepflow"]["alpha"] == 0.5  # read from lighteval's results file


def test_module_prints_its_model_file(capsys):
    from stepscope.integrations.lighteval.__main__ import MODEL_FILE, main

    assert main(["--model-file"]) == 0
    assert capsys.readouterr().out.strip() == str(MODEL_FILE) and MODEL_FILE.is_file()
