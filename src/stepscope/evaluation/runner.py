"""The evaluation run loop: conditions on shared seeds, batched generation, one JSON line per graded sample.

A run lives in a directory: ``run.json`` (the settings that define it), ``results.jsonl`` (one line per graded
sample; ``results.shard-I-of-N.jsonl`` for data-parallel shards) and, optionally, ``traces/<condition>/`` (each
sample's :class:`~stepscope.trace.Trace`). Every (problem, sample) pair draws the same seed in every condition,
so baseline and StepFlow are paired sample by sample. Lines are appended and flushed one at a time, so a run
that is stopped resumes where it stopped: finished keys are skipped, a line cut short by a kill is dropped, and
nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import StepscopeError
from ..stepflow import StepFlowConfig
from .datasets import Problem, build_user_message

if TYPE_CHECKING:
    from .graders import GradingConfig

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

CONDITION_NAMES = ("baseline", "stepflow", "oeb-only", "smi-only")
RESULTS_NAME = "results.jsonl"
RUN_NAME = "run.json"
TRACES_DIR = "traces"
_SHARD_FILE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.jsonl")
_KEY_FIELDS = ("problem_id", "sample", "condition")


# --- conditions and settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One arm of a comparison: a name and the StepFlow settings it generates with (None: plain decoding)."""

    name: str
    stepflow: StepFlowConfig | None = None

    def stepflow_dict(self) -> dict | None:
        return None if self.stepflow is None else self.stepflow.to_dict()


def parse_conditions(text: str) -> list[str]:
    """``"baseline,stepflow"`` -> ``["baseline", "stepflow"]``, checked against :data:`CONDITION_NAMES`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise StepscopeError(f"--conditions is empty; list some of {', '.join(CONDITION_NAMES)}")
    for name in names:
        if name not in CONDITION_NAMES:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(CONDITION_NAMES)}")
    if len(set(names)) != len(names):
        raise StepscopeError("a condition is listed twice in --conditions; list each once")
    return names


def build_conditions(names: Sequence[str], stepflow: StepFlowConfig | None) -> tuple[Condition, ...]:
    """Conditions from names; the StepFlow ones derive from ``stepflow`` (OEB-only drops SMI and vice versa)."""
    out = []
    for name in names:
        if name == "baseline":
            out.append(Condition(name))
            continue
        if name not in CONDITION_NAMES:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(CONDITION_NAMES)}")
        base = stepflow or StepFlowConfig()
        if name == "oeb-only":
            base = dataclasses.replace(base, smi=False)
        elif name == "smi-only":
            base = dataclasses.replace(base, oeb=False)
        if not (base.oeb or base.smi):
            raise StepscopeError(f"condition {name} has neither OEB nor SMI left (check --no-oeb / --no-smi)")
        out.append(Condition(name, base))
    return tuple(out)


@dataclass(frozen=True)
class Sampling:
    """How each sample is drawn; ``n`` samples per problem, temperature 0 meaning greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise StepscopeError(f"--n must be at least 1 sample per problem, got {self.n}")
        if self.temperature < 0:
            raise StepscopeError("--temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise StepscopeError("--top-p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise StepscopeError("--max-new-tokens must be at least 1")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's results; a run directory holds exactly one.

    ``dataset``: the set's name and selection (JSON-able; machine-specific paths such as the data directory
    are left out, and ``problems_sha`` pins the content instead). ``dtype`` and ``device`` (its kind:
    ``cpu``, ``cuda``, ...) are what the model computes in, and ``model_files`` fingerprints a local
    checkpoint (see :func:`stepscope.models.checkpoint_identity`); each is recorded only when set, so runs
    made before they existed still resume.
    """

    model: str
    dataset: Mapping[str, Any]
    problems_sha: str
    num_problems: int
    sampling: Sampling
    conditions: tuple[Condition, ...]
    profile: str = "auto"
    instruction: bool = True
    dtype: str | None = None
    device: str | None = None
    model_files: str | None = None
    grading: GradingConfig | None = None  # None: the default (stepscope) grading

    def __post_init__(self) -> None:
        if not self.conditions:
            raise StepscopeError("a run needs at least one condition")
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise StepscopeError(f"condition names repeat: {names}")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dataset": dict(self.dataset),
            "problems_sha": self.problems_sha,
            "num_problems": self.num_problems,
            "sampling": dataclasses.asdict(self.sampling),
            # a mapping by name, so a changed field reads as conditions.<name>.<field>
            "conditions": {c.name: c.stepflow_dict() for c in self.conditions},
            "profile": self.profile,
            "instruction": self.instruction,
            **{k: getattr(self, k) for k in _OPTIONAL_FIELDS if getattr(self, k) is not None},
            # only a non-default mode is written, so default runs keep their run id
            **({"grading": self.grading.to_dict()} if self.grading and self.grading.mode != "stepscope" else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        conditions = tuple(Condition(name, None if cfg is None else StepFlowConfig.from_dict(cfg))
                           for name, cfg in d["conditions"].items())
        return cls(d["model"], dict(d["dataset"]), d["problems_sha"], int(d["num_problems"]),
                   Sampling(**d["sampling"]), conditions, d.get("profile", "auto"), bool(d.get("instruction", True)),
                   **{k: d.get(k) for k in _OPTIONAL_FIELDS}, grading=_grading_config(d.get("grading")))

    def fingerprint(self) -> str:
        """A short hash of the canonical JSON form: the run id written into every result line."""
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()[:12]

    def differences(self, other: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(dotted field, other's value, this value)`` for every field that differs from ``other``."""
        mine, theirs = _flatten(self.to_dict()), _flatten(dict(other))
        return [(k, theirs.get(k, "<absent>"), mine.get(k, "<absent>"))
                for k in sorted(set(mine) | set(theirs)) if mine.get(k, _MISSING) != theirs.get(k, _MISSING)]

    def record_config(self, condition: Condition) -> dict:
        """The settings written into each result line, so a results file can be summarised on its own."""
        s = self.sampling
        return {"run": self.fingerprint(), "model": self.model, "dataset": self.dataset.get("name"), "n": s.n,
                "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
                "seed": s.seed, "stepflow": condition.stepflow_dict(), "dtype": self.dtype, "device": self.device}


# Top-level config fields added after run.json existed: absent from an older run.json means "not recorded".
_OPTIONAL_FIELDS = ("dtype", "device", "model_files")
_MISSING = object()


def _grading_config(d: Mapping[str, Any] | None) -> GradingConfig | None:
    from .graders import GradingConfig  # noqa: PLC0415 - keeps importing the runner light

    return None if d is None else GradingConfig.from_dict(dict(d))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """Hash of the problem set's ids, questions, answers and graders (what a resumed run must match)."""
    rows = [[p.id, p.question, p.answer, p.grader] for p in problems]
    return hashlib.sha256(_canonical(rows).encode()).hexdigest()[:16]


def sample_seed(base_seed: int, problem_id: str, sample: int) -> int:
    """The seed of one (problem, sample): a stable hash (not Python's salted ``hash``), shared by all conditions."""
    digest = hashlib.sha256(f"{base_seed}\x1f{problem_id}\x1f{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: valid for torch.Generator.manual_seed


# --- shards and processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Problems with ``index % count == index`` of the list belong to this process."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise StepscopeError(f"bad shard {self.index}/{self.count}: need 0 <= i < n, e.g. --shard 0/4")

    def takes(self, problem_index: int) -> bool:
        return problem_index % self.count == self.index

    @property
    def results_name(self) -> str:
        return RESULTS_NAME if self.count == 1 else f"results.shard-{self.index}-of-{self.count}.jsonl"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise StepscopeError(f"bad --shard {text!r}: write I/N with 0 <= I < N, e.g. --shard 0/4")
    return Shard(int(match.group(1)), int(match.group(2)))


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
        from accelerate import PartialState  # noqa: PLC0415 - only under a launcher

        state = PartialState()
        if int(state.num_processes) == world:
            return DistributedContext(int(state.process_index), world, str(state.device))
    except ImportError:
        pass
    # without GPUs accelerate reports a single process even under its launcher: read the launcher's variables
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return DistributedContext(rank, world, _local_device(local))


def _local_device(local_rank: int) -> str | None:
    import torch  # noqa: PLC0415

    return f"cuda:{local_rank}" if torch.cuda.is_available() else None


# --- results files -------------------------------------------------------------------------------------------


def record_key(record: Mapping[str, Any]) -> tuple[str, int, str]:
    return str(record["problem_id"]), int(record["sample"]), str(record["condition"])


def read_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The records of a results file; a final line cut short (a kill mid-write) is dropped.

    ``repair=True`` (for the file this process is about to append to) also cuts that partial line from the
    file, so the next line does not glue onto it. A bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    pieces = data.split(b"\n")
    records: list[dict] = []
    offset = 0
    for lineno, raw in enumerate(pieces, start=1):
        last = lineno == len(pieces)
        if raw.strip():
            try:
                record = json.loads(raw)
                record_key(record)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                if not last:
                    raise StepscopeError(f"{path}:{lineno} is not a result line; fix or remove that line") from None
                if repair:
                    _truncate(path, offset)
                break
            records.append(record)
            if last and repair:  # complete but unterminated: terminate it before appending
                with path.open("ab") as fh:
                    fh.write(b"\n")
        offset += len(raw) + 1
    return records


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


def result_files(directory: str | os.PathLike) -> list[Path]:
    """``results.jsonl`` and every shard file in a run directory, in a fixed order."""
    directory = Path(directory)
    shards = sorted((p for p in directory.glob("results.shard-*-of-*.jsonl") if _SHARD_FILE.fullmatch(p.name)),
                    key=lambda p: tuple(int(x) for x in _SHARD_FILE.fullmatch(p.name).groups())[::-1])
    main = directory / RESULTS_NAME
    return ([main] if main.is_file() else []) + shards


def merge_results(source: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[dict], int]:
    """Records of a run directory (all its results files) or of given files, each key once; and the
    number of duplicate lines dropped (the first line of a key wins)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = result_files(source)
    elif isinstance(source, (str, os.PathLike)):
        files = [Path(source)]
    else:
        files = [Path(p) for p in source]
    seen: set[tuple[str, int, str]] = set()
    merged: list[dict] = []
    duplicates = 0
    for path in files:
        for record in read_results(path):
            key = record_key(record)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            merged.append(record)
    return merged, duplicates


# --- run directory ----------------------------------------------------------------------------------------------


def read_run_file(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / RUN_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise StepscopeError(f"cannot read {path} ({exc}); remove it only if the directory holds no results") from None
    if not isinstance(data, dict) or "config" not in data:
        raise StepscopeError(f"{path} is not a stepscope run file")
    return data


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write through a temporary file and rename: concurrent shard processes never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _create_json(path: Path, data: Mapping[str, Any]) -> bool:
    """Create ``path`` only if absent (atomically: a hard link fails when the name exists); False if it was there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: fall back to a plain rename
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
    return True


def prepare_run_dir(directory: str | os.PathLike, config: RunConfig) -> Path:
    """Create the run directory and its ``run.json``, or check that an existing one holds the same config."""
    from .. import __version__  # noqa: PLC0415 - avoid a cycle at import time

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StepscopeError(f"cannot create the run directory {directory} ({exc.strerror or exc}); "
                             "pass a writable --out") from None
    existing = read_run_file(directory)
    if existing is None:
        if result_files(directory):
            raise StepscopeError(f"{directory} holds results but no {RUN_NAME}; use another --out")
        fresh = {"format": "stepscope.eval-run", "config": config.to_dict(), "run_id": config.fingerprint(),
                 "info": {"stepscope_version": __version__}}
        try:
            if _create_json(directory / RUN_NAME, fresh):
                return directory
        except OSError as exc:
            raise StepscopeError(f"cannot write {directory / RUN_NAME} ({exc.strerror or exc}); "
                                 "pass a writable --out") from None
        existing = read_run_file(directory)  # another shard process created it first: check against that
        if existing is None:
            raise StepscopeError(f"{directory / RUN_NAME} exists but is not a file; pass another --out")
    diffs = config.differences(existing["config"])
    unrecorded = [k for k, old, _ in diffs if k in _OPTIONAL_FIELDS and old == "<absent>"]
    if unrecorded:
        warnings.warn(f"{directory} was started before stepscope recorded {', '.join(unrecorded)}; resuming "
                      "without checking them, so use the same settings as when it was started")
        diffs = [d for d in diffs if d[0] not in unrecorded]
    if diffs:
        shown = "; ".join(f"{k} is {_short(a)} there, {_short(b)} now{_FIELD_NOTES.get(k, '')}"
                          for k, a, b in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise StepscopeError(
            f"{directory} already holds a run with a different config: {shown}{more}. Re-run with the same "
            "settings to resume it, or pass another --out for a new run"
        )
    old = existing.get("info", {}).get("stepscope_version")
    if old and old != __version__:
        warnings.warn(f"{directory} was started with stepscope {old}; resuming it with {__version__}")
    return directory


def update_run_info(directory: str | os.PathLike, **info: Any) -> None:
    """Add facts known only after loading the model (resolved layer bands, library versions) to run.json."""
    directory = Path(directory)
    data = read_run_file(directory)
    if data is None:
        raise StepscopeError(f"{directory} has no {RUN_NAME}; call prepare_run_dir first")
    data.setdefault("info", {}).update(info)
    _write_json_atomic(directory / RUN_NAME, data)


_FIELD_NOTES = {"model_files": " (the checkpoint's config or weight files changed)"}


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def trace_names(problems: Sequence[Problem]) -> dict[str, str]:
    """A file-name-safe, unique stem per problem id (``gsm8k/12`` -> ``gsm8k-12``)."""
    names: dict[str, str] = {}
    for p in problems:
        names[p.id] = re.sub(r"[^A-Za-z0-9._-]", "_", p.id.replace("/", "-"))[:100] or "problem"
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    for pid, name in names.items():
        if counts[name] > 1:  # two ids sanitised to one name: tell them apart by a hash of the id
            names[pid] = f"{name}-{hashlib.sha1(pid.encode()).hexdigest()[:8]}"
    return names


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
    shard: Shard = Shard(),
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
    from .graders import grade_many  # noqa: PLC0415 - keeps importing the runner light

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
    with (nullcontext(lock.handle) if lock is not None else _locked_append(results_path)) as fh:
        read_results(results_path, repair=True)
        done_records, _ = merge_results(out)
        done = {record_key(r) for r in done_records}
        names = trace_names(problems) if save_traces else {}
        bar = _Progress(units, config, done_records, enabled=progress)
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


@dataclass(frozen=True)
class ResultsLock:
    """A shard's results file, open for appending and held against other processes (see :func:`lock_results`)."""

    path: Path
    handle: Any


@contextmanager
def lock_results(out: str | os.PathLike, shard: Shard = Shard()) -> Iterator[ResultsLock]:
    """Take this shard's results file in ``out`` (after :func:`prepare_run_dir`), refusing at once when another
    process is writing it; pass the lock to :func:`run_eval`. The lock is released when the block ends."""
    path = Path(out) / shard.results_name
    with _locked_append(path) as fh:
        yield ResultsLock(path, fh)


@contextmanager
def _locked_append(path: Path) -> Iterator[Any]:
    """Open the results file for appending, refusing if another process is appending to it."""
    try:
        fh = path.open("a", encoding="utf-8")
    except OSError as exc:
        raise StepscopeError(f"cannot write {path} ({exc.strerror or exc}); pass a writable --out") from None
    try:
        try:
            import fcntl  # noqa: PLC0415 - POSIX only; elsewhere the lock is skipped

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            raise StepscopeError(f"another process is writing {path}; wait for it or stop it before resuming") from None
        yield fh
    finally:
        fh.close()


def _prompt(problem: Problem, profile, instruction: bool) -> str:
    return build_user_message(problem, profile) if instruction else problem.question


def _run_batch(model, tokenizer, units: Sequence[_Unit], condition: Condition, config: RunConfig, out: Path,
               names: Mapping[str, str], grade: GradeFn) -> Iterator[dict]:
    """Generate and grade one batch of one condition; yield its result lines (traces saved first)."""
    from ..generation import generate  # noqa: PLC0415
    from ..profiles import get_profile  # noqa: PLC0415

    s = config.sampling
    profile = get_profile(None if config.profile == "auto" else config.profile, tokenizer)
    t0 = time.perf_counter()
    traces = generate(model, tokenizer, [_prompt(u.problem, profile, config.instruction) for u in units],
                      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                      seeds=[u.seed for u in units], batch_size=len(units), profile=profile,
                      stepflow=condition.stepflow, progress=False)
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
            "stop": trace.meta.get("stop"),
            "time_s": round(per_sample, 4),
            "trace": rel,
            "config": record_config,
        }


class _Progress:
    """A tqdm bar over this shard's samples with problems done, samples/s and accuracy per condition."""

    def __init__(self, units: Sequence[_Unit], config: RunConfig, done: Iterable[dict], enabled: bool):
        names = [c.name for c in config.conditions]
        ids = {u.problem.id for u in units}
        self._per_problem = len(names) * config.sampling.n
        self._left: dict[str, int] = {pid: self._per_problem for pid in ids}
        self._right = {n: 0 for n in names}
        self._seen = {n: 0 for n in names}
        for record in done:
            if record["problem_id"] in ids and record["condition"] in self._right:
                self._count(record)
        self._written, self._t0 = 0, time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm  # noqa: PLC0415

            total = len(units) * len(names)
            self._bar = tqdm(total=total, initial=sum(self._seen.values()), unit="sample", desc="eval",
                             dynamic_ncols=True, file=sys.stderr)
            self._bar.set_postfix_str(self._postfix())

    def _count(self, record: Mapping[str, Any]) -> None:
        self._seen[record["condition"]] += 1
        self._right[record["condition"]] += bool(record["correct"])
        self._left[record["problem_id"]] -= 1

    def _postfix(self) -> str:
        done = sum(1 for v in self._left.values() if v <= 0)
        rate = self._written / max(time.perf_counter() - self._t0, 1e-9)
        acc = " ".join(f"{n} {100 * self._right[n] / self._seen[n]:.1f}%" if self._seen[n] else f"{n} -"
                       for n in self._right)
        return f"problems {done}/{len(self._left)}, {rate:.2f} samples/s, acc {acc}"

    def update(self, record: Mapping[str, Any]) -> None:
        self._count(record)
        self._written += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
