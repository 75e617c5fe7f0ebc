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

    ``fire[b, t]``: at the first token of thinking step s >= 1, the index s-1 of the step that just ended;
    ``fire_summary[b, t]``: at the first summary token, the index of the last thinking step; -1 elsewhere.
    """

    segment: torch.Tensor  # (B, capacity) long
    step: torch.Tensor  # (B, capacity) long, index within the segment
    fire: torch.Tensor  # (B, capacity) long
    fire_summary: torch.Tensor  # (B, capacity) long
    length: int = 0

    @classmethod
    def empty(cls, batch: int, capacity: int, device) -> "BatchLabels":
        def full(v):
            return torch.full((batch, capacity), v, dtype=torch.long, device=device)

        return cls(full(OTHER), full(0), full(-1), full(-1), 0)

    def ensure(self, capacity: int) -> None:
        cur = self.segment.shape[1]
        if capacity <= cur:
            return
        grow = max(capacity, 2 * cur) - cur
        pad = {"segment": OTHER, "step": 0, "fire": -1, "fire_summary": -1}
        for name, v in pad.items():
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_full((t.shape[0], grow), v)], dim=1))

    def window(self, q_len: int, k_len: int):
        """Labels of the current call's queries (last ``q_len`` positions) and keys (last ``k_len``)."""
        L = self.length
        q = slice(L - q_len, L)
        k = slice(L - k_len, L)
        return (self.segment[:, q], self.step[:, q], self.fire[:, q], self.fire_summary[:, q]), (
            self.segment[:, k],
            self.step[:, k],
        )


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

    def __post_init__(self):
        width = max(len(p) for p in self.prompts)
        self.labels = BatchLabels.empty(len(self.prompts), max(self.capacity, width + 1), self.device)
        col = torch.tensor([_prompt_segments(len(p), width, self.sink_tokens) for p in self.prompts],
                           dtype=torch.long)
        self.labels.segment[:, :width] = col.to(self.device)
        self.labels.length = width
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
        L = self.labels.length
        self.labels.ensure(L + 1)
        cols = torch.tensor(codes, dtype=torch.long).T.to(self.device)
        lab = self.labels
        lab.segment[:, L], lab.step[:, L], lab.fire[:, L], lab.fire_summary[:, L] = cols
        lab.length = L + 1
        return out


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
    return BatchLabels(t[..., 0].clone(), t[..., 1].clone(), t[..., 2].clone(), t[..., 3].clone(), width)
