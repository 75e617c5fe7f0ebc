"""Per-position segment/step labels of a left-padded batch, as tensors that attention edits can index.

During generation the labels grow one column per step (live labels from :class:`StepTracker`); for a
teacher-forced pass over finished traces they are replayed from the token ids (:func:`replay_labels`) or built
from the final step spans (:func:`labels_from_spans`); both give exactly the labels the decode steps saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .profiles import FormatProfile
from .segments import Segment
from .tracker import LiveLabel, StepTracker

if TYPE_CHECKING:
    from .steps import TokenLabel

# plain ints (the Segment codes) for tensor code, compiled decoding included
OTHER, QUESTION, THINKING, SUMMARY = map(int, Segment)

# where label tensors live: anything ``torch.tensor(..., device=)`` and ``Tensor.to`` take
Device = str | torch.device | int


@dataclass
class BatchLabels:
    """Labels of positions ``0..length-1`` of every row (padding and the first real token are OTHER).

    ``table`` holds six (B, capacity) long planes: ``segment`` and ``step`` (index within the segment: the key
    labels, final once certain), ``fire`` (at the first token of thinking step s >= 1, the index s-1 of the step
    that just ended; -1 elsewhere), ``fire_summary`` (at the first summary token, the index of the last thinking
    step; -1 elsewhere), ``role`` (the segment a query acts as: its segment, or OTHER while it was pending with its
    segment open) and ``resolve`` (1 at the first certain token after pending ones). A pending token's SMI event
    moves to that token. Positions at or past ``length`` are OTHER, so a preallocated (static) cache's empty
    slots read as OTHER.

    ``length`` is the host's count; ``filled`` is the same count as a 0-d tensor on the labels' device, which is
    what attention edits read, so that a compiled decoding step never reads host state that changes per token.
    """

    table: torch.Tensor  # (PLANES, B, capacity) long
    length: int = 0
    filled: torch.Tensor = field(init=False)  # 0-d long, made from ``length`` on the table's device

    def __post_init__(self) -> None:
        self.filled = torch.tensor(self.length, dtype=torch.long, device=self.table.device)
        mark_static(self.table, self.filled)

    @classmethod
    def empty(cls, batch: int, capacity: int, device: Device) -> BatchLabels:
        fill = torch.tensor(_EMPTY, dtype=torch.long, device=device)
        return cls(fill[:, None, None].expand(PLANES, batch, capacity).clone(), 0)

    @classmethod
    def from_planes(cls, segment, step, fire, fire_summary, length: int, role=None, resolve=None) -> BatchLabels:
        role = segment.clone() if role is None else role
        resolve = torch.zeros_like(segment) if resolve is None else resolve
        return cls(torch.stack([segment, step, fire, fire_summary, role, resolve]), length)

    @property
    def segment(self) -> torch.Tensor:
        return self.table[0]

    @property
    def step(self) -> torch.Tensor:
        return self.table[1]

    @property
    def fire(self) -> torch.Tensor:
        return self.table[2]

    @property
    def fire_summary(self) -> torch.Tensor:
        return self.table[3]

    @property
    def role(self) -> torch.Tensor:
        return self.table[4]

    @property
    def resolve(self) -> torch.Tensor:
        return self.table[5]

    @property
    def capacity(self) -> int:
        return self.table.shape[2]

    def ensure(self, capacity: int) -> None:
        """Room for ``capacity`` positions (eager only: a compiled step needs the labels sized up front)."""
        cur = self.capacity
        if capacity <= cur:
            return
        grow = max(capacity, 2 * cur) - cur
        more = BatchLabels.empty(self.table.shape[1], grow, self.table.device).table
        self.table = torch.cat([self.table, more], dim=2)
        mark_static(self.table)

    def set_length(self, length: int) -> None:
        self.length = length
        self.filled.fill_(length)  # a device-side write, no synchronisation

    def positions(self, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of a call's ``q_len`` queries and ``k_len`` key slots, from ``filled``.

        The queries are the last ``q_len`` positions. A cache hands attention either the last ``k_len`` positions
        (dynamic caches, sliding windows that are full) or slots ``0..k_len-1`` of a buffer longer than the
        sequence so far (static caches), whose slots past the current length are empty (OTHER, and masked). One
        formula covers both: the keys start at ``max(length - k_len, 0)``.
        """
        n = self.filled
        q = torch.arange(q_len, device=n.device) + (n - q_len)
        k = torch.arange(k_len, device=n.device) + (n - k_len).clamp_min(0)
        return q, k

    def columns(self, pos: torch.Tensor) -> torch.Tensor:
        """(PLANES, B, len(pos)) labels at positions ``pos``."""
        return self.table.index_select(2, pos)


def mark_static(*tensors) -> None:
    """Mark CUDA state buffers as fixed addresses, so that CUDA graphs of a compiled step use them in place."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t.is_cuda:
            torch._dynamo.mark_static_address(t)


PLANES = 6
# one position's labels: (segment, step, fire, fire_summary, role, resolve)
Codes = tuple[int, int, int, int, int, int]
_EMPTY: Codes = (OTHER, 0, -1, -1, OTHER, 0)
_SEG = {"thinking": THINKING, "summary": SUMMARY, "other": OTHER}


def _codes(lab: LiveLabel | None) -> Codes:
    """(segment, step, fire, fire_summary, role, resolve) of one pushed token."""
    if lab is None:
        return _EMPTY
    return _SEG[lab.segment], lab.step, lab.fire, lab.fire_summary, _SEG[lab.role], int(lab.resolve)


def _prompt_segments(prompt_len: int, width: int, sink_tokens: int = 1) -> list[int]:
    """Segments of a prompt right-aligned in ``width`` positions: padding and the sink token(s) are OTHER."""
    pad = width - prompt_len
    sink = min(sink_tokens, prompt_len)
    return [OTHER] * (pad + sink) + [QUESTION] * (prompt_len - sink)


@dataclass
class RowLabeler:
    """Streams tokens of a left-padded batch through one :class:`StepTracker` per row."""

    tokenizer: object
    profile: FormatProfile
    prompts: list[list[int]]
    device: Device = "cpu"
    capacity: int = 0
    sink_tokens: int = 1
    labels: BatchLabels = field(init=False)
    trackers: list[StepTracker] = field(init=False)
    _width: int = field(init=False)
    _fired: tuple[bool, bool] = field(default=(False, False), init=False)
    _resolving: bool = field(default=False, init=False)
    # host knowledge for skipping sliding layers: each row's last role, last question and thinking columns
    _roles: list = field(init=False)
    _question_end: list = field(init=False)
    _think_end: list = field(init=False)
    _active: list = field(init=False)
    listeners: list = field(default_factory=list, init=False)  # called with each push's labels, after it

    def __post_init__(self):
        width = max(len(p) for p in self.prompts)
        self.labels = BatchLabels.empty(len(self.prompts), max(self.capacity, width + 1), self.device)
        col = torch.tensor([_prompt_segments(len(p), width, self.sink_tokens) for p in self.prompts],
                           dtype=torch.long)
        self.labels.segment[:, :width] = col.to(self.device)
        self.labels.role[:, :width] = col.to(self.device)
        self.labels.set_length(width)
        self._width = width
        self.trackers = [StepTracker(self.tokenizer, self.profile, p) for p in self.prompts]
        self._roles = [OTHER] * len(self.prompts)
        self._question_end = [width - 1 if len(p) > self.sink_tokens else None for p in self.prompts]
        self._think_end = [None] * len(self.prompts)
        self._active = [False] * len(self.prompts)

    def push(self, tokens: list[int | None]) -> list[LiveLabel | None]:
        """Append one token per row (``None`` for a finished row, which is labelled OTHER)."""
        out: list[LiveLabel | None] = []
        codes = []
        fixes = []  # (row, column, segment, step): pending tokens whose labels just became certain
        col = self.labels.length
        for b, tok in enumerate(tokens):
            lab = None if tok is None else self.trackers[b].push(tok)
            codes.append(_codes(lab))
            if lab is not None:
                fixes += [(b, self._width + j, _SEG[f.segment], f.step) for j, f in self.trackers[b].resolved]
                for j, f in self.trackers[b].resolved:
                    if f.segment == "thinking":
                        self._think_end[b] = self._width + j
                if not lab.pending and lab.segment == "thinking":
                    self._think_end[b] = col
            self._roles[b], self._active[b] = codes[-1][4], lab is not None
            out.append(lab)
        self._fired = (any(c[2] >= 0 for c in codes), any(c[3] >= 0 for c in codes))
        self._resolving = any(c[5] for c in codes)
        L = self.labels.length
        self.labels.ensure(L + 1)
        if fixes:
            rows, cols, seg, step = (torch.tensor(x, dtype=torch.long, device=self.labels.table.device)
                                     for x in zip(*fixes))
            self.labels.table[0, rows, cols] = seg
            self.labels.table[1, rows, cols] = step
        cols = torch.tensor(codes, dtype=torch.long).T  # (4, B)
        if self.labels.table.is_cuda:  # an asynchronous copy: the host does not wait for the GPU here
            cols = cols.pin_memory().to(self.labels.table.device, non_blocking=True)
        self.labels.table[:, :, L] = cols
        self.labels.set_length(L + 1)
        for listen in self.listeners:
            listen(out)
        return out

    def fired(self, at_summary: bool = False) -> bool:
        """Whether some row's last pushed token starts a thinking step (or the summary): host knowledge, which
        eager decoding uses to skip SMI's work without reading the device."""
        step, summary = self._fired
        return step or (at_summary and summary)

    def active(self, b: int) -> bool:
        """Whether row ``b``'s last pushed token was a real one (not a finished row's filler)."""
        return self._active[b]

    def bridge_out_of_window(self, window: int) -> list[bool]:
        """Per row: the last pushed query sees no bridge key through a sliding ``window`` (keys ``k`` with
        ``q - k < window``): the question for a thinking query, the thinking for a summary query; True as well
        for queries OEB never edits (pending with an open segment, finished rows)."""
        q = self.labels.length - 1
        out = []
        for role, qe, te in zip(self._roles, self._question_end, self._think_end):
            last = qe if role == THINKING else te if role == SUMMARY else None
            out.append(last is None or last <= q - window)
        return out

    def resolving(self) -> bool:
        """Whether some row's last pushed token is the first certain one after pending tokens (host knowledge)."""
        return self._resolving


def replay_labels(tokenizer, rows: list[tuple[list[int], int, FormatProfile]], device="cpu",
                  sink_tokens: int = 1) -> BatchLabels:
    """Live labels of finished sequences ``(token_ids, prompt_len, profile)``, right-aligned (left-padded) to one
    width, exactly as generation would have produced them (pending tokens corrected as generation corrects
    them)."""
    width = max(len(ids) for ids, _, _ in rows)
    table = []
    for ids, p, profile in rows:
        tracker = StepTracker(tokenizer, profile, ids[:p])
        row = [(s, 0, -1, -1, s, 0) for s in _prompt_segments(p, width - len(ids) + p, sink_tokens)]
        first = len(row)
        for tok in ids[p:]:
            row.append(_codes(tracker.push(tok)))
            for j, f in tracker.resolved:
                row[first + j] = (_SEG[f.segment], f.step) + row[first + j][2:]
        table.append(row)
    return _table(table, width, device)


def labels_from_spans(tokenizer, rows: list[tuple[list[int], int, FormatProfile]], device="cpu",
                      sink_tokens: int = 1) -> BatchLabels:
    """The same labels as :func:`replay_labels`, built offline from the finished text: the final step spans
    (:func:`stepscope.steps.plan_response`; the plain profile's last-paragraph fallback, which no generation can
    know, left out), the tokens that were pending (:func:`stepscope.steps.pending_tokens`) and SMI events moved
    from pending tokens to the first certain one after them. No tracker is involved."""
    from dataclasses import replace

    from .steps import label_response_tokens, pending_tokens, plan_response
    from .textmap import offsets_from_texts, token_texts

    width = max(len(ids) for ids, _, _ in rows)
    table = []
    for ids, p, profile in rows:
        texts = token_texts(tokenizer, ids)
        text, offsets = "".join(texts), offsets_from_texts(texts)
        r = offsets[p][0] if p < len(ids) else len(text)
        plan = plan_response(text, r, replace(profile, last_paragraph=False))
        final = label_response_tokens(text, offsets, p, plan)
        pend = pending_tokens(text, offsets, p, profile)
        row = [(s, 0, -1, -1, s, 0) for s in _prompt_segments(p, width - len(ids) + p, sink_tokens)]
        prev: TokenLabel | None = None
        fire, fsum, was_pending = -1, -1, False
        for lab, (pending, open_) in zip(final, pend):
            seg = _SEG[lab.segment]
            new = prev is not None and (lab.segment, lab.step) != (prev.segment, prev.step)
            if new and lab.segment == "thinking" and lab.step > 0:
                fire = lab.step - 1
            if new and lab.segment == "summary" and prev is not None and prev.segment == "thinking":
                fsum = prev.step
            prev = lab
            if pending:
                row.append((seg, lab.step, -1, -1, OTHER if open_ else THINKING, 0))
            else:
                row.append((seg, lab.step, fire, fsum, seg, int(was_pending)))
                fire = fsum = -1
            was_pending = pending
        table.append(row)
    return _table(table, width, device)


def _table(rows: list[list[tuple]], width: int, device) -> BatchLabels:
    t = torch.tensor(rows, dtype=torch.long, device=device)  # (B, width, PLANES)
    return BatchLabels(t.permute(2, 0, 1).contiguous(), width)
