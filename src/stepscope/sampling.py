"""How the next token is chosen: one :class:`SamplingConfig`, applied through transformers' own logits processors.

The processors are transformers' classes, built in the order ``model.generate`` applies them: the repetition
penalty first (it also applies to greedy decoding), then, only when sampling (``temperature > 0``), temperature,
top-k, top-p and min-p. Every processor works row by row, so a row's distribution never depends on the other rows
of its batch; the repetition penalty is handed each row's pad length, so it sees that row's prompt and generated
ids and never the padding.

Stop strings are matched on the decoded text of the new tokens (the step tracker's incremental decoding, the same
text the trace holds): a row stops at the token whose text completes a stop string. That token is kept, so the
trace's response contains the stop string (and whatever else that last token decodes to): token ids are never cut
inside a token, and token spans stay exact. The trace's ``meta["stop"]`` is then ``"stop_string"`` and
``meta["stop_string"]`` the string that matched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import StepscopeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["QWEN3_THINKING", "SamplingConfig", "StopStrings", "logits_processors"]


@dataclass(frozen=True)
class SamplingConfig:
    """The next-token rule. Each field's neutral value switches it off.

    ``temperature``: 0 is greedy (the default); otherwise logits are divided by it and a token is drawn.
    ``top_p``: nucleus mass in (0, 1] (1: off). ``top_k``: keep the k most likely tokens (0: off). ``min_p``: keep
    tokens at least ``min_p`` times as likely as the most likely one, in [0, 1] (0: off). ``repetition_penalty``:
    > 0, the CTRL penalty on every token already in the row's prompt or response (1: off; greedy decoding sees it
    too). ``stop``: strings that end a row once its generated text contains one (kept in the output).
    ``top_p``, ``top_k`` and ``min_p`` change nothing under greedy decoding (the most likely token always stays).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "temperature", _number("temperature", self.temperature))
        set_(self, "top_p", _number("top_p", self.top_p))
        set_(self, "min_p", _number("min_p", self.min_p))
        set_(self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty))
        if self.temperature < 0:
            raise StepscopeError(f"temperature (--temperature) must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise StepscopeError(f"top_p (--top-p) must be in (0, 1] (1 means off), got {self.top_p}")
        set_(self, "top_k", _whole("top_k (--top-k)", self.top_k))
        if self.top_k < 0:
            raise StepscopeError(f"top_k (--top-k) must be >= 0 (0 means off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise StepscopeError(f"min_p (--min-p) must be in [0, 1] (0 means off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise StepscopeError("repetition_penalty (--repetition-penalty) must be > 0 (1 means off, above 1 "
                                 f"discourages repeats), got {self.repetition_penalty}")
        set_(self, "stop", _stop_strings(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``stop`` as a list), for results files and trace meta."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        return out

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their neutral default (JSON-ready), e.g. for a compact record."""
        default = SamplingConfig()
        return {k: v for k, v in self.to_dict().items() if v != default.to_dict()[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StepscopeError(f"unknown sampling field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        kwargs: dict[str, Any] = {k: tuple(v) if k == "stop" else v for k, v in d.items()}
        return cls(**kwargs)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, numeric strings from a config file
        except (TypeError, ValueError):
            raise StepscopeError(f"{name} must be a number, got {value!r}") from None
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise StepscopeError(f"{name} must be a finite number, got {value}")
    return value


def _whole(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise StepscopeError(f"{name} must be a whole number >= 0 (0 means off), got {value!r}") from None


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        items = tuple(stop)
    except TypeError:
        raise StepscopeError(f"stop (--stop) must be a list of strings, got {stop!r}") from None
    for s in items:
        if not isinstance(s, str) or not s:
            raise StepscopeError(f"each stop string (--stop) must be non-empty text, got {s!r}")
    return tuple(dict.fromkeys(items))  # each once, in the order given


def logits_processors(config: SamplingConfig, pad_lengths: torch.Tensor | Sequence[int] | None = None):
    """transformers' :class:`~transformers.LogitsProcessorList` for ``config``, in ``generate``'s order.

    Call it as ``processors(ids, logits)`` with ``ids`` the (B, T) left-padded prompt + generated ids so far and
    ``logits`` the (B, V) next-token logits (float32 is best: the penalty and the filters compare values).
    ``pad_lengths``: each row's number of left-padding positions, which the repetition penalty skips. Under
    greedy decoding only the repetition penalty is included (the filters cannot change the argmax).
    """
    import torch  # here: the config itself stays importable without torch
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        ignore = None
        if pad_lengths is not None:
            ignore = torch.as_tensor(pad_lengths, dtype=torch.long)
        out.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty), prompt_ignore_length=ignore))
    if config.greedy:
        return out
    if config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(config.temperature)))
    if config.top_k:
        out.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=float(config.top_p)))
    if config.min_p > 0:
        out.append(MinPLogitsWarper(min_p=float(config.min_p)))
    return out


class StopStrings:
    """Watches each row's newly decoded text for the stop strings, in O(1) work per token.

    ``push(row, text)`` takes the text a row's newest token completed and returns the stop string now contained
    in the row's generated text (the one that ends first, then the longest), or None. Only a tail of the text is
    kept: one shorter than the longest stop string cannot hide a match that the new text completes.
    """

    def __init__(self, stops: Iterable[str], rows: int):
        self.stops = tuple(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._tails = [""] * rows

    def __bool__(self) -> bool:
        return bool(self.stops)

    def push(self, row: int, text: str) -> str | None:
        if not self.stops or not text:
            return None
        tail = self._tails[row]
        window = tail + text
        found: tuple[int, int, str] | None = None
        for s in self.stops:
            # a match must end inside the new text, or it would have been found at an earlier token
            at = window.find(s, max(0, len(tail) - len(s) + 1))
            if at >= 0 and (found is None or (at + len(s), -len(s)) < found[:2]):
                found = (at + len(s), -len(s), s)
        self._tails[row] = window[-self._keep:] if self._keep else ""
        return None if found is None else found[2]


QWEN3_THINKING = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
"""Qwen3's recommended setting for thinking mode (``--temperature 0.6 --top-p 0.95 --top-k 20 --min-p 0``)."""
