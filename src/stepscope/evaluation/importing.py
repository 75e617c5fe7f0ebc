"""Responses generated elsewhere (vLLM, an OpenAI-style server, lm-eval, lighteval, any JSONL) as stepscope traces.

Reading is apart from building: one reader per file format turns records into :class:`ImportedSample` objects
(text, and token ids where the file has them), :func:`detect_format` picks the reader, and
:func:`import_samples` tokenises each sample once with the analysed model's tokenizer, segments it into a
:class:`~stepscope.trace.Trace` (exact token spans, from token ids) and writes a results directory laid out
like an ``eval`` run: ``results.jsonl``, ``traces/<condition>/`` and ``import.json`` (what was imported, from
where, how). ``report``, ``diagnose --trace`` and ``analyze --traces`` read it as they read an eval run.

Samples of one problem are numbered 0, 1, ... in file order. Imported samples carry no seed shared with
stepscope's own runs, so a comparison with StepFlow samples of the same problems is paired per problem, not
token for token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StepscopeError
from .datasets import Problem, grader_names

__all__ = [
    "FORMATS",
    "ImportOutcome",
    "ImportedSample",
    "detect_format",
    "import_samples",
    "match_problems",
    "read_file",
    "read_lighteval",
    "read_lm_eval",
    "read_openai",
    "read_plain",
]

FORMATS = ("openai", "lm-eval", "lighteval", "plain")
PROMPT_MODES = ("auto", "chat", "raw")
IMPORT_NAME = "import.json"

# Field names tried in order; a reader's caller may put its own first.
PROMPT_FIELDS = ("prompt", "question", "problem", "input", "query")
RESPONSE_FIELDS = ("response", "completion", "output", "generation", "generated_text", "model_output", "text")
GOLD_FIELDS = ("gold", "answer", "target", "ground_truth", "reference", "solution")
ID_FIELDS = ("problem_id", "id", "question_id", "task_id", "idx", "doc_id")
# sampling fields read from an OpenAI-style / vLLM request
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "max_tokens")
_FINISH = {"stop": "eos", "eos": "eos", "length": "length", "max_tokens": "length"}
# How a response whose reasoning a server returned apart (vLLM's reasoning parsers) is put back together, per
# trace profile: the model wrote the reasoning, then the marker that ends it, then the answer.
_REASONING_JOIN = {
    "think": "{open}{reasoning}</think>{content}",
    "harmony": "<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>"
               "{content}",
    "plain": "{reasoning}\n\n{content}",
}


@dataclass(frozen=True)
class ImportedSample:
    """One response read from a file, before tokenisation.

    ``prompt`` is the exact text the model was given (``raw``) or a user question to template (``chat``);
    ``messages`` a chat to template. ``prompt_ids`` / ``response_ids`` are the file's own token ids, when it has
    them. ``where`` names the record (``file:line``) in error messages.
    """

    where: str
    response: str
    file: str = ""
    prompt: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt_mode: str = "raw"  # how ``prompt`` became tokens: "raw" (as is) or "chat" (the chat template)
    question: str = ""  # the question as a person reads it (display; matching to a dataset)
    reasoning: str | None = None  # reasoning a server returned apart from ``response``
    prompt_ids: tuple[int, ...] | None = None
    response_ids: tuple[int, ...] | None = None
    problem_id: str | None = None  # an id the file gives the problem
    gold: str | None = None
    scores: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)  # the harness's own metrics
    stop: str | None = None  # "eos" or "length" where the file says
    model: str | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    stepflow: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)  # settings it ran with

    @property
    def key(self) -> str:
        """What groups samples into problems when the file gives no id: the prompt itself."""
        if self.messages is not None:
            return json.dumps(list(self.messages), sort_keys=True, ensure_ascii=False)
        if self.prompt is not None:
            return self.prompt
        return json.dumps(list(self.prompt_ids or ()))


# --- reading files ------------------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(index, location, object) per non-blank line of a JSONL file, or per element of a JSON array; the
    location (``file:line``, ``file record N``) is what error messages name."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StepscopeError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise StepscopeError(f"{path} is not a UTF-8 text file; expected JSONL, JSON or parquet") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a whole-file JSON array (a details JSON, a list of records)
        data = _load_whole(path, text)
        yield from ((i, f"{path} record {i + 1}", obj) for i, obj in enumerate(data))
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == 1 and stripped.startswith("{"):  # maybe one pretty-printed JSON object
                whole = _load_whole(path, text, quiet=True)
                if whole is not None:
                    yield from _whole_object(path, whole)
                    return
            raise StepscopeError(f"{path}:{lineno} is not valid JSON ({e.msg}); "
                                 "write one JSON object per line") from None
        yield index, f"{path}:{lineno}", obj
        index += 1


def _load_whole(path: Path, text: str, quiet: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if quiet:
            return None
        raise StepscopeError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None


def _whole_object(path: Path, obj: Any) -> Iterator[tuple[int, str, Any]]:
    """A single JSON object holding the records under one list-valued key (e.g. ``{"samples": [...]}``)."""
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:
            yield from ((i, f"{path} record {i + 1}", x) for i, x in enumerate(lists[0]))
            return
        yield 0, f"{path}:1", obj
        return
    raise StepscopeError(f"{path} holds one JSON value that is not a record or a list of records")


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only lighteval's parquet details need it
    except ModuleNotFoundError:
        raise StepscopeError(f"reading {path} (parquet) needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's errors for damaged files derive from these
        raise StepscopeError(f"cannot read {path} as parquet ({type(e).__name__}: {e})") from None
    yield from ((i, f"{path} row {i + 1}", row) for i, row in enumerate(rows))


def _rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path)
    return _records(path)


def _require_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise StepscopeError(f"{where} is not a JSON object; write one object per line")
    return obj


def _pick(obj: Mapping, names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        if name in obj and obj[name] is not None:
            return name, obj[name]
    return None, None


def _text(value: Any, what: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1:  # e.g. a prompt or response given as a one-element list
        value = value[0]
    if not isinstance(value, str):
        raise StepscopeError(f"{where}: {what} is {type(value).__name__}, expected text")
    return value


def _ids(value: Any, what: str, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise StepscopeError(f"{where}: {what} must be a list of token ids")
    return tuple(int(x) for x in value)


def _gold(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _gold(value[0])
    return str(value)


def _messages(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise StepscopeError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise StepscopeError(f"{where}: every message needs a string role and string content")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _question_of(messages: Sequence[Mapping[str, Any]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1]["content"]


def _problem_id(obj: Mapping, names: Sequence[str]) -> str | None:
    _, value = _pick(obj, names)
    return None if value is None else str(value)


def read_openai(path: str | os.PathLike, *, id_field: str | None = None) -> list[ImportedSample]:
    """OpenAI-style / vLLM JSONL: a prompt (``prompt`` text or ids, or chat ``messages``) and its ``choices``
    (``text``, or ``message.content`` with an optional ``reasoning_content``) or vLLM's ``outputs`` (``text``,
    ``token_ids``). The request may sit under ``request`` / ``body`` and the response under ``response`` /
    ``response.body`` (batch files). One sample per choice."""
    path = Path(path)
    out = []
    for _row, where, obj in _rows(path):
        obj = _require_object(obj, where)
        request = _nested(obj, ("request", "body"), ("body",))
        response = _nested(obj, ("response", "body"), ("response",))
        choices = None
        for holder in (obj, response):
            _, choices = _pick(holder, ("choices", "outputs"))
            if choices is not None:
                break
        if not isinstance(choices, list) or not choices:
            raise StepscopeError(f"{where} has no non-empty 'choices' (or vLLM 'outputs') list")
        prompt, messages, prompt_ids = None, None, None
        for holder in (obj, request):
            if "messages" in holder:
                messages = _messages(holder["messages"], where)
                break
            if "prompt" in holder:
                value = holder["prompt"]
                if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
                    prompt_ids = _ids(value, "prompt", where)
                else:
                    prompt = _text(value, "prompt", where)
                break
        if prompt_ids is None:
            prompt_ids = _ids(obj.get("prompt_token_ids"), "prompt_token_ids", where)
        if prompt is None and messages is None and prompt_ids is None:
            raise StepscopeError(f"{where} has no 'prompt' or 'messages' (put the request beside the choices)")
        pid = _problem_id(obj, (id_field,) if id_field else ("problem_id",))
        model = obj.get("model") or response.get("model") or request.get("model")
        sampling = {k: request.get(k, obj.get(k)) for k in _SAMPLING_KEYS if request.get(k, obj.get(k)) is not None}
        question = _question_of(messages) if messages else (prompt or "")
        for k, choice in enumerate(choices):
            cw = f"{where} (choice {k})"
            if not isinstance(choice, dict):
                raise StepscopeError(f"{cw} is not an object")
            reasoning = None
            if isinstance(choice.get("message"), dict):
                msg = choice["message"]
                text = msg.get("content") or ""
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            elif "text" in choice:
                text = choice["text"]
            else:
                raise StepscopeError(f"{cw} has neither 'text' nor 'message'")
            out.append(ImportedSample(
                file=str(path), where=cw, response=_text(text, "the response", cw), prompt=prompt, messages=messages,
                prompt_mode="chat" if messages else "raw", question=question,
                reasoning=_text(reasoning, "the reasoning", cw) if reasoning else None, prompt_ids=prompt_ids,
                response_ids=_ids(choice.get("token_ids"), "token_ids", cw), problem_id=pid,
                gold=_gold(_pick(obj, GOLD_FIELDS)[1]), stop=_FINISH.get(str(choice.get("finish_reason"))),
                model=str(model) if model else None, sampling=sampling))
    return out


def _nested(obj: Mapping, *paths: tuple[str, ...]) -> dict:
    for keys in paths:
        cur: Any = obj
        for k in keys:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            return cur
    return {}


_LM_EVAL_FILE = re.compile(r"samples_(.+)_(\d{4}-\d{2}-\d{2}T[\d\-.]+)$")


def _lm_eval_stepflow(path: Path, date: str | None) -> dict | None:
    """The StepFlow settings of the run, from lm-eval's results file beside the samples (the ``stepflow``
    model writes them there); None for other models or without that file."""
    results = path.with_name(f"results_{date}.json") if date else None
    if results is None or not results.is_file():
        return None
    try:
        sf = (json.loads(results.read_text(encoding="utf-8")).get("config") or {}).get("stepflow")
    except (OSError, ValueError):
        return None
    return sf.get("config") if isinstance(sf, dict) and isinstance(sf.get("config"), dict) else None


def read_lm_eval(path: str | os.PathLike) -> list[ImportedSample]:
    """An lm-evaluation-harness ``--log_samples`` file (``samples_<task>_<date>.jsonl``): one record per document
    with the exact prompt (``arguments.gen_args_0.arg_0``), the responses (``resps``), the ``target`` and the
    harness's per-sample metrics. Only generate_until tasks have responses to import."""
    path = Path(path)
    match = _LM_EVAL_FILE.fullmatch(path.stem)
    task = match.group(1) if match else path.stem
    stepflow = _lm_eval_stepflow(path, match.group(2) if match else None)
    out = []
    for _row, where, obj in _rows(path):
        obj = _require_object(obj, where)
        for name in ("doc_id", "arguments", "resps"):
            if name not in obj:
                raise StepscopeError(f"{where} has no {name!r}: not an lm-eval --log_samples record")
        args = obj["arguments"]
        first = args.get("gen_args_0") if isinstance(args, dict) else (args[0] if args else None)
        if isinstance(first, dict):
            first = [first.get("arg_0"), first.get("arg_1")]
        if not isinstance(first, (list, tuple)) or not first or not isinstance(first[0], str):
            raise StepscopeError(f"{where}: cannot read the prompt from 'arguments'")
        gen_kwargs = first[1] if len(first) > 1 and isinstance(first[1], dict) else None
        resps = obj["resps"]
        texts = resps[0] if isinstance(resps, list) and resps and isinstance(resps[0], list) else resps
        if gen_kwargs is None or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise StepscopeError(f"{where} is a scored-continuation (loglikelihood) sample: lm-eval generated "
                                 "nothing there; import the samples of generate_until tasks")
        doc = obj.get("doc")
        if not isinstance(doc, dict):
            doc = {}
        question = next((str(doc[k]) for k in ("question", "problem", "prompt", "input")
                         if isinstance(doc.get(k), str)), first[0])
        metrics = obj.get("metrics") or []
        scores = {m: obj[m] for m in metrics if m in obj}
        temperature = gen_kwargs.get("temperature")
        if temperature is None and gen_kwargs.get("do_sample") is False:
            temperature = 0.0  # greedy
        sampling = {"temperature": temperature, "max_tokens": gen_kwargs.get("max_gen_toks")}
        for k, text in enumerate(texts):
            out.append(ImportedSample(
                file=str(path), where=f"{where} (response {k})", response=text, prompt=first[0], prompt_mode="raw",
                question=question, problem_id=f"{task}/{obj['doc_id']}", gold=_gold(obj.get("target")),
                scores=scores, sampling={k2: v for k2, v in sampling.items() if v is not None}, stepflow=stepflow))
    return out


_LIGHTEVAL_FILE = re.compile(r"details_(.+)_\d{4}-\d{2}-\d{2}T[\d\-.]+$")


def read_lighteval(path: str | os.PathLike) -> list[ImportedSample]:
    """A lighteval details file (``details_<task>_<date>.parquet``, or the same rows as JSON / JSONL): per row
    a ``doc`` (query, choices, gold_index), a ``model_response`` (the prompt ``input``, ``input_tokens``, the
    generations ``text`` and their ``output_tokens``) and the ``metric`` scores. The file's token ids are used."""
    path = Path(path)
    match = _LIGHTEVAL_FILE.fullmatch(path.stem)
    stepflow = _lighteval_stepflow(path)
    out = []
    for row, where, obj in _rows(path):
        obj = _require_object(obj, where)
        doc, resp = _json_field(obj, "doc", where), _json_field(obj, "model_response", where)
        texts = resp.get("text") or []
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise StepscopeError(f"{where} has no generated text (model_response.text is empty): a "
                                 "loglikelihood task, or a details file of another kind")
        task = doc.get("task_name") or (match.group(1) if match else path.stem)
        raw_input = resp.get("input")
        messages = prompt = None
        if isinstance(raw_input, list) and raw_input and isinstance(raw_input[0], dict):
            messages = _messages(raw_input, where)
        elif isinstance(raw_input, str):
            prompt = raw_input
        prompt_ids = _ids(resp.get("input_tokens") or None, "input_tokens", where)
        if prompt is None and messages is None and prompt_ids is None:
            prompt = _text(doc.get("query"), "doc.query", where)
        outputs = resp.get("output_tokens") or []
        gold = None
        choices, gi = doc.get("choices") or [], doc.get("gold_index")
        gi = gi[0] if isinstance(gi, list) and gi else gi
        if isinstance(gi, int) and 0 <= gi < len(choices):
            gold = _gold(choices[gi])
        metric = obj.get("metric")
        if not isinstance(metric, dict):
            metric = _json_field(obj, "metric", where)
        pid = str(doc["id"]) if doc.get("id") not in (None, "") else str(row)
        for k, text in enumerate(texts):
            ids = _ids(outputs[k], "output_tokens", where) if k < len(outputs) and outputs[k] else None
            out.append(ImportedSample(
                file=str(path), where=f"{where} (generation {k})", response=_text(text, "the generation", where),
                prompt=prompt,
                messages=messages, prompt_mode="chat" if messages else "raw",
                question=str(doc.get("original_query") or doc.get("query") or prompt or ""), prompt_ids=prompt_ids,
                response_ids=ids, problem_id=f"{task}/{pid}", gold=gold, scores=metric, stepflow=stepflow))
    return out


def _lighteval_stepflow(path: Path) -> dict | None:
    """The StepFlow settings of the run, from lighteval's results file (``OUT/results/<model>/results_<date>.json``
    for ``OUT/details/<model>/<date>/details_*``); None for other models or without that file."""
    from ..integrations.options import FIELDS, stepflow_config

    parts = path.parts
    if "details" not in parts[:-2]:
        return None
    at = len(parts) - 1 - parts[::-1].index("details")
    results = Path(*parts[:at], "results", *parts[at + 1:-2], f"results_{path.parent.name}.json")
    try:
        model_config = json.loads(results.read_text(encoding="utf-8"))["config_general"]["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(model_config, dict) or model_config.get("stepflow") is not True:
        return None
    try:
        config = stepflow_config({k: model_config[k] for k in FIELDS if k in model_config})
    except StepscopeError:
        return None
    return None if config is None else config.to_dict()


def _json_field(obj: Mapping, name: str, where: str) -> dict:
    value = obj.get(name)
    if isinstance(value, str):  # some writers store nested records as JSON strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise StepscopeError(f"{where}: {name!r} is text but not JSON") from None
    if not isinstance(value, dict):
        raise StepscopeError(f"{where} has no {name!r} object: not a lighteval details row")
    return value


def read_plain(path: str | os.PathLike, *, prompt_field: str | None = None, response_field: str | None = None,
               gold_field: str | None = None, id_field: str | None = None) -> list[ImportedSample]:
    """A plain JSONL of prompt + response: ``prompt`` (the exact model input, tokenised as is) or ``question`` /
    ``problem`` / ``input`` (a user question, put into the chat template), or chat ``messages`` whose last
    assistant turn is the response; the response in ``response`` / ``completion`` / ``output`` / ... or a list
    of them in ``responses``; optional gold and id fields."""
    path = Path(path)
    out = []
    for _row, where, obj in _rows(path):
        obj = _require_object(obj, where)
        messages = None
        if "messages" in obj and (prompt_field is None or prompt_field == "messages"):
            messages = list(_messages(obj["messages"], where))
        name, value = _pick(obj, (response_field,) if response_field else RESPONSE_FIELDS)
        responses: list[Any]
        if value is not None:
            responses = [value]
        elif response_field is None and isinstance(obj.get("responses"), list):
            responses = obj["responses"]
        elif messages and messages[-1]["role"] == "assistant":
            responses, messages = [messages[-1]["content"]], messages[:-1]
        else:
            wanted = response_field or "response (or completion, output, responses, ...)"
            raise StepscopeError(f"{where} has no field {wanted!r} (fields: {', '.join(map(str, obj))}); name it "
                                 "with --response-field")
        prompt, mode = None, "chat"
        if messages:
            question = _question_of(messages)
        else:
            pname, pvalue = _pick(obj, (prompt_field,) if prompt_field else PROMPT_FIELDS)
            if pname is None:  # _pick found no field (it gives a name exactly when it gives a value)
                raise StepscopeError(f"{where} has no prompt field ({prompt_field or 'prompt, question, ...'}; "
                                     f"fields: {', '.join(map(str, obj))}); name it with --prompt-field")
            prompt = _text(pvalue, pname, where)
            mode = "raw" if pname == "prompt" else "chat"  # "prompt" is what the model saw; a question is templated
            question = prompt
        pid = _problem_id(obj, (id_field,) if id_field else ID_FIELDS)
        gold = _gold(_pick(obj, (gold_field,) if gold_field else GOLD_FIELDS)[1])
        for k, text in enumerate(responses):
            out.append(ImportedSample(
                file=str(path), where=f"{where}" + (f" (response {k})" if len(responses) > 1 else ""),
                response=_text(text, name or "the response", where), prompt=prompt,
                messages=tuple(messages) if messages else None, prompt_mode=mode, question=question,
                problem_id=pid, gold=gold, model=str(obj["model"]) if obj.get("model") else None))
    return out


def detect_format(path: str | os.PathLike) -> str:
    """The format of a file, from its name and its first record: one of :data:`FORMATS`."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return "lighteval"
    if not path.is_file():
        raise StepscopeError(f"no such file: {path}")
    first = next(iter(_records(path)), None)
    if first is None:
        raise StepscopeError(f"{path} holds no records")
    _, where, obj = first
    obj = _require_object(obj, where)
    if "doc_id" in obj and "resps" in obj:
        return "lm-eval"
    if "model_response" in obj and "doc" in obj:
        return "lighteval"
    if any(k in obj for k in ("choices", "outputs")) or any(k in _nested(obj, ("response", "body"), ("response",))
                                                           for k in ("choices",)):
        return "openai"
    return "plain"


def read_file(path: str | os.PathLike, fmt: str = "auto", **fields: str | None) -> tuple[str, list[ImportedSample]]:
    """``(format, samples)`` of one file; ``fields`` (prompt_field, response_field, gold_field, id_field) name
    the fields of a plain JSONL (and id_field those of an OpenAI-style file)."""
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "openai":
        samples = read_openai(path, id_field=fields.get("id_field"))
    elif fmt == "lm-eval":
        samples = read_lm_eval(path)
    elif fmt == "lighteval":
        samples = read_lighteval(path)
    elif fmt == "plain":
        samples = read_plain(path, **{k: v for k, v in fields.items() if k in
                                      ("prompt_field", "response_field", "gold_field", "id_field")})
    else:
        raise StepscopeError(f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if not samples:
        raise StepscopeError(f"{path} holds no samples")
    return fmt, samples


# --- problems ------------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.split())


def match_problems(samples: Sequence[ImportedSample], problems: Sequence[Problem]) -> list[Problem]:
    """The dataset problem of each sample: by id (``gsm8k/3``), else the problem whose question the sample's
    question equals, else the one whose question occurs last in the prompt (after any few-shot examples)."""
    by_id = {p.id: p for p in problems}
    by_text: dict[str, Problem] = {}
    for p in problems:
        by_text.setdefault(_norm(p.question), p)
    cache: dict[str, Problem | None] = {}
    out = []
    for s in samples:
        found = by_id.get(s.problem_id or "") or by_text.get(_norm(s.question))
        if found is None:
            hay = _norm(s.question + " \n " + (s.prompt or "") + " \n " +
                        " ".join(m["content"] for m in s.messages or ()))
            if hay not in cache:
                best, best_at = None, -1
                for q, p in by_text.items():
                    at = hay.rfind(q)
                    if at > best_at or (at == best_at >= 0 and best is not None and len(q) > len(best.question)):
                        best, best_at = p, at
                cache[hay] = best if best_at >= 0 else None
            found = cache[hay]
        if found is None:
            raise StepscopeError(f"{s.where}: no problem of the dataset has this question; check --dataset, or "
                                 "import without it")
        out.append(found)
    return out


# --- building traces and the results directory ------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOutcome:
    """What :func:`import_samples` wrote."""

    out: Path
    results_path: Path
    samples: int
    problems: int
    graded: bool
    accuracy: float | None
    warnings: dict[str, int]
    first_trace: Path | None


def _prompt_ids(tokenizer, s: ImportedSample, mode: str, system: str | None) -> list[int]:
    from ..prompting import prompt_ids as build_prompt_ids

    if s.prompt_ids is not None:
        return list(s.prompt_ids)
    if s.messages is not None:
        msgs = ([{"role": "system", "content": system}] if system and s.messages[0]["role"] != "system" else [])
        msgs += [dict(m) for m in s.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise StepscopeError(f"{s.where} is a chat, but the tokenizer has no chat template to render it with")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert s.prompt is not None
    use = s.prompt_mode if mode == "auto" else mode
    if use == "chat":
        return build_prompt_ids(tokenizer, s.prompt, system=system)
    bos = getattr(tokenizer, "bos_token", None)
    # A prompt that already starts with the BOS text must not get a second one (as lm-eval encodes it).
    add = not (bos and s.prompt.startswith(bos))
    ids = list(tokenizer(s.prompt, add_special_tokens=add)["input_ids"])
    if not ids:
        raise StepscopeError(f"{s.where}: the prompt is empty")
    return ids


def _response_ids(tokenizer, s: ImportedSample, profile_name: str, prompt_text: str, retokenize: bool) -> list[int]:
    if s.response_ids is not None and not retokenize:
        ids = list(s.response_ids)
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        # Padding a harness added after the end of a generation goes; where padding is the end token, one stays.
        while pad is not None and len(ids) > 1 and ids[-1] == pad and (pad != eos or ids[-2] == eos):
            ids.pop()
        return ids
    text = s.response
    if s.reasoning is not None:
        join = _REASONING_JOIN.get(profile_name, _REASONING_JOIN["plain"])
        opened = prompt_text.rstrip().endswith("<think>")
        text = join.format(open="" if opened else "<think>", reasoning=s.reasoning, content=s.response)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_ids(tokenizer, ids: Sequence[int], s: ImportedSample, what: str) -> None:
    size = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < size]
    if bad:
        raise StepscopeError(f"{s.where}: {what} token id {bad[0]} is outside this tokenizer's vocabulary "
                             f"({size}); import with the model that generated the file, or pass --retokenize")


def _ids_match_text(tokenizer, ids: Sequence[int], text: str) -> bool:
    """Whether the file's token ids spell its text (the harness may have cut the text at a stop string)."""
    decoded = _norm(tokenizer.decode(list(ids), skip_special_tokens=True))
    want = _norm(text)
    return not want or decoded.startswith(want[:200]) or want.startswith(decoded[:200])


def _trace_stems(problem_ids: Iterable[str]) -> dict[str, str]:
    """A file-name-safe stem per problem id, unique: ids that sanitise alike get a hash of the id appended."""
    stems = {pid: re.sub(r"[^A-Za-z0-9._-]", "_", pid.replace("/", "-"))[:100] or "problem" for pid in problem_ids}
    counts = Counter(stems.values())
    return {pid: f"{stem}-{hashlib.sha1(pid.encode()).hexdigest()[:8]}" if counts[stem] > 1 else stem
            for pid, stem in stems.items()}


def _source_correct(s: ImportedSample, metric: str) -> bool:
    if metric not in s.scores:
        have = ", ".join(map(str, s.scores)) or "none"
        raise StepscopeError(f"{s.where} has no metric {metric!r} (it has: {have})")
    value = s.scores[metric]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise StepscopeError(f"{s.where}: metric {metric!r} is {value!r}, not 0/1; pick a per-sample 0/1 metric or "
                         "grade with --grade")


def import_samples(
    samples: Sequence[ImportedSample],
    tokenizer,
    out: str | os.PathLike,
    *,
    model_name: str,
    profile: str = "auto",
    prompt_mode: str = "auto",
    system: str | None = None,
    condition: str = "baseline",
    problems: Sequence[Problem] | None = None,
    dataset: str | None = None,
    grade: bool = False,
    grader: str = "math",
    source_metric: str | None = None,
    retokenize: bool = False,
    overwrite: bool = False,
    workers: int = 2,
    sources: Sequence[Mapping[str, Any]] = (),
    progress: bool = True,
    grade_fn: Callable[[Sequence[Problem], Sequence[str]], Sequence[Any]] | None = None,
) -> ImportOutcome:
    """Tokenise, segment and (optionally) grade ``samples``; write ``out/results.jsonl``, one trace per sample
    under ``out/traces/<condition>/`` and ``out/import.json``.

    ``problems``: a dataset to match samples to (ids, golds and graders come from it). ``grade``: grade with
    stepscope's graders (gold from ``problems`` or from the file, graded as ``grader``). ``source_metric``: take
    correctness from a 0/1 metric the harness recorded per sample instead.
    """
    from .. import __version__  # avoid a cycle at import time
    from ..profiles import get_profile
    from ..trace import Trace
    from .store import RESULTS_NAME, RUN_NAME, TRACES_DIR

    if not samples:
        raise StepscopeError("there are no samples to import")
    if prompt_mode not in PROMPT_MODES:
        raise StepscopeError(f"unknown prompt mode {prompt_mode!r}; choose one of {', '.join(PROMPT_MODES)}")
    if grade and source_metric:
        raise StepscopeError("choose one of --grade (stepscope's graders) and --source-metric (the file's own scores)")
    if grader not in grader_names():
        raise StepscopeError(f"unknown grader {grader!r}; choose one of {', '.join(grader_names())}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", condition):
        raise StepscopeError(f"condition name {condition!r} may hold only letters, digits, '.', '_' and '-'")
    out = Path(out)
    if (out / RUN_NAME).exists():
        raise StepscopeError(f"{out} is a stepscope eval run; import into a directory of its own and summarise "
                             f"both together with `stepscope report {out} OTHER`")
    results_path = out / RESULTS_NAME
    if results_path.exists() or (out / IMPORT_NAME).exists():
        if not overwrite:
            raise StepscopeError(f"{out} already holds imported results; pass another --out, or --overwrite")
        results_path.unlink(missing_ok=True)
        (out / IMPORT_NAME).unlink(missing_ok=True)
        shutil.rmtree(out / TRACES_DIR / condition, ignore_errors=True)

    matched = match_problems(samples, problems) if problems is not None else None
    prof = get_profile(None if profile == "auto" else profile, tokenizer)

    # Problems: the dataset's, else the file's ids, else one per distinct prompt, in order of first appearance.
    ids: list[str] = []
    first_seen: dict[str, int] = {}
    by_prompt: dict[str, str] = {}
    per_stem: Counter[str] = Counter()
    for i, s in enumerate(samples):
        if matched is not None:
            pid = matched[i].id
        elif s.problem_id is not None:
            pid = s.problem_id
        else:
            if s.key not in by_prompt:  # numbered per file: <file stem>/<n-th distinct prompt of that file>
                stem = Path(s.file).stem if s.file else "imported"
                by_prompt[s.key] = f"{stem}/{per_stem[stem]}"
                per_stem[stem] += 1
            pid = by_prompt[s.key]
        ids.append(pid)
        first_seen.setdefault(pid, len(first_seen))
    counts: Counter[str] = Counter()
    sample_no = []
    for pid in ids:
        sample_no.append(counts[pid])
        counts[pid] += 1

    problem_list: list[Problem] = []
    for i, s in enumerate(samples):
        if matched is not None:
            problem_list.append(matched[i])
        else:
            problem_list.append(Problem(ids[i], s.question, s.gold or "", grader, {"imported": True}))
    verdicts: list[Any] | None = None
    if grade:
        missing = [s for s, p in zip(samples, problem_list) if not p.answer]
        if missing:
            raise StepscopeError(f"{missing[0].where} has no gold answer to grade against; pass --dataset NAME, or "
                                 "put the gold in the file (field gold / answer / target)")
        from .graders import grade_many  # grading needs the [eval] extra

        grading = grade_fn or (lambda ps, rs: grade_many(ps, rs, workers=min(workers, len(ps))))
        verdicts = list(grading(problem_list, [s.response for s in samples]))

    # Imported samples share no seed with anything: the run id names the import, so reports tell it apart.
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.key.encode("utf-8", "replace") + b"\x1f" + s.response.encode("utf-8", "replace") + b"\x1e")
    run_id = "import-" + digest.hexdigest()[:10]
    first_sampling = next((s.sampling for s in samples if s.sampling), {})
    config: dict[str, Any] = {"run": run_id, "model": model_name,
                              "dataset": dataset or (sources[0]["format"] if sources else "imported"),
                              "n": max(counts.values()), "stepflow": None, "source": "import"}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "max_new_tokens")):
        if first_sampling.get(src) is not None:
            config[dst] = first_sampling[src]
    # the rest as the request gave it (vLLM's top_k -1 means off), under the key eval's own results use
    rest = {k: first_sampling[k] for k in ("top_k", "min_p", "repetition_penalty", "stop")
            if first_sampling.get(k) is not None}
    if isinstance(rest.get("stop"), str):
        rest["stop"] = [rest["stop"]]
    if rest:
        config["sampling"] = rest

    out.mkdir(parents=True, exist_ok=True)
    stems = _trace_stems(first_seen)
    warn_counts: Counter[str] = Counter()
    bar = None
    if progress:
        from .. import progress as progress_

        bar = progress_.bar(len(samples), "import", "sample")  # stderr; plain periodic lines in a log
    right = 0
    first_trace = None
    try:
        with results_path.open("w", encoding="utf-8") as fh:
            for i, s in enumerate(samples):
                p_ids = _prompt_ids(tokenizer, s, prompt_mode, system)
                _check_ids(tokenizer, p_ids, s, "a prompt")
                prompt_text = tokenizer.decode(p_ids, skip_special_tokens=False)
                r_ids = _response_ids(tokenizer, s, prof.name, prompt_text, retokenize)
                _check_ids(tokenizer, r_ids, s, "a response")
                if s.response_ids is not None and not retokenize and not _ids_match_text(tokenizer, r_ids, s.response):
                    raise StepscopeError(f"{s.where}: the file's token ids do not spell its text under this tokenizer; "
                                         "import with the model that generated it, or pass --retokenize")
                meta = {"imported": {"where": s.where, "source_model": s.model}, "new_tokens": len(r_ids)}
                if s.stop:
                    meta["stop"] = s.stop
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # counted once per kind below, not once per trace
                    trace = Trace.from_ids(tokenizer, p_ids + r_ids, len(p_ids), question=s.question or s.prompt or "",
                                           profile=prof, model=model_name, meta=meta)
                for w in trace.warnings:
                    warn_counts[w.split(":")[0].split(" (")[0]] += 1
                rel = f"{TRACES_DIR}/{condition}/{stems[ids[i]]}__{sample_no[i]}.json"
                trace.save(out / rel)
                first_trace = first_trace or out / rel
                record = _record(ids[i], first_seen[ids[i]], sample_no[i], condition, s, trace, rel, config,
                                 problem_list[i], verdicts[i] if verdicts is not None else None,
                                 _source_correct(s, source_metric) if source_metric else None, source_metric)
                right += bool(record["correct"])
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    graded = verdicts is not None or source_metric is not None
    info = {"format": "stepscope.import", "stepscope_version": __version__, "model": model_name,
            "profile": prof.name, "prompt_mode": prompt_mode, "condition": condition, "dataset": dataset,
            "graded": ("stepscope graders" if verdicts is not None else
                       f"the file's metric {source_metric!r}" if source_metric else None),
            "samples": len(samples), "problems": len(first_seen), "sources": list(sources), "run": run_id,
            "retokenized": retokenize, "warnings": dict(warn_counts),
            "pairing": "per problem: imported samples share no seeds or tokens with stepscope's own runs"}
    (out / IMPORT_NAME).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return ImportOutcome(out, results_path, len(samples), len(first_seen), graded,
                         right / len(samples) if graded else None, dict(warn_counts), first_trace)


def _record(pid: str, index: int, sample: int, condition: str, s: ImportedSample, trace, rel: str,
            config: Mapping[str, Any], problem: Problem, verdict, source: bool | None, metric: str | None) -> dict:
    correct = None if verdict is None and source is None else bool(verdict.correct if verdict is not None else source)
    detail = verdict.detail if verdict is not None else (f"from the file's {metric}" if metric else "not graded")
    return {
        "problem_id": pid,
        "problem_index": index,
        "sample": sample,
        "condition": condition,
        "seed": None,
        "correct": correct,
        "extracted": verdict.extracted if verdict is not None else None,
        "gold": None if problem.grader == "code" else (problem.answer or s.gold),
        "grade_detail": detail,
        "response": s.response,
        "new_tokens": len(trace.token_ids) - trace.prompt_len,
        "stop": s.stop,
        "time_s": None,
        "trace": rel,
        "source": s.where,
        "config": dict(config, stepflow=dict(s.stepflow) if s.stepflow else None),
    }


def samples_from_files(paths: Iterable[str | os.PathLike], fmt: str = "auto",
                       **fields: str | None) -> tuple[list[ImportedSample], list[dict]]:
    """All samples of several files, and a description of each source (file, format, samples)."""
    samples: list[ImportedSample] = []
    sources = []
    for path in paths:
        found, got = read_file(path, fmt, **fields)
        samples.extend(got)
        sources.append({"file": str(path), "format": found, "samples": len(got)})
    return samples, sources
