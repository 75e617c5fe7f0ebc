"""A batch of token sequences as the model takes it: left-padded ids, attention mask and positions, on the
model's device. Generation, Step-Saliency and StepFlow's teacher-forced passes all lay batches out this way."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where inputs go."""
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id (0 when it has none: padded positions are masked out anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return pad if pad is not None else 0


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, width): each row right-aligned, ``pad`` and mask 0 before it."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask: 0 at each row's first real token (padding also reads 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # (B, width) left-padded token ids
    mask: torch.Tensor  # (B, width) 1 on real tokens
    positions: torch.Tensor  # (B, width)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def forward_kwargs(self) -> dict:
        """``input_ids``, ``attention_mask`` and ``position_ids`` for a model call."""
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.positions}


def pad_batch(model, tokenizer, rows: list[list[int]]) -> Batch:
    """``rows`` of token ids left-padded with the tokenizer's pad id, on the model's device."""
    ids, mask = left_pad(rows, pad_id(tokenizer), model_device(model))
    return Batch(ids, mask, positions(mask))
