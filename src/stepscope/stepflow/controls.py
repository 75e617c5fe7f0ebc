"""Null versions of StepFlow's two edits, for controls in the flow analysis (teacher-forced passes only).

* ``random_bridge``: OEB as configured, but the group it lifts to ``tau_B`` is a random set of keys of the
  bridge's size, drawn per query from the keys OEB redistributes (bridge + current segment, causally visible);
  the rest of those keys play the current segment. Same sizes, same targets: only *which* keys get lifted differs.
* ``random_momentum``: SMI as configured, but each head's injected vector ``alpha * m`` is replaced by a random
  direction with the same norm.

The draws are a fixed function of ``seed`` (and of the layer for SMI), so the forward pass, its recomputation
inside Step-Saliency and the rebuilt attention weights all see the same control. Kept out of :mod:`.handle`: a
subclass overrides the two places where groups and injections are made.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from ..attention.dispatch import AttentionCall, install, interface_layers, require_interface
from ..attention.scores import log_normaliser
from ..batch import model_device
from ..errors import StepscopeError
from ..labels import replay_labels
from ..profiles import get_profile
from ..trace import Trace
from .config import StepFlowConfig
from .handle import StepFlowHandle
from .oeb import groups, odds_equal_bridge

CONTROL_KINDS = ("random_bridge", "random_momentum")


@dataclass(frozen=True)
class StepFlowControl:
    """Which null edit to make, and the seed of its random draws."""

    kind: str
    seed: int = 0

    def __post_init__(self):
        if self.kind not in CONTROL_KINDS:
            raise StepscopeError(f"unknown StepFlow control {self.kind!r}; choose one of {', '.join(CONTROL_KINDS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def random_groups(segment: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, 1, T, T) key masks: for each query, a random subset of its visible bridge + current keys, as large as
    its bridge. ``segment``: (B, T) segment labels of the whole (left-padded) sequences."""
    B, T = segment.shape
    bridge, current, _ = groups(segment, segment)  # (B, 1, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    pool = (bridge | current) & causal
    size = (bridge & causal).sum(-1, keepdim=True)  # (B, 1, T, 1)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand((B, 1, T, T), generator=gen, dtype=torch.float64).to(segment.device)
    u = u.masked_fill(~pool, 2.0)  # ineligible keys sort last
    rank = u.argsort(-1).argsort(-1)
    return pool & (rank < size)


class ControlHandle(StepFlowHandle):
    """A StepFlow handle whose bridge group or momentum vector is replaced by its random control."""

    control: StepFlowControl
    _random_bridge: torch.Tensor | None = None

    def bind_labels(self, labels) -> None:
        super().bind_labels(labels)
        if self.control.kind == "random_bridge":
            self._random_bridge = random_groups(labels.segment[:, : labels.length], self.control.seed)

    def _views(self, Tq: int, Tk: int):
        v = super()._views(Tq, Tk)
        if self._random_bridge is None:
            return v
        rb = self._random_bridge.index_select(2, v.q_pos).index_select(3, v.k_pos)
        pool = v.bridge | v.current
        return dataclasses.replace(v, bridge=rb, current=pool & ~rb)

    def _smi(self, call, out, fire, k_seg, k_step):
        edited = super()._smi(call, out, fire, k_seg, k_step)
        if self.control.kind != "random_momentum":
            return edited
        delta = edited - out  # (B, Tq, H, D): alpha * m at firing tokens, zero elsewhere
        norm = delta.double().norm(dim=-1, keepdim=True)
        gen = torch.Generator(device="cpu").manual_seed(int(self.control.seed) * 1009 + int(call.layer_idx))
        noise = torch.randn(delta.shape, generator=gen, dtype=torch.float64).to(delta.device)
        noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norm
        return out + noise.to(out.dtype)

    def saliency_edit(self, layer: int):
        """The attention weights this layer used, for Step-Saliency's rebuild (None: no edit in this layer)."""
        if layer not in self.resolved.oeb_layers or self.config.tau_max == 0:
            return None
        labels, rb = self.bound_labels, self._random_bridge

        def edit(call: AttentionCall, b: int, q0: int, q1: int, k0: int, k1: int, logits: torch.Tensor):
            bridge, current, editable = groups(labels.role[b : b + 1, q0:q1], labels.segment[b : b + 1, k0:k1])
            if rb is not None:
                r = rb[b : b + 1, :, q0:q1, k0:k1]
                bridge, current = r, (bridge | current) & ~r
            res = odds_equal_bridge(logits[None], log_normaliser(call, logits)[None], bridge, current, editable,
                                    self.config.tau_max, self.config.eps)
            return res.probs[0]

        return edit


@contextlib.contextmanager
def teacher_forced_control(model, tokenizer, config: StepFlowConfig, control: StepFlowControl, traces: list[Trace]):
    """Like :func:`~stepscope.stepflow.fullpass.teacher_forced`, with the edit replaced by its control; yields the
    handle (``saliency_edit`` serves Step-Saliency)."""
    resolved = config.resolve(model.config.num_hidden_layers)
    require_interface(model, interface_layers(model), resolved.oeb_layers | resolved.smi_layers,
                      "StepFlow needs softmax attention in the layers it edits")
    handle = ControlHandle(model, tokenizer, config, resolved)
    handle.control = control
    handle._install = install(model, handle, exclusive="stepflow")
    try:
        device = model_device(model)
        rows = [(t.token_ids, t.prompt_len, get_profile(t.profile, tokenizer)) for t in traces]
        handle.bind_labels(replay_labels(tokenizer, rows, device, config.sink_tokens))
        yield handle
    finally:
        handle.remove()
