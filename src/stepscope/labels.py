"""Per-position segment/step labels of a left-padded batch, as tensors that attention edits can index.

During generation the labels grow one column per step (live labels from :class:`StepTracker`); for a
teacher-forced pass over finished traces they are replayed from the token ids, so a full pass sees exactly the
labels the decode steps saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .profiles import FormatProfile
from .tracker import LiveLabel, StepTracker

OTHER, QUESTION, THINKING, SUMMARY = 0, 1, 2, 3


@dataclass
class BatchLabels:
    """Labels of positions ``0..length-1`` of every row (padding and the first real token are OTHER).

    ``table`` holds four (B, capacity) long planes: ``segment``, ``step`` (index within the segment), ``fire`` (at
    the first token of thinking step s >= 1, the index s-1 of the step that just ended; -1 elsewhere) and
    ``fire_summary`` (at the first summary token, the index of the last thinking step; -1 elsewhere). Positions
    at or past ``length`` are OTHER, so a preallocated (static) cache's empty slots read as OTHER.

    ``length`` is the host's count; ``filled`` is the same count as a 0-d tensor on the labels' device, which is
    what attention edits read, so that a compiled decoding step never reads host state that changes per token.
    """

    table: torch.Tensor  # (4, B, capacity) long
    length: int = 0
    filled: torch.Tensor | None = None

    def __post_init__(self):
        if self.filled is None:
            self.filled = torch.tensor(self.length, dtype=torch.long, device=self.table.device)
        mark_static(self.table, self.filled)

    @classmethod
    def empty(cls, batch: int, capacity: int, device) -> BatchLabels:
        fill = torch.tensor([OTHER, 0, -1, -1], dtype=torch.long, device=device)
        return cls(fill[:, None, None].expand(4, batch, capacity).clone(), 0)

    @classmethod
    def from_planes(cls, segment, step, fire, fire_summary, length: int) -> BatchLabels:
        return cls(torch.stack([segment, step, fire, fire_summary]), length)

    segment = property(lambda self: self.table[0])
    step = property(lambda self: self.table[1])
    fire = property(lambda self: self.table[2])
    fire_summary = property(lambda self: self.table[3])

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
        """(4, B, len(pos)) labels at positions ``pos``."""
        return self.table.index_select(2, pos)


def mark_static(*tensors) -> None:
    """Mark CUDA state buffers as fixed addresses, so that CUDA graphs of a compiled step use them in place."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t.is_cuda:
            torch._dynamo.markmark_static(t)


def _codes(lab: LiveLabel | None, prev: LiveLabel | None) -> tuple[int, int, int, int]:
    """(segment, step, fire, fire_summary) of one pushed token."""
    if lab is None:
        return OTHER, 0, -1, -1
    seg = THINKING if lab.segment == "thinking" else SUMMARY
    fire = lab.step - 1 if lab.new_step and seg == THINKING and lab.step > 0 else -1
    fsum = prev.step if lab.new_step and seg == SUMMARY and prev is not None and prev.segment == "thinking" else -1
    return seg, lab.step, fire, fsum


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
    device: object = "cpu"
    capacity: int = 0
    sink_tokens: int = 1
    labels: BatchLabels = field(init=False)
    trackers: list[StepTracker] = field(init=False)
    _last: list[LiveLabel | None] = field(init=False)
    _fired: tuple[bool, bool] = field(default=(False, False), init=False)

    def __post_init__(self):
        width = max(len(p) for p in self.prompts)
        self.labels = BatchLabels.empty(len(self.prompts), max(self.capacity, width + 1), self.device)
        col = torch.tensor([_prompt_segments(len(p), width, self.sink_tokens) for p in self.prompts],
                           dtype=torch.long)
        self.labels.segment[:, :width] = col.to(self.device)
        self.labels.set_length(width)
        self.trackers = [StepTracker(self.tokenizer, self.profile, p) for p in self.prompts]
        self._last = [None] * len(self.prompts)

    def push(self, tokens: list[int | None]) -> list[LiveLabel | None]:
        """Append one token per row (``None`` for a finished row, which is labelled OTHER)."""
        out: list[LiveLabel | None] = []
        codes = []
        for b, tok in enumerate(tokens):
            lab = None if tok is None else self.trackers[b].push(tok)
            codes.append(_codes(lab, self._last[b]))
            if lab is not None:
                self._last[b] = lab
            out.append(lab)
        self._fired = (any(c[2] >= 0 for c in codes), any(c[3] >= 0 for c in codes))
        L = self.labels.length
        self.labels.ensure(L + 1)
        cols = torch.tensor(codes, dtype=torch.long).T  # (4, B)
        if self.labels.table.is_cuda:  # an asynchronous copy: the host does not wait for the GPU here
            cols = cols.pin_memory().to(self.labels.table.device, non_blocking=True)
        self.labels.table[:, :, L] = cols
        self.labels.set_length(L + 1)
        return out

    def fired(self, at_summary: bool = False) -> bool:
        """Whether some row's last pushed token starts a thinking step (or the summary): host knowledge, which
        eager decoding uses to skip SMI's work without reading the device."""
        step, summary = self._fired
        return step or (at_summary and summary)


def replay_labels(tokenizer, rows: list[tuple[list[int], int, FormatProfile]], device="cpu",
                  sink_tokens: int = 1) -> BatchLabels:
    """Live labels of finished sequences ``(token_ids, prompt_len, profile)``, right-aligned (left-padded) to one
    width, exactly as generation would have produced them."""
    width = max(len(ids) for ids, _, _ in rows)
    table = []
    for ids, p, profile in rows:
        tracker, prev = StepTracker(tokenizer, profile, ids[:p]), None
        row = [(s, 0, -1, -1) for s in _prompt_segments(p, width - len(ids) + p, sink_tokens)]
        for tok in ids[p:]:
            lab = tracker.push(tok)
            row.append(_codes(lab, prev))
            prev = lab
        table.append(row)
    t = torch.tensor(table, dtype=torch.long, device=device)  # (B, width, 4)
    return BatchLabels(t.permute(2, 0, 1).contiguous(), width)
