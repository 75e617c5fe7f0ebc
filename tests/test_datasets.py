"""Benchmark loading: offline copies, the hub path (faked), reasoning-gym tasks, user files, prompts."""

from __future__ import annotations

import json
import os
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluation import datasets as ds
from stepscope.evaluation.datasets import (
    DATASETS,
    Problem,
    build_user_message,
    load_problems,
    load_problems_from_file,
    parse_indices,
    parse_rg_params,
)
from stepscope.profiles import PROFILES

DATA_DIR = Path(os.environ.get("STEPSCOPE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(), reason="offline data not here")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(ds.DATA_DIR_ENV, raising=False)


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in ``datasets`` module: load_dataset returns rows registered per (hub id, config)."""
    tables: dict[tuple[str, str | None], list[dict]] = {}
    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        if (path, name) not in tables:
            raise ConnectionError("hub unreachable")
        return tables[(path, name)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return tables, calls


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_is_data_with_valid_graders():
    assert set(DATASETS) == {"gsm8k", "math500", "aime24", "aime25", "amc23", "gpqa_diamond", "humaneval",
                             "livecodebench"}
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.grader in ds.GRADERS
        assert spec.answer_format in ds._ANSWER_FORMATS
        assert spec.row_adapter is None or spec.row_adapter in ds._ROW_ADAPTERS
    assert DATASETS["livecodebench"].offline_dir is None
    assert DATASETS["livecodebench"].hub_id == "livecodebench/code_generation_lite"


# --- offline copies ----------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "name,count,grader",
    [("gsm8k", 1319, "math"), ("math500", 500, "math"), ("aime24", 30, "math"), ("aime25", 30, "math"),
     ("amc23", 40, "math"), ("gpqa_diamond", 198, "choice"), ("humaneval", 164, "code")],
)
def test_offline_sets_load_completely(name, count, grader):
    problems = load_problems(name, data_dir=DATA_DIR)
    assert len(problems) == count
    assert all(p.grader == grader and p.question.strip() and p.answer.strip() for p in problems)
    assert [p.id for p in problems[:3]] == [f"{name}/0", f"{name}/1", f"{name}/2"]
    assert len({p.id for p in problems}) == count


@needs_data
def test_gsm8k_answer_is_the_number_after_hashes():
    problems = load_problems("gsm8k", data_dir=DATA_DIR, limit=3)
    assert problems[0].answer == "18" and "Janet" in problems[0].question
    assert all("####" not in p.answer and "," not in p.answer for p in load_problems("gsm8k", data_dir=DATA_DIR))
    assert problems[0].meta["numeric"] is True


@needs_data
def test_amc_answers_are_normalised_numbers_and_gpqa_letters_are_spread():
    amc = load_problems("amc23", data_dir=DATA_DIR)
    assert amc[0].answer == "27" and amc[0].meta["numeric"]
    letters = Counter(p.answer for p in load_problems("gpqa_diamond", data_dir=DATA_DIR))
    assert letters == {"A": 53, "B": 42, "C": 52, "D": 51}


@needs_data
def test_humaneval_keeps_tests_and_entry_point():
    problem = load_problems("humaneval", data_dir=DATA_DIR, indices=[0])[0]
    assert problem.question.startswith("from typing import List")
    assert "def check(candidate)" in problem.answer
    assert problem.meta["entry_point"] == "has_close_elements"
    assert problem.meta["source_id"] == "HumanEval/0"


@needs_data
def test_limit_and_indices_select_rows():
    assert [p.id for p in load_problems("aime24", data_dir=DATA_DIR, limit=2)] == ["aime24/0", "aime24/1"]
    picked = load_problems("gsm8k", data_dir=DATA_DIR, indices=[17, 3, 1318])
    assert [p.id for p in picked] == ["gsm8k/17", "gsm8k/3", "gsm8k/1318"]
    assert [p.id for p in load_problems("gsm8k", data_dir=DATA_DIR, indices=[5, 6, 7], limit=2)] == ["gsm8k/5", "gsm8k/6"]
    with pytest.raises(StepscopeError, match=r"index 1319 is out of range: gsm8k has 1319 problems \(indices 0..1318\)"):
        load_problems("gsm8k", data_dir=DATA_DIR, indices=[1319])
    with pytest.raises(StepscopeError, match="repeat"):
        load_problems("gsm8k", data_dir=DATA_DIR, indices=[1, 1])
    with pytest.raises(StepscopeError, match="--limit"):
        load_problems("gsm8k", data_dir=DATA_DIR, limit=0)


@needs_data
def test_data_dir_from_the_environment(monkeypatch):
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(DATA_DIR))
    assert len(load_problems("aime25")) == 30


def test_missing_offline_copy_says_what_to_pass(tmp_path):
    with pytest.raises(StepscopeError, match="--data-dir DIR") as info:
        load_problems("gsm8k", data_dir=tmp_path)
    assert "gsm8k/test.jsonl" in str(info.value) and "\n" not in str(info.value)


def test_without_data_dir_or_datasets_package_the_error_says_what_to_do(no_hub):
    with pytest.raises(StepscopeError, match="--data-dir DIR") as info:
        load_problems("math500")
    assert ds.DATA_DIR_ENV in str(info.value)


def test_livecodebench_offline_needs_the_hub(tmp_path):
    with pytest.raises(StepscopeError, match="needs the Hugging Face hub"):
        load_problems("livecodebench", data_dir=tmp_path)


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(StepscopeError, match="did you mean gsm8k"):
        load_problems("gsm8kk")


def test_bad_jsonl_line_is_named(tmp_path):
    folder = tmp_path / "aime25"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"problem": "p", "answer": "1"}\n\n{"problem": oops}\n')
    with pytest.raises(StepscopeError, match=r"test.jsonl:3 is not valid JSON"):
        load_problems("aime25", data_dir=tmp_path)


# --- hub (faked) ------------------------------------------------------------------------------------------


def test_hub_rows_map_like_offline_rows(fake_hub):
    tables, calls = fake_hub
    tables[("openai/gsm8k", "main")] = [{"question": "q0", "answer": "work\n#### 1,234"}, {"question": "q1", "answer": "#### 5"}]
    problems = load_problems("gsm8k")
    assert [(p.id, p.answer) for p in problems] == [("gsm8k/0", "1234"), ("gsm8k/1", "5")]
    assert calls[0][:3] == ("openai/gsm8k", "main", "test")


def test_hub_sets_with_several_configs_are_concatenated(fake_hub):
    tables, _ = fake_hub
    tables[("opencompass/AIME2025", "AIME2025-I")] = [{"question": "a", "answer": "1"}]
    tables[("opencompass/AIME2025", "AIME2025-II")] = [{"question": "b", "answer": "2"}]
    assert [(p.question, p.answer) for p in load_problems("aime25")] == [("a", "1"), ("b", "2")]


def test_hub_gpqa_options_are_shuffled_stably_with_the_right_letter(fake_hub):
    tables, _ = fake_hub
    tables[("Idavidrein/gpqa", "gpqa_diamond")] = [
        {"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
         "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}
        for i in range(40)
    ]
    problems = load_problems("gpqa_diamond")
    for problem in problems:
        assert f"{problem.answer}) right" in problem.question
    assert len({p.answer for p in problems}) > 1  # not always the same letter
    assert [p.question for p in load_problems("gpqa_diamond")] == [p.question for p in problems]


def test_hub_failure_is_one_clear_line(fake_hub):
    with pytest.raises(StepscopeError, match="could not load HuggingFaceH4/MATH-500 from the hub") as info:
        load_problems("math500")
    assert "--data-dir" in str(info.value)


def test_livecodebench_rows_become_code_problems(fake_hub):
    tables, calls = fake_hub
    tables[("livecodebench/code_generation_lite", None)] = [{
        "question_content": "Read n, print n+1.", "starter_code": "", "question_id": "abc123",
        "public_test_cases": json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}]),
        "private_test_cases": "", "metadata": "{}", "platform": "atcoder", "difficulty": "easy",
        "contest_date": "2024-01-01",
    }]
    problem = load_problems("livecodebench")[0]
    assert problem.grader == "code" and problem.meta["harness"] == "stdio"
    assert problem.meta["source_id"] == "abc123"
    assert json.loads(problem.answer)["public"].startswith("[")
    assert calls[0][3] == {"version_tag": "release_v5"}
    assert problem.instruction == "code_stdio" and "standard input" in build_user_message(problem, "think")


# --- reasoning-gym ---------------------------------------------------------------------------------------


def test_rg_tasks_generate_offline_and_record_their_settings():
    problems = load_problems("rg:basic_arithmetic", size=5, seed=3, rg_params={"min_terms": 2, "max_terms": 3})
    assert [p.id for p in problems] == [f"rg:basic_arithmetic/{i}" for i in range(5)]
    first = problems[0]
    assert first.grader == "rg" and first.answer == first.meta["entry"]["answer"]
    assert first.meta["rg_params"] == {"min_terms": 2, "max_terms": 3} and first.meta["seed"] == 3
    again = load_problems("rg:basic_arithmetic", size=5, seed=3, rg_params={"min_terms": 2, "max_terms": 3})
    assert [p.question for p in again] == [p.question for p in problems]
    other = load_problems("rg:basic_arithmetic", size=5, seed=4, rg_params={"min_terms": 2, "max_terms": 3})
    assert [p.question for p in other] != [p.question for p in problems]


def test_rg_indices_beyond_default_size_grow_the_set_without_changing_items():
    small = load_problems("rg:chain_sum", seed=1, indices=[2])[0]
    big = load_problems("rg:chain_sum", seed=1, indices=[2, 150])
    assert big[0].question == small.question and big[1].id == "rg:chain_sum/150"
    with pytest.raises(StepscopeError, match="out of range"):
        load_problems("rg:chain_sum", size=10, indices=[10])


def test_rg_errors_say_what_to_do():
    with pytest.raises(StepscopeError, match="did you mean basic_arithmetic") as info:
        load_problems("rg:basic_arithmetc")
    assert "reasoning_gym.factory" in str(info.value)
    with pytest.raises(StepscopeError, match="rejected its parameters"):
        load_problems("rg:basic_arithmetic", rg_params={"no_such_option": 1})
    with pytest.raises(StepscopeError, match="only applies to rg:"):
        load_problems("gsm8k", rg_params={"x": 1})


def test_parse_rg_params_converts_cli_strings():
    parsed = parse_rg_params(["min_terms=3", "p=0.25", "allow_neg=true", "flag=False", "ops=+,-", "xs=[1, 2]",
                              "name=hello", "nothing=none"])
    assert parsed == {"min_terms": 3, "p": 0.25, "allow_neg": True, "flag": False, "ops": ["+", "-"],
                      "xs": [1, 2], "name": "hello", "nothing": None}
    assert parse_rg_params(["sizes=1,2,3"]) == {"sizes": [1, 2, 3]}
    with pytest.raises(StepscopeError, match="KEY=VALUE"):
        parse_rg_params(["min_terms"])
    with pytest.raises(StepscopeError, match="twice"):
        parse_rg_params(["a=1", "a=2"])


def test_parse_indices():
    assert parse_indices("0-3,17, 20") == [0, 1, 2, 3, 17, 20]
    with pytest.raises(StepscopeError, match="0-4,17,20"):
        parse_indices("1,x")
    with pytest.raises(StepscopeError, match="end must not be below"):
        parse_indices("5-2")


# --- user files ---------------------------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_user_jsonl_loads_with_fields_ids_and_meta(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        json.dumps({"q": "1+1?", "a": 2, "key": "x1", "topic": "add"}),
        "",
        json.dumps({"q": "2+2?", "a": 4.0, "key": "x2", "topic": "add"}),
    ])
    problems = load_problems_from_file(path, question_field="q", answer_field="a", grader="math")
    assert [(p.id, p.question, p.answer) for p in problems] == [("mine/0", "1+1?", "2"), ("mine/1", "2+2?", "4")]
    assert problems[0].meta["topic"] == "add" and "q" not in problems[0].meta
    with_ids = load_problems_from_file(path, question_field="q", answer_field="a", grader="exact", id_field="key",
                                       indices=[1])
    assert [p.id for p in with_ids] == ["x2"]


def test_user_jsonl_errors_name_the_problem(tmp_path):
    with pytest.raises(StepscopeError, match="no such file"):
        load_problems_from_file(tmp_path / "none.jsonl", question_field="q", answer_field="a", grader="math")
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"q": "x", "a": "1"}), "{not json"])
    with pytest.raises(StepscopeError, match=r"bad.jsonl:2 is not valid JSON"):
        load_problems_from_file(bad, question_field="q", answer_field="a", grader="math")
    missing = _write(tmp_path / "missing.jsonl", [json.dumps({"q": "x", "a": "1"}), json.dumps({"question": "y", "a": "2"})])
    with pytest.raises(StepscopeError, match=r"missing.jsonl:2 has no question field 'q' \(fields: question, a\)"):
        load_problems_from_file(missing, question_field="q", answer_field="a", grader="math")
    with pytest.raises(StepscopeError, match="unknown grader"):
        load_problems_from_file(missing, question_field="q", answer_field="a", grader="fuzzy")
    dup = _write(tmp_path / "dup.jsonl", [json.dumps({"q": "x", "a": "1", "id": 1})] * 2)
    with pytest.raises(StepscopeError, match="repeat"):
        load_problems_from_file(dup, question_field="q", answer_field="a", grader="math", id_field="id")


def _load(path, **kw):
    kw.setdefault("answer_field", "a")
    kw.setdefault("grader", "math")
    if "question_template" not in kw:
        kw.setdefault("question_field", "q")
    return load_problems_from_file(path, **kw)


@pytest.mark.parametrize("row, message", [
    ({"q": "1+1?", "a": None}, r"bad.jsonl:2: the answer field 'a' is null"),
    ({"q": "1+1?", "a": "  "}, r"bad.jsonl:2: the answer field 'a' is empty"),
    ({"q": "1+1?", "a": ""}, r"bad.jsonl:2: the answer field 'a' is empty"),
    ({"q": "1+1?", "a": [1, 2]}, r"bad.jsonl:2: the answer field 'a' holds an array"),
    ({"q": "1+1?", "a": {"v": 2}}, r"bad.jsonl:2: the answer field 'a' holds an object"),
    ({"q": "1+1?", "a": float("nan")}, r"bad.jsonl:2: the answer field 'a' is nan"),
    ({"q": None, "a": 2}, r"bad.jsonl:2: the question field 'q' is null"),
    ({"q": "\n \t", "a": 2}, r"bad.jsonl:2: the question field 'q' is empty"),
    ({"q": "3+3?", "a": 6, "id": None}, r"bad.jsonl:2: the id field 'id' is null"),
])
def test_user_rows_with_null_or_empty_fields_are_refused_with_the_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"q": "2+2?", "a": 4, "id": "first"}), json.dumps(row)])
    with pytest.raises(StepscopeError, match=message):
        _load(path, id_field="id" if "id" in row else None)
    # only the rows that would be evaluated are checked: leaving the bad one out loads the rest
    assert [p.answer for p in _load(path, indices=[0])] == ["4"]


def test_a_null_answer_never_becomes_the_gold_none(tmp_path):
    path = _write(tmp_path / "none.jsonl", [json.dumps({"q": "Anything?", "a": None})])
    with pytest.raises(StepscopeError, match="null") as err:
        _load(path)
    assert "\n" not in str(err.value)
    kept = _load(_write(tmp_path / "text.jsonl", [json.dumps({"q": "Say None.", "a": "None"})]))
    assert kept[0].answer == "None"  # the word itself, written by the user, is a legitimate gold


def test_question_template_joins_premise_and_question(tmp_path):
    path = _write(tmp_path / "svamp.jsonl", [
        json.dumps({"ID": "a1", "Body": "Tom has 3 apples.", "Question": "He buys 2 more. How many now?",
                    "Answer": 5.0, "Type": "Addition"}),
    ])
    (p,) = _load(path, question_template="{Body} {Question}", answer_field="Answer", id_field="ID")
    assert p.question == "Tom has 3 apples. He buys 2 more. How many now?" and p.answer == "5" and p.id == "a1"
    assert p.meta["Type"] == "Addition" and "Body" not in p.meta and "Question" not in p.meta
    (lit,) = _load(path, question_template="Context: {Body}\n{{Q}} {Question!s:>5}", answer_field="Answer")
    assert lit.question == "Context: Tom has 3 apples.\n{Q} He buys 2 more. How many now?"


@pytest.mark.parametrize("template, message", [
    ("{Body} {Query}", (r"svamp.jsonl:1 has no field 'Query' named in --question-template "
                        r"\(fields: Body, Question, Answer, Extra\)")),
    ("{} {Question}", "positional field"),
    ("{0}", "positional field"),
    ("{Body.upper}", "plain row field name"),
    ("{Body[0]}", "plain row field name"),
    ("{Body", "bad --question-template"),
    ("no fields at all", "names no row field"),
    ("{Extra} {Question}", r"svamp.jsonl:1: field 'Extra' of --question-template is null"),
])
def test_question_template_mistakes_are_clear(tmp_path, template, message):
    path = _write(tmp_path / "svamp.jsonl", [
        json.dumps({"Body": "B.", "Question": "Q?", "Answer": 1, "Extra": None}),
    ])
    with pytest.raises(StepscopeError, match=message):
        _load(path, question_template=template, answer_field="Answer")


def test_question_template_and_field_are_exclusive(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"q": "Q?", "a": 1})])
    with pytest.raises(StepscopeError, match="not both"):
        _load(path, question_field="q", question_template="{q}")


def test_fields_left_out_of_the_prompt_are_warned_about_once(tmp_path):
    rows = [json.dumps({"Body": f"Ann has {i} pens.", "Question": "How many?", "Answer": i}) for i in range(1, 4)]
    path = _write(tmp_path / "asdiv.jsonl", rows)
    with pytest.warns(UserWarning) as record:
        _load(path, question_field="Question", answer_field="Answer")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "'Body' beside the question field 'Question' is not in the prompt (in 3 of 3 rows)" in messages[0]
    assert '--question-template "{Body} {Question}"' in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a template nothing is left out, so nothing is said
        _load(path, question_template="{Body} {Question}", answer_field="Answer")


def test_user_files_that_are_not_jsonl_text_are_one_line_errors(tmp_path):
    with pytest.raises(StepscopeError, match="is a directory"):
        _load(tmp_path)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x81\xff\x00" * 10)
    with pytest.raises(StepscopeError, match="is not UTF-8 text"):
        _load(binary)


def test_a_byte_order_mark_and_line_separators_inside_strings_keep_line_numbers(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"q": "one\u2028two?", "a": 1}, ensure_ascii=False), json.dumps({"q": "x", "a": None})]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    with pytest.raises(StepscopeError, match=r"bom.jsonl:2: the answer field 'a' is null"):
        _load(path)
    assert _load(path, indices=[0])[0].question == "one\u2028two?"


# --- damaged rows of the built-in sets ------------------------------------------------------------------------


def _offline(tmp_path, folder: str, rows: list[dict]) -> Path:
    (tmp_path / folder).mkdir()
    _write(tmp_path / folder / "test.jsonl", [json.dumps(r) for r in rows])
    return tmp_path


@pytest.mark.parametrize("bad, what", [
    ({"problem": "Q2", "answer": None}, "a null answer"),
    ({"problem": "Q2", "answer": " "}, "an empty answer"),
    ({"problem": None, "answer": "2"}, "a null question"),
    ({"problem": "", "answer": "2"}, "an empty question"),
])
def test_a_damaged_offline_row_is_refused_with_its_index(tmp_path, bad, what):
    data = _offline(tmp_path, "math500", [{"problem": "Q1", "answer": "1"}, bad])
    with pytest.raises(StepscopeError, match=rf"test.jsonl:2 \(math500 problem 1\) has {what}; .*--indices"):
        load_problems("math500", data_dir=data)
    assert [p.answer for p in load_problems("math500", data_dir=data, indices=[0])] == ["1"]


def test_a_gsm8k_solution_without_a_final_number_is_refused(tmp_path):
    data = _offline(tmp_path, "gsm8k", [{"question": "Q", "answer": "We add. ####  "}])
    with pytest.raises(StepscopeError, match=r"gsm8k problem 0\) has no answer after formatting"):
        load_problems("gsm8k", data_dir=data)


def test_a_damaged_hub_row_is_refused_naming_the_row(fake_hub):
    tables, _ = fake_hub
    tables[("HuggingFaceH4/MATH-500", None)] = [{"problem": "Q1", "answer": "1"}, {"problem": "Q2", "answer": None}]
    with pytest.raises(StepscopeError, match=r"HuggingFaceH4/MATH-500 row 1 \(math500 problem 1\) has a null answer"):
        load_problems("math500")


# --- prompts -------------------------------------------------------------------------------------------------


def _problem(grader: str, **meta) -> Problem:
    return Problem("t/0", "What is 2 + 3?", "5", grader, meta)


def test_think_and_harmony_prompts_ask_for_boxed_answers():
    message = build_user_message(_problem("math"), "think")
    assert message == "What is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert build_user_message(_problem("math"), "harmony") == message
    assert "letter" in build_user_message(_problem("choice"), "think")
    assert "\\boxed{}" in build_user_message(_problem("choice"), "think")
    assert "```python" in build_user_message(_problem("code"), "think")


def test_plain_prompt_asks_for_short_steps_and_a_final_answer_line():
    message = build_user_message(_problem("math"), PROFILES["plain"])
    assert "one short sentence per step" in message and message.endswith("'Final answer: <answer>'.")
    assert "Final answer: <letter>" in build_user_message(_problem("choice"), "plain")
    assert "```python" in build_user_message(_problem("code"), "plain")


def test_every_prompt_style_covers_every_grader_and_unknown_profiles_fail():
    for style in ds.INSTRUCTIONS.values():
        assert set(ds.GRADERS) <= set(style)
    with pytest.raises(StepscopeError, match="unknown prompt profile"):
        build_user_message(_problem("math"), "chatty")


def test_the_instruction_kind_is_a_typed_field_of_the_problem():
    stdio = ds.Problem("x/0", "Read n, print n+1.", "tests", "code", {}, instruction="code_stdio")
    assert build_user_message(stdio, "think").endswith(ds.INSTRUCTIONS["think"]["code_stdio"])
    assert build_user_message(ds.Problem("x/1", "Q", "t", "code", {}), "think").endswith(
        ds.INSTRUCTIONS["think"]["code"])
    with pytest.raises(StepscopeError, match="no prompt instruction of kind 'poem'"):
        build_user_message(ds.Problem("x/2", "Q", "1", "math", {}, instruction="poem"), "plain")
    # a row's meta keys do not steer the prompt (only loaders set the field)
    assert build_user_message(ds.Problem("x/3", "Q", "1", "math", {"raw_prompt": True}), "plain") != "Q"


def test_organism_sets_are_math_problems_prompted_with_the_bare_question():
    problems = load_problems("organism:easy", size=4, seed=0, limit=2)
    assert [p.meta["index"] for p in problems] == [0, 1]
    assert all(p.grader == "math" and p.instruction == ds.NO_INSTRUCTION for p in problems)
    assert problems[0].answer.lstrip("-").isdigit()
    assert build_user_message(problems[0], "plain") == problems[0].question  # no instruction appended
    # an index past the default size grows the set rather than failing; the stream is the same
    far = load_problems("organism:easy", seed=0, indices=[150])
    assert far[0].meta["index"] == 150 and far[0].id.endswith("-150")
    assert load_problems("organism:easy", size=2, seed=0)[1].question == problems[1].question
    with pytest.raises(StepscopeError, match="difficulty"):
        load_problems("organism:impossible", size=2)
    with pytest.raises(StepscopeError, match="--rg"):
        load_problems("organism:easy", rg_params={"x": 1})


def test_the_plain_math_instruction_is_the_plain_profiles():
    from stepscope.profiles import PLAIN

    assert ds.INSTRUCTIONS["plain"]["math"] == PLAIN.instruction
    assert build_user_message(Problem("p", "What is 2+2?", "4", "math"), PLAIN).endswith(PLAIN.instruction)
