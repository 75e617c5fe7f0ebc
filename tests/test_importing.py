"""Reading responses generated elsewhere (each format), turning them into traces with exact token spans, grading
them, and the one-line errors for bad files."""

import json
import re
import warnings

import pytest

from stepscope import Trace
from stepscope.errors import StepscopeError
from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.importing import (
    ImportedSample,
    detect_format,
    import_samples,
    match_problems,
    read_file,
    read_lighteval,
    read_lm_eval,
    read_openai,
    read_plain,
    samples_from_files,
)
from stepscope.prompting import prompt_ids

R1 = "First we add 2 and 3. That gives 5 in total.\n\nFinal answer: 5"
R2 = "We think about it once. It is 6, clearly so.\n\nFinal answer: 6"
R3 = "Multiply four by six now. That is 24 exactly.\n\nFinal answer: 24"


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _import(samples, tok, out, **kw):
    kw.setdefault("model_name", "tiny")
    kw.setdefault("progress", False)
    kw.setdefault("workers", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = import_samples(samples, tok, out, **kw)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return outcome, lines, [Trace.load(out / r["trace"]) for r in lines]


def test_plain_questions_are_templated_and_prompts_taken_as_is(tmp_path, tokenizers):
    tok = tokenizers["plain"]
    raw = "<|im_start|>user\nWhat is 4 * 6?<|im_end|>\n<|im_start|>assistant\n"
    f = _jsonl(tmp_path / "plain.jsonl", [{"question": "What is 2 + 3?", "response": R1},
                                          {"prompt": raw, "completion": R3}])
    _, lines, traces = _import(read_plain(f), tok, tmp_path / "out")
    ids0 = prompt_ids(tok, "What is 2 + 3?") + tok(R1, add_special_tokens=False)["input_ids"]
    ids1 = tok(raw)["input_ids"] + tok(R3, add_special_tokens=False)["input_ids"]
    assert [t.token_ids for t in traces] == [ids0, ids1]
    assert traces[0].prompt_len == len(prompt_ids(tok, "What is 2 + 3?"))
    for t, response in zip(traces, (R1, R3)):
        t.validate()  # contiguous, ordered spans from token ids covering the trace
        assert t.response == response
        assert [s.kind for s in t.steps] == ["question", "thinking", "thinking", "summary"]
        assert "".join(s.text for s in t.steps if s.kind != "question") == response
    assert [r["response"] for r in lines] == [R1, R3]
    assert lines[0]["correct"] is None and lines[0]["config"]["stepflow"] is None


def test_samples_of_one_prompt_form_one_problem_in_file_order(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "runs.jsonl", [{"question": "What is 2 + 3?", "response": R1},
                                         {"question": "What is 4 * 6?", "response": R3},
                                         {"question": "What is 2 + 3?", "response": R2},
                                         {"question": "Why?", "id": "q-7", "responses": [R1, R2, R3]}])
    _, lines, _ = _import(read_plain(f), tokenizers["plain"], tmp_path / "out")
    keys = [(r["problem_id"], r["sample"], r["problem_index"]) for r in lines]
    assert keys == [("runs/0", 0, 0), ("runs/1", 0, 1), ("runs/0", 1, 0), ("q-7", 0, 2), ("q-7", 1, 2),
                    ("q-7", 2, 2)]
    assert lines[0]["config"]["n"] == 3


def test_openai_choices_and_chat_reasoning_rebuild_the_generated_text(tmp_path, tokenizers):
    tok = tokenizers["think"]
    f = _jsonl(tmp_path / "vllm.jsonl", [
        {"prompt": "Q: 2 + 3?", "model": "m", "temperature": 0.6,
         "choices": [{"text": R1, "finish_reason": "stop"}, {"text": R2, "finish_reason": "length"}]},
        {"messages": [{"role": "user", "content": "What is 4 * 6?"}],
         "choices": [{"message": {"role": "assistant", "content": "\n\nFinal answer: 24",
                                  "reasoning_content": "Multiply four by six now. That is 24 exactly."}}]},
    ])
    samples = read_openai(f)
    assert [(s.stop, s.prompt_mode) for s in samples] == [("eos", "raw"), ("length", "raw"), (None, "chat")]
    _, lines, traces = _import(samples, tok, tmp_path / "out")
    assert [(r["problem_id"], r["sample"]) for r in lines] == [("vllm/0", 0), ("vllm/0", 1), ("vllm/1", 0)]
    assert lines[1]["stop"] == "length" and lines[0]["config"]["temperature"] == 0.6
    chat = traces[2]
    # the chat template opens <think>, so the model wrote: reasoning, </think>, answer
    assert chat.prompt_text.endswith("<think>\n")
    assert chat.response == "Multiply four by six now. That is 24 exactly.</think>\n\nFinal answer: 24"
    assert [s.kind for s in chat.steps] == ["question", "thinking", "thinking", "summary"]
    assert chat.steps[-1].text == "\n\nFinal answer: 24"


def test_token_ids_in_the_file_are_the_trace(tmp_path, tokenizers):
    tok = tokenizers["plain"]
    p_ids = tok("Q: 2 + 3?")["input_ids"]
    r_ids = tok(R1, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    f = _jsonl(tmp_path / "offline.jsonl", [{"prompt": "Q: 2 + 3?", "prompt_token_ids": p_ids,
                                             "outputs": [{"text": R1, "token_ids": r_ids}]}])
    assert detect_format(f) == "openai"
    _, _, traces = _import(read_openai(f), tok, tmp_path / "a")
    assert traces[0].token_ids == p_ids + r_ids and traces[0].prompt_len == len(p_ids)
    _, _, again = _import(read_openai(f), tok, tmp_path / "b", retokenize=True)
    assert again[0].token_ids == p_ids + r_ids[:-1]  # the text alone has no end token
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"prompt": "Q", "outputs": [{"text": R2, "token_ids": r_ids}]}])
    with pytest.raises(StepscopeError, match=r"wrong\.jsonl:1 \(choice 0\): the file's token ids do not spell"):
        _import(read_openai(wrong), tok, tmp_path / "c")
    outside = _jsonl(tmp_path / "outside.jsonl", [{"prompt": "Q", "outputs": [{"text": "x", "token_ids": [99999]}]}])
    with pytest.raises(StepscopeError, match=r"outside\.jsonl:1 \(choice 0\): a response token id 99999 is outside"):
        _import(read_openai(outside), tok, tmp_path / "d")


def _lm_eval_row(doc_id, question, resps, target, em):
    prompt = f"Question: {question}\nAnswer:"
    return {"doc_id": doc_id, "doc": {"question": question, "answer": target}, "target": target,
            "arguments": {"gen_args_0": {"arg_0": prompt, "arg_1": {"until": ["\n\n"], "max_gen_toks": 64,
                                                                     "temperature": 0.0}}},
            "resps": [resps], "filtered_resps": [resps[0]], "filter": "none", "metrics": ["exact_match"],
            "doc_hash": "x", "prompt_hash": "y", "target_hash": "z", "exact_match": em}


def test_lm_eval_log_samples(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "samples_gsm8k_2026-01-02T03-04-05.678901.jsonl",
               [_lm_eval_row(0, "What is 2 + 3?", [R1, R2], "5", 1.0),
                _lm_eval_row(1, "What is 4 * 6?", [R3], "24", 0.0)])
    assert detect_format(f) == "lm-eval"
    samples = read_lm_eval(f)
    assert [(s.problem_id, s.gold, s.prompt_mode) for s in samples] == [
        ("gsm8k/0", "5", "raw"), ("gsm8k/0", "5", "raw"), ("gsm8k/1", "24", "raw")]
    assert samples[0].question == "What is 2 + 3?" and samples[0].prompt == "Question: What is 2 + 3?\nAnswer:"
    _, lines, traces = _import(samples, tokenizers["plain"], tmp_path / "out", source_metric="exact_match")
    assert [r["correct"] for r in lines] == [True, True, False]
    assert lines[0]["config"]["max_new_tokens"] == 64 and lines[0]["config"]["temperature"] == 0.0
    assert traces[0].prompt_text == "Question: What is 2 + 3?\nAnswer:"
    mc = _lm_eval_row(2, "Pick one", [[-1.5, False]], "A", 1.0)
    mc["resps"] = [[[-1.5, False]], [[-0.5, True]]]
    bad = _jsonl(tmp_path / "samples_mmlu_2026-01-02T03-04-05.678901.jsonl", [mc])
    with pytest.raises(StepscopeError, match=r"jsonl:1 is a scored-continuation \(loglikelihood\) sample"):
        read_lm_eval(bad)


def test_source_metric_must_be_a_recorded_0_1_score(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "samples_t_2026-01-02T03-04-05.678901.jsonl", [_lm_eval_row(0, "Q?", [R1], "5", 0.5)])
    with pytest.raises(StepscopeError, match=re.escape("metric 'exact_match' is 0.5, not 0/1")):
        _import(read_lm_eval(f), tokenizers["plain"], tmp_path / "a", source_metric="exact_match")
    with pytest.raises(StepscopeError, match=r"has no metric 'acc' \(it has: exact_match\)"):
        _import(read_lm_eval(f), tokenizers["plain"], tmp_path / "b", source_metric="acc")


def _lighteval_rows(tok):
    rows = []
    for i, (q, r, gold) in enumerate((("What is 2 + 3?", R1, "5"), ("What is 4 * 6?", R3, "24"))):
        p_ids = prompt_ids(tok, q)
        rows.append({"doc": {"query": q, "choices": [gold], "gold_index": 0, "id": str(i), "task_name": "math|0"},
                     "model_response": {"input": None, "input_tokens": p_ids, "text": [r],
                                        "output_tokens": [tok(r, add_special_tokens=False)["input_ids"] +
                                                          [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]]},
                     "metric": {"em": int(i == 0)}})
    return rows


def test_lighteval_details_json_and_parquet(tmp_path, tokenizers):
    tok = tokenizers["plain"]
    rows = _lighteval_rows(tok)
    js = tmp_path / "details_math|0_2026-01-02T03-04-05.678901.json"
    js.write_text(json.dumps(rows))
    assert detect_format(js) == "lighteval"
    _, lines, traces = _import(read_lighteval(js), tok, tmp_path / "a", source_metric="em")
    assert [(r["problem_id"], r["gold"], r["correct"]) for r in lines] == [
        ("math|0/0", "5", True), ("math|0/1", "24", False)]
    want = rows[0]["model_response"]["input_tokens"] + rows[0]["model_response"]["output_tokens"][0][:-2]
    assert traces[0].token_ids == want  # trailing padding dropped, the end token kept
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "details_math|0_2026-01-02T03-04-05.678901.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert detect_format(path) == "lighteval"
    fmt, samples = read_file(path)
    assert fmt == "lighteval" and [s.response_ids for s in samples] == [s.response_ids for s in read_lighteval(js)]
    assert samples[1].where.endswith(".parquet row 2 (generation 0)")


def test_grading_against_a_gold_in_the_file(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "g.jsonl", [{"question": "What is 2 + 3?", "response": R1, "answer": 5},
                                      {"question": "What is 2 + 3?", "response": R2, "answer": 5},
                                      {"question": "What is 4 * 6?", "response": R3, "answer": "24"}])
    outcome, lines, _ = _import(read_plain(f), tokenizers["plain"], tmp_path / "out", grade=True)
    assert [(r["correct"], r["extracted"], r["gold"]) for r in lines] == [(True, "5", "5"), (False, "6", "5"),
                                                                          (True, "24", "24")]
    assert outcome.graded and outcome.accuracy == pytest.approx(2 / 3)
    info = json.loads((tmp_path / "out" / "import.json").read_text())
    assert info["graded"] == "stepscope graders" and info["samples"] == 3 and info["problems"] == 2
    no_gold = _jsonl(tmp_path / "ng.jsonl", [{"question": "Q?", "response": R1}])
    with pytest.raises(StepscopeError, match=r"ng\.jsonl:1 has no gold answer"):
        _import(read_plain(no_gold), tokenizers["plain"], tmp_path / "ng", grade=True)


def test_samples_match_dataset_problems_by_id_question_or_last_occurrence():
    problems = [Problem("gsm8k/0", "What is 2 + 3?", "5", "math"), Problem("gsm8k/1", "What is 4 * 6?", "24", "math")]
    few_shot = "Question: What is 2 + 3?\nAnswer: 5\n\nQuestion: What is 4 * 6?\nAnswer:"
    samples = [ImportedSample("f:1", R1, problem_id="gsm8k/1", question="unrelated"),
               ImportedSample("f:2", R1, question="  What is 2 +\n3? "),
               ImportedSample("f:3", R1, prompt=few_shot, question=few_shot)]
    assert [p.id for p in match_problems(samples, problems)] == ["gsm8k/1", "gsm8k/0", "gsm8k/1"]
    with pytest.raises(StepscopeError, match="f:9: no problem of the dataset has this question"):
        match_problems([ImportedSample("f:9", R1, question="What is 9 - 1?")], problems)


def test_dataset_problems_give_ids_and_golds(tmp_path, tokenizers):
    problems = [Problem("gsm8k/0", "What is 2 + 3?", "5", "math", {"numeric": True}),
                Problem("gsm8k/1", "What is 4 * 6?", "24", "math", {"numeric": True})]
    f = _jsonl(tmp_path / "v.jsonl", [{"prompt": "Question: What is 4 * 6?\n", "choices": [{"text": R3}]},
                                      {"prompt": "Question: What is 2 + 3?\n", "choices": [{"text": R2}]}])
    _, lines, _ = _import(read_openai(f), tokenizers["plain"], tmp_path / "out", problems=problems, dataset="gsm8k",
                          grade=True)
    assert [(r["problem_id"], r["problem_index"], r["correct"]) for r in lines] == [("gsm8k/1", 0, True),
                                                                                   ("gsm8k/0", 1, False)]
    assert lines[0]["config"]["dataset"] == "gsm8k"


@pytest.mark.parametrize("rows, message", [
    (['{"question": "Q?", "response": "A"}', '{"question": "Q?", "response": '], r"bad\.jsonl:2 is not valid JSON"),
    ([{"question": "Q?", "response": "A"}, {"question": "Q?", "answer": "5"}], r"bad\.jsonl:2 has no field 'response"),
    ([{"response": "A"}], r"bad\.jsonl:1 has no prompt field"),
    ([{"question": "Q?", "response": 5}], r"bad\.jsonl:1: response is int, expected text"),
    ([{"question": "Q?", "response": "A"}, "[1, 2]"], r"bad\.jsonl:2 is not a JSON object"),
    (["[1, 2]"], r"bad\.jsonl record 1 is not a JSON object"),  # a file that opens with [ is one JSON array
])
def test_bad_plain_files_fail_in_one_line_naming_the_line(tmp_path, rows, message):
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(StepscopeError, match=message) as info:
        read_plain(f)
    assert "\n" not in str(info.value)


def test_bad_openai_records_name_the_line(tmp_path):
    f = _jsonl(tmp_path / "o.jsonl", [{"prompt": "Q", "choices": [{"text": "A"}]}, {"prompt": "Q", "choices": []}])
    with pytest.raises(StepscopeError, match=r"o\.jsonl:2 has no non-empty 'choices'"):
        read_openai(f)
    g = _jsonl(tmp_path / "p.jsonl", [{"choices": [{"text": "A"}]}])
    with pytest.raises(StepscopeError, match=r"p\.jsonl:1 has no 'prompt' or 'messages'"):
        read_openai(g)


def test_detection_and_several_files(tmp_path, tokenizers):
    a = _jsonl(tmp_path / "a.jsonl", [{"question": "What is 2 + 3?", "response": R1}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "Q: 4 * 6?", "choices": [{"text": R3}]}])
    samples, sources = samples_from_files([a, b])
    assert [(s["format"], s["samples"]) for s in sources] == [("plain", 1), ("openai", 1)]
    _, lines, _ = _import(samples, tokenizers["plain"], tmp_path / "out", sources=sources)
    assert [r["problem_id"] for r in lines] == ["a/0", "b/0"]
    with pytest.raises(StepscopeError, match="no such file"):
        detect_format(tmp_path / "missing.jsonl")
    with pytest.raises(StepscopeError, match="unknown format 'csv'"):
        read_file(a, "csv")


def test_output_directory_rules(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "a.jsonl", [{"question": "What is 2 + 3?", "response": R1}])
    out = tmp_path / "out"
    _import(read_plain(f), tokenizers["plain"], out)
    with pytest.raises(StepscopeError, match="already holds imported results; pass another --out, or --overwrite"):
        _import(read_plain(f), tokenizers["plain"], out)
    _, lines, _ = _import(read_plain(f), tokenizers["plain"], out, overwrite=True)
    assert len(lines) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(StepscopeError, match="is a stepscope eval run; import into a directory of its own"):
        _import(read_plain(f), tokenizers["plain"], run)
    with pytest.raises(StepscopeError, match="choose one of --grade"):
        _import(read_plain(f), tokenizers["plain"], tmp_path / "x", grade=True, source_metric="em")


def test_problem_ids_that_sanitise_alike_keep_separate_trace_files(tmp_path, tokenizers):
    f = _jsonl(tmp_path / "ids.jsonl", [{"question": "What is 2 + 3?", "id": "a/b", "response": R1},
                                        {"question": "What is 4 * 6?", "id": "a-b", "response": R3}])
    _, lines, traces = _import(read_plain(f), tokenizers["plain"], tmp_path / "out")
    assert len({r["trace"] for r in lines}) == 2
    assert [t.response for t in traces] == [R1, R3]
