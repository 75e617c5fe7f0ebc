"""The step rule, applied offline to a finished text (the reference the online tracker must match).

Thinking: a step ends at a sentence end (``.``, ``?`` or ``!`` followed by whitespace) or at a blank line (a
whitespace run holding two or more newlines). The next step starts at the first non-whitespace character after
that run; the whitespace stays with the step before. A piece whose text (stripped) is shorter than 15
characters, or is only a number, is merged into the next piece. ``3.14`` never splits (no whitespace after the
period). Summary: split on blank lines only; empty pieces are never steps.

Tokens are placed by their *anchor*: the index of their first non-whitespace character, or, for a token that is
all whitespace or empty, the index just before it. A token belongs to the step whose boundary is the last one at
or before its anchor. Steps that receive no token are dropped (their text merges into the next step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .profiles import FormatProfile

_WS_RUN = re.compile(r"\s+")
_NUMBER_ONLY = re.compile(r"[\d\s.,:;()+\-]*")
TERMINATORS = ".?!"


@dataclass(frozen=True)
class PieceRule:
    min_chars: int
    split_on_terminators: bool
    merge_numbers: bool


THINKING_RULE = PieceRule(min_chars=15, split_on_terminators=True, merge_numbers=True)
SUMMARY_RULE = PieceRule(min_chars=1, split_on_terminators=False, merge_numbers=False)


def is_number_only(piece: str) -> bool:
    return _NUMBER_ONLY.fullmatch(piece) is not None


def piece_boundaries(text: str, start: int, end: int, rule: PieceRule) -> list[int]:
    """Character positions in ``(start, end)`` where a new piece starts, after merging short pieces."""
    out: list[int] = []
    piece_start = start
    for m in _WS_RUN.finditer(text, start, end):
        s, e = m.span()
        if e >= end:  # whitespace that runs to the end of the region starts nothing
            break
        ends_sentence = rule.split_on_terminators and s > start and text[s - 1] in TERMINATORS
        blank_line = text.count("\n", s, e) >= 2
        if not (ends_sentence or blank_line):
            continue
        piece = text[piece_start:s].strip()
        if len(piece) < rule.min_chars or (rule.merge_numbers and is_number_only(piece)):
            continue
        out.append(e)
        piece_start = e
    return out


def paragraph_breaks(text: str, start: int, end: int) -> list[int]:
    """Starts of paragraphs after the first non-empty one in ``[start, end)``."""
    return piece_boundaries(text, start, end, SUMMARY_RULE)


def token_anchor(text: str, a: int, b: int) -> int:
    for i in range(a, b):
        if not text[i].isspace():
            return i
    return a - 1


@dataclass(frozen=True)
class ResponsePlan:
    """Where the response splits, in characters of the full text."""

    summary_start: int | None  # None: no summary
    summary_by_anchor: bool  # True: tokens with anchor >= summary_start; False: tokens starting there or later
    thinking_bounds: tuple[int, ...]
    summary_bounds: tuple[int, ...]
    note: str = ""  # why there is no summary / no thinking, for warnings


def plan_response(text: str, response_start: int, profile: FormatProfile) -> ResponsePlan:
    end = len(text)
    summary_start, by_anchor, note = None, False, ""
    think_end = end
    if profile.summary_after:
        m = re.compile(profile.summary_after).search(text, response_start)
        if m:
            # the marker is glued to the last thinking step: no step starts inside it
            summary_start, think_end = m.end(), m.start()
        else:
            note = f"no summary marker ({profile.summary_after}) in the response"
    elif profile.answer_line:
        by_anchor = True
        m = re.compile(profile.answer_line).search(text, response_start)
        if m:
            c = answer_candidate(text, response_start, m.start())
            if is_lead(text, c, m.start()):
                # the marker opens its line or step (after markup at most): the summary starts there
                summary_start = think_end = c
            else:
                # a marker inside a sentence is glued to the thinking step holding it, like a closing marker;
                # the summary starts at the first token after the one completing it
                summary_start, think_end, by_anchor = m.end(), m.start(), False
        elif profile.last_paragraph:
            breaks = paragraph_breaks(text, response_start, end)
            if breaks:
                summary_start = think_end = breaks[-1]
            else:
                note = "no answer line and a single paragraph: no summary"
    thinking = piece_boundaries(text, response_start, think_end, THINKING_RULE)
    summary: list[int] = []
    if summary_start is not None:
        summary = piece_boundaries(text, summary_start, end, SUMMARY_RULE)
    return ResponsePlan(summary_start, by_anchor, tuple(thinking), tuple(summary), note)


def answer_candidate(text: str, response_start: int, at: int) -> int:
    """Where a summary whose answer marker starts at ``at`` would begin: the later of the first non-whitespace
    character of the line holding ``at`` and the start of the thinking step holding it."""
    line = max(text.rfind("\n", response_start, at) + 1, response_start)
    line_anchor = _first_nonws(text, line, at + 1)
    before = piece_boundaries(text, response_start, at + 1, THINKING_RULE)
    return min(max([line_anchor] + before[-1:]), at)


def is_lead(text: str, a: int, b: int) -> bool:
    """Whether ``text[a:b]`` is markup only (no letter or digit): ``**``, ``- ``, ``#``, quotes, ..."""
    return not any(text[i].isalnum() for i in range(a, b))


def _first_nonws(text: str, a: int, b: int) -> int:
    for i in range(a, b):
        if not text[i].isspace():
            return i
    return a


@dataclass(frozen=True)
class TokenLabel:
    segment: str  # "thinking" or "summary"
    step: int  # index of the step within its segment


def label_response_tokens(
    text: str, offsets: list[tuple[int, int]], first: int, plan: ResponsePlan
) -> list[TokenLabel]:
    """Labels of tokens ``first..`` (the response) under ``plan``."""
    import bisect

    labels = []
    for a, b in offsets[first:]:
        anchor = token_anchor(text, a, b)
        if plan.summary_start is None:
            in_summary = False
        elif plan.summary_by_anchor:
            in_summary = anchor >= plan.summary_start
        else:
            in_summary = a >= plan.summary_start
        bounds = plan.summary_bounds if in_summary else plan.thinking_bounds
        labels.append(TokenLabel("summary" if in_summary else "thinking", bisect.bisect_right(bounds, anchor)))
    return labels


def pending_tokens(
    text: str, offsets: list[tuple[int, int]], first: int, profile: FormatProfile
) -> list[tuple[bool, bool]]:
    """For each token ``first..`` (the response): was it *pending* when it was generated, and was its segment
    then open (``(pending, segment_open)``)?

    The offline statement of the online tracker's rule (:mod:`stepscope.tracker`), computed from the finished
    text alone: after token ``i`` (ending at ``e``), while no marker has matched yet, every partial match of the
    marker within the last ``max_marker_chars`` characters names a place from which labels may still change: the
    answer line's start when only markup stands between it and the partial marker (the segment is open there), else
    the first thinking-step boundary inside the partial marker (a closing marker would remove it; only the step
    is open). Token ``i`` is pending when its anchor is at or past the earliest such place.
    """
    import bisect

    import regex

    pattern = profile.summary_after or profile.answer_line
    out = [(False, False)] * (len(offsets) - first)
    if not pattern or first >= len(offsets):
        return out
    start = offsets[first][0]
    marker = regex.compile(pattern)
    full = re.compile(pattern).search(text, start)
    done_at = full.end() if full else len(text) + 1
    bounds = piece_boundaries(text, start, len(text), THINKING_RULE)
    keep = profile.max_marker_chars
    for n, (a, b) in enumerate(offsets[first:]):
        if b >= done_at:
            break
        w0 = max(start, b - keep)
        window = text[w0:b]
        best = None
        i = 0
        while i <= len(window):
            m = marker.search(window, i, partial=True)
            if m is None:
                break
            h, empty = w0 + m.start(), m.start() == len(window)
            cand = None
            if profile.answer_line:
                c = _line_candidate(text, start, h, b, empty, bounds)
                if c is not None and is_lead(text, c, h):
                    cand = (c, True)
            if cand is None and not empty:
                k = bisect.bisect_left(bounds, h)
                if k < len(bounds) and bounds[k] < b:
                    cand = (bounds[k], False)
            if cand is not None and (best is None or cand[0] < best[0] or (cand[0] == best[0] and cand[1])):
                best = cand
            i = m.start() + 1
        if best is not None and token_anchor(text, a, b) >= best[0]:
            out[n] = (True, best[1])
    return out


def _line_candidate(text: str, start: int, h: int, end: int, empty: bool, bounds: list[int]) -> int | None:
    """:func:`answer_candidate` for a marker that may start at ``h``, from the text before ``end`` only."""
    import bisect

    line = max(text.rfind("\n", start, h) + 1, start)
    anchor = next((i for i in range(line, min(h + 1, end)) if not text[i].isspace()), None)
    if anchor is None:
        if empty:
            return None
        anchor = h
    k = bisect.bisect_right(bounds, min(h, end - 1))
    return min(max([anchor] + bounds[max(0, k - 1) : k]), h)
