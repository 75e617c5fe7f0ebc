"""The step rule applied online, one token at a time (a character state machine, no re-scanning).

Each pushed token gets a *live* label at once (segment, step, whether it opens a new step): this is what
StepFlow acts on during generation. ``finish()`` returns the final labels, which equal offline segmentation of
the finished text (:mod:`stepscope.steps`; a property test checks this).

**Pending tokens.** Some labels cannot be known when their token arrives: a step that opens with ``Fin`` may be
the plain profile's ``Final answer:`` line (then it is summary, not a new thinking step), and ``</`` after a
sentence end may be the start of ``</think>`` (then no step starts there: a closing marker is glued to the step
before). While the text since such a point could still grow into the marker (a partial regex match), the tokens
from that point on are *pending*: no decision that depends on their label is taken (StepFlow injects no step
momentum there, and OEB leaves a pending query alone when its segment is open). The first token after them whose
label is certain carries the deferred SMI event (``fire`` / ``fire_summary``) and ``resolve``, and the pending
tokens' labels are corrected (``resolved``) to their final values before any later query reads them as keys.
So every live label that StepFlow acts on is final, and an offline pass over the finished trace
(:func:`stepscope.steps.pending_mask`) knows which tokens were pending. The one label no causal rule can know is
the plain profile's fallback summary (the last paragraph when there is no answer line): StepFlow sees it as
thinking.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import regex  # partial matches: could the text so far still grow into a marker?

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
            if (self._after_term or self._newlines >= 2) and self._first is not None and self._accept(self._first):
                self.bounds.append(pos)
                self._first, self._piece = None, []
        if self._first is None:
            self._first = pos
        self._last, self._last_char = pos, ch
        if self.rule.merge_numbers and len(self._piece) <= self.rule.min_chars:
            self._piece.append(ch)  # only short pieces can still be "only a number" *and* matter

    def _accept(self, first: int) -> bool:
        """Whether the current piece, whose first non-whitespace position is ``first``, counts as a piece."""
        length = self._last - first + 1
        if length < self.rule.min_chars:
            return False
        if self.rule.merge_numbers and len(self._piece) <= self.rule.min_chars:
            # a piece this short is re-checked exactly; longer ones contain letters or are long numbers
            return not is_number_only("".join(self._piece))
        return True


@dataclass(frozen=True)
class LiveLabel:
    segment: str  # "thinking" or "summary" (final unless ``pending``)
    step: int  # index within the segment (final unless ``pending``)
    new_step: bool  # first token of a new step (not the response's first token); False while pending
    pending: bool = False  # the label may still change: no decision is taken on it
    role: str = ""  # the query role StepFlow gives the token: its segment, or "other" (pending, segment open)
    fire: int = -1  # SMI: the thinking step that ended (at the first certain token of the next one), else -1
    fire_summary: int = -1  # SMI at the summary start: the last thinking step, else -1
    resolve: bool = False  # the first certain token after pending ones (their labels were just corrected)


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
        pattern = profile.summary_after or profile.answer_line
        self._marker = regex.compile(pattern) if pattern else None
        self._tail = ""
        self._switch_at: int | None = None  # tokens starting here or later are summary (closing markers)
        self._marker_start: int | None = None  # marker characters start no step (glued to the step before)
        self._final_summary: int | None = None  # plain profile: where the summary starts, once the marker is seen
        self._by_anchor = True  # plain profile: the summary holds tokens whose anchor (else start) is past it
        # recent lines as [start, first non-whitespace position]; the last entry is the current line
        self._lines: deque[list] = deque([[self._pos, None]], maxlen=profile.max_marker_chars + 2)
        self._pending_line: int | None = None  # plain profile: match start whose line anchor is wanted
        self._starts: list[int] = []
        self._anchors: list[int] = []
        self._chars: list[str] = []  # the response's characters (markup-only lead check)
        self._pend: list[int] = []  # indices of the pending tokens (always the last ones)
        self._prev: TokenLabel | None = None  # final label of the last certain token
        self._deferred = [-1, -1]  # SMI events (fire, fire_summary) met at pending tokens
        self.resolved: list[tuple[int, TokenLabel]] = []  # (token index, final label) settled by the last push
        self.texts: list[str] = []

    # -- streaming -------------------------------------------------------------------------------------------
    def push(self, token_id: int) -> LiveLabel:
        text = self._decoder.push(token_id)
        start = self._pos
        self.texts.append(text)
        self._chars.extend(text)
        self._look_for_marker(text, start)
        anchor = start - 1
        for i, ch in enumerate(text):
            pos = start + i
            self._feed(pos, ch)
            if anchor < start and not ch.isspace():
                anchor = pos
        self._pos = start + len(text)
        if self._pending_line is not None:  # plain profile: the marker completed in this token
            h = self._pending_line
            c = self._candidate(h)
            if c is not None and self._is_lead(c, h):
                self._final_summary = c
            else:  # inside a sentence: glued to thinking, the summary starts after the marker
                self._final_summary, self._by_anchor, self._marker_start = self._switch_at, False, h
            self._pending_line = None
        self._starts.append(start)
        self._anchors.append(anchor)
        return self._decide()

    def _decide(self) -> LiveLabel:
        """Settle every token whose label is now certain, in order; the newest one is pending or certain."""
        hold = self._hold()
        i = len(self._starts) - 1
        had_pending = bool(self._pend)
        queue = self._pend + [i]
        self.resolved = []
        new = False
        lab = None
        n = 0
        for j in queue:
            if hold is not None and self._anchors[j] >= hold[0]:
                break
            lab = self._label_now(self._starts[j], self._anchors[j])
            prev = self._prev
            new = prev is not None and (lab.segment, lab.step) != (prev.segment, prev.step)
            if new and lab.segment == "thinking" and lab.step > 0:
                self._deferred[0] = lab.step - 1
            if new and lab.segment == "summary" and prev is not None and prev.segment == "thinking":
                self._deferred[1] = prev.step
            self._prev = lab
            if j != i:
                self.resolved.append((j, lab))
            n += 1
        self._pend = queue[n:]
        if self._pend:  # the newest token is pending: a provisional label, no decision
            assert hold is not None, "tokens stay pending only behind a hold"
            step = bisect.bisect_right(self._thinking.bounds, self._anchors[i])
            return LiveLabel("thinking", step, False, True, "other" if hold[1] else "thinking")
        assert lab is not None, "no token pending: the loop settled the newest one"
        fire, fsum = self._deferred
        self._deferred = [-1, -1]
        return LiveLabel(lab.segment, lab.step, new, False, lab.segment, fire, fsum, had_pending)

    def _label_now(self, start: int, anchor: int) -> TokenLabel:
        """The final label of a token that nothing still to come can change (plain fallback summary aside)."""
        tb = self._thinking.bounds
        if self.profile.answer_line:
            s0, by_anchor = self._final_summary, self._by_anchor
        else:
            s0, by_anchor = self._switch_at, False
        if s0 is not None and (anchor if by_anchor else start) >= s0:
            if by_anchor:  # paragraphs after the summary start
                pb = self._paragraphs.bounds
                return TokenLabel("summary", bisect.bisect_right(pb, anchor) - bisect.bisect_right(pb, s0))
            assert self._summary is not None, "the summary's piece machine starts with the marker that sets s0"
            return TokenLabel("summary", bisect.bisect_right(self._summary.bounds, anchor))
        step = bisect.bisect_right(tb, anchor)
        cut = s0 if (s0 is not None and by_anchor) else self._marker_start
        if cut is not None:  # no thinking step starts inside a marker or past the summary start
            step = min(step, bisect.bisect_left(tb, cut))
        return TokenLabel("thinking", step)

    def _hold(self) -> tuple[int, bool] | None:
        """(position, segment open) from which tokens are pending, or None: the earliest place a summary could
        start (plain profile: the line or step the marker would open) or a step boundary inside a partial marker
        could vanish."""
        if self._marker is None or self._switch_at is not None:
            return None
        tail = self._tail
        t0 = self._pos - len(tail)
        best = None
        i = 0
        while i <= len(tail):
            m = self._marker.search(tail, i, partial=True)
            if m is None:
                break
            cand = self._hold_at(t0 + m.start(), m.start() == len(tail))
            if cand is not None and (best is None or cand[0] < best[0] or (cand[0] == best[0] and cand[1])):
                best = cand
            i = m.start() + 1
        return best

    def _hold_at(self, h: int, empty: bool) -> tuple[int, bool] | None:
        if self.profile.answer_line:
            c = self._candidate(h, empty)
            if c is not None and self._is_lead(c, h):
                return c, True
        if empty:
            return None
        tb = self._thinking.bounds  # a closing (or mid-sentence) marker: only a boundary inside it is open
        k = bisect.bisect_left(tb, h)
        return (tb[k], False) if k < len(tb) else None

    def _candidate(self, h: int, empty: bool = False) -> int | None:
        """The later of the first non-whitespace character of ``h``'s line and the start of the thinking step
        holding ``h`` (:func:`stepscope.steps.answer_candidate`). ``empty``: no marker character yet (``h`` is
        the end of the text): only what already stands can make earlier tokens summary."""
        line = next((a for ls, a in reversed(self._lines) if ls <= h), None)
        if line is None:
            if empty:
                return None
            line = h
        tb = self._thinking.bounds
        k = bisect.bisect_right(tb, h)
        return min(max([line] + tb[max(0, k - 1) : k]), h)

    def _is_lead(self, a: int, b: int) -> bool:
        off = self.prompt_chars
        return not any(self._chars[p - off].isalnum() for p in range(a, b))

    def _feed(self, pos: int, ch: str) -> None:
        if self._switch_at is not None and pos >= self._switch_at:
            assert self._summary is not None, "_look_for_marker sets _switch_at and _summary together"
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
        self._tail = ""
        if self.profile.summary_after:  # a closing marker is glued to the last thinking step
            self._marker_start = tail_start + m.start()
        self._summary = _PieceMachine(SUMMARY_RULE)
        if self.profile.answer_line:
            self._pending_line = tail_start + m.start()  # resolved once this token's characters are fed

    # -- final labels ----------------------------------------------------------------------------------------
    def finish(self) -> tuple[list[TokenLabel], str]:
        """Final labels of the response tokens pushed so far, and a note when a segment is missing."""
        note = ""
        spans = list(zip(self._starts, self._anchors))
        if not (self.profile.answer_line and self._final_summary is None):
            if self.profile.summary_after and self._switch_at is None:
                note = f"no summary marker ({self.profile.summary_after}) in the response"
            return [self._label_now(start, anchor) for start, anchor in spans], note
        # plain profile without an answer line: the last paragraph (known only now) is the summary
        summary_start = None
        if self.profile.last_paragraph:
            if self._paragraphs.bounds:
                summary_start = self._paragraphs.bounds[-1]
            else:
                note = "no answer line and a single paragraph: no summary"
        thinking_bounds, summary_bounds = self._thinking.bounds, []
        if summary_start is not None:
            thinking_bounds = [b for b in thinking_bounds if b < summary_start]
            summary_bounds = [b for b in self._paragraphs.bounds if b > summary_start]
        labels = []
        for _, anchor in spans:
            in_summary = summary_start is not None and anchor >= summary_start
            bounds = summary_bounds if in_summary else thinking_bounds
            labels.append(TokenLabel("summary" if in_summary else "thinking", bisect.bisect_right(bounds, anchor)))
        return labels, note
