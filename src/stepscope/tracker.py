"""The step rule applied online, one token at a time (a character state machine, no re-scanning).

Each pushed token gets a *live* label at once (segment, step, whether it opens a new step): this is what
StepFlow acts on during generation. ``finish()`` returns the final labels, which equal offline segmentation of
the finished text (:mod:`stepscope.steps`; a property test checks this). Live and final labels agree except for
the plain-instruct profile, whose summary starts at the *line* holding the answer marker or at the last
paragraph: neither can be known when those tokens are generated, so live labels switch to summary only after the
marker is complete.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from dataclasses import dataclass, field

from .profiles import FormatProfile
from .steps import SUMMARY_RULE, TERMINATORS, THINKING_RULE, PieceRule, TokenLabel, is_number_only
from .textmap import IncrementalDecoder


@dataclass
class _PieceMachine:
    """Finds piece starts in a character stream under a :class:`PieceRule`."""

    rule: PieceRule
    bounds: list[int] = field(default_factory=list)
    _in_ws: bool = False
    _newlines: int = 0
    _after_term: bool = False
    _first: int | None = None  # first non-whitespace position of the current piece
    _last: int = -1  # last non-whitespace position seen
    _last_char: str = ""
    _piece: list[str] = field(default_factory=list)  # non-ws chars of the current piece, for the number check

    def feed(self, pos: int, ch: str) -> None:
        if ch.isspace():
            if not self._in_ws:
                self._in_ws, self._newlines = True, 0
                self._after_term = (
                    self.rule.split_on_terminators
                    and self._last == pos - 1
                    and self._first is not None
                    and self._last_char in TERMINATORS
                )
            if ch == "\n":
                self._newlines += 1
            return
        if self._in_ws:
            self._in_ws = False
            if (self._after_term or self._newlines >= 2) and self._first is not None and self._accept():
                self.bounds.append(pos)
                self._first, self._piece = None, []
        if self._first is None:
            self._first = pos
        self._last, self._last_char = pos, ch
        if self.rule.merge_numbers and len(self._piece) <= self.rule.min_chars:
            self._piece.append(ch)  # only short pieces can still be "only a number" *and* matter

    def _accept(self) -> bool:
        length = self._last - self._first + 1
        if length < self.rule.min_chars:
            return False
        if self.rule.merge_numbers and len(self._piece) <= self.rule.min_chars:
            # a piece this short is re-checked exactly; longer ones contain letters or are long numbers
            return not is_number_only("".join(self._piece))
        return True


@dataclass(frozen=True)
class LiveLabel:
    segment: str  # "thinking" or "summary"
    step: int  # index within the segment, as known now
    new_step: bool  # first token of a new step (not the response's first token)


class StepTracker:
    """Segments one sequence's response as its tokens arrive."""

    def __init__(self, tokenizer, profile: FormatProfile, prompt_ids):
        self.profile = profile
        self._decoder = IncrementalDecoder(tokenizer)
        self.prompt_chars = sum(len(self._decoder.push(t)) for t in prompt_ids)
        self._pos = self.prompt_chars
        self._thinking = _PieceMachine(THINKING_RULE)
        self._summary: _PieceMachine | None = None
        self._paragraphs = _PieceMachine(SUMMARY_RULE)  # plain profile: final summary steps / last paragraph
        self._marker = re.compile(profile.summary_after or profile.answer_line) if (
            profile.summary_after or profile.answer_line
        ) else None
        self._tail = ""
        self._switch_at: int | None = None  # live: tokens starting here or later are summary
        self._marker_start: int | None = None  # marker characters start no step (glued to the step before)
        self._final_summary: int | None = None  # plain profile: anchor position where the summary starts
        # recent lines as [start, first non-whitespace position]; the last entry is the current line
        self._lines: deque[list] = deque([[self._pos, None]], maxlen=16)
        self._pending_line: int | None = None  # plain profile: match start whose line anchor is wanted
        self._starts: list[int] = []
        self._anchors: list[int] = []
        self._last = LiveLabel("thinking", 0, False)
        self.texts: list[str] = []

    # -- streaming -------------------------------------------------------------------------------------------
    def push(self, token_id: int) -> LiveLabel:
        text = self._decoder.push(token_id)
        start = self._pos
        self.texts.append(text)
        self._look_for_marker(text, start)
        segment = "summary" if self._switch_at is not None and start >= self._switch_at else "thinking"
        anchor = start - 1
        step = None
        for i, ch in enumerate(text):
            pos = start + i
            self._feed(pos, ch)
            if step is None and not ch.isspace():
                anchor = pos
                step = self._count(segment, pos)
        if step is None:
            step = self._count(segment, anchor)
        if self._pending_line is not None:
            line_anchor = next(a for ls, a in reversed(self._lines) if ls <= self._pending_line)
            k = bisect.bisect_right(self._thinking.bounds, self._pending_line)
            self._final_summary = max([line_anchor] + self._thinking.bounds[max(0, k - 1) : k])
            self._pending_line = None
        self._pos = start + len(text)
        self._starts.append(start)
        self._anchors.append(anchor)
        new = len(self._starts) > 1 and (segment, step) != (self._last.segment, self._last.step)
        label = LiveLabel(segment, step, new)
        self._last = label
        return label

    def _count(self, segment: str, anchor: int) -> int:
        machine = self._summary if segment == "summary" else self._thinking
        return bisect.bisect_right(machine.bounds, anchor)

    def _feed(self, pos: int, ch: str) -> None:
        if self._switch_at is not None and pos >= self._switch_at:
            self._summary.feed(pos, ch)
        elif self._marker_start is None or pos < self._marker_start:
            self._thinking.feed(pos, ch)
        self._paragraphs.feed(pos, ch)
        if ch == "\n":
            self._lines.append([pos + 1, None])
        elif self._lines[-1][1] is None and not ch.isspace():
            self._lines[-1][1] = pos

    def _look_for_marker(self, text: str, start: int) -> None:
        if self._marker is None or self._switch_at is not None:
            return
        keep = self.profile.max_marker_chars
        tail_start = start - len(self._tail)
        self._tail += text
        m = self._marker.search(self._tail)
        if m is None:
            self._tail = self._tail[-keep:]
            return
        self._switch_at = tail_start + m.end()
        if self.profile.summary_after:  # a closing marker is glued to the last thinking step
            self._marker_start = tail_start + m.start()
        self._summary = _PieceMachine(SUMMARY_RULE)
        if self.profile.answer_line:
            self._pending_line = tail_start + m.start()  # resolved once this token's characters are fed

    # -- final labels ----------------------------------------------------------------------------------------
    def finish(self) -> tuple[list[TokenLabel], str]:
        """Final labels of the response tokens pushed so far, and a note when a segment is missing."""
        note = ""
        summary_start, by_anchor = self._switch_at, False
        summary_bounds = self._summary.bounds if self._summary else []
        thinking_bounds = self._thinking.bounds
        if self.profile.answer_line:
            by_anchor = True
            summary_start = self._final_summary
            if summary_start is None and self.profile.last_paragraph:
                if self._paragraphs.bounds:
                    summary_start = self._paragraphs.bounds[-1]
                else:
                    note = "no answer line and a single paragraph: no summary"
            if summary_start is not None:
                thinking_bounds = [b for b in thinking_bounds if b < summary_start]
                summary_bounds = [b for b in self._paragraphs.bounds if b > summary_start]
        elif summary_start is None and self.profile.summary_after:
            note = f"no summary marker ({self.profile.summary_after}) in the response"
        else:  # a marker split over tokens may have started a step before it was recognised
            thinking_bounds = [b for b in thinking_bounds if b < self._marker_start]
        labels = []
        for start, anchor in zip(self._starts, self._anchors):
            if summary_start is None:
                in_summary = False
            else:
                in_summary = (anchor if by_anchor else start) >= summary_start
            bounds = summary_bounds if in_summary else thinking_bounds
            labels.append(TokenLabel("summary" if in_summary else "thinking", bisect.bisect_right(bounds, anchor)))
        return labels, note
