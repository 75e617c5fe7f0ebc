"""The results store of an eval run: its directory, ``run.json``, the results files and the lock on them.

A run directory holds ``run.json`` (the :class:`~stepscope.evaluation.run_config.RunConfig` that defines it, its
run id and facts recorded after the model loads), one results file per shard (one JSON line per graded sample,
keyed by problem id, sample and condition) and, optionally, ``traces/<condition>/``. Lines are appended and
flushed one at a time, so a stopped run resumes where it stopped: finished keys are skipped, a line cut short
by a kill is dropped (and cut from the file this process appends to), and nothing is written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..errors import StepscopeError
from .datasets import Problem
from .run_config import OPTIONAL_FIELDS, RunConfig
from .shards import RESULTS_NAME, SHARD_FILE, WHOLE_RUN, Shard

__all__ = [
    "RESULTS_NAME",
    "RUN_NAME",
    "TRACES_DIR",
    "ResultsLock",
    "lock_results",
    "merge_results",
    "prepare_run_dir",
    "read_results",
    "read_run_file",
    "record_key",
    "result_files",
    "trace_names",
    "update_run_info",
]

RUN_NAME = "run.json"
TRACES_DIR = "traces"


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
    numbered = [(n, p) for p in directory.glob("results.shard-*-of-*.jsonl") if (n := _shard_numbers(p)) is not None]
    shards = [p for _, p in sorted(numbered, key=lambda item: item[0][::-1])]  # by shard count, then index
    main = directory / RESULTS_NAME
    return ([main] if main.is_file() else []) + shards


def _shard_numbers(path: Path) -> tuple[int, int] | None:
    """(index, count) of a shard's results file name, or None for any other name."""
    match = SHARD_FILE.fullmatch(path.name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


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
    from .. import __version__  # avoid a cycle at import time

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
    unrecorded = [k for k, old, _ in diffs if k in OPTIONAL_FIELDS and old == "<absent>"]
    if unrecorded:
        warnings.warn(f"{directory} was started before stepscope recorded {', '.join(unrecorded)}; resuming "
                      "without checking them, so use the same settings as when it was started", stacklevel=2)
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
        warnings.warn(f"{directory} was started with stepscope {old}; resuming it with {__version__}", stacklevel=2)
    return directory


def update_run_info(directory: str | os.PathLike, **info: Any) -> None:
    """Add facts known only after loading the model (resolved layer bands, library versions) to run.json."""
    directory = Path(directory)
    data = read_run_file(directory)
    if data is None:
        raise StepscopeError(f"{directory} has no {RUN_NAME}; call prepare_run_dir first")
    data.setdefault("info", {}).update(info)
    write_json_atomic(directory / RUN_NAME, data)  # concurrent shard processes never see half a file


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


# --- the lock on a results file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultsLock:
    """A shard's results file, open for appending and held against other processes (see :func:`lock_results`)."""

    path: Path
    handle: Any


@contextmanager
def lock_results(out: str | os.PathLike, shard: Shard = WHOLE_RUN) -> Iterator[ResultsLock]:
    """Take this shard's results file in ``out`` (after :func:`prepare_run_dir`), refusing at once when another
    process is writing it; pass the lock to :func:`~.runner.run_eval`. The lock is released when the block ends."""
    path = Path(out) / shard.results_name
    with locked_append(path) as fh:
        yield ResultsLock(path, fh)


@contextmanager
def locked_append(path: Path) -> Iterator[Any]:
    """Open the results file for appending, refusing if another process is appending to it."""
    try:
        fh = path.open("a", encoding="utf-8")
    except OSError as exc:
        raise StepscopeError(f"cannot write {path} ({exc.strerror or exc}); pass a writable --out") from None
    try:
        try:
            import fcntl  # POSIX only; elsewhere the lock is skipped

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            raise StepscopeError(f"another process is writing {path}; wait for it or stop it before resuming") from None
        yield fh
    finally:
        fh.close()
