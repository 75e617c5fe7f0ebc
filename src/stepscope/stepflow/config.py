"""StepFlow settings (frozen) and their resolution against a model's depth."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..bands import Bands
from ..defaults import ALPHA, BAND_FRACTION, TAU_MAX
from ..errors import StepscopeError
from .intervention import register_intervention

if TYPE_CHECKING:
    from .handle import InterventionHandle
    from .intervention import Edit


@register_intervention
@dataclass(frozen=True)
class StepFlowConfig:
    """Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers).

    An intervention (:mod:`stepscope.stepflow.intervention`) composed of two edits, :class:`~.oeb_edit.OEBEdit`
    and :class:`~.smi_edit.SMIEdit`; ``oeb=False`` / ``smi=False`` leave one out.

    ``oeb_layers`` / ``smi_layers``: explicit layer indices, or None for the bottom / top ``band_fraction`` of
    layers (rounded up). ``tau_max``: the bridge mass OEB lifts a head to (at most). ``alpha``: SMI strength.
    ``smi_window``: average only the last ``w`` tokens of the finished step (None: the whole step).
    ``smi_at_summary``: also inject at the first summary token. ``sink_tokens``: leading tokens of each sequence
    that count as ``other`` (attention sinks) besides padding.
    """

    oeb: bool = True
    oeb_layers: tuple[int, ...] | None = None
    tau_max: float = TAU_MAX
    eps: float = 1e-6
    smi: bool = True
    smi_layers: tuple[int, ...] | None = None
    alpha: float = ALPHA
    smi_window: int | None = None
    smi_at_summary: bool = False
    band_fraction: float = BAND_FRACTION
    sink_tokens: int = 1

    kind: ClassVar[str] = "stepflow"
    label: ClassVar[str] = "StepFlow"

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
                object.__setattr__(self, name, tuple(sorted({int(x) for x in v})))

    def resolve(self, num_layers: int, windows=None) -> ResolvedStepFlow:
        """The bands for a model of ``num_layers`` layers; ``windows`` (per layer, the sliding window or None,
        :func:`stepscope.windows.layer_windows`) lets the printout mark sliding layers and generation skip default
        OEB layers whose window no longer holds a bridge key."""
        bands = Bands(num_layers, self.band_fraction)
        oeb = self.oeb_layers if self.oeb_layers is not None else tuple(bands.shallow)
        smi = self.smi_layers if self.smi_layers is not None else tuple(bands.deep)
        for name, layers in (("OEB", oeb), ("SMI", smi)):
            bad = [x for x in layers if not 0 <= x < num_layers]
            if bad:
                raise StepscopeError(f"{name} layers {bad} are out of range for a model with {num_layers} layers "
                                     f"(valid: 0-{num_layers - 1})")
        windows = tuple(windows) if windows is not None else ()
        if windows and len(windows) != num_layers:
            raise StepscopeError(f"{len(windows)} layer windows for a model with {num_layers} layers")
        return ResolvedStepFlow(self, frozenset(oeb if self.oeb else ()), frozenset(smi if self.smi else ()),
                                num_layers, windows)

    def layers(self, num_layers: int) -> frozenset[int]:
        resolved = self.resolve(num_layers)
        return resolved.oeb_layers | resolved.smi_layers

    def start(self, handle: InterventionHandle) -> list[Edit]:
        """OEB then SMI, on ``handle``'s model; feeds the flow monitor."""
        from .oeb_edit import OEBEdit
        from .smi_edit import SMIEdit

        resolved = self.resolve(handle.num_layers, handle.windows or None)
        warn_hand_sliding(resolved)
        handle.monitor_bands = (resolved.oeb_layers, resolved.smi_layers)
        return [OEBEdit(handle, self, resolved), SMIEdit(handle, self, resolved)]

    def describe(self, num_layers: int | None = None) -> str:
        if num_layers is not None:
            return self.resolve(num_layers).describe()
        parts = [f"OEB on {'layers ' + _ranges(self.oeb_layers) if self.oeb_layers is not None else 'the bottom band'}"
                 f" (tau_max={self.tau_max})" if self.oeb else "OEB off",
                 f"SMI on {'layers ' + _ranges(self.smi_layers) if self.smi_layers is not None else 'the top band'}"
                 f" (alpha={self.alpha})" if self.smi else "SMI off"]
        return "StepFlow: " + "; ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("oeb_layers", "smi_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StepFlowConfig:
        kwargs: dict[str, Any] = {k: (tuple(v) if k.endswith("_layers") and v is not None else v) for k, v in d.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class ResolvedStepFlow:
    config: StepFlowConfig
    oeb_layers: frozenset[int]
    smi_layers: frozenset[int]
    num_layers: int
    windows: tuple = ()  # per layer: sliding window in tokens, or None (full attention); () when unknown

    @property
    def oeb_default(self) -> bool:
        """Whether the OEB band is the default one (not given by hand): generation then skips its sliding layers
        at the decoding steps where their window holds no bridge key."""
        return self.config.oeb_layers is None

    def sliding(self, layers) -> list[int]:
        """Those of ``layers`` that use a sliding window."""
        return [x for x in sorted(layers) if self.windows and self.windows[x] is not None]

    def describe(self) -> str:
        c = self.config
        w = self.windows
        parts = []
        parts.append(f"OEB on layers {_ranges(self.oeb_layers, w)} (tau_max={c.tau_max})" if self.oeb_layers
                     else "OEB off")
        if self.smi_layers:
            what = "whole previous step" if c.smi_window is None else f"last {c.smi_window} tokens of the step"
            at = ", also at the summary start" if c.smi_at_summary else ""
            parts.append(f"SMI on layers {_ranges(self.smi_layers, w)} (alpha={c.alpha}, {what}{at})")
        else:
            parts.append("SMI off")
        text = f"StepFlow for {self.num_layers} layers: " + "; ".join(parts)
        slid = sorted({w[x] for x in self.sliding(self.oeb_layers | self.smi_layers)})
        if slid:
            text += f" [s: sliding-window layer, {'/'.join(str(x) for x in slid)} tokens"
            if self.sliding(self.oeb_layers) and self.oeb_default:
                text += "; OEB skips one while its window holds no bridge key"
            text += "]"
        return text


def warn_hand_sliding(resolved: ResolvedStepFlow) -> None:
    """OEB layers given by hand that use a sliding window are kept, with a warning: they edit only while a bridge
    key is inside the window (the default band skips them where it is not)."""
    slid = resolved.sliding(resolved.oeb_layers)
    if slid and not resolved.oeb_default:
        sizes = "/".join(str(w) for w in sorted({resolved.windows[x] for x in slid}))
        warnings.warn(f"OEB layers {','.join(map(str, slid))} were given by hand and use a sliding window ({sizes} "
                      "tokens): they edit only while a bridge key (the question, or the thinking for the summary) "
                      "is inside the window; kept as given", stacklevel=4)


def _ranges(layers, windows=()) -> str:
    """'0-3,8'; with ``windows``, runs split where the attention kind changes and sliding runs marked: '0s,1,2-3s'."""
    xs = sorted(layers)

    def slides(x):
        return bool(windows) and windows[x] is not None

    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1 or slides(xs[i + 1]) != slides(x):
            mark = "s" if slides(x) else ""
            out.append(f"{start}{mark}" if start == x else f"{start}-{x}{mark}")
            start = None
    return ",".join(out)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'0-7', '0,2,4', '24-27,30' -> tuple of ints; None/'' -> None (use the default band)."""
    if not text:
        return None
    out: list[int] = []
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
