"""Benchmark problems: a registry of sets as data, offline/hub loading, reasoning-gym tasks, prompts.

Offline copies are read from a user-given directory (``--data-dir`` or ``STEPSCOPE_DATA_DIR``) holding one
``<folder>/test.jsonl`` per set; they are never copied into this package. Without a directory the same sets
load from the Hugging Face hub through the optional ``datasets`` package.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import random
import re
import string
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StepscopeError
from ..extras import require
from ..profiles import PLAIN, PROFILES, FormatProfile, profile_names
from .grader_inputs import GraderInput, RgTask, task_from_meta

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "GRADERS",
    "INSTRUCTIONS",
    "DatasetSpec",
    "Problem",
    "QuestionTemplate",
    "build_user_message",
    "grader_names",
    "load_problems",
    "load_problems_from_file",
    "parse_indices",
    "parse_rg_params",
]

DATA_DIR_ENV = "STEPSCOPE_DATA_DIR"
GRADERS = ("math", "choice", "exact", "code", "rg")  # the built-in graders; plug-ins: graders.register_grader
_PLUGIN_GRADERS: list[str] = []


def grader_names() -> tuple[str, ...]:
    """Every known grader: the built-ins, then those registered by plug-ins (loaded on first use)."""
    from .. import plugins

    plugins.load("graders")
    return GRADERS + tuple(_PLUGIN_GRADERS)


def add_grader_name(name: str, instructions: Mapping[str, str] | None = None) -> None:
    """Record a plug-in grader and its prompt instruction per style (default: the ``exact`` grader's)."""
    instructions = dict(instructions or {})
    unknown = sorted(set(instructions) - set(INSTRUCTIONS))
    if unknown:
        raise StepscopeError(f"instructions for unknown prompt styles {unknown}; the styles are "
                             f"{', '.join(INSTRUCTIONS)}")
    for style, table in INSTRUCTIONS.items():
        table[name] = instructions.get(style, table["exact"])
    if name not in GRADERS and name not in _PLUGIN_GRADERS:
        _PLUGIN_GRADERS.append(name)
RG_PREFIX = "rg:"
ORGANISM_PREFIX = "organism:"


@dataclass(frozen=True)
class Problem:
    """One benchmark item: the bare question, the gold answer (test code for code tasks), how to grade it.

    ``task``: what the grader needs beyond question and answer (:mod:`~stepscope.evaluation.grader_inputs`); when
    not given it is read from the meta keys (:func:`~stepscope.evaluation.grader_inputs.task_from_meta`).
    ``meta``: provenance for display (dataset, index, source id, the row's other fields). ``instruction``: which
    answer-format instruction the prompt appends: None for the grader's, a kind of :data:`INSTRUCTIONS` (e.g.
    ``"code_stdio"``), or :data:`NO_INSTRUCTION` for the bare question. None of the three enters the problem set's
    hash.
    """

    id: str
    question: str
    answer: str
    grader: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    task: GraderInput | None = field(default=None, compare=False, hash=False)
    instruction: str | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.task is None:  # a problem made from meta keys alone (a user's JSONL, older code)
            object.__setattr__(self, "task", task_from_meta(self.grader, self.meta))


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives and how its rows map onto :class:`Problem` (data, not code).

    ``question_field`` may name several candidates; the first present in a row is used (the hub and the
    offline copy of a set do not always agree). ``answer_format`` and ``row_adapter`` name entries of small
    tables below. ``offline_dir`` is the folder under the data directory, or None for hub-only sets.
    """

    name: str
    hub_id: str
    hub_config: str | tuple[str, ...] | None
    split: str
    question_field: str | tuple[str, ...]
    answer_field: str
    id_field: str | None
    grader: str
    offline_dir: str | None
    answer_format: str = "text"
    meta_fields: tuple[str, ...] = ()
    numeric: bool = False
    row_adapter: str | None = None
    hub_kwargs: tuple[tuple[str, Any], ...] = ()
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("gsm8k", "openai/gsm8k", "main", "test", "question", "answer", "idx", "math", "gsm8k",
                    answer_format="gsm8k", numeric=True, row_adapter="gsm8k",
                    description="grade-school math, 1319 problems"),
        DatasetSpec("math500", "HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "unique_id", "math",
                    "math500", meta_fields=("subject", "level"), description="MATH-500 competition math"),
        DatasetSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", ("problem", "question"), "answer", "id",
                    "math", "aime24", numeric=True, meta_fields=("url",), description="AIME 2024 I and II"),
        DatasetSpec("aime25", "opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test",
                    ("problem", "question"), "answer", None, "math", "aime25", numeric=True,
                    description="AIME 2025 I and II"),
        DatasetSpec("amc23", "math-ai/amc23", None, "test", ("problem", "question"), "answer", "id", "math",
                    "amc23", answer_format="number", numeric=True, meta_fields=("url",),
                    description="AMC 12 2023"),
        DatasetSpec("gpqa_diamond", "Idavidrein/gpqa", "gpqa_diamond", "train", "question", "answer", None,
                    "choice", "gpqa_diamond", row_adapter="gpqa",
                    description="GPQA-Diamond, four-option science questions"),
        DatasetSpec("humaneval", "openai/openai_humaneval", None, "test", "prompt", "test", "task_id", "code",
                    "humaneval", meta_fields=("entry_point", "canonical_solution"),
                    description="HumanEval function completion, graded by its tests"),
        DatasetSpec("livecodebench", "livecodebench/code_generation_lite", None, "test", "question_content",
                    "private_test_cases", "question_id", "code", None, row_adapter="livecodebench",
                    hub_kwargs=(("version_tag", "release_v5"),),
                    description="LiveCodeBench code generation (hub only)"),
    )
}


# --- answers and rows -------------------------------------------------------------------------------


def _number_text(value: Any) -> str:
    """27.0 -> '27', 2.5 -> '2.5', '27.0' -> '27'; anything else as text."""
    try:
        number = float(str(value).replace(",", "").strip())
    except ValueError:
        return str(value).strip()
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def _gsm8k_answer(value: Any) -> str:
    """The number after ``####`` in a worked solution, commas removed."""
    text = str(value)
    tail = text.rsplit("####", 1)[-1] if "####" in text else text.strip().splitlines()[-1]
    return tail.strip().replace(",", "").rstrip(".")


_ANSWER_FORMATS: dict[str, Callable[[Any], str]] = {
    "text": lambda value: str(value).strip(),
    "number": _number_text,
    "gsm8k": _gsm8k_answer,
}


def _gpqa_row(row: dict, index: int) -> dict:
    """Hub GPQA rows hold the correct and three wrong options apart: shuffle them into A-D, stably."""
    if "Correct Answer" not in row:
        return row
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(f"gpqa_diamond/{index}").shuffle(order)
    letters = "ABCD"
    lines = [f"{letters[pos]}) {str(options[k]).strip()}" for pos, k in enumerate(order)]
    question = str(row["Question"]).strip() + "\n\n" + "\n".join(lines)
    return {"question": question, "answer": letters[order.index(0)]}


def _livecodebench_row(row: dict, index: int) -> dict:
    """Build the prompt from statement and starter code; keep the encoded tests for the sandboxed harness."""
    starter = (row.get("starter_code") or "").strip()
    question = str(row.get("question_content", "")).strip()
    if starter:
        question += f"\n\nUse this starter code:\n```python\n{starter}\n```"
    try:
        public = json.loads(row.get("public_test_cases") or "[]")
    except (TypeError, ValueError):
        public = []
    functional = bool(public) and public[0].get("testtype") == "functional"
    try:
        fn_name = json.loads(row.get("metadata") or "{}").get("func_name")
    except (TypeError, ValueError, AttributeError):
        fn_name = None
    tests = {
        "public": row.get("public_test_cases") or "[]",
        "private": row.get("private_test_cases") or "",
        "fn_name": fn_name,
    }
    return {
        "question_content": question,
        "private_test_cases": json.dumps(tests),
        "question_id": row.get("question_id", index),
        "harness": "functional" if functional else "stdio",
        "instruction": "code" if functional else "code_stdio",  # read into Problem.instruction
        "platform": row.get("platform"),
        "difficulty": row.get("difficulty"),
        "contest_date": str(row.get("contest_date", "")),
    }


def _gsm8k_row(row: dict, index: int) -> dict:
    """Keep the worked solution (its ``<<a*b=c>>`` annotations are gold steps for the failing-step analysis)."""
    return {**row, "worked_solution": row.get("answer")}


_ROW_ADAPTERS: dict[str, Callable[[dict, int], dict]] = {"gpqa": _gpqa_row, "livecodebench": _livecodebench_row,
                                                         "gsm8k": _gsm8k_row}
_ADAPTER_META: dict[str, tuple[str, ...]] = {
    "gsm8k": ("worked_solution",),
    "livecodebench": ("harness", "platform", "difficulty", "contest_date"),
}


def _pick_field(row: Mapping, candidates: str | tuple[str, ...], what: str, where: str) -> Any:
    names = (candidates,) if isinstance(candidates, str) else candidates
    for name in names:
        if name in row:
            return row[name]
    raise StepscopeError(
        f"{where} has no {what} field {' or '.join(map(repr, names))} (fields: {', '.join(map(str, row))}); "
        "check the file or pass the right field name"
    )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _damaged_row(spec: DatasetSpec, index: int, where: str, what: str) -> StepscopeError:
    # refused rather than skipped: a silently smaller set would no longer be the published benchmark
    return StepscopeError(
        f"{where} ({spec.name} problem {index}) has {what}; the copy looks damaged: fetch it again, or leave "
        "that problem out with --indices"
    )


def _problem_from_row(spec: DatasetSpec, row: dict, index: int, where: str) -> Problem:
    if spec.row_adapter:
        row = _ROW_ADAPTERS[spec.row_adapter](row, index)
    raw_question = _pick_field(row, spec.question_field, "question", where)
    raw_answer = _pick_field(row, spec.answer_field, "answer", where)
    for value, what in ((raw_question, "question"), (raw_answer, "answer")):
        if _blank(value):
            raise _damaged_row(spec, index, where, f"{'a null' if value is None else 'an empty'} {what}")
    question = str(raw_question)
    answer = _ANSWER_FORMATS[spec.answer_format](raw_answer)
    if not answer.strip():  # e.g. a GSM8K solution with nothing after its ####
        raise _damaged_row(spec, index, where, "no answer after formatting")
    meta: dict[str, Any] = {"dataset": spec.name, "index": index}
    if spec.numeric:
        meta["numeric"] = True
    if spec.id_field and spec.id_field in row:
        meta["source_id"] = row[spec.id_field]
    for name in spec.meta_fields + _ADAPTER_META.get(spec.row_adapter or "", ()):
        if name in row:
            meta[name] = row[name]
    instruction = row.get("instruction") if spec.row_adapter else None  # set by an adapter, never by a hub row
    return Problem(f"{spec.name}/{index}", question, answer, spec.grader, meta, task_from_meta(spec.grader, meta),
                   instruction)


# --- selection ----------------------------------------------------------------------------------------


def parse_indices(text: str) -> list[int]:
    """Parse a CLI index list like ``"0-4,17,20"`` into ``[0, 1, 2, 3, 4, 17, 20]``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise StepscopeError(f"bad index {part!r}: write indices like 0-4,17,20")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo:
            raise StepscopeError(f"bad index range {part!r}: the end must not be below the start")
        out.extend(range(lo, hi + 1))
    return out


def _check_selection(count: int, limit: int | None, indices: Sequence[int] | None, what: str) -> list[int]:
    """Row numbers to keep: ``indices`` (validated) or all rows, then the first ``limit`` of them."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise StepscopeError(f"--limit must be a positive whole number, got {limit!r}")
    if indices is None:
        rows = list(range(count))
    else:
        rows = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise StepscopeError(f"problem indices must be whole numbers, got {i!r}")
            if not 0 <= i < count:
                raise StepscopeError(
                    f"index {i} is out of range: {what} has {count} problems (indices 0..{count - 1})"
                )
            rows.append(i)
        if len(set(rows)) != len(rows):
            raise StepscopeError("problem indices repeat; list each index once")
    return rows[:limit] if limit is not None else rows


def _select(rows: Sequence[Any], limit: int | None, indices: Sequence[int] | None, what: str) -> list[tuple[int, Any]]:
    return [(i, rows[i]) for i in _check_selection(len(rows), limit, indices, what)]


# --- loading ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line, with a clear error naming a bad line."""
    if path.is_dir():
        raise StepscopeError(f"{path} is a directory; pass a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise StepscopeError(f"no such file: {path}; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark from an editor is not an error
    except UnicodeDecodeError:
        raise StepscopeError(f"{path} is not UTF-8 text; pass a JSONL file (one JSON object per line)") from None
    except OSError as exc:
        raise StepscopeError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows: list[tuple[int, dict]] = []
    # split on "\n" only: str.splitlines would also cut inside strings holding U+2028 and shift line numbers
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StepscopeError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise StepscopeError(f"{path}:{lineno} is not a JSON object; write one object per line")
        rows.append((lineno, obj))
    return rows


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return Path(data_dir).expanduser() if data_dir is not None else None


def _load_hub_rows(spec: DatasetSpec) -> list[dict]:
    """All rows of a set from the Hugging Face hub (needs the optional ``datasets`` package)."""
    try:
        import datasets  # optional, only for online use
    except ImportError:
        raise StepscopeError(
            f"no data directory for {spec.name}: pass --data-dir DIR (a folder with {spec.offline_dir or spec.name}/"
            f"test.jsonl) or set {DATA_DIR_ENV}, or install the `datasets` package to load {spec.hub_id} from the hub"
        ) from None
    configs = spec.hub_config if isinstance(spec.hub_config, tuple) else (spec.hub_config,)
    rows: list[dict] = []
    try:
        for config in configs:
            ds = datasets.load_dataset(spec.hub_id, config, split=spec.split, **dict(spec.hub_kwargs))
            rows.extend(dict(r) for r in ds)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "could not load"
        hint = "" if spec.offline_dir is None else \
            f", or pass --data-dir DIR with an offline {spec.offline_dir}/test.jsonl"
        first = (str(exc).splitlines() or [""])[0][:200]
        raise StepscopeError(
            f"could not load {spec.hub_id} from the hub ({type(exc).__name__}: {first})"
            f"; check the network and hub access{hint}"
        ) from None
    return rows


def _unknown_dataset(name: str) -> StepscopeError:
    close = difflib.get_close_matches(name, list(DATASETS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return StepscopeError(
        f"unknown dataset {name!r}{hint}; choose one of {', '.join(DATASETS)}, rg:<task> for a reasoning-gym "
        "task, or a JSONL file of your own"
    )


def load_problems(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
    rg_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    size: int | None = None,
) -> list[Problem]:
    """Load a named benchmark (offline from ``data_dir`` or the hub), or generate ``rg:<task>`` or
    ``organism:<difficulty>`` problems (``size`` of them, default ``limit`` or 100 for the organism)."""
    if name.startswith(ORGANISM_PREFIX):
        if rg_params:
            raise StepscopeError("--rg only applies to rg:<task> datasets; drop it for " + name)
        return _load_organism(name[len(ORGANISM_PREFIX):], seed, organism_set_size(size, limit), limit, indices)
    if name.startswith(RG_PREFIX):
        return _load_rg(name[len(RG_PREFIX):], rg_params or {}, seed, size, limit, indices)
    if rg_params:
        raise StepscopeError("--rg-param only applies to rg:<task> datasets; drop it for " + name)
    spec = DATASETS.get(name)
    if spec is None:
        raise _unknown_dataset(name)
    directory = _resolve_data_dir(data_dir)
    if directory is not None:
        if spec.offline_dir is None:
            raise StepscopeError(
                f"{name} has no offline copy and needs the Hugging Face hub ({spec.hub_id}): run without "
                f"--data-dir / {DATA_DIR_ENV}, with network access and the `datasets` package installed"
            )
        path = directory / spec.offline_dir / "test.jsonl"
        if not path.is_file():
            raise StepscopeError(
                f"no offline copy of {name} at {path}; pass --data-dir DIR where DIR/{spec.offline_dir}/test.jsonl "
                "exists"
            )
        rows = _read_jsonl(path)
        chosen = _select(rows, limit, indices, name)
        return [_problem_from_row(spec, row, i, f"{path}:{lineno}") for i, (lineno, row) in chosen]
    hub_rows = _load_hub_rows(spec)
    chosen_hub = _select(hub_rows, limit, indices, name)
    return [_problem_from_row(spec, row, i, f"{spec.hub_id} row {i}") for i, row in chosen_hub]


@dataclass(frozen=True)
class QuestionTemplate:
    """A user's question built from several row fields, e.g. ``"{Body} {Question}"`` (Python format syntax).

    Only plain field names are allowed: ``{row.attr}`` and ``{row[0]}`` would reach into Python objects, and
    positional ``{}`` has nothing to fill it.
    """

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> QuestionTemplate:
        hint = 'write row fields in braces, e.g. --question-template "{Body} {Question}"'
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise StepscopeError(f"bad --question-template {text!r} ({exc}); {hint}") from None
        names: list[str] = []
        for _, name, spec, _ in parts:
            if name is None:
                continue
            if not name or name.isdigit():
                raise StepscopeError(f"--question-template {text!r} has a positional field {{{name}}}; {hint}")
            if any(c in name for c in ".[]"):
                raise StepscopeError(f"--question-template field {{{name}}} must be a plain row field name; {hint}")
            if spec and "{" in spec:
                raise StepscopeError(f"--question-template field {{{name}}} has a nested field in its format; {hint}")
            if name not in names:
                names.append(name)
        if not names:
            raise StepscopeError(f"--question-template {text!r} names no row field; {hint}")
        return cls(text, tuple(names))

    def render(self, row: Mapping[str, Any], where: str) -> str:
        out: list[str] = []
        for literal, name, spec, conversion in string.Formatter().parse(self.text):
            out.append(literal)
            if name is None:
                continue
            if name not in row:
                raise StepscopeError(
                    f"{where} has no field {name!r} named in --question-template (fields: {', '.join(map(str, row))})"
                )
            value = row[name]
            if value is None:
                raise StepscopeError(f"{where}: field {name!r} of --question-template is null; fill it or remove "
                                     "that line")
            if isinstance(value, (list, dict)):
                raise StepscopeError(f"{where}: field {name!r} of --question-template holds a JSON "
                                     f"{'array' if isinstance(value, list) else 'object'}; it must be text or a number")
            if conversion:
                conversions: dict[str, Callable[[Any], str]] = {"r": repr, "s": str, "a": ascii}
                value = conversions[conversion](value)
            try:
                out.append(format(value, spec or ""))
            except (ValueError, TypeError) as exc:
                raise StepscopeError(f"{where}: field {name!r} does not fit its format {spec!r} ({exc})") from None
        return "".join(out)


# Fields that usually hold part of the problem beside the question (SVAMP and ASDiv: Body + Question).
_CONTEXT_FIELDS = ("body", "premise", "context", "passage", "story", "background", "scenario", "preamble")


def _user_text(value: Any, what: str, field_name: str, where: str) -> str:
    """The question (or answer) of a user row as text; null, empty, arrays and objects are refused."""
    if value is None:
        raise StepscopeError(f"{where}: the {what} field {field_name!r} is null; fill it or remove that line")
    if isinstance(value, (list, dict)):
        kind = "an array" if isinstance(value, list) else "an object"
        raise StepscopeError(f"{where}: the {what} field {field_name!r} holds {kind}; write it as text or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise StepscopeError(f"{where}: the {what} field {field_name!r} is {value}; write a finite number or text")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = _number_text(value)
    else:
        text = str(value)
    if not text.strip():
        raise StepscopeError(f"{where}: the {what} field {field_name!r} is empty; fill it or remove that line")
    return text


def _warn_unused_context(path: Path, rows: Sequence[Mapping[str, Any]], question_field: str) -> None:
    """Warn once when rows carry premise-like fields that a single question field leaves out of the prompt."""
    counts: dict[str, int] = {}
    for row in rows:
        for name, value in row.items():
            if name != question_field and str(name).lower() in _CONTEXT_FIELDS and isinstance(value, str) \
                    and value.strip():
                counts[name] = counts.get(name, 0) + 1
    if counts:
        names = sorted(counts, key=lambda n: (-counts[n], n))
        template = " ".join(f"{{{n}}}" for n in [*names, question_field])
        warnings.warn(
            f"{path}: field{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} beside the question field "
            f"{question_field!r} {'are' if len(names) > 1 else 'is'} not in the prompt (in {max(counts.values())} "
            f"of {len(rows)} rows); pass --question-template \"{template}\" to include them",
            stacklevel=3,
        )


def load_problems_from_file(
    path: str | os.PathLike,
    *,
    question_field: str | None = None,
    answer_field: str,
    grader: str,
    id_field: str | None = None,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
    question_template: str | None = None,
) -> list[Problem]:
    """Load the user's own JSONL; fields other than question and answer are kept in ``meta``.

    The question is the row's ``question_field`` (default ``"question"``), or ``question_template`` filled
    from the row's fields (e.g. ``"{Body} {Question}"``); give one of the two. A null or empty question or
    answer is refused with its line number, so nothing is evaluated against a made-up gold such as "None".
    """
    if grader not in grader_names():
        raise StepscopeError(f"unknown grader {grader!r}; choose one of {', '.join(grader_names())}")
    if question_template is not None and question_field is not None:
        raise StepscopeError("give --question-field or --question-template, not both")
    template = QuestionTemplate.parse(question_template) if question_template is not None else None
    question_field = question_field or "question"
    path = Path(path).expanduser()
    rows = _read_jsonl(path)
    if not rows:
        raise StepscopeError(f"{path} holds no problems; write one JSON object per line")
    chosen = _select(rows, limit, indices, str(path))
    if template is None:
        _warn_unused_context(path, [row for _, (_, row) in chosen], question_field)
    used = set(template.fields) if template is not None else {question_field}
    problems = []
    for i, (lineno, row) in chosen:
        where = f"{path}:{lineno}"
        if template is not None:
            question = template.render(row, where)
            if not question.strip():
                raise StepscopeError(f"{where}: --question-template gives an empty question; fill its fields")
        else:
            raw_question = _pick_field(row, question_field, "question", where)
            _user_text(raw_question, "question", question_field, where)
            question = str(raw_question)  # unchanged text: the problems' hash of existing runs must not move
        answer = _user_text(_pick_field(row, answer_field, "answer", where), "answer", answer_field, where)
        if id_field is not None:
            raw_id = _pick_field(row, id_field, "id", where)
            _user_text(raw_id, "id", id_field, where)  # refuses a null or empty id
            pid = str(raw_id)  # as before, so ids (and the problems' hash) of existing runs stay the same
        else:
            pid = f"{path.stem}/{i}"
        meta = {k: v for k, v in row.items() if k not in used and k != answer_field}
        meta.update(dataset=path.stem, index=i)
        problems.append(Problem(pid, question, answer, grader, meta, task_from_meta(grader, meta)))
    if id_field is not None and len({p.id for p in problems}) != len(problems):
        raise StepscopeError(f"ids in field {id_field!r} of {path} repeat; problem ids must be unique")
    return problems


# --- reasoning-gym ---------------------------------------------------------------------------------------


def _convert_scalar(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, '[1, 2]' -> [1, 2]; other text stays text."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text.strip()


def parse_rg_params(items: Iterable[str]) -> dict[str, Any]:
    """Turn CLI strings like ``min_terms=3`` or ``ops=+,-`` into keyword arguments for a task's config."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise StepscopeError(f"bad reasoning-gym parameter {item!r}: write KEY=VALUE, e.g. min_terms=3")
        if key in params:
            raise StepscopeError(f"reasoning-gym parameter {key!r} is given twice; give it once")
        value = value.strip()
        is_list = "," in value and not value.startswith(("[", "(", "{", '"', "'"))
        params[key] = [_convert_scalar(v) for v in value.split(",")] if is_list else _convert_scalar(value)
    return params


def _rg_tasks() -> list[str]:
    RG_DATASETS = require("reasoning_gym.factory", "reasoning-gym tasks").DATASETS  # heavy, on demand

    return sorted(RG_DATASETS)


def organism_set_size(size: int | None, limit: int | None) -> int:
    """How many ``organism:`` problems a selection generates: ``size``, else ``limit``, else 100."""
    return size or limit or 100


def _load_organism(difficulty: str, seed: int, size: int, limit, indices) -> list[Problem]:
    """The organism's evaluation problems (math grader). The organism was trained on the bare question, so the
    prompt carries no instruction."""
    from ..organism.tasks import organism_problems  # only this dataset needs it

    if indices:
        size = max(size, max(indices) + 1)
    records = organism_problems(difficulty, size, seed)
    name = ORGANISM_PREFIX + difficulty
    problems = []
    for i, rec in _select(records, limit, indices, name):
        meta = {**rec["meta"], "dataset": name, "index": i}
        problems.append(Problem(str(rec["id"]), rec["question"], rec["answer"], "math", meta,
                                instruction=NO_INSTRUCTION))
    return problems


def _load_rg(task: str, params: Mapping[str, Any], seed: int, size: int | None, limit, indices) -> list[Problem]:
    """Generate reasoning-gym problems offline; item i depends on the seed and i, not on ``size``."""
    reasoning_gym = require("reasoning_gym", "reasoning-gym tasks")

    tasks = _rg_tasks()
    if task not in tasks:
        close = difflib.get_close_matches(task, tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise StepscopeError(
            f"unknown reasoning-gym task {task!r}{hint}; list the tasks with "
            "python -c \"import reasoning_gym.factory as f; print(sorted(f.DATASETS))\""
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise StepscopeError(f"--size must be a positive whole number, got {size!r}")
    if size is None:
        size = max([100, limit or 0, *(i + 1 for i in (indices or []) if isinstance(i, int) and i >= 0)])
    try:
        dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **dict(params))
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise StepscopeError(
            f"reasoning-gym task {task!r} rejected its parameters {dict(params)} ({type(exc).__name__}: {exc}); "
            "see the task's config class for valid names and ranges"
        ) from None
    problems = []
    for i in _check_selection(size, limit, indices, f"rg:{task} (size {size})"):
        entry = dataset[i]
        meta = {"dataset": f"rg:{task}", "index": i, "task": task, "entry": entry, "rg_params": dict(params),
                "seed": seed, "size": size}
        answer = entry.get("answer")
        problems.append(Problem(f"rg:{task}/{i}", str(entry["question"]), "" if answer is None else str(answer),
                                "rg", meta, RgTask(task, entry, meta["rg_params"], seed, size)))
    return problems


# --- prompts ---------------------------------------------------------------------------------------------

# Instruction appended to the question, by prompt style and problem kind (Problem.instruction, else the grader).
NO_INSTRUCTION = "none"  # Problem.instruction of problems prompted with the bare question (the organism's)
_THINK_MATH = "Please reason step by step, and put your final answer within \\boxed{}."
_PLAIN_MATH = PLAIN.instruction  # what the command line appends to a plain model's question, too
INSTRUCTIONS: dict[str, dict[str, str]] = {
    "think": {
        "math": _THINK_MATH,
        "exact": _THINK_MATH,
        "rg": _THINK_MATH,
        "choice": "Please reason step by step, and put the letter of the correct option (A, B, C or D) "
                  "within \\boxed{}.",
        "code": "Please reason step by step, then write the complete Python function, with any imports it "
                "needs, in a single ```python code block.",
        "code_stdio": "Please reason step by step, then write a complete Python program that reads the input "
                      "from standard input and writes the answer to standard output, in a single ```python "
                      "code block.",
    },
    "plain": {
        "math": _PLAIN_MATH,
        "exact": _PLAIN_MATH,
        "rg": _PLAIN_MATH,
        "choice": "Solve the problem step by step, one short sentence per step. "
                  "End with a last line of the form 'Final answer: <letter>'.",
        "code": "Think step by step, one short sentence per step, then write the complete Python function "
                "in a single ```python code block.",
        "code_stdio": "Think step by step, one short sentence per step, then write a complete Python program "
                      "that reads standard input and writes standard output, in a single ```python code block.",
    },
}


def build_user_message(problem: Problem, profile: Any) -> str:
    """The user turn: the question plus the answer-format instruction for this model profile."""
    if not isinstance(profile, FormatProfile):
        if profile not in profile_names():
            raise StepscopeError(f"unknown prompt profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    style = profile.prompt_style
    if problem.instruction == NO_INSTRUCTION:
        return problem.question
    if problem.instruction is not None and problem.instruction not in INSTRUCTIONS[style]:
        raise StepscopeError(f"no prompt instruction of kind {problem.instruction!r}; known: "
                             f"{', '.join(INSTRUCTIONS[style])}, or {NO_INSTRUCTION!r} for the bare question")
    instruction = INSTRUCTIONS[style].get(problem.instruction or problem.grader)
    if instruction is None:
        raise StepscopeError(f"no prompt instruction for problems graded by {problem.grader!r}")
    return f"{problem.question.rstrip()}\n\n{instruction}"
