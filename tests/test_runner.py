"""The evaluation run loop: shared seeds, resume after a kill, truncated lines, config refusal, shards, merge."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluation import runner
from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.graders import Grade
from stepscope.evaluation.runner import (
    RunConfig,
    Sampling,
    Shard,
    build_conditions,
    merge_results,
    parse_conditions,
    parse_shard,
    prepare_run_dir,
    problems_fingerprint,
    read_results,
    record_key,
    run_eval,
    sample_seed,
)
from stepscope.stepflow import StepFlowConfig
from stepscope.trace import Trace

PROBLEMS = [Problem(f"toy/{i}", f"What is {i} plus {i}?", str(2 * i), "math", {"index": i}) for i in range(3)]


@pytest.fixture(scope="module")
def tiny():
    from stepscope.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("plain")
    return tiny_model("llama", tok, layers=2), tok


def fake_grade(problems, responses):
    """Deterministic verdicts from the response text (the random model's answers are noise)."""
    return [Grade(len(r) % 2 == 0, r[-1:] or None, "fake") for r in responses]


def make_config(names=("baseline", "stepflow"), n=2, temperature=0.8, problems=PROBLEMS, **sampling) -> RunConfig:
    conditions = build_conditions(list(names), StepFlowConfig())
    return RunConfig("tiny", {"name": "toy", "limit": None}, problems_fingerprint(problems), len(problems),
                     Sampling(n=n, temperature=temperature, max_new_tokens=4, **sampling), conditions)


def run(tiny, out, config=None, **kw):
    model, tok = tiny
    kw.setdefault("grade_fn", fake_grade)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 4)
    return run_eval(model, tok, PROBLEMS, config or make_config(), out, **kw)


def all_keys(config=None):
    config = config or make_config()
    return {(p.id, k, c.name) for p in PROBLEMS for k in range(config.sampling.n) for c in config.conditions}


class Kill(RuntimeError):
    pass


def killer(after: int):
    seen = []

    def on_sample(record):
        seen.append(record)
        if len(seen) == after:
            raise Kill(f"killed after {after} samples")

    return on_sample


# --- seeds, conditions, shards ----------------------------------------------------------------------------------


def test_sample_seed_is_a_stable_hash_of_seed_problem_and_sample():
    # a fixed value: the seed must not depend on the process (Python's hash() is salted per process)
    assert sample_seed(0, "gsm8k/0", 0) == 8836823355525047160
    assert sample_seed(0, "gsm8k/0", 0) == sample_seed(0, "gsm8k/0", 0)
    seeds = {sample_seed(s, p, k) for s in (0, 1) for p in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_conditions_derive_from_one_stepflow_config():
    base = StepFlowConfig(tau_max=0.2, alpha=0.1)
    conds = {c.name: c for c in build_conditions(["baseline", "stepflow", "oeb-only", "smi-only"], base)}
    assert conds["baseline"].intervention is None
    assert conds["stepflow"].intervention == base
    assert conds["oeb-only"].intervention.oeb and not conds["oeb-only"].intervention.smi
    assert conds["smi-only"].intervention.smi and not conds["smi-only"].intervention.oeb
    assert conds["smi-only"].intervention.alpha == 0.1
    assert parse_conditions(" baseline, smi-only ") == ["baseline", "smi-only"]
    with pytest.raises(StepscopeError, match="unknown condition 'oeb'"):
        parse_conditions("baseline,oeb")
    with pytest.raises(StepscopeError, match="twice"):
        parse_conditions("baseline,baseline")
    with pytest.raises(StepscopeError, match="neither OEB nor SMI"):
        build_conditions(["smi-only"], StepFlowConfig(smi=False))


def test_shard_parsing_and_selection():
    shard = parse_shard("1/3")
    assert (shard.index, shard.count) == (1, 3)
    assert [i for i in range(8) if shard.takes(i)] == [1, 4, 7]
    assert shard.results_name == "results.shard-1-of-3.jsonl"
    assert Shard().results_name == "results.jsonl"
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(StepscopeError, match="shard"):
            parse_shard(bad)


# --- run.json ------------------------------------------------------------------------------------------------------


def test_a_changed_config_is_refused_naming_the_field(tmp_path):
    prepare_run_dir(tmp_path, make_config())
    prepare_run_dir(tmp_path, make_config())  # the same config: resumes
    with pytest.raises(StepscopeError, match=r"sampling\.temperature is 0\.8 there, 0\.5 now"):
        prepare_run_dir(tmp_path, make_config(temperature=0.5))
    other = RunConfig("tiny", {"name": "toy", "limit": None}, make_config().problems_sha, 3, make_config().sampling,
                      build_conditions(["baseline", "stepflow"], StepFlowConfig(alpha=0.1)))
    with pytest.raises(StepscopeError, match=r"conditions\.stepflow\.alpha"):
        prepare_run_dir(tmp_path, other)
    with pytest.raises(StepscopeError, match=r"conditions\.oeb-only"):
        prepare_run_dir(tmp_path, make_config(names=("baseline", "stepflow", "oeb-only")))


def test_run_config_round_trips_and_warns_on_another_version(tmp_path):
    config = make_config(names=("baseline", "oeb-only"))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    prepare_run_dir(tmp_path, config)
    data = json.loads((tmp_path / "run.json").read_text())
    data["info"]["stepscope_version"] = "0.0.1"
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="0.0.1"):
        prepare_run_dir(tmp_path, config)


def _with(config: RunConfig, **fields) -> RunConfig:
    return dataclasses.replace(config, **fields)


def test_dtype_device_and_model_files_are_part_of_the_run(tmp_path):
    config = _with(make_config(), dtype="float32", device="cpu", model_files="abc123")
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    prepare_run_dir(tmp_path, config)
    stored = json.loads((tmp_path / "run.json").read_text())["config"]
    assert (stored["dtype"], stored["device"], stored["model_files"]) == ("float32", "cpu", "abc123")
    prepare_run_dir(tmp_path, config)  # the same: resumes
    with pytest.raises(StepscopeError, match=r"dtype is 'float32' there, 'bfloat16' now.*another --out"):
        prepare_run_dir(tmp_path, _with(config, dtype="bfloat16"))
    with pytest.raises(StepscopeError, match=r"device is 'cpu' there, 'cuda' now"):
        prepare_run_dir(tmp_path, _with(config, device="cuda"))
    with pytest.raises(StepscopeError, match=r"model_files is 'abc123' there, 'def456' now \(the checkpoint's"):
        prepare_run_dir(tmp_path, _with(config, model_files="def456"))
    record = config.record_config(config.conditions[0])
    assert (record["dtype"], record["device"]) == ("float32", "cpu")


def test_a_run_from_before_dtype_was_recorded_resumes_with_a_warning(tmp_path):
    old = make_config()  # no dtype, device or model files: the keys are left out of run.json
    prepare_run_dir(tmp_path, old)
    assert not {"dtype", "device", "model_files"} & set(json.loads((tmp_path / "run.json").read_text())["config"])
    with pytest.warns(UserWarning, match="before stepscope recorded device, dtype"):
        prepare_run_dir(tmp_path, _with(old, dtype="float32", device="cpu"))
    # other fields are still checked
    with pytest.warns(UserWarning, match="recorded dtype"), pytest.raises(StepscopeError, match=r"sampling\.temperature"):
        prepare_run_dir(tmp_path, _with(make_config(temperature=0.1), dtype="float32"))


def test_an_unwritable_out_directory_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        with pytest.raises(StepscopeError, match=r"cannot create the run directory .*pass a writable --out"):
            prepare_run_dir(out, make_config())
    (tmp_path / "odd" / "run.json").mkdir(parents=True)  # run.json there, but a directory
    with pytest.raises(StepscopeError, match=r"run\.json exists but is not a file"):
        prepare_run_dir(tmp_path / "odd", make_config())


def test_a_model_unlike_the_config_is_refused(tiny, tmp_path):
    with pytest.raises(StepscopeError, match="says dtype bfloat16, but the model's dtype is float64"):
        run(tiny, tmp_path, _with(make_config(), dtype="bfloat16"))
    with pytest.raises(StepscopeError, match="says device cuda, but the model's device is cpu"):
        run(tiny, tmp_path, _with(make_config(), dtype="float64", device="cuda"))
    assert not (tmp_path / "run.json").exists()  # refused before anything was written


# --- results files ------------------------------------------------------------------------------------------------


def _line(pid, sample=0, condition="baseline", correct=True):
    return json.dumps({"problem_id": pid, "sample": sample, "condition": condition, "correct": correct})


def test_a_truncated_last_line_is_dropped_and_cut_on_repair(tmp_path):
    path = tmp_path / "results.jsonl"
    good = _line("a") + "\n" + _line("b") + "\n"
    path.write_text(good + _line("c")[:20])
    assert [r["problem_id"] for r in read_results(path)] == ["a", "b"]
    assert path.read_text() != good  # reading alone leaves the file as it is
    read_results(path, repair=True)
    assert path.read_text() == good


def test_an_unterminated_complete_line_is_kept_and_terminated(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(_line("a") + "\n" + _line("b"))
    assert len(read_results(path, repair=True)) == 2
    assert path.read_text().endswith("\n")


def test_a_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(_line("a") + "\nnot json\n" + _line("b") + "\n")
    with pytest.raises(StepscopeError, match=r"results\.jsonl:2"):
        read_results(path)


def test_merge_reads_main_and_shard_files_once_per_key(tmp_path):
    (tmp_path / "results.jsonl").write_text(_line("a") + "\n" + _line("b") + "\n")
    (tmp_path / "results.shard-0-of-2.jsonl").write_text(_line("b") + "\n" + _line("c") + "\n")
    (tmp_path / "results.shard-1-of-2.jsonl").write_text(_line("d", condition="stepflow") + "\n")
    (tmp_path / "results.summary.json").write_text("{}")  # not a results file
    records, duplicates = merge_results(tmp_path)
    assert [record_key(r) for r in records] == [("a", 0, "baseline"), ("b", 0, "baseline"), ("c", 0, "baseline"),
                                                ("d", 0, "stepflow")]
    assert duplicates == 1


# --- the run loop ------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_loses_and_duplicates_nothing(tiny, tmp_path):
    with pytest.raises(Kill):
        run(tiny, tmp_path, on_sample=killer(5))
    path = tmp_path / "results.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 5
    path.write_text(path.read_text() + _line("toy/2", 1, "stepflow")[:25])  # a kill in the middle of a write
    outcome = run(tiny, tmp_path)
    lines = path.read_text().splitlines()
    assert lines[:5] == first
    keys = [record_key(json.loads(line)) for line in lines]
    assert Counter(keys) == Counter(all_keys())  # every key exactly once
    assert (outcome.written, outcome.skipped, outcome.total) == (7, 5, 12) and outcome.complete
    again = run(tiny, tmp_path)
    assert again.written == 0 and path.read_text().splitlines() == lines


def test_conditions_share_seeds_and_lines_carry_the_settings(tiny, tmp_path):
    config = make_config(names=("baseline", "stepflow", "smi-only"))
    run(tiny, tmp_path, config)
    records, _ = merge_results(tmp_path)
    by_pair: dict[tuple[str, int], set[int]] = {}
    for r in records:
        by_pair.setdefault((r["problem_id"], r["sample"]), set()).add(r["seed"])
        assert r["seed"] == sample_seed(0, r["problem_id"], r["sample"])
        assert r["config"]["run"] == config.fingerprint() and r["config"]["temperature"] == 0.8
        assert (r["config"]["stepflow"] is None) == (r["condition"] == "baseline")
        assert r["correct"] == (len(r["response"]) % 2 == 0)
        assert r["new_tokens"] <= 4 and r["time_s"] >= 0
        trace = Trace.load(tmp_path / r["trace"])  # the trace is saved where the line says
        assert trace.response == r["response"] and trace.meta["seed"] == r["seed"]
    assert len(by_pair) == 6 and all(len(seeds) == 1 for seeds in by_pair.values())
    assert {Path(r["trace"]).parts[1] for r in records} == {"baseline", "stepflow", "smi-only"}


def test_shards_split_problems_and_merge_to_the_whole_run(tiny, tmp_path):
    config = make_config(n=1)
    first = run(tiny, tmp_path, config, shard=Shard(0, 2), save_traces=False)
    second = run(tiny, tmp_path, config, shard=Shard(1, 2), save_traces=False)
    assert (first.total, second.total) == (4, 2)
    shard0 = read_results(tmp_path / "results.shard-0-of-2.jsonl")
    assert {r["problem_index"] for r in shard0} == {0, 2}
    assert all(r["trace"] is None for r in shard0)
    records, duplicates = merge_results(tmp_path)
    assert {record_key(r) for r in records} == all_keys(config) and duplicates == 0
    # a plain (unsharded) resume of the same run finds everything done
    assert run(tiny, tmp_path, config).written == 0


def test_a_second_writer_of_the_same_file_is_refused(tiny, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    prepare_run_dir(tmp_path, make_config())
    with (tmp_path / "results.jsonl").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StepscopeError, match="another process is writing"):
            run(tiny, tmp_path)


def test_the_results_lock_is_taken_before_the_run_and_handed_to_it(tiny, tmp_path):
    pytest.importorskip("fcntl")
    config = make_config(names=("baseline",), n=1)
    prepare_run_dir(tmp_path, config)
    with runner.lock_results(tmp_path) as lock:
        with pytest.raises(StepscopeError, match="another process is writing"), runner.lock_results(tmp_path):
            pass
        with pytest.raises(StepscopeError, match="another process is writing"):
            run(tiny, tmp_path, config)  # without the lock: refused, it is held
        with pytest.raises(StepscopeError, match="the lock taken is for"):
            run(tiny, tmp_path, config, shard=Shard(1, 2), lock=lock)
        outcome = run(tiny, tmp_path, config, lock=lock)
    assert outcome.written == 3 and len(read_results(outcome.results_path)) == 3
    with runner.lock_results(tmp_path):  # released when the block ended
        pass


def test_problems_must_match_the_config(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(StepscopeError, match="problems differ"):
        run_eval(model, tok, PROBLEMS[:2], make_config(), tmp_path, grade_fn=fake_grade, progress=False)


def test_greedy_runs_and_default_grading(tiny, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run(tiny, tmp_path, make_config(names=("baseline",), n=1, temperature=0.0), grade_fn=None,
                      workers=0)
    records = read_results(outcome.results_path)
    assert len(records) == 3
    assert all(r["gold"] == p.answer for r, p in zip(records, PROBLEMS))
    assert all(isinstance(r["correct"], bool) and r["grade_detail"] for r in records)


class _FakeState:
    def __init__(self, index, count, device):
        self.process_index, self.num_processes, self.device = index, count, device


def test_distributed_context_from_accelerate_or_the_launcher_variables(monkeypatch):
    import accelerate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runner.distributed_context() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(accelerate, "PartialState", lambda: _FakeState(2, 4, "cuda:2"))
    ctx = runner.distributed_context()
    assert (ctx.process_index, ctx.num_processes, ctx.device) == (2, 4, "cuda:2")
    assert ctx.shard == Shard(2, 4)
    # accelerate without GPUs reports one process even under its launcher: the launcher's variables decide
    monkeypatch.setattr(accelerate, "PartialState", lambda: _FakeState(0, 1, "cpu"))
    monkeypatch.setattr(runner, "_local_device", lambda local: f"dev{local}")
    ctx = runner.distributed_context()
    assert (ctx.process_index, ctx.num_processes, ctx.device) == (3, 4, "dev3")
