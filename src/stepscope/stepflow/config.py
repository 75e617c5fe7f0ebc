"""StepFlow settings (frozen) and their resolution against a model's depth."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import StepscopeError


@dataclass(frozen=True)
class StepFlowConfig:
    """Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers).

    ``oeb_layers`` / ``smi_layers``: explicit layer indices, or None for the bottom / top ``band_fraction`` of
    layers (rounded up). ``tau_max``: the bridge mass OEB lifts a head to (at most). ``alpha``: SMI strength.
    ``smi_window``: average only the last ``w`` tokens of the finished step (None: the whole step).
    ``smi_at_summary``: also inject at the first summary token. ``sink_tokens``: leading tokens of each sequence
    that count as ``other`` (attention sinks) besides padding.
    """

    oeb: bool = True
    oeb_layers: tuple[int, ...] | None = None
    tau_max: float = 0.15
    eps: float = 1e-6
    smi: bool = True
    smi_layers: tuple[int, ...] | None = None
    alpha: float = 0.06
    smi_window: int | None = None
    smi_at_summary: bool = False
    band_fraction: float = 0.25
    sink_tokens: int = 1

    def __post_init__(self):
        if not 0 <= self.tau_max < 1:
            raise StepscopeError(f"tau_max must be in [0, 1), got {self.tau_max}")
        if self.alpha < 0:
            raise StepscopeError(f"alpha must be >= 0, got {self.alpha}")
        if not 0 < self.eps < 0.1:
            raise StepscopeError(f"eps must be in (0, 0.1), got {self.eps}")
        if self.smi_window is not None and self.smi_window < 1:
            raise StepscopeError(f"smi_window must be a positive number of tokens, got {self.smi_window}")
        if not 0 < self.band_fraction <= 0.5:
            raise StepscopeError(f"band_fraction must be in (0, 0.5], got {self.band_fraction}")
        if self.sink_tokens < 0:
            raise StepscopeError("sink_tokens must be >= 0")
        for name in ("oeb_layers", "smi_layers"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(sorted(set(int(x) for x in v))))

    def resolve(self, num_layers: int) -> "ResolvedStepFlow":
        k = max(1, math.ceil(num_layers * self.band_fraction))
        oeb = self.oeb_layers if self.oeb_layers is not None else tuple(range(0, k))
        smi = self.smi_layers if self.smi_layers is not None else tuple(range(num_layers - k, num_layers))
        for name, layers in (("OEB", oeb), ("SMI", smi)):
            bad = [x for x in layers if not 0 <= x < num_layers]
            if bad:
                raise StepscopeError(f"{name} layers {bad} are out of range for a model with {num_layers} layers "
                                     f"(valid: 0-{num_layers - 1})")
        return ResolvedStepFlow(self, frozenset(oeb if self.oeb else ()), frozenset(smi if self.smi else ()),
                                num_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("oeb_layers", "smi_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepFlowConfig":
        return cls(**{k: (tuple(v) if k.endswith("_layers") and v is not None else v) for k, v in d.items()})


@dataclass(frozen=True)
class ResolvedStepFlow:
    config: StepFlowConfig
    oeb_layers: frozenset[int]
    smi_layers: frozenset[int]
    num_layers: int

    def describe(self) -> str:
        c = self.config
        parts = []
        parts.append(f"OEB on layers {_ranges(self.oeb_layers)} (tau_max={c.tau_max})" if self.oeb_layers
                     else "OEB off")
        if self.smi_layers:
            w = "whole previous step" if c.smi_window is None else f"last {c.smi_window} tokens of the step"
            at = ", also at the summary start" if c.smi_at_summary else ""
            parts.append(f"SMI on layers {_ranges(self.smi_layers)} (alpha={c.alpha}, {w}{at})")
        else:
            parts.append("SMI off")
        return f"StepFlow for {self.num_layers} layers: " + "; ".join(parts)


def _ranges(layers) -> str:
    xs = sorted(layers)
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'0-7', '0,2,4', '24-27,30' -> tuple of ints; None/'' -> None (use the default band)."""
    if not text:
        return None
    out = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise StepscopeError(f"cannot read layer list {text!r}; write it like 0-7 or 0,2,4") from None
    return tuple(out)
