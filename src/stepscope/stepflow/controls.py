"""Null versions of StepFlow's two edits, for controls in the flow analysis (teacher-forced passes only).

* ``random_bridge``: OEB as configured, but the group it lifts to ``tau_B`` is a random set of keys of the
  bridge's size, drawn per query from the keys OEB redistributes (bridge + current segment, causally visible);
  the rest of those keys play the current segment. Same sizes, same targets: only *which* keys get lifted differs.
* ``random_momentum``: SMI as configured, but each head's injected vector ``alpha * m`` is replaced by a random
  direction with the same norm.

The draws are a fixed function of ``seed`` (and of the layer for SMI), so the forward pass, its recomputation
inside Step-Saliency and the rebuilt attention weights all see the same control. Each control is an edit that
subclasses the real one and overrides where its groups or injections are made; :class:`ControlledStepFlow` is
the intervention that composes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import StepscopeError
from .config import StepFlowConfig
from .intervention import Edit, register_intervention
from .oeb import groups
from .oeb_edit import OEBEdit
from .smi_edit import SMIEdit

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


class RandomBridgeOEB(OEBEdit):
    """OEB whose lifted group is a random set of keys of the bridge's size (fixed by the seed per batch)."""

    def __init__(self, handle, config, resolved, seed: int):
        super().__init__(handle, config, resolved)
        self.seed = seed
        self._random: torch.Tensor | None = None

    def reset(self, labels) -> None:
        super().reset(labels)
        self._random = random_groups(labels.segment[:, : labels.length], self.seed)

    def groups(self, views):
        if self._random is None:
            raise StepscopeError("the random-bridge control needs labels bound first")
        rb = self._random.index_select(2, views.q_pos).index_select(3, views.k_pos)
        pool = views.bridge | views.current
        return rb, pool & ~rb, views.editable

    def block_groups(self, labels, b, q0, q1, k0, k1):
        bridge, current, editable = super().block_groups(labels, b, q0, q1, k0, k1)
        if self._random is None:
            raise StepscopeError("the random-bridge control needs labels bound first")
        r = self._random[b : b + 1, :, q0:q1, k0:k1]
        return r, (bridge | current) & ~r, editable


class RandomMomentumSMI(SMIEdit):
    """SMI whose injected vector is a random direction with the norm of ``alpha * m`` (per head and token)."""

    def __init__(self, handle, config, resolved, seed: int):
        super().__init__(handle, config, resolved)
        self.seed = seed

    def inject_many(self, call, out, fire, k_seg, k_step):
        delta = super().inject_many(call, out, fire, k_seg, k_step) - out  # alpha * m at firing tokens, else 0
        norm = delta.double().norm(dim=-1, keepdim=True)
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1009 + int(call.layer_idx))
        noise = torch.randn(delta.shape, generator=gen, dtype=torch.float64).to(delta.device)
        noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norm
        return out + noise.to(out.dtype)


@register_intervention
@dataclass(frozen=True)
class ControlledStepFlow:
    """StepFlow with one edit replaced by its control (an intervention like any other, for teacher-forced passes:
    the random draws are made per bound batch of finished traces)."""

    stepflow: StepFlowConfig
    control: StepFlowControl

    kind: ClassVar[str] = "stepflow_control"
    label: ClassVar[str] = "StepFlow control"
    decodes: ClassVar[bool] = False  # the random draws cover a finished sequence: teacher-forced passes only

    def layers(self, num_layers: int) -> frozenset[int]:
        return self.stepflow.layers(num_layers)

    def start(self, handle) -> list[Edit]:
        resolved = self.stepflow.resolve(handle.num_layers)
        seed, cfg = self.control.seed, self.stepflow
        oeb = (RandomBridgeOEB(handle, cfg, resolved, seed) if self.control.kind == "random_bridge"
               else OEBEdit(handle, cfg, resolved))
        smi = (RandomMomentumSMI(handle, cfg, resolved, seed) if self.control.kind == "random_momentum"
               else SMIEdit(handle, cfg, resolved))
        return [oeb, smi]

    def describe(self, num_layers: int | None = None) -> str:
        return f"{self.stepflow.describe(num_layers)} [control: {self.control.kind}, seed {self.control.seed}]"

    @property
    def sink_tokens(self) -> int:
        return self.stepflow.sink_tokens

    def to_dict(self) -> dict:
        return {"stepflow": self.stepflow.to_dict(), "control": self.control.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ControlledStepFlow:
        return cls(StepFlowConfig.from_dict(d["stepflow"]), StepFlowControl(**d["control"]))
