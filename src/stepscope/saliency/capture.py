"""An attention handler that keeps what Step-Saliency needs from a layer: the call's inputs and dL/dO."""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field

import torch

from ..attention.dispatch import AttentionCall


@dataclass
class LayerRecord:
    call: AttentionCall | None  # None once the layer is pooled (its Q/K/V freed)
    grad_out: torch.Tensor | None = None


@dataclass
class Capture:
    """Records calls of the layers in ``wanted`` (None: none) and hooks the gradient at their outputs."""

    wanted: Container[int] | None = None
    seen: set[int] = field(default_factory=set)
    records: dict[int, LayerRecord] = field(default_factory=dict)
    on_grad: Callable[[int, LayerRecord], None] | None = None  # optional callback once dL/dO has arrived

    def __call__(self, call: AttentionCall, proceed):
        out, weights = proceed(call)
        layer = call.layer_idx
        self.seen.add(layer)
        if self.wanted is not None and layer in self.wanted and torch.is_grad_enabled() and out.requires_grad:
            kept = AttentionCall(call.module, call.query.detach(), call.key.detach(), call.value.detach(),
                                 call.attention_mask, call.kwargs)
            rec = LayerRecord(kept)
            self.records[layer] = rec

            def hook(grad, rec=rec, layer=layer):
                rec.grad_out = grad.detach()
                if self.on_grad is not None:
                    self.on_grad(layer, rec)

            out.register_hook(hook)
        return out, weights
