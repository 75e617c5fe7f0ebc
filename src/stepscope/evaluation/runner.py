"""The evaluation run loop: conditions on shared seeds, batched generation, one JSON line per graded sample.

:func:`run_eval` generates, grades and appends every (problem, sample, condition) of a shard not yet in the run
directory. Every (problem, sample) pair draws the same seed in every condition, so baseline and StepFlow are
paired sample by sample, and conditions advance in lockstep, so a run stopped early still holds paired results.

The other concerns of a run live beside this loop, and their names are re-exported here:
:mod:`~stepscope.evaluation.conditions` (the named conditions), :mod:`~stepscope.evaluation.run_config` (the
frozen run config, its fingerprint and resume checks, the problem hash and sample seeds),
:mod:`~stepscope.evaluation.shards` (which problems and results file belong to a process),
:mod:`~stepscope.evaluation.store` (the run directory, ``run.json``, the results files, merging and resumption)
and :mod:`~stepscope.evaluation.run_progress` (the progress bar). This module also reads the launch context of
a multi-process run (:func:`distributed_context`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StepscopeError
from .conditions import CONDITION_NAMES, Condition, build_conditions, parse_conditions
from .datasets import Problem, build_user_message
from .run_config import RunConfig, Sampling, problems_fingerprint, sample_seed
from .run_progress import RunProgress
from .shards import RESULTS_NAME as RESULTS_NAME
from .shards import WHOLE_RUN, Shard, parse_shard
from .store import RUN_NAME as RUN_NAME
from .store import (
    TRACES_DIR,
    ResultsLock,
    lock_results,
    locked_append,
    merge_results,
    prepare_run_dir,
    read_results,
    read_run_file,
    record_key,
    result_files,
    trace_names,
    update_run_info,
)

__all__ = [
    "CONDITION_NAMES",
    "Condition",
    "DistributedContext",
    "ResultsLock",
    "RunConfig",
    "RunOutcome",
    "Sampling",
    "Shard",
    "build_conditions",
    "distributed_context",
    "lock_results",
    "merge_results",
    "parse_conditions",
    "parse_shard",
    "prepare_run_dir",
    "problems_fingerprint",
    "read_results",
    "read_run_file",
    "record_key",
    "result_files",
    "run_eval",
    "sample_seed",
    "trace_names",
    "update_run_info",
]


# --- this process's place in a launch ------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a multi-process launch (``accelerate launch`` / ``torchrun``)."""

    process_index: int
    num_processes: int
    device: str | None

    @property
    def shard(self) -> Shard:
        return Shard(self.process_index, self.num_processes)


def distributed_context() -> DistributedContext | None:
    """The launch context when several processes were started (WORLD_SIZE > 1), else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return None
    try:
        from accelerate import PartialState  # only under a launcher

        state = PartialState()
        if int(state.num_processes) == world:
            return DistributedContext(int(state.process_index), world, str(state.device))
    except ImportError:
        pass
    # without GPUs accelerate reports a single process even under its launcher: read the launcher's variables
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return DistributedContext(rank, world, _local_device(local))


def _local_device(local_rank: int) -> str | None:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else None


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What a call to :func:`run_eval` did; ``complete``: every key of this shard is in the results."""

    out: Path
    results_path: Path
    written: int
    skipped: int
    total: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.written + self.skipped == self.total


@dataclass(frozen=True)
class _Unit:
    """One (problem, sample) pair of this shard."""

    index: int
    problem: Problem
    sample: int
    seed: int


GradeFn = Callable[[Sequence[Problem], Sequence[str]], Sequence[Any]]


def run_eval(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: RunConfig,
    out: str | os.PathLike,
    *,
    shard: Shard = WHOLE_RUN,
    batch_size: int = 8,
    workers: int = 2,
    save_traces: bool = True,
    progress: bool = True,
    on_sample: Callable[[dict], None] | None = None,
    grade_fn: GradeFn | None = None,
    lock: ResultsLock | None = None,
) -> RunOutcome:
    """Generate, grade and append every (problem, sample, condition) of ``shard`` not yet in ``out``.

    Conditions advance in lockstep, one batch of (problem, sample) pairs at a time, so a run stopped early
    still holds paired results. ``on_sample(record)`` is called after each line is written (for tests and
    monitors); ``grade_fn(problems, responses)`` replaces the graders (default: :func:`grade_many`).
    ``lock``: this shard's results file, already taken with :func:`lock_results` (a CLI takes it before the
    model loads, so a second process is refused at once).
    """
    from .graders import grade_many  # keeps importing the runner light

    if batch_size < 1:
        raise StepscopeError("--batch-size must be at least 1")
    if problems_fingerprint(problems) != config.problems_sha or len(problems) != config.num_problems:
        raise StepscopeError("the problems differ from the ones the run config was made for; rebuild the config")
    _check_model_matches(model, config)
    out = prepare_run_dir(out, config)
    grade = grade_fn or (lambda ps, rs: grade_many(ps, rs, workers=min(workers, len(ps)), config=config.grading))
    units = _shard_units(problems, config, shard)
    results_path = out / shard.results_name
    if lock is not None and lock.path.resolve() != results_path.resolve():
        raise StepscopeError(f"the lock taken is for {lock.path}, but this shard writes {results_path}")
    with (nullcontext(lock.handle) if lock is not None else locked_append(results_path)) as fh:
        read_results(results_path, repair=True)
        done_records, _ = merge_results(out)
        done = {record_key(r) for r in done_records}
        names = trace_names(problems) if save_traces else {}
        bar = RunProgress(units, config, done_records, enabled=progress)
        written, t0 = 0, time.perf_counter()
        try:
            for chunk in _chunks(units, batch_size):
                for condition in config.conditions:
                    todo = [u for u in chunk if (u.problem.id, u.sample, condition.name) not in done]
                    if not todo:
                        continue
                    for record in _run_batch(model, tokenizer, todo, condition, config, out, names, grade):
                        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                        done.add(record_key(record))
                        written += 1
                        bar.update(record)
                        if on_sample is not None:
                            on_sample(record)
        finally:
            bar.close()
    total = len(units) * len(config.conditions)
    skipped = sum(1 for u in units for c in config.conditions if (u.problem.id, u.sample, c.name) in done) - written
    return RunOutcome(out, results_path, written, skipped, total, time.perf_counter() - t0)


def _shard_units(problems: Sequence[Problem], config: RunConfig, shard: Shard) -> list[_Unit]:
    s = config.sampling
    return [_Unit(i, p, k, sample_seed(s.seed, p.id, k))
            for i, p in enumerate(problems) if shard.takes(i) for k in range(s.n)]


def _chunks(items: Sequence[_Unit], size: int) -> Iterator[Sequence[_Unit]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_model_matches(model, config: RunConfig) -> None:
    """Refuse a model whose dtype or device kind is not the one the config records (a mislabelled run)."""
    actual = {"dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
              "device": getattr(getattr(model, "device", None), "type", None)}
    for name, value in actual.items():
        wanted = getattr(config, name)
        if wanted in (None, "auto", "custom device_map") or not value:
            continue
        if value != wanted:
            raise StepscopeError(f"the run config says {name} {wanted}, but the model's {name} is {value}; build "
                                 "the config from the settings the model was loaded with")


def _prompt(problem: Problem, profile, instruction: bool) -> str:
    return build_user_message(problem, profile) if instruction else problem.question


def _run_batch(model, tokenizer, units: Sequence[_Unit], condition: Condition, config: RunConfig, out: Path,
               names: Mapping[str, str], grade: GradeFn) -> Iterator[dict]:
    """Generate and grade one batch of one condition; yield its result lines (traces saved first)."""
    from ..generation import generate
    from ..profiles import get_profile

    s = config.sampling
    profile = get_profile(None if config.profile == "auto" else config.profile, tokenizer)
    t0 = time.perf_counter()
    traces = generate(model, tokenizer, [_prompt(u.problem, profile, config.instruction) for u in units],
                      max_new_tokens=s.max_new_tokens, **s.config.to_dict(),
                      seeds=[u.seed for u in units], batch_size=len(units), profile=profile,
                      stepflow=condition.intervention, progress=False)
    grades = grade([u.problem for u in units], [t.response for t in traces])
    per_sample = (time.perf_counter() - t0) / len(units)
    record_config = config.record_config(condition)
    for unit, trace, verdict in zip(units, traces, grades):
        rel = None
        if names:
            rel = f"{TRACES_DIR}/{condition.name}/{names[unit.problem.id]}__{unit.sample}.json"
            trace.save(out / rel)
        yield {
            "problem_id": unit.problem.id,
            "problem_index": unit.index,
            "sample": unit.sample,
            "condition": condition.name,
            "seed": unit.seed,
            "correct": bool(verdict.correct),
            "extracted": verdict.extracted,
            "gold": None if unit.problem.grader == "code" else unit.problem.answer,
            "grade_detail": verdict.detail,
            "response": trace.response,
            "new_tokens": int(trace.meta.get("new_tokens", len(trace.token_ids) - trace.prompt_len)),
            "stop": trace.meta.get("stop"),  # eos, length or stop_string
            **({"stop_string": trace.meta["stop_string"]} if "stop_string" in trace.meta else {}),
            "time_s": round(per_sample, 4),
            "trace": rel,
            "config": record_config,
        }
