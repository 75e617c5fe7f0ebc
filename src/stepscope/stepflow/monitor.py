"""A live, gradient-free flow monitor: how much attention each thinking step gives its bridge (the question).

OEB computes the bridge mass ``p(B)`` of every head and query in its band while decoding, before and after its
edit; StepFlow also measures it (read only) in the SMI band. Per generated token the handle keeps the head and layer
sums of those masses (:class:`TokenFlow`); :class:`FlowRecord` pools them per thinking step and band. Every
StepFlow generation puts ``FlowRecord.to_dict()`` (plain JSON) in ``trace.meta["flow"]``; ``stream(callback)``
calls ``callback(row, FlowStep)`` as each step ends, which is what ``stepscope generate --monitor`` prints.

SMI edits attention *outputs*, not weights, so in the SMI band the mass after the edit is the mass before it; the
two are kept for symmetry. A query's bridge is the question for a thinking token (the thinking for a summary
token, which this record leaves out); a sliding-window layer whose window holds no bridge key counts mass 0.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["FlowRecord", "FlowStep", "format_step", "stream"]

# per-token planes of the handle's buffer: sums over (layer, head) of p(B) and the number of (layer, head) pairs
PLANES = ("oeb_before", "oeb_after", "oeb_n", "smi_mass", "smi_n")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FlowStep:
    """One thinking step: token span ``[start, end)`` and the mean bridge mass per band (None: no data)."""

    index: int  # 1 for T1
    start: int
    end: int
    oeb_before: float | None
    oeb_after: float | None
    smi_before: float | None
    smi_after: float | None

    @classmethod
    def from_sums(cls, index: int, start: int, end: int, s) -> FlowStep:
        """From the step's totals of the PLANES (sums over its tokens, layers and heads)."""
        oeb = (s[0] / s[2], s[1] / s[2]) if s[2] > 0 else (None, None)
        smi = s[3] / s[4] if s[4] > 0 else None
        return cls(int(index), int(start), int(end), _f(oeb[0]), _f(oeb[1]), _f(smi), _f(smi))

    @property
    def label(self) -> str:
        return f"T{self.index}"

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def line(self, row: int | None = None) -> str:
        return format_step(self, row)


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def format_step(step: FlowStep, row: int | None = None) -> str:
    """One compact line, e.g. ``[0] T3   14 tok | OEB bridge  3.2% ->  15.0% | SMI bridge  1.1%``."""
    head = "" if row is None else f"[{row}] "
    return (f"{head}{step.label:<4} {step.tokens:4d} tok | OEB bridge {_pct(step.oeb_before)} -> "
            f"{_pct(step.oeb_after)} | SMI bridge {_pct(step.smi_before)}")


@dataclass
class FlowRecord:
    """Per thinking step, the mean bridge (question) attention mass in the OEB and SMI bands."""

    oeb_layers: list[int]
    smi_layers: list[int]
    steps: list[FlowStep] = field(default_factory=list)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, spans: list[tuple[int, int, int]], oeb_layers, smi_layers
                    ) -> FlowRecord:
        """``tokens``: (len(PLANES), T) per-token sums at trace positions; ``spans``: (index, start, end) of the
        thinking steps. A step's mean pools its tokens' (layer, head) pairs."""
        steps = [FlowStep.from_sums(index, a, b, tokens[:, a:b].sum(axis=1)) for index, a, b in spans]
        return cls(sorted(int(x) for x in oeb_layers), sorted(int(x) for x in smi_layers), steps)

    @classmethod
    def of_trace(cls, trace, tokens: np.ndarray, oeb_layers, smi_layers) -> FlowRecord:
        spans = [(s.index, s.start, s.end) for s in trace.steps_of("thinking")]
        return cls.from_tokens(tokens, spans, oeb_layers, smi_layers)

    def lines(self, row: int | None = None) -> list[str]:
        return [format_step(s, row) for s in self.steps]

    def series(self, name: str) -> list[float | None]:
        """One field per step, e.g. ``series("oeb_before")``."""
        return [getattr(s, name) for s in self.steps]

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "oeb_layers": list(self.oeb_layers), "smi_layers": list(self.smi_layers),
                "steps": [asdict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> FlowRecord:
        return cls(list(d["oeb_layers"]), list(d["smi_layers"]), [FlowStep(**s) for s in d["steps"]])

    @classmethod
    def of(cls, trace) -> FlowRecord | None:
        """The record a StepFlow generation left in ``trace.meta["flow"]``, or None."""
        d = (getattr(trace, "meta", None) or {}).get("flow")
        return cls.from_dict(d) if d else None


def thinking_spans(labels, first: int) -> list[tuple[int, int, int]]:
    """(index, start, end) of the thinking steps of response labels (``TokenLabel``s of tokens ``first..``),
    numbered as :class:`stepscope.Trace` numbers its steps (runs of one segment and step)."""
    out, run, start, n = [], None, first, 0
    for i, lab in enumerate(list(labels) + [None]):
        key = None if lab is None else (lab.segment, lab.step)
        if key != run:
            if run is not None and run[0] == "thinking":
                n += 1
                out.append((n, start, first + i))
            run, start = key, first + i
    return out


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


_STREAM: contextvars.ContextVar[Callable[[int, FlowStep], None] | None] = contextvars.ContextVar(
    "stepscope_flow_stream", default=None)


@contextlib.contextmanager
def stream(callback: Callable[[int, FlowStep], None]) -> Iterator[None]:
    """Within the block, StepFlow generation calls ``callback(row, step)`` as each thinking step of a batch row
    ends (``row``: the row within its batch), while the model is still writing."""
    token = _STREAM.set(callback)
    try:
        yield
    finally:
        _STREAM.reset(token)


def current_stream() -> Callable[[int, FlowStep], None] | None:
    return _STREAM.get()
