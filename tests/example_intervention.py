"""A test-only intervention plug-in, written as a user would write one: one module plus a registration.

``question_boost`` multiplies the attention every thinking query gives the question's keys by ``beta`` and
renormalises (a bias of ``log(beta)`` on those logits), in the chosen layers. It edits the attention weights, so
it also tells Step-Saliency which weights the layer used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from stepscope.attention.scores import compute_dtype, log_normaliser, logits_block
from stepscope.labels import QUESTION, THINKING
from stepscope.stepflow.intervention import Edit, register_intervention


def boost_mask(q_seg: torch.Tensor, k_seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, q, k): thinking query rows x question key columns."""
    return (q_seg == THINKING)[:, None, :, None] & (k_seg == QUESTION)[:, None, None, :]


@register_intervention
@dataclass(frozen=True)
class QuestionBoost:
    beta: float = 2.0
    on_layers: tuple[int, ...] | None = None  # None: every layer

    kind: ClassVar[str] = "question_boost"
    label: ClassVar[str] = "question boost"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError("beta must be positive")

    def layers(self, num_layers: int) -> frozenset[int]:
        return frozenset(range(num_layers)) if self.on_layers is None else frozenset(self.on_layers)

    def start(self, handle) -> list[Edit]:
        return [BoostEdit(handle, self)]

    def describe(self, num_layers: int | None = None) -> str:
        where = "every layer" if self.on_layers is None else f"layers {list(self.on_layers)}"
        return f"question boost x{self.beta:g} on {where}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["on_layers"] = None if self.on_layers is None else list(self.on_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuestionBoost:
        layers = d.get("on_layers")
        return cls(float(d.get("beta", 2.0)), None if layers is None else tuple(layers))


class BoostEdit(Edit):
    def __init__(self, handle, spec: QuestionBoost):
        self.handle, self.log_beta = handle, math.log(spec.beta)
        self.layers = spec.layers(handle.num_layers)
        self.boosted: torch.Tensor | None = None

    def reset(self, labels) -> None:
        self.boosted = torch.zeros(labels.segment.shape[0], dtype=torch.float64, device=labels.table.device)

    def _probs(self, call, logits, mask):
        z = logits + self.log_beta * mask.to(logits.dtype)
        return torch.nan_to_num(torch.exp(z - log_normaliser(call, z)[..., None]), nan=0.0)

    def attend(self, call, views, out, weights):
        _, H, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        mask = boost_mask(views.q_seg, views.k_seg)  # (B, 1, Tq, Tk)
        logits = logits_block(call, slice(None), 0, Tq, 0, Tk, self.handle.query_offset(Tq, Tk))
        probs = self._probs(call, logits, mask)  # (B, H, Tq, Tk)
        value = compute_dtype(call.value).repeat_interleave(H // call.value.shape[1], dim=1)
        ours = (probs @ value).transpose(1, 2)  # (B, Tq, H, D)
        rows = mask.any(-1)[:, 0]  # (B, Tq) queries the boost touches
        if self.boosted is not None:
            self.boosted += rows.sum(-1).to(self.boosted.dtype)
        out = torch.where(rows[:, :, None, None], ours.to(out.dtype), out)
        if weights is not None:
            probs = torch.where(rows[:, None, :, None], probs.to(weights.dtype), weights)
        return out, probs.to(call.query.dtype) if weights is None else probs

    def saliency_edit(self, layer: int):
        if layer not in self.layers:
            return None
        labels = self.handle.bound_labels

        def edit(call, b, q0, q1, k0, k1, logits):
            mask = boost_mask(labels.role[b : b + 1, q0:q1], labels.segment[b : b + 1, k0:k1])[0]
            return self._probs(call, logits, mask)

        return edit

    def row_stats(self) -> list[dict]:
        if self.boosted is None:
            return []
        return [{"question_boost_queries": int(x)} for x in self.boosted.cpu()]
