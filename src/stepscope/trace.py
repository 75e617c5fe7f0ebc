"""A reasoning trace: token ids plus exact token spans of the question, thinking steps and summary steps."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import TraceError
from .profiles import FormatProfile, get_profile
from .prompting import prompt_ids as build_prompt_ids
from .segments import Segment
from .steps import TokenLabel, label_response_tokens, plan_response
from .textmap import offsets_from_texts, token_texts

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Step:
    """Tokens ``start`` (inclusive) to ``end`` (exclusive) of a trace, of one ``kind``."""

    kind: str  # "question", "thinking" or "summary"
    start: int
    end: int
    text: str
    index: int  # position within its kind, from 1 (the question is 0)

    @property
    def label(self) -> str:
        return {"question": "Q", "thinking": f"T{self.index}", "summary": f"S{self.index}"}[self.kind]

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Trace:
    """One sequence (prompt + response) and its steps.

    Token 0 (the attention-sink first token) belongs to no step; every other token belongs to exactly one step,
    and the steps are contiguous and ordered: question, thinking steps, summary steps.
    """

    token_ids: list[int]
    prompt_len: int
    steps: list[Step]
    token_texts: list[str]
    question: str = ""
    profile: str = "plain"
    model: str | None = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_ids(
        cls,
        tokenizer,
        token_ids,
        prompt_len: int,
        *,
        question: str = "",
        profile: str | FormatProfile | None = None,
        model: str | None = None,
        meta: dict | None = None,
        labels: list[TokenLabel] | None = None,
        note: str | None = None,
    ) -> Trace:
        """Segment ``token_ids`` whose first ``prompt_len`` tokens are the prompt.

        ``labels`` (final labels of the response tokens, e.g. from the online tracker) skip the offline pass.
        """
        prof = get_profile(profile, tokenizer)
        ids = [int(t) for t in token_ids]
        if not 1 <= prompt_len <= len(ids):
            raise TraceError(f"prompt length {prompt_len} does not fit a trace of {len(ids)} tokens")
        texts = token_texts(tokenizer, ids)
        if labels is None:
            text = "".join(texts)
            offsets = offsets_from_texts(texts)
            response_start = offsets[prompt_len][0] if prompt_len < len(ids) else len(text)
            plan = plan_response(text, response_start, prof)
            labels = label_response_tokens(text, offsets, prompt_len, plan)
            note = plan.note
        steps = _steps_from_labels(texts, prompt_len, labels)
        trace = cls(ids, prompt_len, steps, texts, question, prof.name, model, dict(meta or {}))
        trace._check_segments(note or "")
        return trace

    @classmethod
    def from_text(
        cls,
        tokenizer,
        prompt: str,
        response: str,
        profile: str | FormatProfile | None = None,
        *,
        system: str | None = None,
        chat: bool | None = None,
        model: str | None = None,
    ) -> Trace:
        """A trace for a response someone already has; ``prompt`` is the user's question (templated as for
        generation). The response is tokenised once, after the prompt, and never re-split into pieces."""
        p_ids = build_prompt_ids(tokenizer, prompt, system=system, chat=chat)
        r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        return cls.from_ids(tokenizer, p_ids + r_ids, len(p_ids), question=prompt, profile=profile, model=model)

    def _check_segments(self, note: str) -> None:
        kinds = {s.kind for s in self.steps}
        if self.prompt_len < len(self.token_ids):
            if "thinking" not in kinds:
                self.warnings.append("the response has no thinking steps" + (f" ({note})" if note else ""))
            if "summary" not in kinds:
                self.warnings.append("the response has no summary" + (f": {note}" if note else ""))
        else:
            self.warnings.append("the trace has no response tokens")
        for w in self.warnings:
            warnings.warn(w, stacklevel=3)

    # -- views -----------------------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return "".join(self.token_texts)

    @property
    def prompt_text(self) -> str:
        return "".join(self.token_texts[: self.prompt_len])

    @property
    def response(self) -> str:
        return "".join(self.token_texts[self.prompt_len :])

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:  # short: counts and labels, no token ids (see stepscope.notebook)
        from .notebook import trace_repr

        return trace_repr(self)

    def _repr_html_(self) -> str:  # Jupyter: coloured steps, a segment legend, control tokens hidden
        from .notebook import trace_html

        return trace_html(self)

    def steps_of(self, kind: str) -> list[Step]:
        return [s for s in self.steps if s.kind == kind]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.steps]

    def step_ids(self) -> np.ndarray:
        """Step index of each token (position in ``steps``), -1 for tokens in no step."""
        out = np.full(len(self.token_ids), -1, dtype=np.int64)
        for i, s in enumerate(self.steps):
            out[s.start : s.end] = i
        return out

    def segment_ids(self) -> np.ndarray:
        """Segment of each token as a :class:`~stepscope.segments.Segment` code (0 for tokens in no step)."""
        out = np.zeros(len(self.token_ids), dtype=np.int64)
        for s in self.steps:
            out[s.start : s.end] = Segment.of(s.kind)
        return out

    def display_text(self, step: Step) -> str:
        """``step``'s text for reading: control tokens such as ``<|im_end|>`` left out (the ids keep them)."""
        from .notebook import display_text

        return display_text(self.token_texts[step.start : step.end])

    def pretty(self, width: int = 100, max_chars: int = 400, show_warnings: bool = True) -> str:
        """The question, numbered thinking steps and summary steps as text (control tokens hidden); with
        ``show_warnings``, the trace's warnings at the end (a command that reports warnings itself leaves them out)."""
        lines = []
        for s in self.steps:
            body = " ".join(self.display_text(s).split())
            if len(body) > max_chars:
                body = body[: max_chars - 3] + "..."
            head = {"question": "Question", "thinking": f"  [T{s.index}]", "summary": f"  [S{s.index}]"}[s.kind]
            if s.kind == "question":
                body = " ".join(self.question.split()) or body
                lines.append(f"{head} ({len(s)} tokens): {body}")
            else:
                if s.kind == "thinking" and s.index == 1:
                    lines.append("Thinking:")
                if s.kind == "summary" and s.index == 1:
                    lines.append("Summary:")
                lines.append(f"{head} {body}")
        for w in self.warnings if show_warnings else ():
            lines.append(f"warning: {w}")
        return "\n".join(_wrap(line, width) for line in lines)

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "stepscope.trace",
            "version": FORMAT_VERSION,
            "question": self.question,
            "profile": self.profile,
            "model": self.model,
            "prompt_len": self.prompt_len,
            "token_ids": self.token_ids,
            "token_texts": self.token_texts,
            "steps": [asdict(s) for s in self.steps],
            "meta": self.meta,
            "warnings": self.warnings,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> Trace:
        if not isinstance(d, dict):
            kind = {list: "a JSON array", str: "a JSON string"}.get(type(d), f"a JSON {type(d).__name__}")
            raise TraceError(f"not a stepscope trace: it holds {kind}, not an object; pass one trace file per --trace "
                             "(as written by stepscope)")
        try:
            if d.get("format") != "stepscope.trace":
                raise TraceError("not a stepscope trace (missing \"format\": \"stepscope.trace\")")
            if not isinstance(d["steps"], list) or not all(isinstance(s, dict) for s in d["steps"]):
                raise TraceError("malformed trace: \"steps\" must be a list of objects")
            if not isinstance(d.get("meta", {}), dict):
                raise TraceError("malformed trace: \"meta\" must be an object")
            steps = [Step(**s) for s in d["steps"]]
            trace = cls(
                [int(t) for t in d["token_ids"]],
                int(d["prompt_len"]),
                steps,
                list(d["token_texts"]),
                d.get("question", ""),
                d.get("profile", "plain"),
                d.get("model"),
                d.get("meta", {}),
                list(d.get("warnings", [])),
            )
        except TraceError:
            raise
        except KeyError as e:
            raise TraceError(f"malformed trace: the field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise TraceError(f"malformed trace: {e}") from None
        trace.validate()
        return trace

    @classmethod
    def from_json(cls, text: str) -> Trace:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"the trace is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> Trace:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise TraceError(f"cannot read trace file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise TraceError(f"{path} is not a text file; expected a trace JSON written by stepscope") from None
        try:
            return cls.from_json(text)
        except TraceError as e:
            raise TraceError(f"{path}: {e}") from None

    def check_vocab(self, vocab_size: int, model: str | None = None) -> None:
        """Refuse token ids outside ``0..vocab_size-1`` (a trace from another model, or edited by hand), which
        would otherwise fail deep inside the embedding lookup (or as a device-side assert on a GPU)."""
        bad = [(i, t) for i, t in enumerate(self.token_ids) if not 0 <= t < vocab_size]
        if bad:
            i, t = bad[0]
            made = f" (it was made with {self.model})" if self.model else ""
            raise TraceError(
                f"the trace has {len(bad)} token id(s) outside the vocabulary of {model or 'this model'} "
                f"(0..{vocab_size - 1}), first {t} at position {i}{made}; use the model that wrote the trace"
            )

    def validate(self) -> None:
        """Check the invariants: spans ordered, contiguous, covering tokens 1..end, texts consistent."""
        n = len(self.token_ids)
        if len(self.token_texts) != n:
            raise TraceError(f"{len(self.token_texts)} token texts for {n} tokens")
        if not 1 <= self.prompt_len <= n:
            raise TraceError(f"prompt length {self.prompt_len} does not fit a trace of {n} tokens")
        pos = 1
        order = {"question": 0, "thinking": 1, "summary": 2}
        last_kind = 0
        for s in self.steps:
            if s.kind not in order:
                raise TraceError(f"unknown step kind {s.kind!r}")
            if s.start != pos or s.end <= s.start:
                raise TraceError(f"steps are not contiguous at token {pos} (step {s.label} spans {s.start}:{s.end})")
            if order[s.kind] < last_kind:
                raise TraceError(f"step {s.label} is out of order")
            last_kind, pos = order[s.kind], s.end
        if n > 1 and pos != n:
            raise TraceError(f"steps cover tokens 1:{pos} of {n}")


def _steps_from_labels(texts: list[str], prompt_len: int, labels: list[TokenLabel]) -> list[Step]:
    steps: list[Step] = []
    if prompt_len > 1:
        steps.append(Step("question", 1, prompt_len, "".join(texts[1:prompt_len]), 0))
    counters = {"thinking": 0, "summary": 0}
    run_start, run_key = prompt_len, None
    for i, lab in enumerate(labels + [None]):
        key = None if lab is None else (lab.segment, lab.step)
        if key != run_key:
            if run_key is not None:
                kind = run_key[0]
                counters[kind] += 1
                end = prompt_len + i
                steps.append(Step(kind, run_start, end, "".join(texts[run_start:end]), counters[kind]))
            run_start, run_key = prompt_len + i, key
    return steps


def _wrap(line: str, width: int) -> str:
    import textwrap

    indent = " " * (len(line) - len(line.lstrip()) + 5)
    return textwrap.fill(line, width=width, subsequent_indent=indent, break_long_words=True)
