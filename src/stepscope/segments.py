"""The segments of a trace, as one enum: the codes that trace arrays and live label tensors store."""

from __future__ import annotations

from enum import IntEnum


class Segment(IntEnum):
    """Segment of a token. ``OTHER``: in no step (padding, the attention-sink first token)."""

    OTHER = 0
    QUESTION = 1
    THINKING = 2
    SUMMARY = 3

    @property
    def kind(self) -> str:
        """The name a :class:`~stepscope.trace.Step` carries: ``"question"``, ``"thinking"``, ..."""
        return self.name.lower()

    @classmethod
    def of(cls, kind: str) -> Segment:
        """The segment of a step ``kind`` (``"question"``, ``"thinking"``, ``"summary"`` or ``"other"``)."""
        return cls[kind.upper()]


SEGMENTS: tuple[str, ...] = tuple(s.kind for s in Segment)  # kinds in code order
