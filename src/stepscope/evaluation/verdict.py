"""The verdict on one graded response (shared by every grader)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Grade"]


@dataclass(frozen=True)
class Grade:
    """The verdict on one response: whether it is right, what answer was read from it, and why."""

    correct: bool
    extracted: str | None
    detail: str = ""
